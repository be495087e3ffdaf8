"""Activation stores: sharded safetensors on disk, a memory-mapped reader, and ``extract()``.

A store is a folder::

    manifest.json              model + fingerprint, tokenizer, hooks, dtype, dataset + hash, options,
                               rows, shards (rows, sha256), package versions
    documents.jsonl            the documents the rows come from ({"doc": i, "text": ...} per line)
    shard-00000.safetensors    one tensor per hook [rows, d] (storage dtype) and per row:
                               token_ids, doc_index, pos_index, char_end (int) ...

Rows are tokens in canonical order: by document, then by position. ``pos_index`` is the token's index in
its (unpadded) tokenized document, ``char_end`` the character offset where the token ends in the
document text (``-1`` for tokens that end inside a character or are special), used by
:mod:`rosettalens.align` to pair stores of two models. Padding never enters a store; special tokens
(BOS, ...) are left out unless ``keep_special=True``.

Shard ``k`` holds rows ``[k * shard_size, (k + 1) * shard_size)``: the plan is a pure function of the
config, so an interrupted extraction resumes at the first missing shard and the finished store is
identical to an uninterrupted one; under ``torchrun`` rank ``r`` computes shards ``k % world == r`` and
rank 0 writes the manifest, so the store is the same as a single-process one.

While an extraction writes a store, ``.extract.lock`` in it holds the writer's pid: a second
``extract`` into the same folder is refused with one line (:class:`rosettalens.io.LockedError`)
instead of deleting the first one's temporary shards; the lock of a killed writer is taken over.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import json
import math
import os
import shutil
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rosettalens.data import Corpus, load_documents
from rosettalens.errors import (
    ChecksumError,
    ConfigError,
    DataError,
    HookPointError,
    RosettaError,
    StoreError,
)
from rosettalens.io import (
    FileLock,
    atomic_write_bytes,
    atomic_write_json,
    is_temp_name,
    sha256_bytes,
    sha256_file,
)
from rosettalens.models.loading import load
from rosettalens.offsets import char_ends_by_decoding, char_ends_from_offsets

FORMAT = "rosettalens.activation_store/1"
MANIFEST = "manifest.json"
PROGRESS = ".extract-in-progress.json"
LOCK = ".extract.lock"  # the writer's lock (owner pid) while an extraction writes the store
DOCUMENTS = "documents.jsonl"
INDEX_TENSORS = ("token_ids", "doc_index", "pos_index", "char_end")

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}
_ST_ITEM = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8}

__all__ = ["ActivationStore", "ExtractConfig", "extract", "shard_name", "StoreError"]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _read_header(path: Path) -> tuple[int, dict]:
    """safetensors layout: u64 little-endian header length, JSON header, raw data. Returns (data start, header).

    A header that is not JSON, or not tensors this reader knows (dtype, shape, data offsets that agree),
    is one :class:`StoreError` line."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        _check_header(header)
    except (OSError, ValueError, struct.error) as e:
        raise StoreError(f"shard {path} is unreadable or truncated ({str(e).splitlines()[0]})") from None
    return 8 + n, header


def _check_header(header: Any) -> None:
    """ValueError unless ``header`` is a safetensors header whose tensors this reader can map."""
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in _ST_ITEM:
            raise ValueError(f"tensor {name!r} has no known dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r} has no valid shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets):
            raise ValueError(f"tensor {name!r} has no valid data_offsets")
        if (
            not 0 <= offsets[0] <= offsets[1]
            or offsets[1] - offsets[0] != math.prod(shape) * _ST_ITEM[info["dtype"]]
        ):
            raise ValueError(f"tensor {name!r}: data_offsets do not match its shape and dtype")


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def _check_manifest(mp: Path, m: Any) -> None:
    """One :class:`StoreError` line for a manifest that is valid JSON but not a store's manifest."""
    if not isinstance(m, dict):
        raise StoreError(f"{mp} is not a store manifest (a JSON {type(m).__name__}, expected an object)")
    if m.get("format") != FORMAT:
        raise StoreError(f"{mp.parent}: unknown store format {m.get('format')!r} (expected {FORMAT})")

    def bad(what: str) -> StoreError:
        return StoreError(f"{mp} is corrupt: {what}; extract the store again")

    for key in ("hooks", "hook_shapes", "d_model", "dtype", "shards", "model"):
        if key not in m:
            raise bad(f"no {key!r}")
    hooks = m["hooks"]
    if not isinstance(hooks, list) or not hooks or not all(isinstance(h, str) for h in hooks):
        raise bad("'hooks' is not a non-empty list of hook names")
    shapes = m["hook_shapes"]
    if not isinstance(shapes, dict) or any(
        not isinstance(shapes.get(h), list) or not all(isinstance(n, int) for n in shapes[h]) for h in hooks
    ):
        raise bad("'hook_shapes' does not give a shape for every hook")
    if not isinstance(m["d_model"], int) or isinstance(m["d_model"], bool):
        raise bad("'d_model' is not an integer")
    if m["dtype"] not in STORAGE_DTYPES:
        raise bad(f"'dtype' {m['dtype']!r} is not one of {', '.join(STORAGE_DTYPES)}")
    if not isinstance(m["model"], dict) or not isinstance(m["model"].get("name"), str):
        raise bad("'model' has no name")
    shards = m["shards"]
    if not isinstance(shards, list) or not all(
        isinstance(sh, dict)
        and isinstance(sh.get("file"), str)
        and "/" not in sh["file"]
        and isinstance(sh.get("rows"), int)
        and isinstance(sh.get("sha256"), str)
        for sh in shards
    ):
        raise bad("'shards' is not a list of {file, rows, sha256}")


# --------------------------------------------------------------------------------------------- reader
class ActivationStore:
    """Read-only view of a finished store; tensors are memory-mapped, never loaded whole.

    ``read(hook, rows)`` -> ``[rows, d]`` (``[rows, *shape]`` for per-head hooks) in the storage dtype.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.hooks: list[str] = list(manifest["hooks"])
        self.d_model: int = int(manifest["d_model"])
        self._shards = manifest["shards"]
        self._rows = np.array([s["rows"] for s in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._rows)]).astype(np.int64)
        self._headers: list[tuple[int, dict]] = []
        for s in self._shards:
            p = path / s["file"]
            if not p.is_file():
                raise StoreError(f"store {path}: shard {s['file']} is missing")
            start, header = _read_header(p)
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if p.stat().st_size != start + end:
                raise StoreError(
                    f"store {path}: shard {s['file']} is truncated or changed "
                    f"({p.stat().st_size} bytes, expected {start + end})"
                )
            self._headers.append((start, header))
        self._maps: dict[int, np.ndarray] = {}  # shard -> whole-file memmap (LRU order)
        self._index_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False) -> ActivationStore:
        """Open a finished store. ``verify=True`` also checks every shard's sha256 (reads all data)."""
        p = Path(path)
        mp = p / MANIFEST
        if not mp.is_file():
            if (p / PROGRESS).is_file():
                raise StoreError(
                    f"{p} is an unfinished extraction; rerun the same extract command to resume it"
                )
            raise StoreError(f"{p} is not an activation store (no {MANIFEST})")
        try:
            manifest = json.loads(mp.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"{mp} is not valid JSON ({e})") from None
        _check_manifest(mp, manifest)
        store = cls(p, manifest)
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Check every shard against the sha256 recorded in the manifest; the first bad one is named."""
        for s in self._shards:
            got = sha256_file(self.path / s["file"])
            if got != s["sha256"]:
                raise ChecksumError(
                    f"store {self.path}: shard {s['file']} was changed (sha256 {got[:12]}…, manifest {s['sha256'][:12]}…)"
                )

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        m = self.manifest
        return f"ActivationStore({str(self.path)!r}, model={m['model']['name']!r}, rows={len(self)}, hooks={self.hooks})"

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.manifest["dtype"]]

    # ------------------------------------------------------------------ raw access
    _MAX_OPEN = 64  # memory maps kept open at once (one file descriptor each)

    def _map(self, k: int, name: str) -> np.ndarray:
        """Read-only view ``[rows, ...]`` of tensor ``name`` in shard ``k`` (memory-mapped, no copy)."""
        start, header = self._headers[k]
        if name not in header:
            raise HookPointError(f"store {self.path} has no {name!r}; stored hooks: {', '.join(self.hooks)}")
        info = header[name]
        b, e = info["data_offsets"]
        dtype = np.dtype(_ST_NP[info["dtype"]])
        shape = tuple(info["shape"])
        if e == b:
            return np.zeros(shape, dtype=dtype)
        mm = self._maps.pop(k, None)
        if mm is None:
            mm = np.memmap(self.path / self._shards[k]["file"], mode="r", dtype=np.uint8)
            if len(self._maps) >= self._MAX_OPEN:
                self._maps.pop(next(iter(self._maps)))
        self._maps[k] = mm  # most recently used last
        return mm[start + b : start + e].view(dtype).reshape(shape)

    def _to_torch(self, arr: np.ndarray, name: str) -> torch.Tensor:
        if isinstance(arr, np.memmap) or not arr.flags.writeable:
            arr = np.array(arr)  # copy out of the read-only map
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if self._headers[0][1][name]["dtype"] == "BF16":
            t = t.view(torch.bfloat16)
        return t

    def _column(self, name: str) -> torch.Tensor:
        if name not in self._index_cache:
            parts = [self._to_torch(self._map(k, name), name) for k in range(len(self._shards))]
            self._index_cache[name] = torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)
        return self._index_cache[name]

    @property
    def token_ids(self) -> torch.Tensor:
        """Token id of every row ``[rows]``."""
        return self._column("token_ids")

    @property
    def doc_index(self) -> torch.Tensor:
        """Document index (into ``documents()``) of every row ``[rows]``."""
        return self._column("doc_index")

    @property
    def pos_index(self) -> torch.Tensor:
        """Position of every row's token in its tokenized document (BOS included) ``[rows]``."""
        return self._column("pos_index")

    @property
    def char_end(self) -> torch.Tensor:
        """Character offset where each row's token ends in its document (``-1``: none) ``[rows]``."""
        return self._column("char_end")

    def documents(self) -> list[str]:
        """The texts of the documents, indexed by ``doc_index``."""
        docs: dict[int, str] = {}
        path = self.path / DOCUMENTS
        try:
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    obj = json.loads(line)
                    if not isinstance(obj, dict) or not isinstance(obj.get("doc"), int):
                        raise ValueError(f"line {i} is not a {{doc, text}} object")
                    if not isinstance(obj.get("text"), str) or obj["doc"] < 0:
                        raise ValueError(f"line {i} is not a {{doc, text}} object")
                    docs[obj["doc"]] = obj["text"]
        except (OSError, ValueError) as e:
            raise StoreError(
                f"store {self.path}: {DOCUMENTS} is unreadable ({str(e).splitlines()[0]})"
            ) from None
        n = max(docs) + 1 if docs else 0
        return [docs.get(i, "") for i in range(n)]

    def read(self, hook: str, rows: Any = None) -> torch.Tensor:
        """Activations of ``hook`` at ``rows`` (all rows if ``None``): ``[n, d]`` in the storage dtype.

        ``rows`` may be a slice, a list, a numpy array or a LongTensor, in any order (duplicates allowed).
        """
        if hook not in self.hooks:
            raise HookPointError(
                f"store {self.path} has no hook {hook!r}; stored hooks: {', '.join(self.hooks)}"
            )
        n = len(self)
        if rows is None:
            idx = np.arange(n, dtype=np.int64)
        elif isinstance(rows, slice):
            idx = np.arange(n, dtype=np.int64)[rows]
        else:
            idx = (
                torch.as_tensor(rows).long().numpy()
                if not isinstance(rows, np.ndarray)
                else rows.astype(np.int64)
            )
            idx = idx.reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise StoreError(f"row index out of range for store with {n} rows")
        shape = tuple(self.manifest["hook_shapes"][hook])
        out = torch.empty((len(idx), *shape), dtype=self.dtype)
        if not len(idx):
            return out
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        order = np.argsort(shard, kind="stable")
        bounds = np.searchsorted(shard[order], np.arange(len(self._shards) + 1))
        for k in range(len(self._shards)):
            sel = order[bounds[k] : bounds[k + 1]]
            if not len(sel):
                continue
            local = idx[sel] - self._starts[k]
            mm = self._map(k, hook)
            if len(sel) == mm.shape[0] and np.array_equal(local, np.arange(mm.shape[0])):
                block = mm[:]
            else:
                srt = np.argsort(local, kind="stable")  # sorted reads are page-friendly
                block = np.empty((len(local), *mm.shape[1:]), dtype=mm.dtype)
                block[srt] = mm[local[srt]]
            out[torch.from_numpy(sel)] = self._to_torch(block, hook)
        return out

    def iter_batches(
        self, hook: str, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> Iterator[torch.Tensor]:
        """Yield ``[batch, d]`` activations of ``hook``; a seeded permutation of all rows if ``shuffle``."""
        for idx in row_batches(len(self), batch_size, shuffle, seed, drop_last):
            yield self.read(hook, idx)


def row_batches(
    n: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """Row indices ``[batch]`` covering ``range(n)`` once: a seeded permutation if ``shuffle``."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        yield idx


# --------------------------------------------------------------------------------------------- extraction
@dataclass
class ExtractConfig:
    """Everything that determines the content of a store (its hash names the store's identity)."""

    hooks: list[str]
    data: str
    field: str | None = None
    positions: str = "all"
    keep_special: bool = False
    max_tokens: int | None = None
    max_length: int | None = None
    batch_size: int = 8
    shard_size: int = 16384
    dtype: str = "float32"

    def validate(self) -> None:
        if not self.hooks:
            raise ConfigError("no hooks given: pass at least one hook point, e.g. resid_post.-1")
        if self.positions not in ("all", "last"):
            raise ConfigError(f"--positions must be 'all' or 'last', got {self.positions!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"--max-tokens must be a positive number of tokens, got {self.max_tokens}")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"--max-length must be >= 1, got {self.max_length}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be >= 1 rows, got {self.shard_size}")
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")


def model_fingerprint(hm) -> str:
    """sha256 over the model config and, per parameter, its name, shape, dtype, sum and first/last values.

    Cheap (no full pass over the weights) yet changes with any realistic change of weights.
    """
    h = hashlib.sha256()
    h.update(hm.model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in hm.model.named_parameters():
            flat = p.detach().reshape(-1)
            if flat.device.type == "meta":
                continue
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            sample = torch.cat([flat[:256], flat[-256:]]).float().cpu()
            h.update(sample.numpy().tobytes())
            h.update(struct.pack("<d", float(flat.float().sum())))
    return h.hexdigest()


def tokenizer_info(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        digest = sha256_bytes(backend.to_str().encode())
    else:
        digest = sha256_bytes(json.dumps(sorted(tok.get_vocab().items())).encode())
    return {
        "name_or_path": str(getattr(tok, "name_or_path", "")),
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "sha256": digest,
        "bos_token_id": tok.bos_token_id,
        "special_ids": sorted(int(i) for i in tok.all_special_ids),
    }


def _versions() -> dict:
    import safetensors
    import transformers

    import rosettalens

    return {
        "rosettalens": rosettalens.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
    }


@dataclass
class _Doc:
    ids: np.ndarray  # [len] token ids (truncated)
    keep: np.ndarray  # [n_rows] positions stored
    char_end: np.ndarray  # [n_rows]


def _tokenize_docs(tok, documents: Sequence[str], cfg: ExtractConfig, max_length: int) -> list[_Doc]:
    """Tokenize, truncate and choose the stored positions of every document (stops at max_tokens rows)."""
    special = set(int(i) for i in tok.all_special_ids)
    out: list[_Doc] = []
    total = 0
    fast = getattr(tok, "is_fast", False)
    chunk = 256
    for s in range(0, len(documents), chunk):
        texts = list(documents[s : s + chunk])
        if fast:
            enc = tok(texts, add_special_tokens=True, return_offsets_mapping=True)
        else:
            enc = tok(texts, add_special_tokens=True)
        for j, text in enumerate(texts):
            ids_full = list(enc["input_ids"][j])
            ids = ids_full[:max_length]
            is_special = np.array([t in special for t in ids], dtype=bool)
            if fast:
                offs = enc["offset_mapping"][j]
                nxt = offs[max_length][0] if len(ids_full) > max_length else None
                ends = np.array(
                    char_ends_from_offsets(offs[:max_length], is_special.tolist(), nxt), dtype=np.int64
                )
            else:
                ends = np.array(char_ends_by_decoding(tok, text, ids), dtype=np.int64)
            keep = np.arange(len(ids)) if cfg.keep_special else np.nonzero(~is_special)[0]
            if cfg.positions == "last":
                keep = keep[-1:]
            if cfg.max_tokens is not None:
                keep = keep[: cfg.max_tokens - total]
            out.append(_Doc(np.asarray(ids, dtype=np.int64), keep.astype(np.int64), ends[keep]))
            total += len(keep)
            if cfg.max_tokens is not None and total >= cfg.max_tokens:
                return out
    return out


def _hook_shape(hm, hook: str) -> tuple[int, ...] | None:
    kind = hook.split(".")[0]
    c = hm.cfg
    if kind in ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        return (c.d_model,)
    return None  # learned from the first batch


def init_distributed() -> tuple[int, int, bool]:
    """(rank, world, we_initialised) from torchrun's environment; gloo on CPU, NCCL on GPU.

    The group is made once and lives as long as the process (it is destroyed at exit), so the trainers and
    extraction called one after another in one process share it: making a group again after destroying
    one can hang under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    # NCCL needs one GPU per process; with fewer GPUs than local ranks (2 processes on a 1-GPU
    # machine) the ranks share the GPUs round-robin and talk over gloo (only a few flags are sent).
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # torch._dynamo (imported by the first optimizer) keeps a reference to a process group that exists when
    # it is imported, so destroy_process_group() would leave gloo's worker threads alive until exit, where
    # one still freeing a tensor aborts the process ("terminate called without an active exception").
    importlib.import_module("torch._dynamo")

    dist.init_process_group(backend=backend)
    atexit.register(_destroy_group)
    return dist.get_rank(), dist.get_world_size(), True


def _destroy_group() -> None:
    """At exit, while the interpreter can still run the tensor frees gloo's threads have left."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def extract(
    model,
    hooks: str | Sequence[str],
    data,
    out: str | os.PathLike,
    *,
    field: str | None = None,
    max_tokens: int | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    positions: str = "all",
    keep_special: bool = False,
    shard_size: int = 16384,
    dtype: str = "float32",
    overwrite: bool = False,
    device: Any = None,
    model_dtype: Any = None,
    device_map: str | None = None,
    progress: bool = False,
) -> ActivationStore:
    """Run ``model`` over documents and store activations of ``hooks`` at every kept token.

    model: a HookedModel or a MODEL string (loaded with ``device``, ``model_dtype``, ``device_map``).
    data: a data spec (file, ``hf:<id>``, built-in name) or a :class:`rosettalens.data.Corpus`.
    Returns the finished :class:`ActivationStore`. Raises a ``RosettaError`` subclass on bad input before
    anything is written; resumes an interrupted run of the same config at its first missing shard.
    """
    if isinstance(hooks, str):
        hooks = [h.strip() for h in hooks.split(",") if h.strip()]
    corpus = data if isinstance(data, Corpus) else load_documents(data, field=field)
    cfg = ExtractConfig(
        hooks=list(hooks),
        data=corpus.spec,
        field=field,
        positions=positions,
        keep_special=keep_special,
        max_tokens=max_tokens,
        max_length=max_length,
        batch_size=batch_size,
        shard_size=shard_size,
        dtype=dtype,
    )
    cfg.validate()
    rank, world, _ = init_distributed()
    if isinstance(model, str):
        if world > 1 and torch.cuda.is_available() and device is None and device_map is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
        hm = load(
            model, device=device, dtype=model_dtype, device_map=device_map, progress=progress and rank == 0
        )
    else:
        hm = model
    return _extract(hm, corpus, cfg, Path(out), overwrite, rank, world, progress)


def _extract(
    hm, corpus, cfg: ExtractConfig, out: Path, overwrite: bool, rank: int, world: int, progress: bool
):
    cfg.hooks = [hm.resolve_hook(h) for h in cfg.hooks]
    if len(set(cfg.hooks)) != len(cfg.hooks):
        raise ConfigError(f"a hook point is given twice: {cfg.hooks}")
    for h in cfg.hooks:
        if h.startswith("attn_pattern."):
            raise HookPointError(
                f"{h} is not per-token (it is [heads, q, k]); stores hold per-token hooks only"
            )
    max_pos = getattr(hm.model.config.get_text_config(), "max_position_embeddings", None) or 1024
    max_length = min(cfg.max_length or 1024, int(max_pos))
    cfg.max_length = max_length
    docs = _tokenize_docs(hm.tokenizer, corpus.documents, cfg, max_length)
    n_rows = sum(len(d.keep) for d in docs)
    if n_rows == 0:
        raise DataError(f"data {corpus.spec!r} gives no tokens to store (only special tokens?)")

    identity = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "data"},  # the dataset hash names the data
        "model": {
            "name": hm.name,
            "fingerprint": model_fingerprint(hm),
            "dtype": str(hm.dtype).replace("torch.", ""),
        },
        "tokenizer": tokenizer_info(hm.tokenizer),
        "dataset": corpus.describe(),
    }
    config_hash = sha256_bytes(json.dumps(identity, sort_keys=True).encode())

    # rank 0 holds the writer's lock of --out from the first check to the manifest (a stale lock of a
    # killed run is taken over); the other ranks only write their own shards
    fresh = not out.exists()  # a store this call starts is removed again if float16 overflows
    lock = FileLock(out / LOCK, what=f"--out {out}")
    try:
        err: RosettaError | None = None
        if rank == 0:
            try:
                if out.exists() and not out.is_dir():
                    raise StoreError(f"--out {out} exists and is not a directory")
                lock.acquire()  # a second writer into the same --out is refused, never interleaved
                _prepare_out(out, config_hash, overwrite)
            except RosettaError as e:
                err = e
        if world > 1:  # every rank stops if rank 0 refused --out (no rank waits at a barrier forever)
            import torch.distributed as dist

            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([1 if err is not None else 0], device=dev)
            dist.broadcast(flag, src=0)
            if flag.item() and err is None:
                raise StoreError(f"rank 0 refused --out {out} (see its error)")
        if err is not None:
            raise err
        if (out / MANIFEST).is_file():
            return ActivationStore.open(out)

        # row tables in canonical order
        row_doc = np.concatenate([np.full(len(d.keep), i, dtype=np.int64) for i, d in enumerate(docs)])
        row_pos = np.concatenate([d.keep for d in docs])
        row_tok = np.concatenate([d.ids[d.keep] for d in docs])
        row_end = np.concatenate([d.char_end for d in docs])
        doc_first_row = np.concatenate([[0], np.cumsum([len(d.keep) for d in docs])])
        n_shards = (n_rows + cfg.shard_size - 1) // cfg.shard_size
        store_dtype = STORAGE_DTYPES[cfg.dtype]
        pad_id = hm.tokenizer.pad_token_id if hm.tokenizer.pad_token_id is not None else 0
        shapes: dict[str, tuple[int, ...] | None] = {h: _hook_shape(hm, h) for h in cfg.hooks}

        mine = [k for k in range(n_shards) if k % world == rank]
        todo = [
            k
            for k in mine
            if not _shard_ok(out / shard_name(k), cfg.hooks, min(cfg.shard_size, n_rows - k * cfg.shard_size))
        ]
        from tqdm import tqdm

        bar = tqdm(
            total=len(mine),
            initial=len(mine) - len(todo),
            desc=f"extract {hm.name}",
            unit="shard",
            disable=not progress,
            file=sys.stderr,
        )
        for k in todo:
            r0, r1 = k * cfg.shard_size, min((k + 1) * cfg.shard_size, n_rows)
            d0, d1 = int(row_doc[r0]), int(row_doc[r1 - 1]) + 1
            bufs: dict[str, torch.Tensor] = {}
            # batch documents of similar length together (less padding); rows land at their canonical place
            shard_docs = sorted(range(d0, d1), key=lambda i: len(docs[i].ids))
            for b in range(0, len(shard_docs), cfg.batch_size):
                batch = shard_docs[b : b + cfg.batch_size]
                T = max(len(docs[i].ids) for i in batch)
                ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), T), dtype=torch.long)
                flat, dest = [], []
                for j, i in enumerate(batch):
                    d = docs[i]
                    L = len(d.ids)
                    ids[j, T - L :] = torch.from_numpy(d.ids)
                    mask[j, T - L :] = 1
                    rows = np.arange(doc_first_row[i], doc_first_row[i + 1])
                    sel = (rows >= r0) & (rows < r1)
                    flat.append(j * T + (T - L) + d.keep[sel])
                    dest.append(rows[sel] - r0)
                flat_t = torch.from_numpy(np.concatenate(flat)).to(hm.device)
                dest_t = torch.from_numpy(np.concatenate(dest))
                _, cache = hm.run_with_cache(
                    ids.to(hm.device), hooks=cfg.hooks, attention_mask=mask.to(hm.device), stop_early=True
                )
                for h in cfg.hooks:
                    act = cache[h]
                    act = act.reshape(act.shape[0] * act.shape[1], *act.shape[2:])
                    sel = act.index_select(0, flat_t.to(act.device))
                    vals = sel.to(store_dtype).cpu()
                    if store_dtype == torch.float16 and not bool(torch.isfinite(vals).all()):
                        big = float(sel.float().abs().nan_to_num(posinf=0.0).max())
                        if fresh and rank == 0:
                            lock.release()
                            shutil.rmtree(out, ignore_errors=True)
                        raise DataError(
                            f"{h}: activations reach {big:.0f}, beyond float16's range (65504); "
                            "extract with dtype bfloat16 (same size, float32's range) or float32"
                        )
                    if h not in bufs:
                        shapes[h] = tuple(vals.shape[1:])
                        bufs[h] = torch.empty((r1 - r0, *vals.shape[1:]), dtype=store_dtype)
                    bufs[h][dest_t] = vals
                del cache
            tensors = dict(bufs)
            tensors["token_ids"] = torch.from_numpy(row_tok[r0:r1].astype(np.int32))
            tensors["doc_index"] = torch.from_numpy(row_doc[r0:r1])
            tensors["pos_index"] = torch.from_numpy(row_pos[r0:r1].astype(np.int32))
            tensors["char_end"] = torch.from_numpy(row_end[r0:r1].astype(np.int32))
            meta = json.dumps({"format": FORMAT, "first_row": r0, "config_hash": config_hash}, sort_keys=True)
            _write_shard(out / shard_name(k), tensors, {"rosettalens": meta})  # one key: byte-reproducible
            bar.update(1)
        bar.close()
        _barrier(world)

        if rank == 0:
            hook_shapes = {}
            for h in cfg.hooks:
                _, header = _read_header(out / shard_name(0))
                hook_shapes[h] = header[h]["shape"][1:]
            used_docs = int(row_doc[-1]) + 1
            _write_documents(out / DOCUMENTS, corpus.documents[:used_docs])
            shards = [
                {
                    "file": shard_name(k),
                    "rows": min(cfg.shard_size, n_rows - k * cfg.shard_size),
                    "sha256": sha256_file(out / shard_name(k)),
                }
                for k in range(n_shards)
            ]
            c = hm.cfg
            manifest = {
                "format": FORMAT,
                "config_hash": config_hash,
                "model": {
                    **identity["model"],
                    "family": c.family,
                    "n_layers": c.n_layers,
                    "d_model": c.d_model,
                },
                "tokenizer": identity["tokenizer"],
                "hooks": cfg.hooks,
                "hook_shapes": hook_shapes,
                "dtype": cfg.dtype,
                "d_model": c.d_model,
                "n_rows": n_rows,
                "n_documents": used_docs,
                "dataset": identity["dataset"],
                "positions": cfg.positions,
                "keep_special": cfg.keep_special,
                "max_length": max_length,
                "max_tokens": cfg.max_tokens,
                "batch_size": cfg.batch_size,
                "shard_size": cfg.shard_size,
                "index_tensors": list(INDEX_TENSORS),
                "shards": shards,
                "versions": _versions(),
            }
            atomic_write_json(out / MANIFEST, manifest, indent=1)
            (out / PROGRESS).unlink(missing_ok=True)
        _barrier(world)
        return ActivationStore.open(out)
    finally:
        lock.release()


def _write_documents(path: Path, documents: Sequence[str]) -> None:
    lines = [json.dumps({"doc": i, "text": t}, ensure_ascii=False) for i, t in enumerate(documents)]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _shard_ok(path: Path, hooks: Sequence[str], rows: int) -> bool:
    """A shard left by an interrupted run is reused when it is complete and readable."""
    if not path.is_file():
        return False
    try:
        start, header = _read_header(path)
    except StoreError:
        return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size != start + end:
        return False
    return all(h in header and header[h]["shape"][:1] == [rows] for h in (*hooks, *INDEX_TENSORS))


def _is_store_file(name: str) -> bool:
    return (
        name in (MANIFEST, PROGRESS, DOCUMENTS, LOCK)
        or (name.startswith("shard-") and name.endswith(".safetensors"))
        or _is_temp(name)
    )


def _is_temp(name: str) -> bool:
    """A temp file of :mod:`rosettalens.io` (``.NAME.tmp-PID-RANDOM``) or of older versions (``.NAME.tmpPID``)."""
    return is_temp_name(name) or (name.startswith(".") and ".tmp" in name)


def _prepare_out(out: Path, config_hash: str, overwrite: bool) -> None:
    """Create ``out``, or check that it holds this very extraction (finished or interrupted).

    The caller holds the writer's lock, so temp files found here belong to a killed run.
    """
    if out.exists() and not out.is_dir():
        raise StoreError(f"--out {out} exists and is not a directory")
    if out.is_dir() and not any(p.name != LOCK and not _is_temp(p.name) for p in out.iterdir()):
        for p in out.iterdir():  # only temp files of a killed run (that had not written its marker yet)
            if _is_temp(p.name):
                p.unlink()
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        existing = None
        for name in (MANIFEST, PROGRESS):
            p = out / name
            if p.is_file():
                try:
                    existing = json.loads(p.read_text("utf-8")).get("config_hash")
                except (OSError, ValueError):
                    existing = "unreadable"
                break
        if existing == config_hash and not overwrite:
            for p in out.iterdir():  # temp files of a killed run
                if _is_temp(p.name):
                    p.unlink()
            if (out / MANIFEST).is_file():
                ActivationStore.open(out, verify=True)  # finished: make sure it is intact
            return
        if not overwrite:
            what = (
                "a store written with a different config"
                if existing
                else "files that are not an activation store"
            )
            raise StoreError(f"--out {out} already holds {what}; choose another --out or pass --overwrite")
        others = [p.name for p in out.iterdir() if not _is_store_file(p.name)]
        if others:
            raise StoreError(
                f"--out {out} holds files that are not part of a store ({others[0]}, ...); not overwriting"
            )
        for p in out.iterdir():
            if p.name != LOCK:
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PROGRESS, {"format": FORMAT, "config_hash": config_hash}, indent=1)
