"""An offline corpus sampled from a bundled base model: ``rosetta data generate``.

Documents start from short opening prompts of many genres; each batch draws its openings, a temperature
and a torch seed from the run seed, so the same ``(model, n_tokens, seed, options)`` gives the same
corpus. Near-empty, highly repetitive and duplicate samples are dropped.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any

import torch

from rosettalens.data.sources import documents_sha256
from rosettalens.errors import ConfigError, DataError
from rosettalens.io import atomic_write_json, atomic_write_text, check_output, sha256_file
from rosettalens.store import model_fingerprint

OPENINGS = [
    "The history of",
    "Once upon a time,",
    "In a recent study, researchers found that",
    "Dear friend,",
    "def main():",
    "The recipe calls for",
    "Breaking news:",
    "Q: Why is the sky blue?\nA:",
    "The best way to learn a new language is",
    "Chapter 1\n\n",
    "In 1850,",
    "The following is a list of",
    "import numpy as np\n",
    "My favourite place in the world is",
    "The theory of evolution",
    "According to the report,",
    "She opened the door and",
    "How to fix a flat tyre:",
    "The city of",
    "In mathematics, a prime number",
    "Product review:",
    "The meeting was scheduled for",
    "Once the water boils,",
    "The ancient Romans",
    "Step 1:",
    "Climate scientists warn that",
    "It was a dark and stormy night.",
    "The following code shows how to",
    "Welcome to our website!",
    "The football match ended",
    "Photosynthesis is",
    "To whom it may concern,",
    "The human brain",
    "A short poem about the sea:\n",
    "Yesterday I went to the market and",
    "The main difference between",
    "SELECT",
    "Abstract:",
    "The weather forecast for tomorrow",
    "He had never seen",
    "The company announced",
    "In the beginning",
    "Frequently asked questions\n\n",
    "The museum's new exhibition",
    "There are three reasons why",
    "My grandmother used to say",
    "The train was late again,",
    "Instructions: mix the flour and",
]
TEMPERATURES = (0.7, 0.85, 1.0, 1.15)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _repetitive(text: str) -> bool:
    words = text.split()
    if len(words) < 8:
        return len(set(words)) < len(words) / 2
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) < 0.5 * len(grams)


def _key(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def generate_corpus(
    hm,
    n_tokens: int,
    seed: int = 0,
    max_new_tokens: int = 96,
    batch_size: int = 8,
    top_p: float = 0.95,
    openings: list[str] | None = None,
    progress: bool = False,
) -> list[dict]:
    """Sample documents from ``hm`` (a HookedModel) until they hold ``n_tokens`` tokens.

    Returns ``[{"text", "opening", "temperature", "seed"}]`` in generation order, deduplicated.
    """
    if n_tokens < 1:
        raise ConfigError(f"--n-tokens must be >= 1, got {n_tokens}")
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("--max-new-tokens and --batch-size must be >= 1")
    openings = openings or OPENINGS
    tok = hm.tokenizer
    seen: set[str] = set()
    docs: list[dict] = []
    total = 0
    max_rounds = 20 + 4 * (n_tokens // max(1, batch_size * max_new_tokens // 2) + 1)
    from tqdm import tqdm

    bar = tqdm(total=n_tokens, desc=f"generate {hm.name}", unit="tok", disable=not progress, file=sys.stderr)
    for r in range(max_rounds):
        rng = random.Random(f"{seed}:{r}")
        prompts = [rng.choice(openings) for _ in range(batch_size)]
        temp = rng.choice(TEMPERATURES)
        batch_seed = rng.randrange(2**31)
        torch.manual_seed(batch_seed)
        enc = hm.tokenize(prompts)
        out = hm.model.generate(
            **enc,
            do_sample=True,
            temperature=temp,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
        )
        new = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for prompt, cont in zip(prompts, new):
            cont = _CONTROL.sub("", cont.replace("\ufffd", ""))  # cut multi-byte chars, control chars
            text = (prompt + cont).strip()
            if len(cont.strip()) < 12 or _repetitive(cont):
                continue
            k = _key(text)
            ck = _key(cont)[:48]
            if k in seen or ck in seen:
                continue
            seen.update((k, ck))
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            docs.append({"text": text, "opening": prompt, "temperature": temp, "seed": batch_seed})
            total += n
            bar.update(n)
            if total >= n_tokens:
                bar.close()
                return docs
    bar.close()
    if not docs:
        raise DataError(f"{hm.name} produced no usable documents (all empty, repetitive or duplicates)")
    return docs


def write_corpus(docs: list[dict], out: Path, overwrite: bool = False) -> None:
    """Write documents atomically: ``.jsonl`` keeps everything, ``.txt`` one document per line.

    An existing ``out`` is refused (:class:`~rosettalens.errors.OutputExistsError`) unless ``overwrite``.
    """
    if out.suffix == ".jsonl":
        body = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    elif out.suffix == ".txt":
        body = "".join(re.sub(r"\s*\n\s*", " ", d["text"]).strip() + "\n" for d in docs)
    else:
        raise ConfigError(f"--out must end in .jsonl or .txt, got {out.name!r}")
    atomic_write_text(out, body, overwrite=overwrite)


def check_corpus_out(out: str | Path, overwrite: bool = False) -> Path:
    """Check ``out`` before any generation: a ``.jsonl``/``.txt`` file name, not a folder, and not an
    existing file unless ``overwrite`` or it is a corpus this module wrote (it has a ``.meta.json``
    sidecar; :func:`generate_to_file` then reuses it when the options match, else replaces it)."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a .jsonl or .txt file name")
    if out.suffix not in (".jsonl", ".txt"):
        raise ConfigError(f"--out must end in .jsonl or .txt, got {out.name!r}")
    if not _meta_path(out).is_file():
        check_output(out, overwrite, "corpus file")
    return out


def _meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def generate_to_file(
    hm,
    out: str | Path,
    n_tokens: int,
    seed: int = 0,
    progress: bool = False,
    overwrite: bool = False,
    **kw: Any,
) -> dict:
    """Generate (or reuse the cached) corpus at ``out``; returns a summary dict.

    A sidecar ``<out>.meta.json`` records the model fingerprint and options; a rerun with the same ones
    returns the existing file untouched (``cached: true``). A corpus this function wrote with other
    options is replaced; any other existing file is refused unless ``overwrite`` (checked before the
    model generates anything). A folder given as ``out`` is a :class:`ConfigError`.
    """
    out = check_corpus_out(out, overwrite)
    meta_path = _meta_path(out)
    options = {"n_tokens": n_tokens, "seed": seed, **kw}
    ident = {"model": hm.name, "fingerprint": model_fingerprint(hm), "options": options}
    if out.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text("utf-8"))
        except ValueError:
            meta = {}
        same = isinstance(meta, dict) and meta.get("identity") == ident
        if same and meta.get("file_sha256") == sha256_file(out):
            return {**meta["summary"], "cached": True}
    docs = generate_corpus(hm, n_tokens, seed=seed, progress=progress, **kw)
    # checked above: a corpus of ours (it has a sidecar) or --overwrite; at the swap a newcomer is refused
    write_corpus(docs, out, overwrite=overwrite or meta_path.is_file())
    texts = [d["text"] for d in docs]
    n_tok = sum(len(hm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    summary = {
        "path": str(out),
        "model": hm.name,
        "n_documents": len(docs),
        "n_tokens": n_tok,
        "documents_sha256": documents_sha256(texts),
        "seed": seed,
    }
    atomic_write_json(meta_path, {"identity": ident, "summary": summary, "file_sha256": sha256_file(out)})
    return {**summary, "cached": False}
