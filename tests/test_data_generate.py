"""``rosetta data generate`` to a ``.txt`` file: one document per line, the same documents as ``.jsonl``."""

from __future__ import annotations

import json
import re

from cli_helpers import run_rosetta, save_tiny
from rosettalens.models.tiny import tiny_tokenizer


def test_data_generate_txt_holds_one_document_per_line(tmp_path, capsys):
    model = save_tiny(tmp_path / "m", "llama", seed=0, n_layers=2, d_model=36)
    common = ["--model", model, "--n-tokens", "80", "--max-new-tokens", "16", "--batch-size", "4",
              "--seed", "5", "--no-progress", "--json"]  # fmt: skip
    txt = json.loads(run_rosetta(capsys, "data", "generate", *common, "--out", str(tmp_path / "a" / "c.txt")))
    jl = json.loads(
        run_rosetta(capsys, "data", "generate", *common, "--out", str(tmp_path / "b" / "c.jsonl"))
    )
    docs = [json.loads(line)["text"] for line in (tmp_path / "b" / "c.jsonl").read_text("utf-8").splitlines()]
    lines = (tmp_path / "a" / "c.txt").read_text("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == txt["n_documents"] == len(docs) > 0
    # same seed and options: the same documents; in .txt each on one line, its inner newlines collapsed
    assert lines[:-1] == [re.sub(r"\s*\n\s*", " ", t).strip() for t in docs]
    assert all(line.strip() == line and line for line in lines[:-1])
    assert txt["documents_sha256"] == jl["documents_sha256"] and txt["n_tokens"] == jl["n_tokens"]
    tok = tiny_tokenizer()
    assert txt["n_tokens"] == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in docs) >= 80
