"""Checks of an attribution graph on the real model: the replacement model (every MLP replaced by its
transcoder, plus the frozen errors of a clean run) and intervention agreement (the graph's predicted
effect of steering a feature down against the change measured in the real model, and in the real model
with the norms, then also the attention patterns, frozen as in the graph). See
:mod:`rosettalens.circuits.graph` for the graph itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..names import hook_name
from .graph import AttributionGraph, frozen_norm_linear, norm_modules

__all__ = ["intervention_agreement", "replacement_model"]


@contextlib.contextmanager
def replacement_model(hm: Any, transcoders: Any, errors: Tensor | None = None) -> Iterator[Any]:
    """Every MLP output replaced by its transcoder's output (plus ``errors [n_layers, pos, d_model]``,
    frozen from a clean run, when given): ``with replacement_model(hm, tset, clean_errors): hm(ids)``.

    With the errors of the same prompt the logits equal the real model's (the reconstruction identity).
    """
    stash: dict[int, Tensor] = {}

    def grab(act: Tensor, name: str) -> None:
        stash[int(name.split(".")[1])] = act

    def put(act: Tensor, name: str) -> Tensor:
        L = int(name.split(".")[1])
        y = transcoders[L](stash[L]).to(act.dtype) if L in transcoders else torch.zeros_like(act)
        if errors is not None:
            y = y + errors[L].to(device=act.device, dtype=act.dtype)
        return y

    fwd: list[tuple[str, Any, str]] = []
    for L in range(hm.cfg.n_layers):
        fwd += [(hook_name("mlp_in", L), grab, "plain"), (hook_name("mlp_out", L), put, "plain")]
    with hm.intervene(fwd):
        yield hm


@torch.no_grad()
def intervention_agreement(
    hm: Any, transcoders: Any, graph: AttributionGraph, n_features: int = 20, scale: float = 1.0
) -> dict[str, Any]:
    """Spearman correlation between predicted and measured effects of steering features down.

    For the ``n_features`` most influential feature nodes: predicted = the graph's total (direct +
    indirect) effect of the feature on the top logit target, times ``-scale``; measured = the change
    of that demeaned logit in the real model when ``scale * activation * W_dec[feature]`` is
    subtracted at ``mlp_out.L`` at the feature's position. ``spearman_frozen_norms`` (and each row's
    ``measured_frozen_norms``) repeats the measurement with every norm's scale frozen at its clean value,
    as in the graph (attention and the MLPs stay live): the part of a miss that the norms make. A
    last-layer feature at the last position is then predicted exactly. ``spearman_frozen_attention``
    (``measured_frozen_attention``) freezes the attention patterns too (queries and keys at their clean
    values), so only the MLPs' nonlinearity separates it from the graph.
    """
    from scipy.stats import spearmanr

    if graph.n_features == 0:
        nan = float("nan")
        return {
            "spearman": nan,
            "spearman_frozen_norms": nan,
            "spearman_frozen_attention": nan,
            "n": 0,
            "scale": scale,
            "features": [],
        }
    infl = graph.influence()[: graph.n_features]
    order = torch.argsort(infl, descending=True)[:n_features].tolist()
    total = graph.total_effects(0)  # effects on the top logit target
    target = int(graph.logit_tokens[0])
    ids = graph.input_ids.to(hm.device)[None]

    def demeaned(logits: Tensor) -> float:
        last = logits[0, -1].double()
        return float(last[target] - last.mean())

    norms = norm_modules(hm)
    clean: dict[int, tuple[Tensor, Tensor]] = {}

    def record(mod: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, Tensor) and args and isinstance(args[0], Tensor):
            clean[id(mod)] = (args[0].detach(), output.detach())

    def frozen(mod: nn.Module, args: tuple, output: Any) -> Any:
        if id(mod) not in clean:
            return None
        x0, y0 = clean[id(mod)]
        return y0 + frozen_norm_linear(mod, x0, args[0] - x0).to(y0.dtype)

    qk = [hook_name(kind, L) for L in range(hm.cfg.n_layers) for kind in ("q", "k")]
    handles = [m.register_forward_hook(record) for _, m in norms]
    try:  # one clean pass: the demeaned logit, every norm's input and output, every query and key
        logits, qk_clean = hm.run_with_cache(ids, hooks=qk)
    finally:
        for h in handles:
            h.remove()
    base = demeaned(logits)

    def clean_qk(act: Tensor, name: str) -> Tensor:
        return qk_clean[name].to(act.dtype)

    def measure(hooks: list, freeze: bool, attention: bool = False) -> float:
        handles = [m.register_forward_hook(frozen) for _, m in norms] if freeze else []
        if attention:
            hooks = hooks + [(h, clean_qk, "plain") for h in qk]
        try:
            with hm.intervene(hooks):
                return demeaned(hm.forward(ids))
        finally:
            for h in handles:
                h.remove()

    rows = []
    for i in order:
        n = graph.node(i)
        L, p, f, a = n["layer"], n["pos"], n["feature"], n["activation"]
        vec = (scale * a * transcoders[L].W_dec[f].detach()).to(hm.dtype)

        def sub(act: Tensor, name: str, p: int = p, vec: Tensor = vec) -> Tensor:
            out = act.clone()
            out[:, p] -= vec.to(act.device)
            return out

        hooks = [(hook_name("mlp_out", L), sub, "plain")]
        rows.append(
            {
                "node_id": graph.node_id(i),
                "predicted": -scale * float(total[i]),
                "measured": measure(hooks, False) - base,
                "measured_frozen_norms": measure(hooks, True) - base,
                "measured_frozen_attention": measure(hooks, True, attention=True) - base,
            }
        )
    pred = [r["predicted"] for r in rows]

    def rho(key: str) -> float:
        r = float(spearmanr(pred, [x[key] for x in rows]).statistic) if len(rows) > 2 else float("nan")
        return r if math.isfinite(r) else float("nan")

    return {
        "spearman": rho("measured"),
        "spearman_frozen_norms": rho("measured_frozen_norms"),
        "spearman_frozen_attention": rho("measured_frozen_attention"),
        "n": len(rows),
        "scale": scale,
        "features": rows,
    }
