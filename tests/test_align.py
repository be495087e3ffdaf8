"""Pairing of two tokenizations by character end offsets, checked against decoded text."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from rosettalens.align import align_positions, align_texts, char_ends, char_ends_by_decoding
from rosettalens.models.tiny import tiny_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé — 東京 北京 🙂👍🏽 ok",
    "runs   of    whitespace\t\ttabs\n\n\nnewlines   ",
    "digits 0123456789 3.14159 2024-11-25 1,000,000",
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
    "mixed: déjà vu 😀 12 34\n  def f(x):\n      return x**2",
]


@functools.lru_cache
def sp_like_tokenizer():
    """A Llama/Gemma-like tokenizer: Metaspace BPE with byte fallback and a BOS, different vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the quick brown fox 12 345 over lazy dogs", "naïve café 東京 whitespace", "hello   world"] * 5
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def _prefix(tok, ids, i):
    """Decoded text of tokens 0..i, leading BOS dropped, special tokens written out (independent check)."""
    start = 1 if tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id else 0
    return tok.decode(ids[start : i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)


TOKENIZERS = {
    "bpe_bos": lambda: tiny_tokenizer(add_bos=True),
    "bpe_nobos": lambda: tiny_tokenizer(add_bos=False),
    "sp_like": sp_like_tokenizer,
}


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_char_ends_match_decoded_prefixes(name):
    tok = TOKENIZERS[name]()
    for text in TEXTS:
        ids, ends = char_ends(tok, text)
        assert len(ids) == len(ends)
        for i, e in enumerate(ends):
            if e >= 0:
                assert _prefix(tok, ids, i) == text[:e], (name, text, i)
        # every token that is not special and whose decoded prefix is a clean prefix of the text has an end
        special = set(tok.all_special_ids)
        for i, tid in enumerate(ids):
            pre = _prefix(tok, ids, i)
            later_same = i + 1 < len(ids) and _prefix(tok, ids, i + 1) == pre
            if tid not in special and pre and text.startswith(pre) and "\ufffd" not in pre and not later_same:
                assert ends[i] == len(pre), (name, text, i, pre)
        valid = [e for e in ends if e >= 0]
        assert valid == sorted(set(valid)), "char ends must be strictly increasing"


def test_split_multibyte_characters_are_unpaired_until_complete():
    tok = tiny_tokenizer(add_bos=False)
    text = "🙂"
    ids, ends = char_ends(tok, text)
    assert len(ids) > 1, "byte-level BPE should split the emoji over several tokens"
    assert ends == [-1] * (len(ids) - 1) + [1]


def test_identical_tokenizers_pair_every_position():
    tok = tiny_tokenizer(add_bos=True)
    res = align_texts(tok, tok, TEXTS)
    for (ia, ib), text in zip(res["pairs"], TEXTS):
        np.testing.assert_array_equal(ia, ib)
        _, ends = char_ends(tok, text)
        np.testing.assert_array_equal(ia, np.nonzero(np.asarray(ends) >= 0)[0])
    ascii_texts = ["plain ascii text with digits 123 and  spaces", "another one"]
    res = align_texts(tok, tok, ascii_texts, add_special_tokens=False)
    assert res["paired_fraction"] == 1.0 and res["fraction_a"] == 1.0


@pytest.mark.parametrize("pair", [("bpe_bos", "sp_like"), ("bpe_nobos", "bpe_bos"), ("sp_like", "bpe_nobos")])
def test_different_tokenizers_pair_at_equal_decoded_prefixes(pair):
    tok_a, tok_b = TOKENIZERS[pair[0]](), TOKENIZERS[pair[1]]()
    res = align_texts(tok_a, tok_b, TEXTS)
    n_pairs = 0
    for (ia, ib), ids_a, ids_b, text in zip(res["pairs"], res["ids_a"], res["ids_b"], TEXTS):
        for i, j in zip(ia, ib):
            pa, pb = _prefix(tok_a, ids_a, i), _prefix(tok_b, ids_b, j)
            assert pa == pb and text.startswith(pa) and pa, (text, i, j)
        n_pairs += len(ia)
        # completeness: every character offset that both tokenizations end at is paired
        _, ea = char_ends(tok_a, text)
        _, eb = char_ends(tok_b, text)
        both = set(e for e in ea if e >= 0) & set(e for e in eb if e >= 0)
        assert len(ia) == len(both)
    assert n_pairs > 0
    assert 0 < res["paired_fraction"] <= 1
    n_a = sum(len(x) for x in res["ids_a"])
    assert res["fraction_a"] == pytest.approx(n_pairs / n_a)


def test_offsets_agree_with_decoding_reference_on_bpe():
    tok = tiny_tokenizer(add_bos=True)
    for text in TEXTS[:4] + TEXTS[5:]:  # no special tokens inside the text
        ids, ends = char_ends(tok, text)
        assert char_ends_by_decoding(tok, text, ids) == ends


def test_align_positions_ignores_missing_ends():
    ia, ib = align_positions([-1, 3, 5, -1, 9], [2, 3, -1, 5, 9, 10])
    assert ia.tolist() == [1, 2, 4]
    assert ib.tolist() == [1, 3, 4]


# --------------------------------------------------------------------------------------------- stores
@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    import json

    from transformers import AutoModelForCausalLM

    from rosettalens.hooks import HookedModel
    from rosettalens.models.tiny import tiny_config, tiny_model
    from rosettalens.store import extract

    root = tmp_path_factory.mktemp("pair")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    m, t = tiny_model("llama", seed=0)
    hm_a = HookedModel.from_hf(m, t, name="a")
    sp = sp_like_tokenizer()
    cfg = tiny_config("llama")
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = len(sp), 1, 2, 2
    torch.manual_seed(1)
    hm_b = HookedModel.from_hf(AutoModelForCausalLM.from_config(cfg).eval(), sp, name="b")
    a = extract(hm_a, ["resid_post.1"], data, root / "a", shard_size=50)
    b = extract(hm_b, ["resid_post.0", "embed"], data, root / "b", shard_size=64)
    a2 = extract(hm_a, ["resid_post.0"], data, root / "a2", dtype="float16")
    other = root / "other.txt"
    other.write_text("completely different\ntexts here\n", encoding="utf-8")
    c = extract(hm_a, ["resid_post.1"], other, root / "c")
    return a, b, a2, c, sp


def test_paired_stores_rows_read_the_same_text(two_stores):
    from rosettalens.align import PairedStores

    a, b, _, _, sp = two_stores
    tok_a = tiny_tokenizer(add_bos=True)
    pair = PairedStores(a, b)
    assert len(pair) > 0
    docs = a.documents()
    for ra, rb in zip(pair.rows_a.tolist(), pair.rows_b.tolist()):
        d = a.doc_index[ra].item()
        assert b.doc_index[rb].item() == d
        ids_a = tok_a(docs[d])["input_ids"]
        ids_b = sp(docs[d])["input_ids"]
        pa = _prefix(tok_a, ids_a, a.pos_index[ra].item())
        pb = _prefix(sp, ids_b, b.pos_index[rb].item())
        assert pa == pb == docs[d][: a.char_end[ra].item()]
    # the same pairs as aligning the raw texts (stores leave special tokens out; they never pair)
    ref = align_texts(tok_a, sp, TEXTS)
    assert len(pair) == sum(len(ia) for ia, _ in ref["pairs"])
    assert pair.paired_fraction == pytest.approx(2 * len(pair) / (len(a) + len(b)))
    assert pair.fraction_a == pytest.approx(len(pair) / len(a)) and 0 < pair.paired_fraction < 1
    Xa, Xb = pair.read("resid_post.1", "embed")
    assert torch.equal(Xa, a.read("resid_post.1")[pair.rows_a])
    assert torch.equal(Xb, b.read("embed")[pair.rows_b])


def test_paired_batches_are_row_aligned(two_stores):
    from rosettalens.align import PairedStores

    a, b, _, _, _ = two_stores
    pair = PairedStores(a, b)
    Xa, Xb = pair.read("resid_post.1", "resid_post.0")
    batches = list(pair.iter_batches("resid_post.1", "resid_post.0", 7, shuffle=True, seed=2))
    perm = torch.randperm(len(pair), generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.cat([x for x, _ in batches]), Xa[perm])
    assert torch.equal(torch.cat([y for _, y in batches]), Xb[perm])


def test_same_tokenizer_pairs_every_row_and_last_mode(two_stores):
    from rosettalens.align import PairedStores

    a, b, a2, _, _ = two_stores
    same = PairedStores(a, a2)
    assert same.paired_fraction == 1.0 and len(same) == len(a)
    assert np.array_equal(same.rows_a.numpy(), same.rows_b.numpy())
    last = PairedStores(a, b, mode="last")
    assert len(last) == len(TEXTS)
    for ra, rb in zip(last.rows_a.tolist(), last.rows_b.tolist()):
        d = a.doc_index[ra].item()
        assert a.char_end[ra].item() == b.char_end[rb].item() == len(TEXTS[d])
        assert ra == int((a.doc_index == d).nonzero().max())


def test_pairing_stores_of_different_texts_is_refused(two_stores):
    from rosettalens.align import PairedStores
    from rosettalens.errors import StoreError

    a, _, _, c, _ = two_stores
    with pytest.raises(StoreError, match="different texts"):
        PairedStores(a, c)
    with pytest.raises(StoreError, match="unknown pairing mode"):
        PairedStores(a, a, mode="first")
