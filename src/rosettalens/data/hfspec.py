"""The one ``hf:`` dataset syntax of every command (``--data``, prompt sets), parsed without loading anything."""

from __future__ import annotations

from rosettalens.errors import DataError

__all__ = ["HF_SYNTAX", "parse_hf_spec"]

HF_SYNTAX = "hf:<dataset id>[:<config>][@<split>]"
_SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``(dataset id, config or None, split)`` of ``hf:<dataset id>[:<config>][@<split>]``.

    The one ``hf:`` syntax of every command (``--data``, prompt sets): the split follows ``@``
    (default ``train``), the config follows ``:``. Examples: ``hf:wikitext:wikitext-2-raw-v1@test``,
    ``hf:tatsu-lab/alpaca``, ``hf:allenai/c4:en@validation``. ``hf:<id>:<config>:<split>`` is read too
    (it is unambiguous); ``hf:<id>:<name>`` where ``<name>`` looks like a split (``hf:imdb:test``) is
    refused with one line saying to write ``hf:<id>@<split>`` or ``hf:<id>:<config>@train``.
    """
    if not spec.startswith("hf:"):
        raise DataError(f"{spec!r} is not a dataset spec; expected {HF_SYNTAX}")
    body = spec[len("hf:") :]
    split: str | None = None
    if body.count("@") > 1:
        raise DataError(f"cannot parse {spec!r}: more than one '@'; expected {HF_SYNTAX}")
    if "@" in body:
        body, split = body.split("@")
        if not split:
            raise DataError(f"empty split after '@' in {spec!r}; expected {HF_SYNTAX}")
    parts = body.split(":")
    ds_id = parts[0]
    if not ds_id:
        raise DataError(f"empty dataset id in {spec!r}; expected {HF_SYNTAX}")
    if any(not p for p in parts[1:]) or len(parts) > 3 or (len(parts) == 3 and split is not None):
        raise DataError(f"cannot parse {spec!r}; expected {HF_SYNTAX}")
    if len(parts) == 3:  # hf:<id>:<config>:<split>
        return ds_id, parts[1], parts[2]
    config = parts[1] if len(parts) == 2 else None
    if config is not None and split is None and config.lower() in _SPLIT_NAMES:
        raise DataError(
            f"{spec!r} is ambiguous: write hf:{ds_id}@{config} for the split {config!r}, "
            f"or hf:{ds_id}:{config}@train for a config named {config!r}"
        )
    return ds_id, config, split or "train"
