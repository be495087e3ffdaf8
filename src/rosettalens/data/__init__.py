"""Text corpora for extraction: files, Hugging Face datasets, built-in and model-generated corpora.

``load_documents(spec)`` is the single entry point; ``spec`` is

- a path to a ``.txt`` file (one document per line; blank lines are skipped),
- a path to a ``.jsonl`` file (one JSON object per line, text in field ``text`` or ``field=``),
- ``hf:<dataset id>[:<config>][@<split>]`` (split ``train`` by default; the one ``hf:`` syntax, also
  for prompt sets, see :func:`parse_hf_spec`; needs the optional ``datasets`` package; offline it
  fails with one clear :class:`DataError`),
- the name of a built-in dataset (``rosetta data list``).
"""

from __future__ import annotations

from rosettalens.data.sources import HF_SYNTAX, Corpus, builtin_datasets, load_documents, parse_hf_spec
from rosettalens.errors import DataError

__all__ = ["HF_SYNTAX", "Corpus", "DataError", "builtin_datasets", "load_documents", "parse_hf_spec"]
