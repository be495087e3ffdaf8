"""Helpers shared by the command-line tests: run ``rosetta`` in-process, run two ranks under torchrun,
save a tiny model folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rosettalens.cli import main
from rosettalens.models.tiny import tiny_model


def run_rosetta(capsys, *args: str) -> str:
    """Run ``rosetta ARGS``; assert exit 0 and return stdout."""
    capsys.readouterr()
    code = main([*args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def run_torchrun(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None):
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (a script, or ``-m module ...``) with this checkout
    on the path and one thread per rank (``env`` adds to the environment); asserts exit 0 and returns the
    completed process (stdout: what the ranks printed)."""
    full = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    full["PYTHONPATH"] = src + os.pathsep + full.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    r = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def save_tiny(path: Path, family: str, seed: int, n_layers: int = 3, d_model: int = 48) -> str:
    """A tiny random model of ``family`` saved as an HF folder at ``path``; returns the path."""
    model, tok = tiny_model(family, seed=seed, n_layers=n_layers, d_model=d_model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
