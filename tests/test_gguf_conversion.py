"""A ``.gguf`` MODEL is converted once into the cache and loads with the logits of the model it was
written from (float32 GGUF written with the ``gguf`` package from a random tiny HF model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_rosetta
from rosettalens.models.tiny import tiny_config, tiny_tokenizer


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for RoPE (its HF -> GGUF converter does this; loaders undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_llama_gguf(path: Path):
    """A float32 llama-architecture GGUF, written with the ``gguf`` package from a random tiny HF model;
    returns that model and its tokenizer (the reference)."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", n_layers=2, d_model=48)
    cfg.attention_bias = False  # llama GGUF files carry no q/k/v biases
    cfg.vocab_size = 384  # = the tokenizer's size: GGUF's token list sets the vocabulary
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = tiny_tokenizer(add_bos=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-gguf")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tj = json.loads(tok.backend_tokenizer.to_str())
    vocab = tj["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(True)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for gname, hname in [("attn_norm", "input_layernorm"), ("attn_v", "self_attn.v_proj"),
                             ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                             ("ffn_down", "mlp.down_proj")]:  # fmt: skip
            w.add_tensor(f"blk.{i}.{gname}.weight", sd[p + hname + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_for_gguf(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))  # fmt: skip
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_for_gguf(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


def test_gguf_is_converted_to_a_model_with_the_same_logits(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rosettalens.models import zoo

    monkeypatch.setenv("ROSETTA_CACHE", str(tmp_path / "cache"))
    gguf_path = tmp_path / "tiny-gguf.gguf"
    ref_model, ref_tok = _write_tiny_llama_gguf(gguf_path)
    info = json.loads(run_rosetta(capsys, "models", "info", str(gguf_path), "--json"))
    assert info["family"] == "llama" and info["n_layers"] == 2 and info["d_model"] == 48
    assert info["n_heads"] == 6 and info["n_kv_heads"] == 2 and info["vocab_size"] == 384
    (dest,) = (tmp_path / "cache" / "models").iterdir()
    marker = zoo.check_cache(dest, zoo.sha256_file(gguf_path))  # complete, from this very file
    assert marker["name"] == "tiny-gguf"
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(dest)
    text = "How do I bake bread? Café 東京 — 42"
    ids = ref_tok(text)["input_ids"]
    assert tok(text)["input_ids"] == ids  # the same tokenizer, BOS included
    x = torch.tensor([ids])
    with torch.no_grad():
        want, got = ref_model(x).logits, model(x).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    # a second use finds the converted folder and does not convert again
    mtime = (dest / zoo.MARKER).stat().st_mtime_ns
    run_rosetta(capsys, "models", "info", str(gguf_path), "--json")
    assert (dest / zoo.MARKER).stat().st_mtime_ns == mtime
