"""Text corpora for extraction: files, Hugging Face datasets, built-in and model-generated corpora.

``load_documents(spec)`` is the single entry point; ``spec`` is

- a path to a ``.txt`` file (one document per line; blank lines are skipped),
- a path to a ``.jsonl`` file (one JSON object per line, text in field ``text`` or ``field=``),
- ``hf:<dataset id>[:split]`` or ``hf:<dataset id>:<config>:<split>`` (needs the optional
  ``datasets`` package; offline it fails with one clear :class:`DataError`),
- the name of a built-in dataset (``rosetta data list``).
"""

from __future__ import annotations

from rosettalens.data.sources import Corpus, builtin_datasets, load_documents
from rosettalens.errors import DataError

__all__ = ["Corpus", "DataError", "builtin_datasets", "load_documents"]
