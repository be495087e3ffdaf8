"""What a crosscoder learned: reconstruction per model, latents shared or owned by one model, splicing.

* :func:`evaluate_crosscoder`: per model, explained variance ``1 - sum ||x - x_hat||^2 / sum ||x -
  mean||^2`` (variance about the mean), and for the shared code ``l0`` (mean active latents per token)
  and ``dead_fraction`` (latents that never fire on the data).
* :func:`latent_stats`: per latent the relative decoder norm ``rho = ||d_b|| / (||d_a|| + ||d_b||)`` and
  a class (Minder et al. 2025's bands): **A-only** ``rho < 0.1``, **B-only** ``rho > 0.9``, **shared**
  ``0.3 <= rho <= 0.7``, **other** in between; dead latents get no class. The cosine of a shared
  latent's two decoder rows is reported only when ``d_a == d_b`` (otherwise the two rows live in
  spaces of different dimension and the cosine is undefined: ``null``). Counts, a histogram of rho
  over live latents, and the Latent Scaling check of :func:`latent_scaling`.
* :func:`latent_scaling` (Minder et al. 2025): for a latent ``j`` with decoders ``d_a``, ``d = d_b`` and
  activation ``f``, the best scalars ``beta_m = argmin_beta sum ||beta f d - y_m||^2 = sum f <d, y_m> /
  (||d||^2 sum f^2)`` for each model's reconstruction error with the latent's own contribution added
  back, ``y_a = u_a - u_hat_a + f d_a`` and ``y_b = u_b - u_hat_b + f d``; ``nu = beta_a / beta_b``: how
  much of B's direction A carries where the latent fires. A latent that is truly B-only has ``nu`` near
  0; a latent whose direction is also missing from A's reconstruction (an L1 artefact, "complete
  shrinkage") has ``nu`` near 1, as has a shared latent. For a B-only latent (``d_a = 0``) this is
  Minder et al.'s error target; adding ``f d_a`` back extends it to any latent. Defined only when ``d_a
  == d_b`` (A's target must live in the space of ``d``); ``None`` otherwise.
* :func:`splice_metrics`: per model, CE loss recovered and KL score of splicing that model's
  reconstruction into it at one hook (the crosscoder reads both models, so both run on each text).
  Only paired positions kept by the crosscoder's sink rule in both models are replaced (attention
  sinks, norm outliers and unpaired tokens keep the model's own activation); the zero-ablation baseline zeroes the same positions; CE and KL
  are averaged over those positions (CE where a next token exists).
* :func:`prompt_max_latents` / :func:`auroc`: the largest activation of chosen latents over each
  prompt's paired positions, and the rank AUROC at separating two prompt sets (organism diffing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rosettalens.crosscoder.model import CrossCoder
from rosettalens.errors import DataError, ShapeError

__all__ = [
    "A_ONLY_MAX",
    "B_ONLY_MIN",
    "SHARED_RANGE",
    "auroc",
    "classify_latents",
    "evaluate_crosscoder",
    "latent_scaling",
    "latent_stats",
    "prompt_max_latents",
    "splice_metrics",
    "summarize",
]

A_ONLY_MAX = 0.1  # rho < 0.1: A-only
B_ONLY_MIN = 0.9  # rho > 0.9: B-only
SHARED_RANGE = (0.3, 0.7)  # 0.3 <= rho <= 0.7: shared


def _rows(x_a: Tensor, x_b: Tensor, batch_size: int):
    if x_a.shape[0] != x_b.shape[0]:
        raise ShapeError(f"paired activations have {x_a.shape[0]} and {x_b.shape[0]} rows; they must match")
    for s in range(0, x_a.shape[0], batch_size):
        yield x_a[s : s + batch_size], x_b[s : s + batch_size]


@torch.no_grad()
def evaluate_crosscoder(
    cc: CrossCoder, x_a: Tensor, x_b: Tensor, *, batch_size: int = 4096
) -> dict[str, Any]:
    """Reconstruction and sparsity on paired ``x_a [n, d_a]``, ``x_b [n, d_b]`` (module docstring).

    Returns ``{"a": {fvu, explained_variance, mse}, "b": {...}, "l0", "dead_fraction", "fires" [width]
    (tokens each latent fired on), "n_tokens"}``.
    """
    dev = cc.device
    acc: dict[str, dict[str, Any]] = {m: {"ss": 0.0, "sse": 0.0, "sum": None} for m in ("a", "b")}
    fires = torch.zeros(cc.width, dtype=torch.float64)
    n = 0
    nnz = 0.0
    for xa, xb in _rows(x_a, x_b, batch_size):
        xa, xb = xa.to(dev).float(), xb.to(dev).float()
        z = cc.encode(xa, xb)
        ha, hb = cc.decode(z)
        for m, x, h in (("a", xa, ha), ("b", xb, hb)):
            xd = x.double()
            st = acc[m]
            st["sum"] = xd.sum(0) if st["sum"] is None else st["sum"] + xd.sum(0)
            st["ss"] += float(xd.pow(2).sum())
            st["sse"] += float((xd - h.double()).pow(2).sum())
        act = z > 0
        nnz += float(act.sum())
        fires += act.sum(0).double().cpu()
        n += xa.shape[0]
    if n == 0:
        raise DataError("no paired activations to evaluate")
    out: dict[str, Any] = {}
    for m in ("a", "b"):
        st = acc[m]
        var = st["ss"] - float(st["sum"].pow(2).sum()) / n
        fvu = st["sse"] / var if var > 0 else float("nan")
        out[m] = {"fvu": fvu, "explained_variance": 1.0 - fvu, "mse": st["sse"] / n}
    out["l0"] = nnz / n
    out["dead_fraction"] = float((fires == 0).double().mean())
    out["fires"] = fires
    out["n_tokens"] = n
    return out


def classify_latents(rho: Tensor, alive: Tensor | None = None) -> list[str]:
    """Class of every latent from its relative decoder norm: ``"a_only"``, ``"b_only"``, ``"shared"``,
    ``"other"`` or (not ``alive``) ``"dead"``."""
    out = []
    for j, r in enumerate(rho.tolist()):
        if alive is not None and not bool(alive[j]):
            out.append("dead")
        elif r < A_ONLY_MAX:
            out.append("a_only")
        elif r > B_ONLY_MIN:
            out.append("b_only")
        elif SHARED_RANGE[0] <= r <= SHARED_RANGE[1]:
            out.append("shared")
        else:
            out.append("other")
    return out


@torch.no_grad()
def latent_scaling(
    cc: CrossCoder, x_a: Tensor, x_b: Tensor, latents: Sequence[int], *, batch_size: int = 4096
) -> list[float | None]:
    """Minder et al.'s ``nu = beta_a / beta_b`` for each latent in ``latents`` (module docstring), on
    paired ``x_a [n, d_a]``, ``x_b [n, d_b]``. ``None`` for a latent that never fires; all ``None``
    when ``d_a != d_b``."""
    J = torch.as_tensor(list(latents), dtype=torch.long)
    if cc.cfg.d_a != cc.cfg.d_b:
        return [None] * len(J)
    if len(J) == 0:
        return []
    dev = cc.device
    D = cc.W_dec_b.detach()[J.to(dev)].double()  # [J, d]
    Da = cc.W_dec_a.detach()[J.to(dev)].double()  # [J, d]: A's own decoder rows, added back
    num_a = torch.zeros(len(J), dtype=torch.float64, device=dev)
    num_b = torch.zeros_like(num_a)
    ff = torch.zeros_like(num_a)
    for xa, xb in _rows(x_a, x_b, batch_size):
        xa, xb = xa.to(dev).float(), xb.to(dev).float()
        z = cc.encode(xa, xb)
        ua, ub = xa * cc.scale_a, xb * cc.scale_b
        ea = (ua - (z @ cc.W_dec_a + cc.b_dec_a)).double()  # [n, d]
        eb = (ub - (z @ cc.W_dec_b + cc.b_dec_b)).double()
        f = z[:, J.to(dev)].double()  # [n, J]
        # y_a = e_a + f d_a: <d, y_a> = <d, e_a> + f <d, d_a>
        num_a += (f * (ea @ D.t() + f * (D * Da).sum(1)[None, :])).sum(0)
        # y_b = e_b + f d: <d, y_b> = <d, e_b> + f ||d||^2
        num_b += (f * (eb @ D.t() + f * D.pow(2).sum(1)[None, :])).sum(0)
        ff += f.pow(2).sum(0)
    dd = D.pow(2).sum(1)
    out: list[float | None] = []
    for j in range(len(J)):
        if ff[j] <= 0 or dd[j] <= 0:
            out.append(None)
            continue
        beta_a = float(num_a[j] / (dd[j] * ff[j]))
        beta_b = float(num_b[j] / (dd[j] * ff[j]))
        out.append(beta_a / beta_b if beta_b != 0 else None)
    return out


@torch.no_grad()
def latent_stats(
    cc: CrossCoder,
    x_a: Tensor | None = None,
    x_b: Tensor | None = None,
    *,
    fires: Tensor | None = None,
    bins: int = 20,
) -> dict[str, Any]:
    """Per-latent view of what is shared (module docstring).

    ``fires [width]`` (from :func:`evaluate_crosscoder`) or the paired data decide which latents are
    alive (none dead when neither is given). Returns ``rho`` [width], ``classes`` [width], ``n_alive``,
    ``n_shared``, ``n_a_only``, ``n_b_only``, ``n_other``, ``shared_fraction`` (of live latents),
    ``rho_histogram`` ``{edges, counts}`` over live latents, ``shared_decoder_cosine_median`` (``None``
    when ``d_a != d_b`` or nothing is shared), ``latent_scaling`` ``{nu: [per B-only latent],
    nu_median}`` (needs the data and ``d_a == d_b``; else ``nu_median`` is ``None``).
    """
    rho = cc.relative_norms().cpu()
    if fires is None and x_a is not None and x_b is not None:
        fires = evaluate_crosscoder(cc, x_a, x_b)["fires"]
    alive = (fires > 0) if fires is not None else torch.ones(cc.width, dtype=torch.bool)
    classes = classify_latents(rho, alive)
    count = {c: sum(1 for k in classes if k == c) for c in ("shared", "a_only", "b_only", "other")}
    n_alive = int(alive.sum())
    shared = [j for j, c in enumerate(classes) if c == "shared"]
    cos_median = None
    cosines: list[float] = []
    if cc.cfg.d_a == cc.cfg.d_b and shared:
        J = torch.as_tensor(shared)
        cos = F.cosine_similarity(cc.W_dec_a.detach()[J].cpu(), cc.W_dec_b.detach()[J].cpu(), dim=1)
        cosines = cos.tolist()
        cos_median = float(cos.median())
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts, _ = np.histogram(rho[alive].numpy(), bins=edges)
    b_only = [j for j, c in enumerate(classes) if c == "b_only"]
    nu: list[float | None] = []
    if x_a is not None and x_b is not None and cc.cfg.d_a == cc.cfg.d_b:
        nu = latent_scaling(cc, x_a, x_b, b_only)
    finite = [v for v in nu if v is not None]
    return {
        "rho": rho,
        "classes": classes,
        "n_alive": n_alive,
        "n_shared": count["shared"],
        "n_a_only": count["a_only"],
        "n_b_only": count["b_only"],
        "n_other": count["other"],
        "shared_fraction": count["shared"] / n_alive if n_alive else float("nan"),
        "rho_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "shared_decoder_cosine_median": cos_median,
        "shared_decoder_cosines": cosines,
        "latent_scaling": {
            "latents": b_only,
            "nu": nu,
            "nu_median": float(np.median(finite)) if finite else None,
        },
    }


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores [n]`` for binary ``labels [n]`` (1 = positive): the
    Mann-Whitney probability that a positive outscores a negative, ties counted half."""
    if isinstance(scores, Tensor):
        scores = scores.detach().cpu().double().numpy()
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).astype(bool).reshape(-1)
    if len(s) != len(y):
        raise ShapeError(f"AUROC: {len(s)} scores but {len(y)} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError("AUROC needs both positive and negative examples")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --------------------------------------------------------------------------------- both models run
def _paired_batches(cc: CrossCoder, hm_a, hm_b, hook_a: str, hook_b: str, texts: Sequence[str], pairing: str,
                    batch_size: int, max_length: int | None, with_logits: bool):  # fmt: skip
    """Per batch of texts: both models' encodings, logits (if asked), hook activations and the paired
    positions kept by the crosscoder's sink rule in both models ``(rows, cols_a, cols_b)`` (indices
    into the left-padded batches)."""
    from rosettalens.mapping.pairs import pad_id, pad_left, pair_texts

    pt = pair_texts(hm_a.tokenizer, hm_b.tokenizer, texts, pairing, max_length)
    rule_a, rule_b = cc.cfg.rule("a"), cc.cfg.rule("b")
    for s in range(0, len(pt.ids_src), batch_size):
        chunk_a, chunk_b = pt.ids_src[s : s + batch_size], pt.ids_tgt[s : s + batch_size]
        ids_a, mask_a = pad_left(chunk_a, pad_id(hm_a), hm_a.device)
        ids_b, mask_b = pad_left(chunk_b, pad_id(hm_b), hm_b.device)
        la, cache_a = hm_a.run_with_cache(
            ids_a, hooks=[hook_a], attention_mask=mask_a, stop_early=not with_logits
        )
        lb, cache_b = hm_b.run_with_cache(
            ids_b, hooks=[hook_b], attention_mask=mask_b, stop_early=not with_logits
        )
        act_a, act_b = cache_a[hook_a], cache_b[hook_b]
        keep_a = rule_a.keep(act_a, mask_a).cpu()  # [batch, pos]
        keep_b = rule_b.keep(act_b, mask_b).cpu()
        rows, ca, cb = [], [], []
        for j in range(len(chunk_a)):
            pa = pt.pos_src[s + j] + ids_a.shape[1] - len(chunk_a[j])
            pb = pt.pos_tgt[s + j] + ids_b.shape[1] - len(chunk_b[j])
            k = (keep_a[j, pa] & keep_b[j, pb]).numpy().astype(bool)
            rows.append(np.full(int(k.sum()), j))
            ca.append(pa[k])
            cb.append(pb[k])
        idx = tuple(torch.as_tensor(np.concatenate(v), dtype=torch.long) for v in (rows, ca, cb))
        yield {
            "first": s,
            "ids": (ids_a, ids_b),
            "mask": (mask_a, mask_b),
            "logits": (la, lb),
            "acts": (act_a, act_b),
            "idx": idx,
        }


@torch.no_grad()
def prompt_max_latents(
    cc: CrossCoder,
    hm_a,
    hm_b,
    texts: Sequence[str],
    latents: Sequence[int] | None = None,
    *,
    hook_a: str | None = None,
    hook_b: str | None = None,
    pairing: str = "auto",
    batch_size: int = 8,
    max_length: int | None = 256,
) -> Tensor:
    """``[len(texts), len(latents)]``: each latent's largest activation over each text's kept paired
    positions (0 when a text has none). ``latents=None``: every latent."""
    hook_a = hm_a.resolve_hook(hook_a or cc.cfg.hook_a)
    hook_b = hm_b.resolve_hook(hook_b or cc.cfg.hook_b)
    J = torch.arange(cc.width) if latents is None else torch.as_tensor(list(latents), dtype=torch.long)
    out = torch.zeros(len(texts), len(J))
    for bt in _paired_batches(cc, hm_a, hm_b, hook_a, hook_b, texts, pairing, batch_size, max_length, False):
        rows, ca, cb = bt["idx"]
        if len(rows) == 0:
            continue
        act_a, act_b = bt["acts"]
        xa = act_a.reshape(*act_a.shape[:2], -1)[rows.to(act_a.device), ca.to(act_a.device)]
        xb = act_b.reshape(*act_b.shape[:2], -1)[rows.to(act_b.device), cb.to(act_b.device)]
        z = cc.encode(xa.to(cc.device).float(), xb.to(cc.device).float())[:, J.to(cc.device)].cpu()
        for j in rows.unique().tolist():
            out[bt["first"] + j] = z[rows == j].max(0).values
    return out


@torch.no_grad()
def splice_metrics(
    cc: CrossCoder,
    hm_a,
    hm_b,
    texts: Sequence[str],
    *,
    hook_a: str | None = None,
    hook_b: str | None = None,
    pairing: str = "auto",
    batch_size: int = 8,
    max_length: int | None = 256,
) -> dict[str, dict[str, float]]:
    """``{"a": {...}, "b": {...}}``: for each model, ``ce_loss_recovered``, ``kl_score``, ``ce_clean``,
    ``ce_spliced``, ``ce_zero``, ``kl_spliced``, ``kl_zero``, ``n_tokens`` of splicing that model's
    reconstruction into it at its hook (module docstring)."""
    hook_a = hm_a.resolve_hook(hook_a or cc.cfg.hook_a)
    hook_b = hm_b.resolve_hook(hook_b or cc.cfg.hook_b)
    for hm, hook, d in ((hm_a, hook_a, cc.cfg.d_a), (hm_b, hook_b, cc.cfg.d_b)):
        w = hm.hook_width(hook)
        if w != d:
            raise ShapeError(f"{hm.name} {hook} has width {w} but the crosscoder takes {d}")
    names = ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero")
    tot = {m: dict.fromkeys(names, 0.0) for m in ("a", "b")}
    n_ce = {"a": 0, "b": 0}
    n_kl = {"a": 0, "b": 0}
    for bt in _paired_batches(cc, hm_a, hm_b, hook_a, hook_b, texts, pairing, batch_size, max_length, True):
        rows, ca, cb = bt["idx"]
        if len(rows) == 0:
            continue
        act_a, act_b = bt["acts"]
        xa = act_a.reshape(*act_a.shape[:2], -1)[rows.to(act_a.device), ca.to(act_a.device)]
        xb = act_b.reshape(*act_b.shape[:2], -1)[rows.to(act_b.device), cb.to(act_b.device)]
        rec = cc(xa.to(cc.device).float(), xb.to(cc.device).float())
        for i, (m, hm, hook, cols) in enumerate((("a", hm_a, hook_a, ca), ("b", hm_b, hook_b, cb))):
            ids, mask, clean = bt["ids"][i], bt["mask"][i], bt["logits"][i]
            r, c = rows.to(hm.device), cols.to(hm.device)

            def put(act: Tensor, name: str, new: Tensor | None = None, r=r, c=c) -> Tensor:
                out = act.clone()
                flat = out.reshape(*out.shape[:2], -1)
                flat[r, c] = new.to(act.dtype).to(act.device) if new is not None else 0.0
                return flat.reshape(act.shape)

            new = rec[i]
            with hm.intervene([(hook, lambda act, name, new=new, put=put: put(act, name, new), "plain")]):
                spliced = hm.forward(ids, attention_mask=mask).float()
            with hm.intervene([(hook, put, "plain")]):
                zeroed = hm.forward(ids, attention_mask=mask).float()
            clean = clean.float()
            logp_clean = F.log_softmax(clean, -1)
            # CE at spliced positions that have a next token; KL at every spliced position
            has_next = c < ids.shape[1] - 1
            rn, cn = r[has_next], c[has_next]
            labels = ids[rn, cn + 1]
            for key, logits in (("clean", clean), ("spliced", spliced), ("zero", zeroed)):
                logp = F.log_softmax(logits, -1)
                tot[m][f"ce_{key}"] += float(-logp[rn, cn].gather(-1, labels[:, None]).double().sum())
                if key != "clean":
                    kl = (logp_clean[r, c].exp() * (logp_clean[r, c] - logp[r, c])).sum(-1)
                    tot[m][f"kl_{key}"] += float(kl.double().sum())
            n_ce[m] += int(has_next.sum())
            n_kl[m] += len(r)
    out: dict[str, dict[str, float]] = {}
    for m in ("a", "b"):
        if n_ce[m] == 0:
            raise DataError("no paired tokens with a next token to splice on")
        o = {k: v / (n_ce[m] if k.startswith("ce") else n_kl[m]) for k, v in tot[m].items()}
        den = o["ce_zero"] - o["ce_clean"]
        o["ce_loss_recovered"] = (o["ce_zero"] - o["ce_spliced"]) / den if den != 0 else float("nan")
        o["kl_score"] = (o["kl_zero"] - o["kl_spliced"]) / o["kl_zero"] if o["kl_zero"] != 0 else float("nan")
        o["n_tokens"] = n_kl[m]
        out[m] = o
    return out


def summarize(
    cc: CrossCoder, x_a: Tensor, x_b: Tensor, *, latents_on: tuple[Tensor, Tensor] | None = None
) -> dict[str, Any]:
    """The headline numbers on paired ``x_a [n, d_a]``, ``x_b [n, d_b]``: ``explained_variance`` {a, b},
    ``fvu`` {a, b}, ``l0``, ``dead_fraction``, ``n_alive``, ``n_shared``, ``n_a_only``, ``n_b_only``,
    ``n_other``, ``shared_fraction``, ``shared_decoder_cosine_median``, ``latent_scaling_nu_median``,
    ``rho_histogram``, ``n_tokens`` (plus ``"_stats"``: the full :func:`latent_stats` result).

    ``latents_on``: other paired data ``(x_a, x_b)`` for the per-latent view (which latents are
    alive, Latent Scaling), e.g. the training pairs when the held-out documents lack what one model
    owns (an organism's trigger); the reconstruction metrics stay on ``x_a``, ``x_b``.
    """
    ev = evaluate_crosscoder(cc, x_a, x_b)
    if latents_on is None:
        st = latent_stats(cc, x_a, x_b, fires=ev["fires"])
    else:
        st = latent_stats(cc, latents_on[0], latents_on[1])
    return {
        "explained_variance": {"a": ev["a"]["explained_variance"], "b": ev["b"]["explained_variance"]},
        "fvu": {"a": ev["a"]["fvu"], "b": ev["b"]["fvu"]},
        "l0": ev["l0"],
        "dead_fraction": ev["dead_fraction"],
        **{k: st[k] for k in ("n_alive", "n_shared", "n_a_only", "n_b_only", "n_other", "shared_fraction")},
        "shared_decoder_cosine_median": st["shared_decoder_cosine_median"],
        "latent_scaling_nu_median": st["latent_scaling"]["nu_median"],
        "rho_histogram": st["rho_histogram"],
        "n_tokens": ev["n_tokens"],
        "_stats": st,
    }
