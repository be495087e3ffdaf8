"""ActivationStore and extract(): content against plain HF forwards, reader, integrity, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rosettalens.errors import ChecksumError, ConfigError, DataError, HookPointError, StoreError
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import tiny_model
from rosettalens.store import ActivationStore, extract

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café 東京 🙂 and   runs of spaces",
    "0 1 2 3 4 5 6 7 8 9 10 11 12",
    "short",
    "January February March April May June July August September October November December.",
    "def main():\n    return 42\n",
    "How do I bake bread at home? Sure, here is how you do it.",
]


@pytest.fixture(scope="module")
def hm():
    m, t = tiny_model("llama", seed=0)
    return HookedModel.from_hf(m, t, name="tiny-llama")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def store(hm, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("st") / "store"
    return extract(hm, ["resid_post.1", "mlp_out.0", "head_z.2"], data_file, out, batch_size=3, shard_size=37)


def _hf_reference(hm, text):
    """Unpadded single-document plain HF forward: hidden_states[L + 1] is resid_post.L."""
    enc = hm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = hm.model(**enc, output_hidden_states=True)
    return enc["input_ids"][0], out.hidden_states


def test_rows_match_plain_hf_forward(hm, store):
    docs = store.documents()
    assert docs == DOCS
    special = set(hm.tokenizer.all_special_ids)
    X = store.read("resid_post.1")
    assert X.shape == (len(store), hm.cfg.d_model) and X.dtype == torch.float32
    n_expected = 0
    for d, text in enumerate(DOCS):
        ids, hidden = _hf_reference(hm, text)
        keep = [i for i, t in enumerate(ids.tolist()) if t not in special]  # BOS excluded, no padding
        n_expected += len(keep)
        rows = (store.doc_index == d).nonzero().squeeze(1)
        assert store.pos_index[rows].tolist() == keep
        assert store.token_ids[rows].tolist() == ids[keep].tolist()
        torch.testing.assert_close(X[rows], hidden[2][0, keep], rtol=1e-5, atol=1e-5)
        ends = store.char_end[rows].tolist()
        for p, e in zip(keep, ends):
            if e >= 0:
                assert hm.tokenizer.decode(ids[1 : p + 1]) == text[:e]
    assert len(store) == n_expected
    assert len(store.manifest["shards"]) == -(-n_expected // 37)


def test_manifest_records_provenance(hm, store, data_file):
    m = store.manifest
    assert m["hooks"] == ["resid_post.1", "mlp_out.0", "head_z.2"] and store.hooks == m["hooks"]
    assert m["hook_shapes"]["head_z.2"] == [hm.cfg.n_heads, hm.cfg.d_head]
    assert m["d_model"] == hm.cfg.d_model and m["dtype"] == "float32" and m["positions"] == "all"
    assert m["model"]["name"] == "tiny-llama" and len(m["model"]["fingerprint"]) == 64
    assert m["tokenizer"]["vocab_size"] == len(hm.tokenizer)
    from rosettalens.data.sources import documents_sha256

    assert m["dataset"]["sha256"] == documents_sha256(DOCS) and m["n_rows"] == len(store)
    assert {"torch", "transformers", "safetensors", "rosettalens"} <= set(m["versions"])
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert store.read("head_z.2").shape == (len(store), hm.cfg.n_heads, hm.cfg.d_head)


def test_random_access_and_shuffled_batches(store):
    full = store.read("mlp_out.0")
    rows = torch.tensor([len(store) - 1, 0, 40, 40, 3, 36, 37])
    torch.testing.assert_close(store.read("mlp_out.0", rows), full[rows], rtol=0, atol=0)
    torch.testing.assert_close(store.read("mlp_out.0", slice(10, 50)), full[10:50], rtol=0, atol=0)
    batches = list(store.iter_batches("mlp_out.0", 16, shuffle=True, seed=3))
    assert sum(len(b) for b in batches) == len(store)
    cat = torch.cat(batches)
    perm = torch.randperm(len(store), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cat, full[perm], rtol=0, atol=0)
    assert not torch.equal(cat, full)
    again = torch.cat(list(store.iter_batches("mlp_out.0", 16, shuffle=True, seed=3)))
    assert torch.equal(cat, again)
    ordered = torch.cat(list(store.iter_batches("mlp_out.0", 50, shuffle=False)))
    assert torch.equal(ordered, full)
    with pytest.raises(HookPointError, match="no hook 'resid_post.0'"):
        store.read("resid_post.0")


def test_last_positions_and_keep_special(hm, data_file, tmp_path):
    last = extract(hm, "resid_post.-2", data_file, tmp_path / "last", positions="last")
    assert last.hooks == ["resid_post.1"] and len(last) == len(DOCS)
    spec = extract(hm, "embed", data_file, tmp_path / "spec", keep_special=True, max_tokens=20)
    assert len(spec) == 20
    assert spec.token_ids[0].item() == hm.tokenizer.bos_token_id and spec.char_end[0].item() == -1
    for d, text in enumerate(DOCS):
        ids, hidden = _hf_reference(hm, text)
        torch.testing.assert_close(last.read("resid_post.1", [d])[0], hidden[2][0, -1], rtol=1e-5, atol=1e-5)
        assert last.pos_index[d].item() == len(ids) - 1 and last.char_end[d].item() == len(text)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_dtypes(hm, store, data_file, tmp_path, dtype):
    st = extract(hm, ["resid_post.1"], data_file, tmp_path / dtype, dtype=dtype, shard_size=37, batch_size=3)
    x = st.read("resid_post.1")
    want = getattr(torch, dtype)
    assert x.dtype == want and st.manifest["dtype"] == dtype
    assert torch.equal(x, store.read("resid_post.1").to(want))
    assert torch.equal(st.read("resid_post.1", [5, 1]), x[[5, 1]])


def test_float16_overflow_is_one_error_and_leaves_nothing(hm, data_file, tmp_path):
    """Activations beyond float16's range (65504) would be stored as inf: refused, directory removed."""
    m, t = tiny_model("llama", seed=0)
    with torch.no_grad():
        m.get_input_embeddings().weight.mul_(1e6)  # residual stream far past 65504
    big = HookedModel.from_hf(m, t, name="tiny-llama-big")
    out = tmp_path / "f16"
    with pytest.raises(DataError, match="beyond float16's range.*bfloat16"):
        extract(big, ["resid_post.0"], data_file, out, dtype="float16")
    assert not out.exists()
    st = extract(big, ["resid_post.0"], data_file, tmp_path / "bf16", dtype="bfloat16")
    assert bool(torch.isfinite(st.read("resid_post.0").float()).all())


def test_corrupt_and_truncated_shards_are_named(hm, data_file, tmp_path):
    out = tmp_path / "s"
    extract(hm, ["resid_post.0"], data_file, out, shard_size=30)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="shard-00001.safetensors"):
        ActivationStore.open(out, verify=True)
    with pytest.raises(ChecksumError, match="shard-00001"):  # re-running the same extraction checks too
        extract(hm, ["resid_post.0"], data_file, out, shard_size=30)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(StoreError, match="shard-00001.safetensors is truncated"):
        ActivationStore.open(out)
    shard.unlink()
    with pytest.raises(StoreError, match="shard-00001.safetensors is missing"):
        ActivationStore.open(out)


def _shard_with_header(header: bytes, body: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + body


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x01\x02", "unreadable or truncated"),  # shorter than the 8-byte header length
        (_shard_with_header(b"{not json"), "unreadable or truncated"),
        (_shard_with_header(b"[1, 2]"), "not an object"),
        (
            _shard_with_header(b'{"x": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}', bytes(8)),
            "dtype",
        ),
        (
            _shard_with_header(b'{"x": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}', bytes(8)),
            "shape",
        ),
        (
            _shard_with_header(b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}', bytes(8)),
            "offsets",
        ),
        (
            _shard_with_header(b'{"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', bytes(8)),
            "match",
        ),
    ],
)
def test_corrupt_shard_header_is_one_store_error(hm, data_file, tmp_path, content, match):
    """A shard whose safetensors header is garbage, or names tensors that do not fit their bytes, is a
    StoreError naming the shard (not a struct, JSON, key or reshape error from deep inside a read)."""
    out = tmp_path / "s"
    extract(hm, ["resid_post.0"], data_file, out, shard_size=30)
    (out / "shard-00001.safetensors").write_bytes(content)
    with pytest.raises(StoreError, match=match) as e:
        ActivationStore.open(out)
    assert "shard-00001.safetensors" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content", [b'{"doc": 0, "text": "a"}\n{"doc": 1, "te', b"\xff\xfe not utf-8\n", b'["doc", 0]\n']
)
def test_corrupt_documents_file_is_one_store_error(hm, data_file, tmp_path, content):
    out = tmp_path / "s"
    store = extract(hm, ["resid_post.0"], data_file, out)
    assert store.documents() == DOCS  # the intact file reads back
    (out / "documents.jsonl").write_bytes(content)
    with pytest.raises(StoreError, match="documents.jsonl is unreadable"):
        ActivationStore.open(out).documents()


def test_existing_out_with_other_config_is_refused(hm, data_file, tmp_path):
    out = tmp_path / "s"
    a = extract(hm, ["resid_post.0"], data_file, out)
    again = extract(hm, ["resid_post.0"], data_file, out)  # same config: returns the finished store
    assert again.manifest == a.manifest
    with pytest.raises(StoreError, match="different config.*--overwrite"):
        extract(hm, ["resid_post.1"], data_file, out)
    assert ActivationStore.open(out).hooks == ["resid_post.0"]  # untouched
    b = extract(hm, ["resid_post.1"], data_file, out, overwrite=True)
    assert b.hooks == ["resid_post.1"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an activation store"):
        extract(hm, ["resid_post.0"], data_file, tmp_path / "other")


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(hooks=["resid_post.9"]), HookPointError, "out of range"),
        (dict(hooks=["nonsense"]), HookPointError, "unknown hook point"),
        (dict(max_tokens=0), ConfigError, "--max-tokens"),
        (dict(data="missing.txt"), DataError, "not found"),
        (dict(positions="first"), ConfigError, "--positions"),
        (dict(dtype="int8"), ConfigError, "storage dtype"),
    ],
)
def test_bad_input_writes_nothing(hm, data_file, tmp_path, kwargs, err, match):
    args = dict(hooks=["resid_post.0"], data=data_file)
    args.update(kwargs)
    if args["data"] == "missing.txt":
        args["data"] = tmp_path / "missing.txt"
    out = tmp_path / "never"
    with pytest.raises(err, match=match):
        extract(hm, args.pop("hooks"), args.pop("data"), out, **args)
    assert not out.exists()


def test_cli_bad_input_one_line_exit_2(tmp_path, capsys):
    from rosettalens.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        ["--data", str(tmp_path / "missing.txt")],
        ["--data", str(empty)],
        ["--data", "sequences", "--max-tokens", "0"],
        ["--data", "hf:someone/some-corpus"],
        ["--data", "sequences"],  # the model does not exist
    ]
    for extra in cases:
        out = tmp_path / "o"
        argv = [
            "extract",
            "--model",
            "no-such-model-xyz",
            "--hooks",
            "resid_post.0",
            "--out",
            str(out),
            *extra,
        ]
        assert main(argv) == 2, extra
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rosetta: error: "), captured.err
        assert captured.out == "" and not out.exists()


def test_index_tensors_are_compact(store):
    from rosettalens.store import _read_header

    _, header = _read_header(store.path / store.manifest["shards"][0]["file"])
    assert header["token_ids"]["dtype"] == "I32" and header["doc_index"]["dtype"] == "I64"
    assert np.all(np.diff(store.doc_index.numpy()) >= 0)
