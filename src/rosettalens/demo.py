"""A short real use of the default zoo model: `python -m rosettalens.demo`.

Loads SmolLM2-135M-Instruct from the cache, reads its residual stream on a few prompts, reports the
logit-lens top token at a few layers, and shows that a hooked forward equals the plain HF forward.
"""

from __future__ import annotations

import json
import sys

import torch

import rosettalens


def main(model: str = "smollm2-135m-instruct") -> int:
    hm = rosettalens.load(model)
    prompts = ["1 2 3 4 5 6", "The capital of France is", "Monday Tuesday Wednesday"]
    n = hm.cfg.n_layers
    layers = sorted({n // 4, n // 2, 3 * n // 4, n - 1})
    logits, cache = hm.run_with_cache(prompts, hooks=[f"resid_post.{layer}" for layer in layers])
    enc = hm.tokenize(prompts)
    plain = hm.model(**enc, position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    norm = dict(hm.model.named_modules())[hm.adapter.final_norm]
    head = hm.model.get_output_embeddings()
    lens = {}
    for layer in layers:
        with torch.no_grad():
            top = head(norm(cache[f"resid_post.{layer}"][:, -1])).argmax(-1)
        lens[f"resid_post.{layer}"] = [hm.tokenizer.decode(t) for t in top.tolist()]
    result = {
        "model": hm.name,
        "cfg": {k: v for k, v in hm.cfg.to_dict().items() if k != "hook_points"},
        "prompts": prompts,
        "next_token": [hm.tokenizer.decode(t) for t in logits[:, -1].argmax(-1).tolist()],
        "logit_lens_last_token": lens,
        "hooked_vs_plain_max_abs_diff": float((logits - plain).abs().max()),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
