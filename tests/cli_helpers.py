"""Helpers shared by the command-line tests: run ``rosetta`` in-process, save a tiny model folder."""

from __future__ import annotations

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


def save_tiny(path: Path, family: str, seed: int, n_layers: int = 3, d_model: int = 48) -> str:
    """A tiny random model of ``family`` saved as an HF folder at ``path``; returns the path."""
    model, tok = tiny_model(family, seed=seed, n_layers=n_layers, d_model=d_model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
