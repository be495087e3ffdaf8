"""A list of documents with its provenance (:class:`Corpus`) and the hash that identifies its texts."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Corpus", "documents_sha256"]


@dataclass(frozen=True)
class Corpus:
    """An ordered list of documents and where it came from.

    ``sha256`` identifies the exact texts (order included); two stores extracted from corpora with the
    same hash were extracted from the same documents.
    """

    spec: str
    documents: list[str]
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def sha256(self) -> str:
        return documents_sha256(self.documents)

    def describe(self) -> dict:
        """JSON-ready description for manifests: spec, number of documents, hash, source details."""
        return {"spec": self.spec, "n_documents": len(self.documents), "sha256": self.sha256, **self.info}


def documents_sha256(documents: Iterable[str]) -> str:
    """sha256 over the documents in order (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for doc in documents:
        b = doc.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
