"""Node pruning by iterative mean-ablation and path patching, on tiny models.

The planted model is a GPT-2 (3 layers, 6 heads, no position embeddings) with a word-level tokenizer
whose weights are set by hand: every head and MLP writes nothing except head 1.2, a successor head
(it attends to the current token and its OV circuit maps member ``i`` to the unembedding of member
``i+1``), and head 2.0, a weak copy head (OV maps member ``i`` to member ``i``). Pruning must find
exactly head 1.2.
"""

import pytest
import torch

from rosettalens.circuits.pruning import (
    all_heads,
    circuit_score,
    component_means,
    head_name,
    mean_ablate,
    path_patch_edges,
    prune_nodes,
    run_last_logits,
)
from rosettalens.circuits.tasks import SequenceTask, make_prompts
from rosettalens.hooks import HookedModel
from rosettalens.models.tiny import tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module (restored after): its many tiny forwards run several times
    slower with 2 threads on a CPU busy with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MEMBERS = ["A", "B", "C", "D", "E", "F", "G", "H"]
FILLERS = ["then", "and", "so"]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(MEMBERS + FILLERS)}}
    for i in range(len(vocab), 40):
        vocab[f"w{i}"] = i
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def planted_model(copy_scale: float = 0.2, succ_head: tuple[int, int] = (1, 2)) -> HookedModel:
    """The hand-built GPT-2 described in the module docstring (successor head 1.2, copy head 2.0)."""
    import transformers as T

    tok = word_tokenizer()
    d, H, dh = 48, 6, 8
    cfg = T.GPT2Config(vocab_size=40, n_embd=d, n_layer=3, n_head=H, n_positions=64, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=1, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(cfg).eval()
    # 16 orthonormal zero-mean directions: e_0..e_7 embed the members, g_0..g_7 unembed them
    X = torch.randn(d, 16)
    X = X - X.mean(0, keepdim=True)
    Q, _ = torch.linalg.qr(X)
    Q = Q - Q.mean(0, keepdim=True)
    Q, _ = torch.linalg.qr(Q)
    E, G = Q[:, :8], Q[:, 8:]
    ids = [tok.convert_tokens_to_ids(m) for m in MEMBERS]
    s = 4.0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0)
        wte = model.transformer.wte.weight
        wte.copy_(0.3 * torch.randn_like(wte))
        wte -= wte.mean(1, keepdim=True)
        for j, t in enumerate(ids):
            wte[t] = s * E[:, j]
        lm = model.lm_head.weight
        lm.copy_(0.01 * torch.randn_like(lm))
        for j, t in enumerate(ids):
            lm[t] = 10.0 * G[:, j]

        def plant(layer: int, head: int, out_dirs: torch.Tensor, scale: float, attn: float = 3.0) -> None:
            blk = model.transformer.h[layer].attn
            W = blk.c_attn.weight  # [d, 3d]: x @ W -> [q | k | v]
            sl = slice(head * dh, (head + 1) * dh)
            W[:, sl] = attn * E
            W[:, d + head * dh : d + (head + 1) * dh] = attn * E
            W[:, 2 * d + head * dh : 2 * d + (head + 1) * dh] = E
            blk.c_proj.weight[sl, :] = scale * out_dirs.T  # z @ W_O

        succ = torch.stack([G[:, min(j + 1, 7)] for j in range(8)], 1)
        plant(*succ_head, succ, 1.0)
        plant(2, 0, G, copy_scale)
    return HookedModel.from_hf(model, tok, name="planted-gpt2")


@pytest.fixture(scope="module")
def planted():
    return planted_model()


@pytest.fixture(scope="module")
def planted_prompts(planted):
    task = SequenceTask("letters", MEMBERS, templates=["then {1} and {2} and {3} and {4}"])
    return task, make_prompts(planted, task, n=16, seed=0)


def test_planted_model_continues(planted, planted_prompts):
    _, ps = planted_prompts
    assert ps.tokenization["answer_form"] == "space"
    logits = run_last_logits(planted, ps.clean_ids)
    assert (logits[:, -1].argmax(-1) == ps.answer_ids).all()
    assert float(ps.metric()(logits).min()) > 3


@pytest.mark.parametrize("group_first", [False, True])
def test_pruning_recovers_planted_head(planted, planted_prompts, group_first):
    _, ps = planted_prompts
    res = prune_nodes(
        planted, ps.clean_ids, ps.metric(), ps.corrupted_ids, threshold=0.8, group_first=group_first
    )
    assert res.heads == ["1.2"]
    assert res.mlps == []
    assert res.ratio >= 0.8 and res.score_full > 3
    assert planted.active_hook_count() == 0
    # every entry of the trace is keyed by its own component (the paper's swapped-keys bug)
    groups = ("heads.", "layer.")  # group_first entries: a layer's heads / the whole layer
    heads = {e["component"] for e in res.trace if isinstance(e["component"], str)
             and not e["component"].startswith(groups)}  # fmt: skip
    assert heads <= {head_name(L, h) for L, h in all_heads(planted)}
    mlps = {e["component"] for e in res.trace if isinstance(e["component"], int)}
    assert mlps <= {0, 1, 2}
    if not group_first:
        assert mlps == {0, 1, 2} and len(heads) == 18
    else:  # layers 0 and 2 go in one step each; layer 1 is tested part by part
        assert [e["component"] for e in res.trace[:2]] == ["layer.2", "layer.1"] and res.trace[0]["removed"]
        assert res.n_forward < 18 + 3
    # without the planted head the circuit keeps almost nothing
    means = component_means(planted, ps.corrupted_ids)
    without = float(circuit_score(planted, ps.clean_ids, ps.metric(), means, [], []).mean())
    assert without < 0.5 * res.score_full


def test_mean_ablation_matches_ablator_of_the_faithfulness_module():
    """Our circuit score equals m(C) of circuits.faithfulness (F's independent mean ablation)."""
    from rosettalens.circuits.faithfulness import Circuit, Faithfulness

    model, tok = tiny_model("llama", n_layers=2)
    hm = HookedModel.from_hf(model, tok)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(10, 300, (6, 7), generator=g)
    ref = torch.randint(10, 300, (5, 7), generator=g)
    good, bad = torch.randint(10, 300, (6,), generator=g), torch.randint(10, 300, (6,), generator=g)
    from rosettalens.circuits.tasks import AnswerMetric

    metric = AnswerMetric(good, bad)
    means = component_means(hm, ref, batch_size=2)
    heads, mlps = ["0.1", "1.3", "1.5"], [1]
    ours = float(circuit_score(hm, clean, metric, means, heads, mlps, batch_size=4).mean())
    fa = Faithfulness(hm, clean, metric, ablation="mean", reference=ref, batch_size=3)
    assert ours == pytest.approx(fa.metric_of(Circuit(heads=heads, mlps=mlps)), abs=1e-4)
    with mean_ablate(hm, means, heads=["0.0"], mlps=[0]):
        assert hm.active_hook_count() > 0
    assert hm.active_hook_count() == 0


def test_path_patching_against_manual_residual_arithmetic():
    """Edge 0.1 -> v of head 1.4 in a tiny Llama: the receiver's value input rebuilt by hand from the
    sender's o_proj contribution equals what path patching patches in."""
    model, tok = tiny_model("llama", n_layers=2)
    hm = HookedModel.from_hf(model, tok)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(10, 300, (4, 6), generator=g)
    corr = torch.randint(10, 300, (4, 6), generator=g)
    from rosettalens.circuits.tasks import AnswerMetric

    metric = AnswerMetric(
        torch.randint(10, 300, (4,), generator=g), torch.randint(10, 300, (4,), generator=g)
    )
    (edge,) = path_patch_edges(hm, clean, corr, metric, senders=["0.1"], receivers=["1.4"], inputs=("v",))
    assert edge["sender"] == "0.1" and edge["receiver"] == "1.4" and edge["input"] == "v"
    assert edge["kv_group"] == ["1.3", "1.4", "1.5"]  # 6 heads, 2 kv heads: group of 3
    # by hand: resid_pre.1 + (o_proj(z with the sender's slice corrupted) - o_proj(z clean))
    _, cc = hm.run_with_cache(clean, hooks=["head_z.0", "resid_pre.1"])
    _, cx = hm.run_with_cache(corr, hooks=["head_z.0"])
    blk0, blk1 = model.model.layers[0], model.model.layers[1]
    z = cc["head_z.0"].clone()
    z[:, :, 1] = cx["head_z.0"][:, :, 1]
    with torch.no_grad():
        o = blk0.self_attn.o_proj
        resid = cc["resid_pre.1"] + o(z.flatten(2)) - o(cc["head_z.0"].flatten(2))
        v = blk1.self_attn.v_proj(blk1.input_layernorm(resid)).view(4, 6, 2, 8)

    def put(act, name):
        out = act.clone()
        out[:, :, 1] = v[:, :, 1]
        return out

    with hm.hooks([("v.1", put)]):
        want = float(metric(hm.forward(clean)).mean())
    assert edge["patched"] == pytest.approx(want, abs=1e-4)
    assert edge["effect"] == pytest.approx(edge["clean"] - want, abs=1e-4)
    assert hm.active_hook_count() == 0


def test_path_patching_planted_edges(planted, planted_prompts):
    _, ps = planted_prompts
    edges = path_patch_edges(planted, ps.clean_ids, ps.corrupted_ids, ps.metric(), senders=["0.3", "1.2"],
                             receivers=["2.0", "logits"], inputs=("qkv",))  # fmt: skip
    by = {(e["sender"], e["receiver"]): e["effect"] for e in edges}
    assert by[("1.2", "logits")] > 3  # the successor head's direct path carries the answer
    assert abs(by[("0.3", "logits")]) < 1e-4  # a head that writes nothing
    assert abs(by[("0.3", "2.0")]) < 1e-4


def test_bad_inputs(planted, planted_prompts):
    from rosettalens.errors import ShapeError

    _, ps = planted_prompts
    with pytest.raises(ShapeError, match="one shape"):
        path_patch_edges(planted, ps.clean_ids, ps.corrupted_ids[:, 1:], ps.metric(), ["1.2"], ["logits"])
    with pytest.raises(ShapeError, match="positions"):
        prune_nodes(planted, ps.clean_ids, ps.metric(), ps.corrupted_ids[:, 1:])
    neg = lambda logits: -ps.metric()(logits)  # noqa: E731
    with pytest.raises(ShapeError, match="not positive"):
        prune_nodes(planted, ps.clean_ids, neg, ps.corrupted_ids)


# ------------------------------------------------------------------ batched pruning == sequential pruning
@pytest.fixture(scope="module")
def random_llama():
    """A tiny random Llama (GQA: 6 heads, 2 key-value heads), prompts and a metric whose full-model value
    is positive (the top token minus the bottom token at the last position)."""
    model, tok = tiny_model("llama", n_layers=3)
    hm = HookedModel.from_hf(model, tok)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(10, 300, (6, 7), generator=g)
    ref = torch.randint(10, 300, (5, 7), generator=g)
    from rosettalens.circuits.tasks import AnswerMetric

    lg = run_last_logits(hm, clean)[:, -1]
    return hm, clean, ref, AnswerMetric(lg.argmax(-1), lg.argmin(-1))


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
@pytest.mark.parametrize("mode", ["heads+mlps", "group_first", "heads only"])
def test_batched_pruning_equals_sequential(random_llama, ablation, mode):
    """The batched (speculative) pruning takes every decision of the sequential reference, in the same
    order, with the same scores to float tolerance; the circuit is a mix of kept and removed heads and
    MLPs, and the speculation both hit and missed (rows were thrown away)."""
    hm, clean, ref, metric = random_llama
    kw = dict(threshold=0.97, ablation=ablation, batch_size=4, group_first=mode == "group_first",
              include_mlps=mode != "heads only")  # fmt: skip
    r = None if ablation == "zero" else ref
    seq = prune_nodes(hm, clean, metric, r, batched=False, **kw)
    bat = prune_nodes(hm, clean, metric, r, batched=True, max_rows=5, grow=True, **kw)
    stk = prune_nodes(hm, clean, metric, r, batched=True, max_rows=5, grow=False, **kw)
    assert [(e["sweep"], e["component"], e["removed"]) for e in bat.trace] == [
        (e["sweep"], e["component"], e["removed"]) for e in seq.trace
    ]
    # all prompts of every circuit stacked into one forward (the GPU mode): the same decisions
    assert [(e["component"], e["removed"]) for e in stk.trace] == [
        (e["component"], e["removed"]) for e in seq.trace
    ]
    assert max(abs(a["ratio"] - b["ratio"]) for a, b in zip(seq.trace, stk.trace)) < 1e-5
    # compute: every sequential score runs 3 layers x 6 prompts; grown rows skip the layers below
    # their first difference, so they never cost more than the same batches stacked
    assert seq.layer_rows == 3 * 6 * seq.n_forward and stk.layer_rows == 3 * 6 * stk.rows_scored
    assert bat.batches == stk.batches and bat.layer_rows < stk.layer_rows
    # one forward per batch, plus 2 chunks of 4 prompts for the full model and for the final circuit
    assert stk.n_model_calls == len(stk.batches) + 4
    for a, b in zip(seq.trace, bat.trace):
        assert b["ratio"] == pytest.approx(a["ratio"], abs=1e-5)
    assert (bat.heads, bat.mlps) == (seq.heads, seq.mlps)
    assert bat.score_circuit == pytest.approx(seq.score_circuit, abs=1e-6)
    assert bat.n_forward == seq.n_forward and bat.batched and not seq.batched
    assert 0 < len(seq.heads) < 18  # some heads kept, some removed
    removed = [e["component"] for e in seq.trace if e["removed"]]
    if mode == "heads+mlps":
        assert 0 < len(seq.mlps) < 3 and any(isinstance(c, int) for c in removed)
    if mode == "heads only":
        assert seq.mlps == [0, 1, 2] and all(isinstance(e["component"], str) for e in seq.trace)
    assert bat.rows_scored > bat.n_forward - 1  # speculative rows were discarded and rescored
    assert sum(d for _, d in bat.batches) == len(bat.trace)  # every tested removal decided once
    assert sum(k for k, _ in bat.batches) == bat.rows_scored - 2  # + the full model and the final circuit
    assert all(d >= 1 for _, d in bat.batches)  # each forward decides at least one step
    assert hm.active_hook_count() == 0


def test_batched_pruning_planted_and_scores_against_ablator(planted, planted_prompts):
    """On the planted GPT-2, the batched scorer's rows equal circuit_score (hooks of the mean_ablate
    context, one circuit per forward) for circuits that first differ from the base at different layers."""
    from rosettalens.circuits.pruning import _Scorer

    _, ps = planted_prompts
    sc = _Scorer(planted, ps.clean_ids, ps.metric(), ps.corrupted_ids, "mean", True, 64, 0)
    full_h, full_m = set(all_heads(planted)), {0, 1, 2}
    circuits = [
        (full_h - {(2, 0)}, full_m),
        ({(1, 2)}, set()),
        (full_h - {(0, 1)}, full_m - {1}),
        ({(1, 2)}, {2}),
    ]
    got = sc.batch((full_h, full_m), circuits)
    means = component_means(planted, ps.corrupted_ids)
    for (h, m), s in zip(circuits, got):
        want = float(circuit_score(planted, ps.clean_ids, ps.metric(), means, list(h), list(m)).mean())
        assert s == pytest.approx(want, abs=1e-4)
    res = prune_nodes(planted, ps.clean_ids, ps.metric(), ps.corrupted_ids, threshold=0.8, max_rows=64)
    assert res.heads == ["1.2"] and res.mlps == [] and res.batched
    assert res.n_model_calls < len(res.trace) * len(ps)  # fewer forwards than one per tested removal
