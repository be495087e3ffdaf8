"""Reading SAE folders: ours, SAELens's and EleutherAI sparsify's; downloading them by hub id.

Formats (as the peers write them):

* SAELens (>= 6, and the older schema it still reads): ``cfg.json`` (``architecture`` standard | topk |
  jumprelu, ``d_in``, ``d_sae``, ``k``, ``apply_b_dec_to_input``, ``normalize_activations``,
  ``metadata.hook_name`` ...) + ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
  ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, ``threshold [d_sae]`` for jumprelu). A BatchTopK SAE is saved
  as jumprelu with its learned threshold in every entry. Pre-6 configs (``hook_point``,
  ``activation_fn_str``, ``activation_fn_kwargs.k``) are read too.
* sparsify: ``cfg.json`` (``d_in``, ``num_latents`` or ``expansion_factor``, ``k``, ``activation``) +
  ``sae.safetensors`` (``encoder.weight [num_latents, d_in]``, ``encoder.bias``, ``W_dec [num_latents,
  d_in]``, ``b_dec [d_in]``); latents are the top k of ``relu(encoder(x - b_dec))``.
* ours is SAELens's, with our own record under ``cfg.json["rosettalens"]``.

Loaded weights are kept as they are (a peer's decoder rows need not be unit-norm), so latents equal the
peer's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rosettalens.errors import ConfigError, DataError
from rosettalens.sae.model import CFG_FILE, FORMAT, SAE, SPARSIFY_WEIGHTS_FILE, WEIGHTS_FILE, SAEConfig

__all__ = ["load_folder", "load_hub"]


def _read_cfg(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise DataError(f"SAE folder {path} does not exist")
    p = path / CFG_FILE
    if not p.is_file():
        raise DataError(f"SAE folder {path} has no {CFG_FILE}")
    try:
        cfg = json.loads(p.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{p} must hold a JSON object")
    return cfg


def _tensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        t = load_file(str(p))
    except Exception as e:  # safetensors raises its own error types
        raise DataError(f"{p} is not a readable safetensors file ({e})") from None
    return {k: v.float() for k, v in t.items()}


def _int(cfg: dict, key: str, where: Path) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise DataError(f"{where / CFG_FILE}: {key!r} must be an integer, got {v!r}")
    return v


def _expect(t: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], where: Path) -> torch.Tensor:
    if name not in t:
        raise DataError(f"{where}: the weights have no {name!r} (have: {', '.join(sorted(t))})")
    if tuple(t[name].shape) != shape:
        raise DataError(
            f"{where}: {name} has shape {tuple(t[name].shape)} but cfg.json implies {shape} (inconsistent cfg.json)"
        )
    return t[name]


def _build(cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, threshold=None) -> SAE:
    try:
        sae = SAE(cfg)
    except ConfigError as e:
        raise DataError(f"inconsistent SAE config: {e}") from None
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        if sae.threshold is not None:
            sae.threshold.copy_(threshold)
    return sae


def load_folder(path: Path) -> SAE:
    """An SAE from a local folder in any of the formats above."""
    cfg = _read_cfg(path)
    if (path / WEIGHTS_FILE).is_file():
        return _load_saelens(path, cfg)
    if (path / SPARSIFY_WEIGHTS_FILE).is_file():
        return _load_sparsify(path, cfg)
    raise DataError(
        f"SAE folder {path} has {CFG_FILE} but neither {WEIGHTS_FILE} nor {SPARSIFY_WEIGHTS_FILE}"
    )


def _load_saelens(path: Path, cfg: dict[str, Any]) -> SAE:
    ours = cfg.get("rosettalens")
    meta: dict[str, Any] = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}
    d_in, d_sae = _int(cfg, "d_in", path), _int(cfg, "d_sae", path)
    arch_peer = cfg.get("architecture") or "standard"
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    k = cfg.get("k")
    if k is None and isinstance(cfg.get("activation_fn_kwargs"), dict):
        k = cfg["activation_fn_kwargs"].get("k")
    if arch_peer == "standard" and act == "topk" and k is not None:
        arch_peer = "topk"  # pre-6 topk schema
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise DataError(f"{path}: normalize_activations={norm!r} is not supported (only none)")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise DataError(f"{path}: reshape_activations={cfg['reshape_activations']!r} is not supported")

    if isinstance(ours, dict):
        if ours.get("format") != FORMAT:
            raise DataError(
                f"{path}: unknown rosettalens SAE format {ours.get('format')!r} (expected {FORMAT})"
            )
        try:
            scfg = SAEConfig.from_dict(ours.get("config") or {})
        except TypeError as e:
            raise DataError(f"{path / CFG_FILE}: bad rosettalens config ({e})") from None
        if (scfg.d_in, scfg.width) != (d_in, d_sae):
            raise DataError(
                f"{path / CFG_FILE} is inconsistent: d_in/d_sae {d_in}/{d_sae} vs its rosettalens config "
                f"{scfg.d_in}/{scfg.width}"
            )
        want = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}.get(
            scfg.arch
        )
        if want != arch_peer:
            raise DataError(
                f"{path / CFG_FILE} is inconsistent: architecture {arch_peer!r} vs rosettalens arch {scfg.arch!r}"
            )
        if scfg.arch == "topk" and k != scfg.k:
            raise DataError(f"{path / CFG_FILE} is inconsistent: k={k} vs rosettalens k={scfg.k}")
    else:
        if arch_peer == "standard":
            if act != "relu":
                raise DataError(f"{path}: activation {act!r} is not supported (relu, topk, jumprelu)")
            arch = "relu"
        elif arch_peer in ("topk", "jumprelu"):
            arch = arch_peer
        else:
            raise DataError(
                f"{path}: SAELens architecture {arch_peer!r} is not supported (standard, topk, jumprelu)"
            )
        if arch == "topk" and not isinstance(k, int):
            raise DataError(f"{path / CFG_FILE}: a topk SAE needs an integer k, got {k!r}")
        scfg = SAEConfig(
            d_in=d_in,
            width=d_sae,
            arch=arch,
            k=int(k) if arch == "topk" else None,  # type: ignore[arg-type]
            model=meta.get("model_name", cfg.get("model_name")),
            hook=meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point"))),
        )
    t = _tensors(path / WEIGHTS_FILE)
    W_enc = _expect(t, "W_enc", (d_in, d_sae), path)
    b_enc = _expect(t, "b_enc", (d_sae,), path)
    W_dec = _expect(t, "W_dec", (d_sae, d_in), path)
    b_dec = _expect(t, "b_dec", (d_in,), path)
    thr = None
    if scfg.arch in ("jumprelu", "batchtopk"):
        if "threshold" in t:
            thr = _expect(t, "threshold", (d_sae,), path)
        elif "log_threshold" in t:
            thr = _expect(t, "log_threshold", (d_sae,), path).exp()
        else:
            raise DataError(f"{path}: a jumprelu SAE needs 'threshold' in {WEIGHTS_FILE}")
    if not cfg.get("apply_b_dec_to_input", True):  # SAELens then encodes x, not x - b_dec
        b_enc = b_enc + b_dec @ W_enc
    sae = _build(scfg, W_enc, b_enc, W_dec, b_dec, thr)
    if isinstance(ours, dict):
        sae.input_scale = float(ours.get("input_scale") or 1.0)
        sae.info = dict(ours.get("info") or {})
    sae.info.setdefault(
        "source", {"format": "rosettalens" if isinstance(ours, dict) else "saelens", "path": str(path)}
    )
    return sae


def _load_sparsify(path: Path, cfg: dict[str, Any]) -> SAE:
    d_in = _int(cfg, "d_in", path)
    n = cfg.get("num_latents") or 0
    if not n:
        ef = cfg.get("expansion_factor")
        if not isinstance(ef, int) or ef < 1:
            raise DataError(f"{path / CFG_FILE}: needs num_latents or expansion_factor")
        n = d_in * ef
    k = cfg.get("k")
    if not isinstance(k, int):
        raise DataError(f"{path / CFG_FILE}: 'k' must be an integer, got {k!r}")
    if cfg.get("activation", "topk") != "topk":
        raise DataError(f"{path}: sparsify activation {cfg.get('activation')!r} is not supported (topk only)")
    if cfg.get("transcode"):
        raise DataError(f"{path}: a sparsify transcoder is not an autoencoder; not supported")
    t = _tensors(path / SPARSIFY_WEIGHTS_FILE)
    if "W_skip" in t:
        raise DataError(f"{path}: sparsify skip connections (W_skip) are not supported")
    enc = _expect(t, "encoder.weight", (n, d_in), path)
    b_enc = _expect(t, "encoder.bias", (n,), path)
    W_dec = _expect(t, "W_dec", (n, d_in), path)
    b_dec = _expect(t, "b_dec", (d_in,), path)
    scfg = SAEConfig(d_in=d_in, width=n, arch="topk", k=k)
    sae = _build(scfg, enc.t(), b_enc, W_dec, b_dec)
    sae.info["source"] = {"format": "sparsify", "path": str(path)}
    return sae


def load_hub(spec: str) -> SAE:
    """Download ``owner/repo[/subfolder]`` from the Hugging Face hub (SAELens or sparsify layout) and load it."""
    parts = [p for p in spec.strip("/").split("/") if p]
    if len(parts) < 2:
        raise DataError(f"hub SAE {spec!r}: expected owner/repo[/subfolder]")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download

        local = Path(
            snapshot_download(
                repo,
                allow_patterns=[f"{sub}/{CFG_FILE}", f"{sub}/*.safetensors"]
                if sub
                else [CFG_FILE, "*.safetensors"],
            )
        )
    except Exception as e:  # offline, unknown repo, gated: one clear line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot download SAE {spec!r} from the hub ({type(e).__name__}: {msg})") from None
    folder = local / sub if sub else local
    if not (folder / CFG_FILE).is_file():
        raise DataError(
            f"hub SAE {spec!r} has no {CFG_FILE} there; name the subfolder (owner/repo/subfolder)"
        )
    sae = load_folder(folder)
    sae.info["source"] = {**sae.info.get("source", {}), "hub": spec}
    return sae
