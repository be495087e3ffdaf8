"""SAEs by hub id, and the one entry point :func:`load_sae` (a local folder or a hub id).

Local folders (ours, SAELens's, EleutherAI sparsify's) are read by :func:`rosettalens.sae.model.load_folder`
(formats described there); this module adds the download of ``owner/repo[/subfolder]`` from the
Hugging Face hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rosettalens.errors import DataError
from rosettalens.sae.model import CFG_FILE, SAE, load_folder

__all__ = ["load_folder", "load_hub", "load_sae"]


def load_sae(spec: str | os.PathLike, device: str | torch.device | None = None) -> SAE:
    """An SAE from a local folder (ours, SAELens, sparsify) or, online, a hub id ``owner/repo[/subfolder]``
    (``hf:`` prefix optional)."""
    s = str(spec)
    p = Path(s)
    if p.exists():
        sae = load_folder(p)
    elif s.startswith("hf:") or (s.count("/") >= 1 and not s.startswith((".", "/", "~"))):
        sae = load_hub(s.removeprefix("hf:"))
    else:
        raise DataError(f"SAE {s!r}: no such folder (and not a hub id owner/repo[/subfolder])")
    return sae.to(device) if device is not None else sae


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
