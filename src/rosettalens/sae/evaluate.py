"""SAE evaluation: reconstruction and sparsity on activations, and splice metrics inside the model.

``evaluate_sae`` (on held-out activations ``x [n, d_in]``):

* ``fvu``: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, the
  variance taken **about the mean** of ``x`` over the evaluation set (taken about zero, as one popular
  library did for a while, the denominator includes ``n ||mean||^2`` and "explained variance" looks
  better than it is; residual streams have large means). ``explained_variance = 1 - fvu``.
* ``l0``: mean number of non-zero latents per token; ``dead_fraction``: latents that never fire on
  ``x`` (``alive_fraction = 1 - dead_fraction``); ``dense_fraction``: latents firing on more than
  ``dense_threshold`` (10%) of the tokens; ``cossim``: mean cosine of ``x`` and ``x_hat``; ``l2_ratio``:
  mean ``||x_hat|| / ||x||`` (SAEBench's core metrics).

Both apply the SAE's sink rule (:mod:`rosettalens.sae.sinks`, read from the SAE's config): the positions
the SAE leaves out are left out of the metrics of ``evaluate_sae`` (the position test needs
``positions``; a store gives its own) and keep the model's own activation in ``splice_metrics``.

``splice_metrics`` runs the model on token batches three times, as SAELens's ``get_recons_loss`` does:
clean; with the hook's activations replaced by the SAE's reconstruction at every real (non-pad,
non-special) token the sink rule keeps; with the hook's activations zero-ablated at those same
positions (so an SAE that outputs zeros scores exactly 0 and an exact one 1). Then
``ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)`` (SAELens's and SAEBench's
``ce_loss_score``) and ``kl_score = (KL_zero - KL_sae) / KL_zero`` (``kl_div_score``), with
``KL = KL(clean || spliced)`` of the next-token distributions, averaged over the real tokens (CE over
real tokens that have a next token). ``spliced_fraction`` is the share of real tokens spliced.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rosettalens.errors import DataError, ShapeError
from rosettalens.sae.model import SAE
from rosettalens.sae.sinks import sae_rule

__all__ = ["evaluate_sae", "splice_metrics", "fvu", "best_decoder_cosine"]


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (float64) of ``[n, d]`` tensors."""
    x, x_hat = x.double(), x_hat.double()
    den = (x - x.mean(0)).pow(2).sum()
    return float((x - x_hat).pow(2).sum() / den) if den > 0 else float("nan")


def _batches(x: Any, hook: str | None, batch_size: int, positions: Tensor | None):
    """``(rows [b, d], positions [b] or None)`` batches of a store's hook or a tensor."""
    from rosettalens.store import ActivationStore

    if isinstance(x, ActivationStore):
        if hook is None:
            if len(x.hooks) != 1:
                raise DataError(f"store {x.path} holds several hooks; name one")
            hook = x.hooks[0]
        n = len(x)
        pos_all = x.pos_index if positions is None else torch.as_tensor(positions).long()
        for s in range(0, n, batch_size):
            t = x.read(hook, slice(s, min(n, s + batch_size)))
            yield t.reshape(t.shape[0], -1), pos_all[s : s + batch_size]
        return
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ShapeError(
            f"evaluation data must be [n, d_in] or an ActivationStore, got {getattr(x, 'shape', x)}"
        )
    if positions is not None:
        positions = torch.as_tensor(positions).long().reshape(-1)
        if len(positions) != x.shape[0]:
            raise ShapeError(f"positions has {len(positions)} entries but x has {x.shape[0]} rows")
    for s in range(0, x.shape[0], batch_size):
        yield x[s : s + batch_size], None if positions is None else positions[s : s + batch_size]


@torch.no_grad()
def best_decoder_cosine(a: Any, b: Any) -> Tensor:
    """For each latent of ``a``, the largest cosine of its decoder row with any decoder row of ``b``
    ``[width_a]`` (float64). ``a`` / ``b``: SAEs or decoder matrices ``[width, d_in]``. Its median over
    the latents is how much two SAEs (two seeds, say) agree."""
    wa = (a.W_dec if isinstance(a, SAE) else a).detach().double().cpu()
    wb = (b.W_dec if isinstance(b, SAE) else b).detach().double().cpu()
    if wa.shape[1] != wb.shape[1]:
        raise ShapeError(f"decoders of width {wa.shape[1]} and {wb.shape[1]} cannot be compared")
    wa = wa / wa.norm(dim=1, keepdim=True).clamp_min(1e-30)
    wb = wb / wb.norm(dim=1, keepdim=True).clamp_min(1e-30)
    out = torch.empty(wa.shape[0], dtype=torch.float64)
    for s in range(0, wa.shape[0], 4096):
        out[s : s + 4096] = (wa[s : s + 4096] @ wb.T).max(1).values
    return out


@torch.no_grad()
def evaluate_sae(
    sae: SAE,
    x: Any,
    *,
    hook: str | None = None,
    positions: Tensor | None = None,
    sinks: bool = True,
    batch_size: int = 4096,
    dense_threshold: float = 0.1,
) -> dict[str, float]:
    """Reconstruction and sparsity of ``sae`` on ``x [n, d_in]`` (or a store's hook), streamed in batches.

    ``positions [n]``: each row's position in its document (a store's own by default), for the sink
    rule's position test; ``sinks=False`` evaluates every row. Returns ``fvu``, ``explained_variance``,
    ``mse`` (per token, summed over dimensions), ``cossim``, ``l2_ratio``, ``l0``, ``dead_fraction``,
    ``alive_fraction``, ``dense_fraction``, ``n_tokens`` (rows evaluated), ``n_left_out``.
    """
    d = sae.d_in
    dev = sae.device
    rule = sae_rule(sae)
    n = 0
    left_out = 0
    s_x = torch.zeros(d, dtype=torch.float64)
    s_xx = 0.0
    sse = 0.0
    nnz = 0.0
    cos = 0.0
    ratio = 0.0
    fires = torch.zeros(sae.width, dtype=torch.float64)
    for xb, pb in _batches(x, hook, batch_size, positions):
        if xb.shape[1] != d:
            raise ShapeError(f"activations have width {xb.shape[1]} but the SAE takes d_in={d}")
        if sinks and not rule.off:
            keep = rule.keep(xb.float(), positions=pb)
            left_out += int((~keep).sum())
            xb = xb[keep]
            if xb.shape[0] == 0:
                continue
        xb = xb.to(dev).float()
        z = sae.encode(xb)
        x_hat = sae.decode(z)
        xd = xb.double()
        hd = x_hat.double()
        n += xb.shape[0]
        s_x += xd.sum(0).cpu()
        s_xx += float(xd.pow(2).sum())
        sse += float((xd - hd).pow(2).sum())
        nx, nh = xd.norm(dim=1), hd.norm(dim=1)
        cos += float(((xd * hd).sum(1) / (nx * nh).clamp_min(1e-30)).sum())
        ratio += float((nh / nx.clamp_min(1e-30)).sum())
        act = z > 0
        nnz += float(act.sum())
        fires += act.sum(0).double().cpu()
    if n == 0:
        raise DataError(
            "no activations to evaluate" + (" (the sink rule left every row out)" if left_out else "")
        )
    var = s_xx - float(s_x.pow(2).sum()) / n  # sum ||x - mean||^2
    f = sse / var if var > 0 else float("nan")
    freq = fires / n
    dead = float((fires == 0).double().mean())
    return {
        "fvu": f,
        "explained_variance": 1.0 - f,
        "mse": sse / n,
        "cossim": cos / n,
        "l2_ratio": ratio / n,
        "l0": nnz / n,
        "dead_fraction": dead,
        "alive_fraction": 1.0 - dead,
        "dense_fraction": float((freq > dense_threshold).double().mean()),
        "n_tokens": n,
        "n_left_out": left_out,
    }


def _token_batches(hm, batches: Any, batch_size: int, max_length: int | None) -> Iterable[dict[str, Tensor]]:
    if isinstance(batches, str):
        batches = [batches]
    if isinstance(batches, list | tuple) and batches and all(isinstance(b, str) for b in batches):
        texts = [t for t in batches if t.strip()]
        for s in range(0, len(texts), batch_size):
            yield hm.tokenize(texts[s : s + batch_size], max_length=max_length)
        return
    for b in batches:
        if isinstance(b, dict):
            ids = b["input_ids"]
            mask = b.get("attention_mask")
        else:
            ids, mask = b, None
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        if mask is None:
            mask = torch.ones_like(ids)
        yield {"input_ids": ids.to(hm.device), "attention_mask": mask.to(hm.device)}


def _special_ids(tok) -> list[int]:
    ids = set(getattr(tok, "all_special_ids", None) or [])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def splice_metrics(
    sae: SAE,
    hm,
    hook: str | None,
    batches: Any,
    *,
    batch_size: int = 8,
    max_length: int | None = 256,
    exclude_special: bool = True,
    sinks: bool = True,
) -> dict[str, float]:
    """CE loss recovered and KL score of splicing ``sae`` into ``hm`` at ``hook`` (module docstring).

    batches: texts (tokenised here, left-padded, ``batch_size`` per forward), or an iterable of token-id
    tensors ``[batch, pos]`` / dicts with ``input_ids`` and ``attention_mask``. ``hook=None``: the SAE's
    recorded hook. ``sinks=False`` splices at every real token (the SAE's sink rule ignored). Returns
    ``ce_loss_recovered`` (= ``ce_loss_score``), ``kl_score`` (= ``kl_div_score``), ``ce_clean``,
    ``ce_sae``, ``ce_zero``, ``kl_sae``, ``kl_zero``, ``n_tokens``, ``spliced_fraction``.
    """
    rule = sae_rule(sae)
    hook = hook or sae.cfg.hook
    if hook is None:
        raise DataError("no hook given and the SAE records none")
    hook = hm.resolve_hook(hook)
    width = hm.hook_width(hook) if hasattr(hm, "hook_width") else None
    if width is not None and width != sae.d_in:
        raise ShapeError(f"{hm.name} {hook} has width {width} but the SAE takes d_in={sae.d_in}")
    special = torch.tensor(_special_ids(hm.tokenizer) if exclude_special else [], dtype=torch.long)
    tot = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n_ce = n_kl = n_spliced = 0
    for enc in _token_batches(hm, batches, batch_size, max_length):
        ids, attn = enc["input_ids"], enc["attention_mask"]
        real = attn.bool()
        if len(special):
            real &= ~torch.isin(ids, special.to(ids.device))
        if not real.any():
            continue
        where: dict[str, Tensor] = {}  # the positions spliced: set by `replace`, reused by `zero`

        def replace(act: Tensor, name: str, real=real, attn=attn, where=where) -> Tensor:
            flat = act.reshape(*act.shape[:2], -1)
            if flat.shape[-1] != sae.d_in:
                raise ShapeError(f"{name} has width {flat.shape[-1]} but the SAE takes d_in={sae.d_in}")
            m = real.to(act.device)
            if sinks and not rule.off:
                m = m & rule.keep(flat, attn.to(act.device))
            where["m"] = m
            rec = sae(flat.to(sae.device).float()).to(act.dtype).to(act.device)
            out = torch.where(m[..., None], rec, flat)
            return out.reshape(act.shape)

        def zero(act: Tensor, name: str, where=where) -> Tensor:
            flat = act.reshape(*act.shape[:2], -1)
            out = torch.where(where["m"][..., None].to(act.device), torch.zeros_like(flat), flat)
            return out.reshape(act.shape)

        clean = hm.forward(enc).float()
        with hm.patch({hook: replace}):
            spliced = hm.forward(enc).float()
        with hm.patch({hook: zero}):
            zeroed = hm.forward(enc).float()
        logp_clean = F.log_softmax(clean, -1)
        p_clean = logp_clean.exp()
        labels = ids[:, 1:]
        ce_mask = real[:, :-1] & attn[:, 1:].bool()
        kl_mask = real
        for name, logits in (("clean", clean), ("sae", spliced), ("zero", zeroed)):
            logp = F.log_softmax(logits, -1)
            ce = -logp[:, :-1].gather(-1, labels[..., None]).squeeze(-1)
            tot[f"ce_{name}"] += float(ce[ce_mask].double().sum())
            if name != "clean":
                kl = (p_clean * (logp_clean - logp)).sum(-1)
                tot[f"kl_{name}"] += float(kl[kl_mask].double().sum())
        n_ce += int(ce_mask.sum())
        n_kl += int(kl_mask.sum())
        n_spliced += int(where["m"].sum())
    if n_kl == 0 or n_ce == 0:
        raise DataError("no real (non-special, non-pad) tokens with a next token to evaluate on")
    out: dict[str, float] = {k: v / (n_ce if k.startswith("ce") else n_kl) for k, v in tot.items()}
    den = out["ce_zero"] - out["ce_clean"]
    out["ce_loss_recovered"] = (out["ce_zero"] - out["ce_sae"]) / den if den != 0 else float("nan")
    out["kl_score"] = (
        (out["kl_zero"] - out["kl_sae"]) / out["kl_zero"] if out["kl_zero"] != 0 else float("nan")
    )
    out["ce_loss_score"] = out["ce_loss_recovered"]
    out["kl_div_score"] = out["kl_score"]
    out["n_tokens"] = n_kl
    out["spliced_fraction"] = n_spliced / n_kl
    return out
