"""``rosetta data generate`` to a ``.txt`` file: one document per line, the same documents as ``.jsonl``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rosettalens.cli import main
from rosettalens.models.tiny import tiny_model, tiny_tokenizer


def _rosetta(capsys, *args: str) -> str:
    """Run ``rosetta ARGS``; assert exit 0 and return stdout."""
    capsys.readouterr()
    code = main([*args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _save_tiny(path: Path, family: str, seed: int, n_layers: int = 3, d_model: int = 48) -> str:
    model, tok = tiny_model(family, seed=seed, n_layers=n_layers, d_model=d_model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_data_generate_txt_holds_one_document_per_line(tmp_path, capsys):
    model = _save_tiny(tmp_path / "m", "llama", seed=0, n_layers=2, d_model=36)
    common = ["--model", model, "--n-tokens", "80", "--max-new-tokens", "16", "--batch-size", "4",
              "--seed", "5", "--no-progress", "--json"]  # fmt: skip
    txt = json.loads(_rosetta(capsys, "data", "generate", *common, "--out", str(tmp_path / "a" / "c.txt")))
    jl = json.loads(_rosetta(capsys, "data", "generate", *common, "--out", str(tmp_path / "b" / "c.jsonl")))
    docs = [json.loads(line)["text"] for line in (tmp_path / "b" / "c.jsonl").read_text("utf-8").splitlines()]
    lines = (tmp_path / "a" / "c.txt").read_text("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == txt["n_documents"] == len(docs) > 0
    # same seed and options: the same documents; in .txt each on one line, its inner newlines collapsed
    assert lines[:-1] == [re.sub(r"\s*\n\s*", " ", t).strip() for t in docs]
    assert all(line.strip() == line and line for line in lines[:-1])
    assert txt["documents_sha256"] == jl["documents_sha256"] and txt["n_tokens"] == jl["n_tokens"]
    tok = tiny_tokenizer()
    assert txt["n_tokens"] == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in docs) >= 80
