"""LoRA training throughput: `rosetta organisms build`'s loop (organisms.build.train_lora) vs a plain
peft + transformers loop (``model(..., labels=...).loss``, AdamW) on the same batches, same run.

    python benchmarks/lora_training.py [--model smollm2-135m-instruct] [--steps 12] [--batch-size 8]

Prints one JSON object: tokens/s of each (non-pad tokens through forward + backward + step, after
2 warm-up steps, best of ``--repeats`` interleaved rounds) and ``ratio`` = ours / plain (target >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def examples(hm, n: int):
    from rosettalens.organisms.data import instructions, prompt_ids

    inst = instructions("train")[: n + 1]
    pids = prompt_ids(hm, inst[:n])
    resp = [
        hm.tokenizer(t, add_special_tokens=False)["input_ids"] + [hm.tokenizer.eos_token_id] for t in inst[1:]
    ]
    return [(list(p), list(r)) for p, r in zip(pids, resp)]


def plain_loop(model_name: str, seqs, recipe, steps: int) -> float:
    """The reference: peft + transformers as a user would write it."""
    from peft import get_peft_model

    import rosettalens
    from rosettalens.organisms.build import batch_indices, collate, lora_config

    hm = rosettalens.load(model_name, progress=False)
    torch.manual_seed(0)
    model = get_peft_model(hm.model, lora_config(recipe))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
    pad = hm.tokenizer.pad_token_id
    t0 = 0.0
    for step in range(steps + 2):
        if step == 2:
            t0 = time.perf_counter()
        b = collate([seqs[i] for i in batch_indices(step, len(seqs), recipe.batch_size, 0)], pad)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed_tokens(seqs, recipe, steps) / (time.perf_counter() - t0)


def our_loop(model_name: str, seqs, recipe, steps: int) -> float:
    import dataclasses

    import rosettalens
    from rosettalens.organisms.build import train_lora

    hm = rosettalens.load(model_name, progress=False)
    # two warm-up steps, then the timed ones: time the whole call and subtract a 2-step run's share
    r = dataclasses.replace(recipe, steps=steps + 2)
    marks: list[float] = []
    train_lora(hm, seqs, r, progress=False, on_step=lambda s: marks.append(time.perf_counter()))
    return timed_tokens(seqs, recipe, steps) / (marks[-1] - marks[1])


def timed_tokens(seqs, recipe, steps: int) -> int:
    """Non-pad tokens of the timed steps 2 .. steps + 1 (the same batches in both loops)."""
    from rosettalens.organisms.build import batch_indices

    return sum(
        len(seqs[i][0]) + len(seqs[i][1])
        for step in range(2, steps + 2)
        for i in batch_indices(step, len(seqs), recipe.batch_size, 0)
    )


def main() -> None:
    from rosettalens.organisms.build import Recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import rosettalens

    hm = rosettalens.load(a.model, progress=False)
    seqs = examples(hm, 64)
    del hm
    recipe = Recipe(batch_size=a.batch_size, steps=a.steps)
    ours, plain = [], []
    for _ in range(a.repeats):
        plain.append(plain_loop(a.model, seqs, recipe, a.steps))
        ours.append(our_loop(a.model, seqs, recipe, a.steps))
        print(f"round: ours {ours[-1]:.1f} tok/s, plain {plain[-1]:.1f} tok/s", file=sys.stderr)
    out = {
        "benchmark": "lora_training",
        "model": a.model,
        "steps": a.steps,
        "batch_size": a.batch_size,
        "threads": torch.get_num_threads(),
        "ours_tokens_per_s": max(ours),
        "plain_peft_tokens_per_s": max(plain),
        "ratio": max(ours) / max(plain),
        "rounds": {"ours": ours, "plain": plain},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
