"""Typed exceptions. Every error a user can cause is a :class:`RosettaError`.

The CLI turns any ``RosettaError`` into one line on stderr and exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RosettaError(Exception):
    """Base class for every error caused by the user's input or environment."""


class UnknownModelError(RosettaError, LookupError):
    """A MODEL string names no zoo model, cached hub id, local folder or GGUF file."""


class ZooUnavailableError(RosettaError):
    """A zoo model's wheels cannot be fetched (offline, no cache)."""


class ChecksumError(RosettaError):
    """An assembled file or a stored shard does not match its recorded sha256."""


class CacheError(RosettaError):
    """A converted-model cache is corrupt or half-written."""


class HookPointError(RosettaError, KeyError):
    """Unknown hook-point name, or a layer index out of range."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ChatTemplateError(RosettaError):
    """The tokenizer has no chat template but a chat-formatted prompt was asked for."""


class DataError(RosettaError, ValueError):
    """Missing, empty, corrupt or unsupported data (files, datasets, prompts)."""


class StoreError(RosettaError):
    """An activation store is missing, corrupt, or was written with another config."""


class ShapeError(RosettaError, ValueError):
    """Mismatched dimensions between tensors, mappers, vectors or models."""


class ConfigError(RosettaError, ValueError):
    """An invalid option value or combination of options."""


class OutputExistsError(RosettaError, FileExistsError):
    """An output exists and ``--overwrite`` was not given, or it cannot be written at all."""
