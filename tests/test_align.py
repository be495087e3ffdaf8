"""Pairing of two tokenizations by character end offsets, checked against decoded text."""

from __future__ import annotations

import functools

import numpy as np
import pytest

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
