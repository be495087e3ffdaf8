"""The "lightweight safety switch" (Oozeer et al. 2025): a mapper from a *base* model's activations to
its fine-tuned organism's at one hook point, used to replace the organism's residual stream there.

With the switch **off** the organism runs as it is. With it **on** (``with switch.on(organism):``) the
base model runs alongside on the same tokens, and at ``hook`` the organism's activation
``[batch, pos, d_model]`` is replaced by ``mapper(base activation)`` at every position. The
organism's own computation up to ``hook`` (where a backdoor's trigger detection lives when the hook
is deep enough) is thereby discarded; its later layers read what the base model computed, carried
into the organism's space.

Pairing: base and organism share a tokenizer (a fine-tune keeps its base's), so activations are
paired position by position on the same token ids (padding excluded). The mapper is fitted on
*clean* text (no trigger): it learns the shared computation, never the fine-tune's response to the
trigger.

Inside ``generate()``: a forward pre-hook on the organism sees every step's ``input_ids``,
``attention_mask``, ``position_ids`` and KV cache. The base model is run on exactly those inputs with
its own KV cache (created when the organism's cache is empty or new, i.e. at each prompt forward),
and stops right after ``hook``; the recorded activation replaces the organism's at ``hook`` in the
same step. So the switch is exact under greedy decoding and sampling with a KV cache and without one
(``run_with_cache``); beam search, which reorders caches, is not supported.

On disk a switch is a directory: ``mapper/`` (a saved :class:`~rosettalens.mapping.Mapper`,
safetensors + JSON) and ``switch.json`` (format, base and organism names, hook, fit data and
fidelity), written atomically with the JSON last.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rosettalens.errors import ConfigError, DataError, ShapeError
from rosettalens.io import atomic_dir, atomic_write_json, json_safe
from rosettalens.mapping.base import Mapper, MapperError, read_json
from rosettalens.names import parse_hook_name

if TYPE_CHECKING:
    from rosettalens.hooks import HookedModel

__all__ = ["SWITCH_FORMAT", "SafetySwitch", "paired_positions"]

SWITCH_FORMAT = "rosettalens.safety_switch"
SWITCH_VERSION = 1
_RESIDUAL = ("resid_pre", "resid_mid", "resid_post")


class _BaseDone(Exception):
    """Raised by the recorder on the base model once the switch hook's activation is taken."""


def _check_same_tokenizer(base: HookedModel, organism: HookedModel) -> None:
    if base.model is organism.model:
        raise ConfigError("the safety switch needs two model instances: the base and its organism")
    a, b = base.tokenizer, organism.tokenizer
    if a.get_vocab() != b.get_vocab():
        raise ConfigError(
            f"{base.name} and {organism.name} have different tokenizers; the safety switch pairs a base "
            "model with its own fine-tune (same tokenizer, paired by position)"
        )


def _resid_hook(hm: HookedModel, hook: str) -> str:
    name = hm.resolve_hook(hook)
    if parse_hook_name(name)[0] not in _RESIDUAL:
        raise ConfigError(
            f"the safety switch replaces the residual stream: use resid_pre/mid/post.L, not {name}"
        )
    return name


@torch.no_grad()
def paired_positions(
    base: HookedModel,
    organism: HookedModel,
    texts: Sequence[str],
    hooks: Sequence[str],
    *,
    batch_size: int = 16,
    add_special_tokens: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Activations of both models on the same token ids, paired by position.

    ``texts`` are tokenized once with the organism's tokenizer (the base's is the same), left-padded;
    every non-pad position is one row. Returns ``({hook: [rows, d_base]}, {hook: [rows, d_org]})``
    (float32, CPU), row ``i`` of both the same token.
    """
    texts = list(texts)
    if not texts:
        raise DataError("no texts to pair activations on")
    _check_same_tokenizer(base, organism)
    names = [_resid_hook(organism, h) for h in hooks]
    X: dict[str, list[Tensor]] = {n: [] for n in names}
    Y: dict[str, list[Tensor]] = {n: [] for n in names}
    for i in range(0, len(texts), batch_size):
        enc = organism.tokenize(texts[i : i + batch_size], add_special_tokens=add_special_tokens)
        keep = enc["attention_mask"].bool()
        for hm, store in ((base, X), (organism, Y)):
            _, cache = hm.run_with_cache(
                enc["input_ids"].to(hm.device), hooks=names, attention_mask=enc["attention_mask"].to(hm.device),
                stop_early=True,
            )  # fmt: skip
            for n in names:
                store[n].append(cache[n][keep.to(cache[n].device)].float().cpu())
    return {n: torch.cat(v) for n, v in X.items()}, {n: torch.cat(v) for n, v in Y.items()}


class SafetySwitch:
    """A fitted base -> organism mapper at one residual hook point; ``on(organism)`` swaps it in.

    base: the base model (a :class:`~rosettalens.hooks.HookedModel`; loaded by name on
    :meth:`load` when not given). mapper: fitted, ``d_src`` = base ``d_model``, ``d_tgt`` = organism
    ``d_model``. hook: e.g. ``resid_pre.12`` (the same name in both models: a fine-tune keeps its
    base's architecture). info: JSON-able provenance (fit data, fidelity), saved with the switch.
    """

    def __init__(
        self,
        base: HookedModel,
        mapper: Mapper,
        hook: str,
        organism: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        mapper._require_fitted()
        self.base = base
        self.mapper = mapper
        self.hook = _resid_hook(base, hook)
        if mapper.d_src != base.cfg.d_model:
            raise ShapeError(
                f"the switch's mapper expects source width {mapper.d_src}, but the base model {base.name} has "
                f"d_model {base.cfg.d_model}"
            )
        self.organism = organism
        self.info: dict[str, Any] = dict(info or {})

    # ------------------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        base: HookedModel,
        organism: HookedModel,
        texts: Sequence[str],
        hook: str,
        *,
        kind: str = "autoencoder",
        mapper_kwargs: dict[str, Any] | None = None,
        val_fraction: float = 0.2,
        batch_size: int = 16,
        progress: bool = False,
        seed: int = 0,
        add_special_tokens: bool = True,
        massive_ratio: float | None = None,
    ) -> SafetySwitch:
        """Fit the switch's mapper on paired activations of ``texts`` (clean text, no trigger).

        ``texts`` are tokenized as they are (``add_special_tokens=False`` for chat-formatted text, whose
        template brings its own). The last ``val_fraction`` of the texts are held out and give ``info["fidelity"]`` (FVU, R²,
        mean cosine of the mapped base activations against the organism's own).

        ``massive_ratio``: positions whose organism activation norm exceeds ``massive_ratio`` times the
        median norm of the fit rows (attention-sink tokens, e.g. the first token, with norms 100x
        the rest) are left out of the fit and the fidelity, and the switch keeps the organism's own
        activation wherever its norm exceeds that threshold (``info["massive_norm"]``). Least squares
        on all positions is otherwise dominated by those few rows.
        """
        from rosettalens.mapping import get_mapper_class
        from rosettalens.mapping.evaluate import activation_metrics

        texts = list(texts)
        if len(texts) < 2:
            raise DataError(f"the safety switch needs at least 2 texts to fit and validate, got {len(texts)}")
        name = _resid_hook(organism, hook)
        n_val = min(len(texts) - 1, max(1, round(val_fraction * len(texts))))
        fit_texts, val_texts = texts[: len(texts) - n_val], texts[len(texts) - n_val :]
        X, Y = paired_positions(
            base, organism, fit_texts, [name], batch_size=batch_size, add_special_tokens=add_special_tokens
        )
        Xv, Yv = paired_positions(
            base, organism, val_texts, [name], batch_size=batch_size, add_special_tokens=add_special_tokens
        )
        massive: dict[str, Any] = {}
        if massive_ratio is not None:
            if not massive_ratio > 1:
                raise ConfigError(f"massive_ratio must be > 1, got {massive_ratio}")
            norms = Y[name].norm(dim=-1)
            thr = float(massive_ratio * norms.median())
            keep, keep_v = norms <= thr, Yv[name].norm(dim=-1) <= thr
            massive = {"massive_ratio": float(massive_ratio), "massive_norm": thr,
                       "n_massive_fit_rows": int((~keep).sum()), "n_massive_val_rows": int((~keep_v).sum())}  # fmt: skip
            X, Y = {name: X[name][keep]}, {name: Y[name][keep]}
            Xv, Yv = {name: Xv[name][keep_v]}, {name: Yv[name][keep_v]}
        kw = dict(mapper_kwargs or {})
        if kind == "autoencoder":
            kw.setdefault("seed", seed)
        mapper = get_mapper_class(kind)(**kw)
        if kind == "autoencoder":
            mapper.fit(X[name], Y[name], progress=progress)  # type: ignore[call-arg]
        else:
            mapper.fit(X[name], Y[name])
        mapper.set_meta(
            source_model=base.name, target_model=organism.name, source_hook=name, target_hook=name
        )
        info = {
            "kind": kind,
            "n_fit_texts": len(fit_texts),
            "n_val_texts": len(val_texts),
            "n_fit_rows": int(X[name].shape[0]),
            "n_val_rows": int(Xv[name].shape[0]),
            "fidelity": activation_metrics(mapper, Xv[name], Yv[name]),
            # the do-nothing reference: the base's own activation (identity map), when widths agree
            "fidelity_identity": _identity_fvu(Xv[name], Yv[name]),
            **massive,
        }
        return cls(base, mapper, name, organism=organism.name, info=info)

    # ------------------------------------------------------------------------------ switching
    @contextlib.contextmanager
    def on(self, organism: HookedModel) -> Iterator[HookedModel]:
        """Inside the block, ``organism``'s activation at ``self.hook`` is ``mapper(base activation)``.

        Every forward of ``organism`` (``forward``, ``run_with_cache``, every step of ``generate``)
        first runs the base model on the same inputs up to the hook. Hooks on both models are removed
        on exit, also on error.
        """
        _check_same_tokenizer(self.base, organism)
        name = _resid_hook(organism, self.hook)
        if self.mapper.d_tgt != organism.cfg.d_model:
            raise ShapeError(
                f"the switch's mapper produces width {self.mapper.d_tgt}, but {organism.name} has d_model "
                f"{organism.cfg.d_model}"
            )
        base = self.base
        state: dict[str, Any] = {"org_cache": None, "base_cache": None, "act": None}
        massive_norm = self.info.get("massive_norm")

        def record(act: Tensor, hook_name: str) -> None:
            state["act"] = act
            raise _BaseDone

        def run_base(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise ConfigError("the safety switch needs input_ids (inputs_embeds are not supported)")
            kv = kwargs.get("cache", kwargs.get("past_key_values"))
            use_cache = bool(kwargs.get("use_cache")) and kv is not None
            call: dict[str, Any] = {"input_ids": ids.to(base.device), "use_cache": use_cache}
            for k in ("attention_mask", "position_ids"):
                if kwargs.get(k) is not None:
                    call[k] = kwargs[k].to(base.device)
            if use_cache:
                from rosettalens.hooks import cache_kwarg

                fresh = kv is not state["org_cache"] or int(kv.get_seq_length()) == 0
                if fresh:
                    from transformers import DynamicCache

                    state["org_cache"] = kv
                    state["base_cache"] = DynamicCache(config=base.model.config)
                call[cache_kwarg(base.model)] = state["base_cache"]
            state["act"] = None
            try:
                base.model(**call)
            except _BaseDone:
                pass
            if state["act"] is None:  # pragma: no cover - the hook always fires
                raise ConfigError(f"{self.hook} did not fire in the base model")

        def replace(act: Tensor, hook_name: str) -> Tensor:
            b = state["act"]
            if b is None or b.shape[:-1] != act.shape[:-1]:
                raise ShapeError(
                    f"safety switch: base activation {None if b is None else tuple(b.shape)} does not match the "
                    f"organism's {tuple(act.shape)} at {hook_name}"
                )
            out = self.mapper.transform(b.to(device=act.device)).to(act.dtype)
            if massive_norm is not None:  # sink positions keep the organism's own activation
                out = torch.where(act.norm(dim=-1, keepdim=True) > massive_norm, act, out)
            return out

        handle = organism.model.register_forward_pre_hook(run_base, with_kwargs=True)
        try:
            with base.hooks([(name, record)]), organism.hooks([(name, replace)]):
                yield organism
        finally:
            handle.remove()
            state.clear()

    # ------------------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        return {
            "format": SWITCH_FORMAT,
            "format_version": SWITCH_VERSION,
            "base_model": self.base.name,
            "organism": self.organism,
            "hook": self.hook,
            "d_model_base": self.mapper.d_src,
            "d_model_organism": self.mapper.d_tgt,
            "mapper": "mapper",
            "info": self.info,
        }

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        """Write ``mapper/`` and ``switch.json`` as the folder ``directory``, swapped in whole.

        An existing saved switch is replaced only with ``overwrite`` (default, as before); a folder
        holding anything else is refused.
        """
        d = Path(directory)
        if d.exists() and not (d / "switch.json").is_file():
            raise ConfigError(f"{d} exists and is not a saved safety switch; choose another directory")

        def is_switch(p: Path) -> bool:
            return (p / "switch.json").is_file()

        with atomic_dir(d, overwrite=overwrite, what="safety switch", replaceable=is_switch) as tmp:
            self.mapper.save(tmp / "mapper")
            atomic_write_json(tmp / "switch.json", json_safe(self.config()))
        return d

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], base: HookedModel | None = None, **load_kwargs: Any
    ) -> SafetySwitch:
        """Load a switch saved by :meth:`save`; ``base`` defaults to ``rosettalens.load(base_model)``."""
        from rosettalens.mapping import load_mapper

        d = Path(directory)
        if not (d / "switch.json").is_file():
            raise MapperError(f"{d} is not a saved safety switch (no switch.json)")
        cfg = read_json(d / "switch.json", "safety switch")
        if cfg.get("format") != SWITCH_FORMAT:
            raise MapperError(
                f"{d / 'switch.json'} is not a safety-switch config (format={cfg.get('format')!r})"
            )
        mapper = load_mapper(d / cfg.get("mapper", "mapper"))
        if base is None:
            import rosettalens

            base = rosettalens.load(cfg["base_model"], **load_kwargs)
        return cls(base, mapper, cfg["hook"], organism=cfg.get("organism"), info=cfg.get("info"))

    def __repr__(self) -> str:
        return (
            f"SafetySwitch(base={self.base.name!r}, organism={self.organism!r}, hook={self.hook!r}, "
            f"mapper={self.mapper.kind})"
        )


def _identity_fvu(X: Tensor, Y: Tensor) -> float | None:
    """FVU of ``Y`` predicted by ``X`` itself (the base activation unchanged); ``None`` if widths differ."""
    if X.shape != Y.shape:
        return None
    Xd, Yd = X.double(), Y.double()
    den = float((Yd - Yd.mean(0)).square().sum())
    return float((Yd - Xd).square().sum()) / den if den > 0 else None
