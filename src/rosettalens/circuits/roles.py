"""Head roles for sequence continuation: successor score, copy score and attention to the members.

**Successor score** (Gould et al. 2023, as Lan, Torr, Barez 2024 compute it in
``OV_scores/alltasks_nextscores``): each member token is run on its own (after the tokenizer's own
prefix, e.g. BOS) and its residual stream after layer 0 (``resid_post.0``, the "effective embedding")
is taken as the input of every head: the head's layer normalises it with its own input norm, the
value projection of the head's key-value group and the head's slice of the output projection map it
(the OV circuit; the output projection's bias, the same for every input, is left out), Gemma's
post-attention norm is applied where the model has one, then the final norm and the unembedding. The
score is the share of members whose *successor* is among the top-5 tokens (either spelling, with or
without the leading space); the **copy score** is the share whose own token is. The paper normalises
with layer 1's norm for every head (a quirk of the IOI code it starts from); here each head uses its
own layer's norm. All of it runs through the HF modules and our hook points: one forward pass with
every ``resid_pre.L`` patched to ``resid_post.0`` gives each layer's value vectors.

**Member attention** ("member detection" heads): the attention of the last position to the positions
of the shown members, summed over them and averaged over prompts (``attn_pattern.L``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError
from ..names import hook_name
from .tasks import PromptSet, SequenceTask, answer_forms, token_ids

__all__ = ["ov_logits", "successor_scores", "member_attention", "head_roles", "role_label", "match_roles"]

ROLE_KEYS = ("successor", "copy", "member_attention")


def _module(root: Any, path: str) -> Any:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


@torch.no_grad()
def ov_logits(hm: Any, token_ids: Sequence[int], layers: Sequence[int] | None = None) -> dict[int, Tensor]:
    """OV-circuit logits of every head for single tokens.

    token_ids: ``n`` tokens, each run alone after the tokenizer's prefix. Returns ``{layer: logits
    [n_heads, n, vocab]}``: unembedding of head ``h``'s OV output for token ``i`` (see module
    docstring).
    """
    cfg, a = hm.cfg, hm.adapter
    layers = list(range(cfg.n_layers)) if layers is None else [int(x) % cfg.n_layers for x in layers]
    prefix = list(hm.tokenizer("", add_special_tokens=True)["input_ids"])
    ids = torch.tensor([prefix + [int(t)] for t in token_ids], dtype=torch.long)
    _, c0 = hm.run_with_cache(ids, hooks=[hook_name("resid_post", 0)], stop_early=True)
    emb = c0[hook_name("resid_post", 0)]  # [n, pos, d]
    patches = [(hook_name("resid_pre", L), lambda act, name, e=emb: e.to(act.dtype).clone()) for L in layers]
    with hm.hooks(patches):
        _, cache = hm.run_with_cache(ids, hooks=[hook_name("v", L) for L in layers], stop_early=True)
    layer_mods = _module(hm.model, a.layers)
    final_norm, lm_head = _module(hm.model, a.final_norm), hm.model.get_output_embeddings()
    H, dh, group = cfg.n_heads, cfg.d_head, cfg.n_heads // cfg.n_kv_heads
    n = len(token_ids)
    out = {}
    for L in layers:
        v = cache[hook_name("v", L)][:, -1]  # [n, n_kv, dh]
        z = torch.zeros(H, n, H, dh, dtype=v.dtype, device=v.device)
        for h in range(H):
            z[h, :, h] = v[:, h // group]
        o_proj = _module(layer_mods[L], a.o_proj)
        flat = z.reshape(H * n, H * dh)
        o = o_proj(flat) - o_proj(torch.zeros_like(flat[:1]))
        if a.post_block_norms:
            o = _module(layer_mods[L], a.attn_out)(o)
        logits = lm_head(final_norm(o)).float()
        out[L] = logits.reshape(H, n, -1)
    return out


def _spellings(tok: Any, member: str) -> set[int]:
    out = set()
    for text in (member, " " + member):
        ids = token_ids(tok, text)
        if len(ids) == 1:
            out.add(ids[0])
    return out


@torch.no_grad()
def successor_scores(
    hm: Any, task: SequenceTask, top_k: int = 5, layers: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Successor and copy scores of every head for a task's members.

    Returns ``(successor [n_layers, n_heads], copy [n_layers, n_heads])``, shares in ``[0, 1]`` over
    the usable members that have a successor (members that are not one token are left out). Layers
    not in ``layers`` are NaN.
    """
    tok = hm.tokenizer
    _, answer_id, _ = answer_forms(tok, task.members)
    members = [m for m in task.members if m in answer_id]
    pairs = [
        (m, task.members[i + task.step])
        for i, m in enumerate(task.members)
        if i + task.step < len(task.members) and m in answer_id
    ]
    pairs = [(m, s) for m, s in pairs if _spellings(tok, s)]
    if not pairs:
        raise DataError(f"task {task.name!r}: no single-token member with a successor for {hm.name}")
    del members
    ids = [answer_id[m] for m, _ in pairs]
    succ_sets = [_spellings(tok, s) for _, s in pairs]
    self_sets = [_spellings(tok, m) | {answer_id[m]} for m, _ in pairs]
    L_all, H = hm.cfg.n_layers, hm.cfg.n_heads
    succ = torch.full((L_all, H), float("nan"))
    copy = torch.full((L_all, H), float("nan"))
    for L, logits in ov_logits(hm, ids, layers).items():
        top = logits.topk(top_k, dim=-1).indices.cpu()  # [H, n, k]
        for h in range(H):
            rows = top[h].tolist()
            succ[L, h] = sum(bool(set(r) & s) for r, s in zip(rows, succ_sets)) / len(pairs)
            copy[L, h] = sum(bool(set(r) & s) for r, s in zip(rows, self_sets)) / len(pairs)
    return succ, copy


@torch.no_grad()
def member_attention(hm: Any, prompts: PromptSet, batch_size: int = 16) -> Tensor:
    """Attention of the last position to the shown members' positions, summed over members, mean over
    prompts: ``[n_layers, n_heads]``."""
    if prompts.member_positions is None:
        raise DataError("the prompt set has no member positions")
    L_all = hm.cfg.n_layers
    hooks = [hook_name("attn_pattern", L) for L in range(L_all)]
    total = torch.zeros(L_all, hm.cfg.n_heads, dtype=torch.float64)
    n = len(prompts)
    for i in range(0, n, batch_size):
        ids = prompts.clean_ids[i : i + batch_size]
        pos = prompts.member_positions[i : i + batch_size]  # [b, k]
        _, cache = hm.run_with_cache(ids, hooks=hooks)
        for L in range(L_all):
            pat = cache[hook_name("attn_pattern", L)][:, :, -1, :].double().cpu()  # [b, H, k_pos]
            idx = pos[:, None, :].expand(-1, pat.shape[1], -1).clamp(min=0)
            got = pat.gather(2, idx) * (pos[:, None, :] >= 0)
            total[L] += got.sum(2).sum(0)
    return (total / n).float()


def head_roles(
    hm: Any, task: SequenceTask, prompts: PromptSet | None = None, heads: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """``{"L.H": {"successor", "copy", "member_attention"}}`` for ``heads`` (default: every head);
    member attention only when ``prompts`` are given."""
    succ, copy = successor_scores(hm, task)
    att = member_attention(hm, prompts) if prompts is not None and len(prompts) else None
    names = heads or [f"{L}.{h}" for L in range(hm.cfg.n_layers) for h in range(hm.cfg.n_heads)]
    out = {}
    for name in names:
        L, h = (int(x) for x in name.split("."))
        row = {"successor": float(succ[L, h]), "copy": float(copy[L, h])}
        if att is not None:
            row["member_attention"] = float(att[L, h])
        out[name] = row
    return out


def role_label(scores: dict[str, float], min_score: float = 0.2) -> str:
    """A head's role: the highest of its successor / copy / member-attention scores when that score is
    at least ``min_score``, else ``"unassigned"`` (a head that scores about nothing has no role, and
    two such heads must not count as "the same role")."""
    keys = [k for k in ROLE_KEYS if k in scores]
    if not keys:
        raise DataError(f"no role score in {sorted(scores)}; expected some of {list(ROLE_KEYS)}")
    best = max(keys, key=lambda k: scores[k])
    return best if scores[best] >= min_score else "unassigned"


def _hungarian(
    ra: dict[str, dict[str, float]], rb: dict[str, dict[str, float]]
) -> list[tuple[str, str, float]]:
    from scipy.optimize import linear_sum_assignment

    ha, hb = list(ra), list(rb)
    if not ha or not hb:
        return []
    keys = [k for k in ROLE_KEYS if all(k in ra[h] for h in ha) and all(k in rb[h] for h in hb)]
    cost = torch.tensor(
        [[sum((ra[x][k] - rb[y][k]) ** 2 for k in keys) ** 0.5 for y in hb] for x in ha], dtype=torch.float64
    )
    r, c = linear_sum_assignment(cost.numpy())
    return [(ha[x], hb[y], float(cost[x, y])) for x, y in zip(r.tolist(), c.tolist())]


def _n_same(
    pairs: list[tuple[str, str, float]], ra: dict, rb: dict, min_score: float, max_distance: float
) -> int:
    return sum(
        d <= max_distance and role_label(ra[x], min_score) == role_label(rb[y], min_score) != "unassigned"
        for x, y, d in pairs
    )


def match_roles(
    ra: dict[str, dict[str, float]],
    rb: dict[str, dict[str, float]],
    *,
    min_score: float = 0.2,
    max_distance: float = 0.25,
    null_a: dict[str, dict[str, float]] | None = None,
    null_b: dict[str, dict[str, float]] | None = None,
    n_null: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Match two models' heads by role: Hungarian matching on the Euclidean distance between their
    (successor, copy, member attention) vectors; a pair farther apart than ``max_distance`` is not a
    match, and a pair "shares a role" when both heads have the same :func:`role_label` other than
    ``"unassigned"``.

    With ``null_a``/``null_b`` (the role scores of *every* head of each model), the same count is
    taken for random head sets of the same sizes drawn from them (``n_null`` draws): ``p_value`` is
    the share of draws sharing at least as many roles (with the +1 correction), so a small p-value says
    the two sub-circuits' heads agree in role more than arbitrary heads of the two models do.
    """
    if min_score < 0 or max_distance < 0:
        raise ValueError("min_score and max_distance must be >= 0")
    pairs = _hungarian(ra, rb)
    out_pairs, unmatched_a, unmatched_b = [], list(ra), list(rb)
    for x, y, d in pairs:
        la, lb = role_label(ra[x], min_score), role_label(rb[y], min_score)
        matched = d <= max_distance
        if matched:
            unmatched_a.remove(x)
            unmatched_b.remove(y)
        out_pairs.append(
            {"heads": [x, y], "role_distance": d, "matched": matched, "roles": [la, lb],
             "same_role": matched and la == lb != "unassigned", "scores": [ra[x], rb[y]]}
        )  # fmt: skip
    n_same = sum(bool(p["same_role"]) for p in out_pairs)
    res: dict[str, Any] = {
        "pairs": out_pairs,
        "unmatched": [unmatched_a, unmatched_b],
        "n_matched": sum(p["matched"] for p in out_pairs),
        "n_same_role": n_same,
        "roles": [
            {h: role_label(v, min_score) for h, v in ra.items()},
            {h: role_label(v, min_score) for h, v in rb.items()},
        ],
        "min_score": min_score,
        "max_distance": max_distance,
    }
    if null_a is not None and null_b is not None and ra and rb:
        import random

        if len(null_a) < len(ra) or len(null_b) < len(rb):
            raise ValueError("the null head pools must be at least as large as the matched head sets")
        rng = random.Random(seed)
        ka, kb = list(null_a), list(null_b)
        null = []
        for _ in range(n_null):
            sa = {h: null_a[h] for h in rng.sample(ka, len(ra))}
            sb = {h: null_b[h] for h in rng.sample(kb, len(rb))}
            null.append(_n_same(_hungarian(sa, sb), sa, sb, min_score, max_distance))
        res["null_mean_same_role"] = sum(null) / len(null)
        res["p_value"] = (1 + sum(v >= n_same for v in null)) / (1 + len(null))
        res["n_null"] = n_null
    return res
