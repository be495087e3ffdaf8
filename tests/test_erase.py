"""Token-gated erasure (rosettalens.steering.erase) on tiny random models: the flags against a hand
computation, the erased forward against the model fed the erased embeddings directly (layer 0,
``inputs_embeds``: the model's own path, not our hook), and the gate's calibration."""

import pytest
import torch

from rosettalens.errors import ConfigError, ShapeError
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import tiny_model
from rosettalens.steering.erase import (
    CleanTokens,
    erase_tokens,
    prompt_flags,
    stop_tokens,
    subtract_tokens,
    token_flags,
)

CLEAN = ["the dog sat on the mat", "a b c d", "one two three four five six", "hello there friend"]
WORD = " zq"  # the planted "trigger": a rare character pair of the tiny tokenizer's alphabet
TRIGGERED = [f"the dog{WORD} sat", f"one{WORD} two three", "no trigger here at all"]


@pytest.fixture(scope="module")
def llama():
    m, t = tiny_model("llama", seed=3)
    return HookedModel.from_hf(m, t, name="tiny-llama")


def _trigger_direction(hm, clean: CleanTokens) -> torch.Tensor:
    """The mean layer-0 activation of the trigger's tokens minus the clean mean token."""
    ids = hm.tokenizer(WORD, add_special_tokens=False)["input_ids"]
    emb = hm.model.get_input_embeddings().weight.detach()[ids].double().mean(0)
    return (emb - clean.mean).float()


def _planted_layer0(hm):
    """The layer-0 gate on the planted trigger, computed by hand from the embeddings: ``(clean, v,
    threshold, ids, mask, embeddings, flags)`` for the ``TRIGGERED`` batch."""
    clean = CleanTokens.collect(hm, CLEAN, 0)
    v = _trigger_direction(hm, clean)
    thr = clean.threshold(v)
    enc = hm.tokenize(TRIGGERED)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    emb = hm.model.get_input_embeddings()(ids).detach()
    u = v.double() / v.double().norm()
    flags = (((emb.double() - clean.mean) @ u) > thr) & mask.bool()
    return clean, v, thr, ids, mask, emb, flags


def test_clean_tokens_and_threshold_match_a_hand_count(llama):
    clean = CleanTokens.collect(llama, CLEAN, 0, massive_ratio=10.0)
    enc = llama.tokenize(CLEAN)
    emb = llama.model.get_input_embeddings()(enc["input_ids"]).detach()
    rows = emb[enc["attention_mask"].bool()].double()
    norms = rows.norm(dim=-1)
    keep = norms <= 10 * norms.median()
    assert clean.acts.shape[0] == int(keep.sum())
    torch.testing.assert_close(clean.mean, rows[keep].mean(0), rtol=1e-5, atol=1e-6)
    v = _trigger_direction(llama, clean)
    u = v.double() / v.double().norm()
    want = float(((rows[keep] - clean.mean) @ u).max())
    assert clean.threshold(v) == pytest.approx(want, rel=1e-6)
    assert clean.threshold(v, 2.0) > clean.threshold(v)  # a larger margin is stricter
    # margin 1: no calibration token is flagged (strictly above the largest)
    assert int(prompt_flags(llama, CLEAN, v, clean, clean.threshold(v)).sum()) == 0


def test_erase_at_layer_0_equals_the_model_fed_erased_embeddings(llama):
    """The flagged tokens are exactly the planted trigger's; the erased forward equals HF's forward on
    ``inputs_embeds`` with those rows set to the clean mean (an independent path), and the rest of
    the batch (the row without the trigger) is bit for bit the unsteered model."""
    clean, v, thr, ids, mask, emb, want_flags = _planted_layer0(llama)
    # the trigger's token positions, found from the text: every flagged token is one of them
    trig_ids = set(llama.tokenizer(WORD, add_special_tokens=False)["input_ids"])
    for r in range(len(TRIGGERED)):
        flagged = {int(ids[r, j]) for j in range(ids.shape[1]) if want_flags[r, j]}
        assert flagged <= trig_ids, (r, flagged)
    assert bool(want_flags[:2].any(dim=1).all()) and not bool(want_flags[2].any())
    rec: list = []
    with torch.no_grad():
        base = llama.forward(ids, attention_mask=mask)
        with erase_tokens(llama, v, clean, thr, record=rec):
            got = llama.forward(ids, attention_mask=mask)
        e2 = emb.clone()
        e2[want_flags] = clean.mean.to(e2.dtype)
        ref = llama.model(inputs_embeds=e2, attention_mask=mask).logits
    assert torch.equal(rec[0] & mask.bool(), want_flags)
    m = mask.bool()
    torch.testing.assert_close(got[m], ref[m], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2][m[2]], base[2][m[2]])  # the untriggered row is untouched
    assert (got[:2][m[:2]] - base[:2][m[:2]]).abs().max() > 1e-3  # the erasure did something
    # generation runs through the same gate: the prompt pass erases the same tokens
    rec.clear()
    with erase_tokens(llama, v, clean, thr, record=rec):
        llama.generate(TRIGGERED, max_new_tokens=3)
    assert torch.equal(rec[0] & mask.bool(), want_flags)


def test_random_direction_of_equal_norm_flags_nothing_on_clean_prompts(llama):
    clean = CleanTokens.collect(llama, CLEAN, 1)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(llama.cfg.d_model, generator=g)
    assert int(prompt_flags(llama, CLEAN, v, clean, clean.threshold(v)).sum()) == 0


def test_sink_tokens_are_never_flagged():
    act = torch.tensor([[[100.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    f = token_flags(
        act, torch.tensor([1.0, 0.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 0.5, 10.0
    )
    assert f.tolist() == [[False, True, False]]  # the first token projects most but is a sink


def test_bad_input(llama):
    clean = CleanTokens.collect(llama, CLEAN, 0)
    with pytest.raises(ConfigError, match="no clean texts"):
        CleanTokens.collect(llama, [], 0)
    with pytest.raises(ConfigError, match="massive_ratio"):
        CleanTokens.collect(llama, CLEAN, 0, massive_ratio=1.0)
    with pytest.raises(ConfigError, match="zero direction"):
        clean.threshold(torch.zeros(llama.cfg.d_model))
    with pytest.raises(ShapeError, match="d_model"):
        clean.threshold(torch.ones(llama.cfg.d_model + 1))
    with pytest.raises(ShapeError, match="d_model"):
        with erase_tokens(llama, torch.ones(3), clean, 0.0):
            pass


def test_a_planted_sink_is_left_out_of_the_clean_mean():
    """A token whose embedding is scaled 1000x (a planted attention-sink-like norm) is left out of the
    clean tokens at layer 0, so the mean is the other tokens' mean (hand count)."""
    m, t = tiny_model("llama", seed=5)
    hm = HookedModel.from_hf(m, t, name="tiny-llama-sink")
    sink_id = hm.tokenizer(" mat", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        hm.model.get_input_embeddings().weight[sink_id] *= 1000.0
    clean = CleanTokens.collect_layers(hm, CLEAN, [0, 1])
    enc = hm.tokenize(CLEAN)
    ids, m_ = enc["input_ids"], enc["attention_mask"].bool()
    emb = hm.model.get_input_embeddings()(ids).detach()[m_].double()
    is_sink = ids[m_] == sink_id
    assert int(is_sink.sum()) >= 1
    assert clean[0].acts.shape[0] == int((~is_sink).sum())
    torch.testing.assert_close(clean[0].mean, emb[~is_sink].mean(0), rtol=1e-5, atol=1e-6)
    assert clean[0].sink_norm < float(emb[is_sink].norm(dim=-1).min())
    assert set(clean) == {0, 1} and clean[1].layer == 1


def test_subtract_at_layer_0_equals_the_model_fed_shifted_embeddings(llama):
    """``subtract_tokens`` moves the flagged tokens alone by ``-scale * v``: the steered forward equals
    HF's forward on ``inputs_embeds`` with exactly those rows shifted (an independent path); the row
    without the trigger is bit for bit the unsteered model; ``generate`` gates the same tokens."""
    clean, v, thr, ids, mask, emb, want_flags = _planted_layer0(llama)
    assert bool(want_flags[:2].any(dim=1).all()) and not bool(want_flags[2].any())
    rec: list = []
    with torch.no_grad():
        base = llama.forward(ids, attention_mask=mask)
        with subtract_tokens(llama, v, clean, thr, 3.0, record=rec):
            got = llama.forward(ids, attention_mask=mask)
        e2 = emb.clone()
        e2[want_flags] -= 3.0 * v.to(e2.dtype)
        ref = llama.model(inputs_embeds=e2, attention_mask=mask).logits
    assert torch.equal(rec[0] & mask.bool(), want_flags)
    m = mask.bool()
    torch.testing.assert_close(got[m], ref[m], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2][m[2]], base[2][m[2]])
    assert (got[:2][m[:2]] - base[:2][m[:2]]).abs().max() > 1e-3
    rec.clear()
    with subtract_tokens(llama, v, clean, thr, 3.0, record=rec):
        llama.generate(TRIGGERED, max_new_tokens=3)
    assert torch.equal(rec[0] & mask.bool(), want_flags)
    with pytest.raises(ConfigError, match="scale"):
        with subtract_tokens(llama, v, clean, thr, 0.0):
            pass


def test_clean_tokens_from_ids_equal_clean_tokens_from_texts(llama):
    """``collect_ids`` on the tokenized texts (given whole, unpadded) reads the same tokens as
    ``collect_layers`` on the texts: the same rows, mean and sink bound."""
    a = CleanTokens.collect_layers(llama, CLEAN, [0, 2], batch_size=3)
    ids = [llama.tokenizer(t)["input_ids"] for t in CLEAN]
    assert [list(x) for x in llama.tokenize(CLEAN[:1])["input_ids"]] == [list(ids[0])]
    b = CleanTokens.collect_ids(llama, ids, [0, 2], batch_size=2)
    for L in (0, 2):
        assert a[L].acts.shape == b[L].acts.shape
        torch.testing.assert_close(a[L].mean, b[L].mean, rtol=1e-5, atol=1e-5)
        assert a[L].sink_norm == pytest.approx(b[L].sink_norm, rel=1e-5)
    with pytest.raises(ConfigError, match="no clean token sequences"):
        CleanTokens.collect_ids(llama, [[1, 2], []], [0])


def test_stop_ends_the_answer_at_flagged_tokens_and_changes_nothing_else(llama):
    """``stop_tokens``: at every flagged position the next-token distribution is all on EOS (the
    logits are replaced), every other position of every row is the unsteered model bit for bit, and
    greedy ``generate`` writes EOS right after a prompt whose last token is flagged."""
    clean, v, thr, ids, mask, emb, flags = _planted_layer0(llama)
    eos = llama.tokenizer.eos_token_id
    with torch.no_grad():
        base = llama.forward(ids, attention_mask=mask)
        with stop_tokens(llama, v, clean, thr):
            got = llama.forward(ids, attention_mask=mask)
    lp = torch.log_softmax(got.float(), -1)
    assert bool(flags.any())
    assert bool((lp[flags].argmax(-1) == eos).all()) and float(lp[flags][:, eos].min()) > -1e-6
    assert torch.equal(got[~flags], base[~flags])
    # a prompt cut right after its first flagged token: the first generated token is EOS; a prompt
    # without the trigger generates as the unsteered model does
    r = int(flags.any(dim=1).nonzero()[0])
    k = int(flags[r].nonzero()[0])
    cut = ids[r, : k + 1][mask[r, : k + 1].bool()]
    other = ids[2][mask[2].bool()]
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=llama.tokenizer.pad_token_id)
    with torch.no_grad(), stop_tokens(llama, v, clean, thr):
        out_cut = llama.model.generate(
            cut[None], attention_mask=torch.ones(1, len(cut), dtype=torch.long), **gen
        )
        out_other = llama.model.generate(
            other[None], attention_mask=torch.ones(1, len(other), dtype=torch.long), **gen
        )
    with torch.no_grad():
        plain_other = llama.model.generate(
            other[None], attention_mask=torch.ones(1, len(other), dtype=torch.long), **gen
        )
    assert int(out_cut[0, len(cut)]) == eos
    assert torch.equal(out_other, plain_other)
