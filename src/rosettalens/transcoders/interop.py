"""circuit-tracer's published transcoder format: load it as a :class:`TranscoderSet`, write ours in it.

A circuit-tracer transcoder set is a folder with ``config.yaml`` and one safetensors file per layer::

    config.yaml            model_kind: transcoder_set
                           feature_input_hook: mlp.hook_in | ln2.hook_normalized | hook_resid_mid
                           feature_output_hook: mlp.hook_out | hook_mlp_out
                           activation: relu | topk (jumprelu when the files hold a threshold)
                           k: K (topk)
                           transcoders: [path per layer, in layer order]  (optional; default
                                        layer_{i}.safetensors beside config.yaml)
    layer_{i}.safetensors  W_enc [width, d_model]   b_enc [width]
                           W_dec [width, d_model]   b_dec [d_model]
                           W_skip [d_model, d_model] (optional; applied as x @ W_skip.T)
                           activation_function.threshold [width] (optional: JumpReLU)
                           k (optional scalar: TopK)

Their encoder is ``F.linear(x, W_enc, b_enc)``, so ``W_enc`` is stored transposed to ours, as is
``W_skip``; ``W_dec`` has our layout. Input hooks map to ours as: ``mlp.hook_in`` and
``ln2.hook_normalized`` -> ``mlp_in.L`` (the MLP's input after its norm); ``hook_resid_mid`` ->
``resid_mid.L`` (before the norm: such a transcoder reads the residual stream, and a replacement
must feed it that); output hooks ``mlp.hook_out`` / ``hook_mlp_out`` -> ``mlp_out.L``. Hub folders
(``hf://`` paths) are not fetched: download them first and pass the local folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rosettalens.errors import DataError
from rosettalens.names import hook_name
from rosettalens.transcoders.model import Transcoder, TranscoderConfig, TranscoderSet

__all__ = ["load_circuit_tracer", "save_circuit_tracer", "INPUT_HOOKS", "OUTPUT_HOOKS"]

CONFIG = "config.yaml"
#: circuit-tracer (TransformerLens) hook suffix -> our hook kind
INPUT_HOOKS = {"mlp.hook_in": "mlp_in", "ln2.hook_normalized": "mlp_in", "hook_resid_mid": "resid_mid"}
OUTPUT_HOOKS = {"mlp.hook_out": "mlp_out", "hook_mlp_out": "mlp_out"}
THRESHOLD_KEY = "activation_function.threshold"


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a circuit-tracer config (expected a mapping)")
    return d


def _layer_paths(folder: Path, cfg: dict[str, Any]) -> dict[int, Path]:
    if "transcoders" in cfg:
        paths = cfg["transcoders"]
        if not isinstance(paths, list) or not paths:
            raise DataError(f"{folder / CONFIG}: 'transcoders' must be a non-empty list of files")
        out = {}
        for i, p in enumerate(paths):
            if str(p).startswith("hf://"):
                raise DataError(
                    f"{folder / CONFIG} names hub file {p}; download the set and list local files instead"
                )
            q = Path(p)
            out[i] = q if q.is_absolute() else folder / q
        return out
    files = sorted(folder.glob("layer_*.safetensors"))
    if not files:
        raise DataError(f"{folder}: no layer_*.safetensors files beside {CONFIG}")
    return {i: folder / f"layer_{i}.safetensors" for i in range(len(files))}


def _hook(name: str, table: dict[str, str], layer: int, what: str) -> str:
    kind = table.get(name)
    if kind is None:
        raise DataError(
            f"circuit-tracer {what} {name!r} is not supported; expected one of {', '.join(table)}"
        )
    return hook_name(kind, layer)


def load_circuit_tracer(folder: str | os.PathLike, model: str | None = None) -> TranscoderSet:
    """A :class:`TranscoderSet` from a circuit-tracer transcoder folder (module docstring).

    ``model``: recorded as the set's model (default: the config's ``model_name``, else ``""``)."""
    from safetensors.torch import load_file

    p = Path(folder)
    if not (p / CONFIG).is_file():
        raise DataError(f"{p} is not a circuit-tracer transcoder folder (no {CONFIG})")
    cfg = _read_yaml(p / CONFIG)
    kind = cfg.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise DataError(f"{p / CONFIG}: model_kind {kind!r} is not supported (only transcoder_set)")
    activation = cfg.get("activation")
    tcs: dict[int, Transcoder] = {}
    for layer, path in _layer_paths(p, cfg).items():
        if not path.is_file():
            raise DataError(f"circuit-tracer set {p}: {path} is missing")
        try:
            t = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise DataError(f"cannot read {path}: {e}") from e
        missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(t)
        if missing:
            raise DataError(f"{path} lacks {', '.join(sorted(missing))}")
        width, d_in = t["W_enc"].shape
        d_out = t["b_dec"].shape[0]
        if THRESHOLD_KEY in t or "threshold" in t:
            arch, k = "jumprelu", 1
        elif activation == "topk" or "k" in t:
            arch = "topk"
            k = int(cfg["k"]) if cfg.get("k") is not None else int(t["k"]) if "k" in t else 0
            if k < 1:
                raise DataError(f"{p / CONFIG}: activation topk needs k")
        else:
            arch, k = "relu", 1
        tcfg = TranscoderConfig(
            layer=layer, d_in=d_in, d_out=d_out, width=width, arch=arch, k=k, skip="W_skip" in t,  # type: ignore[arg-type]
            hook_in=_hook(str(cfg.get("feature_input_hook", "mlp.hook_in")), INPUT_HOOKS, layer, "input hook"),
            hook_out=_hook(str(cfg.get("feature_output_hook", "mlp.hook_out")), OUTPUT_HOOKS, layer, "output hook"),
            model=model or str(cfg.get("model_name", "") or ""), skip_first=1, norm_ratio=0.0,
            info={"source": "circuit-tracer", "path": str(path)},
        )  # fmt: skip
        ours: dict[str, Tensor] = {
            "W_enc": t["W_enc"].t(),
            "b_enc": t["b_enc"],
            "W_dec": t["W_dec"],
            "b_dec": t["b_dec"],
        }
        if "W_skip" in t:
            ours["W_skip"] = t["W_skip"].t()
        if arch == "jumprelu":
            ours["threshold"] = t[THRESHOLD_KEY] if THRESHOLD_KEY in t else t["threshold"]
        tcs[layer] = Transcoder.from_tensors(tcfg, ours, str(path))
    return TranscoderSet(tcs[0].cfg.model, tcs, info={"source": "circuit-tracer", "config": cfg})


def save_circuit_tracer(tset: TranscoderSet, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``tset`` in circuit-tracer's layout (``config.yaml`` + ``layer_{i}.safetensors``).

    circuit-tracer wants every layer from 0 to the last; sets with gaps are refused. Our
    transcoders read ``mlp_in.L`` and write ``mlp_out.L``: ``mlp.hook_in`` / ``mlp.hook_out``."""
    import yaml
    from safetensors.torch import save_file

    from rosettalens.errors import ConfigError
    from rosettalens.io import atomic_dir, atomic_write_text

    if tset.layers != list(range(len(tset))):
        raise ConfigError(f"circuit-tracer needs every layer from 0; this set has {tset.layers}")
    archs = {tset[L].cfg.arch for L in tset.layers}
    ks = {tset[L].cfg.k for L in tset.layers}
    if len(archs) != 1 or ("topk" in archs and len(ks) != 1):
        raise ConfigError("circuit-tracer needs one activation (and one k) for every layer")
    arch = archs.pop()
    cfg: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "model_name": tset.model,
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
    }
    if arch != "jumprelu":
        cfg["activation"] = arch
    if arch == "topk":
        cfg["k"] = int(ks.pop())
    out = Path(folder)

    def earlier(p: Path) -> bool:  # what overwrite may replace: a folder this function wrote
        names = {q.name for q in p.iterdir()} if p.is_dir() else set()
        return CONFIG in names and all(
            n == CONFIG or re.fullmatch(r"layer_\d+\.safetensors", n) for n in names
        )

    with atomic_dir(out, overwrite=overwrite, what="circuit-tracer folder", replaceable=earlier) as tmp:
        for L in tset.layers:
            t = tset[L].state_tensors()
            ct = {
                "W_enc": t["W_enc"].t().contiguous(),
                "b_enc": t["b_enc"],
                "W_dec": t["W_dec"],
                "b_dec": t["b_dec"],
            }
            if "W_skip" in t:
                ct["W_skip"] = t["W_skip"].t().contiguous()
            if "threshold" in t:
                ct[THRESHOLD_KEY] = t["threshold"]
            if arch == "topk":
                ct["k"] = torch.tensor(int(tset[L].cfg.k))
            save_file(ct, str(tmp / f"layer_{L}.safetensors"))
        atomic_write_text(tmp / CONFIG, yaml.safe_dump(cfg, sort_keys=False))
    return out
