"""The real bundled SmolLM2-135M-Instruct (pulled once into $ROSETTA_CACHE; CI pulls it first)."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.real


def test_cached_model_facts(smollm):
    c = smollm.cfg
    assert (c.family, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head) == (
        "llama",
        30,
        576,
        9,
        3,
        64,
    )
    # tied embeddings survive the GGUF -> safetensors round trip
    assert (
        smollm.model.get_output_embeddings().weight.data_ptr()
        == smollm.model.get_input_embeddings().weight.data_ptr()
    )


def test_hooked_logits_equal_hf_and_hidden_states(smollm):
    enc = smollm.tokenize(["The capital of France is", "1 2 3 4 5 6"])
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    out = smollm.model(**enc, position_ids=pos, output_hidden_states=True)
    logits, cache = smollm.run_with_cache(enc, hooks=["resid_pre.0", "resid_post.10", "head_z.5", "logits"])
    assert torch.equal(logits, out.logits)
    assert torch.equal(cache["resid_pre.0"], out.hidden_states[0])
    assert torch.equal(cache["resid_post.10"], out.hidden_states[11])
    assert smollm.tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_greedy_generation_unchanged_by_empty_hook_context(smollm):
    prompt = "How do I bake bread at home?"
    base = smollm.generate(prompt, chat=True, max_new_tokens=12)
    with smollm.steer("resid_pre.10", torch.zeros(576)), smollm.patch({"mlp_out.3": lambda a, n: None}):
        hooked = smollm.generate(prompt, chat=True, max_new_tokens=12)
    assert hooked == base and len(base[0]) > 0


def test_models_info_json_matches_cfg(smollm):
    r = subprocess.run([sys.executable, "-m", "rosettalens.cli", "models", "info", "smollm2-135m-instruct", "--json"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info == smollm.cfg.to_dict()


def test_half_written_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, smollm):
    """A truncated safetensors file in the cache is noticed on load and the model is rebuilt from the wheels."""
    import os
    import shutil

    import rosettalens
    from rosettalens.models import zoo

    name = "smollm2-135m-instruct"
    real_wheels = zoo.wheel_dir(name)
    monkeypatch.setenv("ROSETTA_CACHE", str(tmp_path))
    os.makedirs(tmp_path / "wheels")
    os.symlink(real_wheels, zoo.wheel_dir(name))  # reuse the downloaded wheels, no network
    shutil.copytree(smollm.model.config._name_or_path, zoo.model_dir(name))
    st = zoo.model_dir(name) / "model.safetensors"
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size // 2)
    assert not zoo.is_cached(name)
    hm = rosettalens.load(name, progress=False)
    assert zoo.is_cached(name)
    ids = smollm.tokenize("The capital of France is")["input_ids"]
    assert torch.equal(hm.forward(ids), smollm.forward(ids))
