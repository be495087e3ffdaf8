"""Sequence-continuation tasks (Lan, Torr, Barez 2024): prompts, corrupted prompts, metric, competence.

A task is an ordered list of *members* (``1 2 3 ...``, ``January February ...``). A prompt shows ``k``
consecutive members (every ``step``-th for interval tasks) and the answer is the member after them;
the one-digit ``addition`` task shows two digits and the answer is their sum. Prompts come from
templates holding ``{1}`` ... ``{k}`` for the shown members and optionally ``{name}`` (one name per
prompt), ``{name1}``, ``{name2}``, ... (distinct names, as in the paper's "Claire was born in
February. John was born in March. ... Bob was born in") and ``{verb}``; the pools of names and verbs
are in ``rosettalens/data/circuits/pools.json``. Without templates a task uses the built-in ones: the
paper's style ``{name1} was {verb} in {1}. ... {nameK+1} was {verb} in`` and the bare list
``{1} {2} {3} {4}``.

Tokenizer-aware, per model: a member is usable when it is one token as the answer would be written
(``" May"``; for tokenizers that split a space off digits, ``"5"`` after a prompt ending in a space
token). Members that are not one token are *reported* (:attr:`PromptSet.tokenization`) and left out
of the prompts; a user task (``strict=True``) refuses them with a :class:`DataError` instead. Every
prompt of a set has the same token length (prompts of another length are dropped and counted), and
its corrupted prompt (each shown member replaced by a random member, the last two not in order) has
that length too, so clean and corrupted ids are ``[n, pos]`` tensors of one shape with no padding.

Metric (one value per prompt row): ``logit(next member) - logit(last shown member)`` at the last
position, or ``p(next member)``. The competence filter keeps a prompt when the next member is the
model's top-1 prediction and ``p(next) > 2 p(last)``.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError, ShapeError

__all__ = [
    "BUILTIN_TASKS",
    "SequenceTask",
    "PromptSet",
    "AnswerMetric",
    "load_task",
    "load_task_file",
    "make_prompts",
    "prompt_ids",
    "competence",
    "logit_diff",
    "name_pool",
]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_]*\d*)\}")


def _data(name: str) -> dict:
    return json.loads(resources.files("rosettalens.data").joinpath("circuits", name).read_text("utf-8"))


def name_pool() -> dict[str, list[str]]:
    """The team-written pools ``{"names": [...], "verbs": [...], "objects": [...]}``."""
    d = _data("pools.json")
    return {k: list(v) for k, v in d.items() if not k.startswith("_")}


@dataclass
class SequenceTask:
    """An ordered list of members and the templates its prompts are made from.

    ``kind="sequence"``: ``k`` shown members ``members[i], members[i+step], ...``, answer
    ``members[i + k*step]``. ``kind="addition"``: ``k=2`` digits ``a, b`` (members indexed by value),
    answer ``members[a+b]``. ``templates=None`` uses the built-in templates.
    """

    name: str
    members: list[str]
    templates: list[str] | None = None
    k: int = 4
    step: int = 1
    kind: str = "sequence"

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise DataError("a task needs a non-empty 'name'")
        if not isinstance(self.members, list) or not all(isinstance(m, str) and m for m in self.members):
            raise DataError(f"task {self.name!r}: 'members' must be a list of non-empty strings")
        if len(set(self.members)) != len(self.members):
            dup = [m for m, c in Counter(self.members).items() if c > 1]
            raise DataError(f"task {self.name!r}: repeated members {dup}")
        if self.kind not in ("sequence", "addition"):
            raise DataError(f"task {self.name!r}: kind must be 'sequence' or 'addition', got {self.kind!r}")
        if self.k < 1 or self.step < 1:
            raise DataError(f"task {self.name!r}: k and step must be >= 1")
        if self.kind == "addition" and self.k != 2:
            raise DataError(f"task {self.name!r}: addition shows k=2 members")
        if self.kind == "sequence" and len(self.members) < self.k * self.step + 1:
            raise DataError(
                f"task {self.name!r}: {len(self.members)} members are too few for k={self.k}, step={self.step}"
                f" (need at least {self.k * self.step + 1})"
            )
        for t in self.templates or []:
            _check_template(self.name, t, self.k)

    def items(self) -> list[tuple[list[str], str, str]]:
        """Every ``(shown members, answer, last shown member)`` of the task."""
        out = []
        if self.kind == "addition":
            m = self.members
            for a in range(1, len(m)):
                for b in range(len(m)):
                    if a + b < len(m):
                        out.append(([m[a], m[b]], m[a + b], m[b]))
            return out
        span = self.k * self.step
        for i in range(len(self.members) - span):
            shown = self.members[i : i + span : self.step]
            out.append((shown, self.members[i + span], shown[-1]))
        return out

    def default_templates(self) -> list[str]:
        """Paper-style template with names and a verb, and the bare list."""
        k = self.k
        paper = " ".join(f"{{name{i}}} was {{verb}} in {{{i}}}." for i in range(1, k + 1))
        paper += f" {{name{k + 1}}} was {{verb}} in"
        bare = " ".join(f"{{{i}}}" for i in range(1, k + 1))
        return [paper, bare]

    def to_dict(self) -> dict:
        return {"name": self.name, "members": self.members, "templates": self.templates, "k": self.k,
                "step": self.step, "kind": self.kind}  # fmt: skip


def _check_template(task: str, template: str, k: int) -> None:
    found = _PLACEHOLDER.findall(template)
    nums = {int(p) for p in found if p.isdigit()}
    if nums != set(range(1, k + 1)):
        raise DataError(
            f"task {task!r}: template {template!r} must hold {{1}} ... {{{k}}} (one per shown member), "
            f"found {sorted(nums)}"
        )
    bad = [p for p in found if not (p.isdigit() or re.fullmatch(r"name\d*|verb", p))]
    if bad:
        raise DataError(
            f"task {task!r}: template {template!r} has unknown placeholders {bad}; "
            "allowed: {1}..{k}, {name}, {name1}, {name2}, ..., {verb}"
        )
    if template != template.rstrip():
        raise DataError(f"task {task!r}: template {template!r} must not end with whitespace")


def _builtin_specs() -> dict[str, dict]:
    return {t["name"]: t for t in _data("tasks.json")["tasks"]}


BUILTIN_TASKS: tuple[str, ...] = (
    "digits",
    "number-words",
    "months",
    "days",
    "letters",
    "interval-digits",
    "interval-number-words",
    "addition",
)


def load_task(name: str) -> SequenceTask:
    """A built-in task by name (see :data:`BUILTIN_TASKS`)."""
    specs = _builtin_specs()
    if name not in specs:
        raise DataError(f"unknown task {name!r}; built-in tasks: {', '.join(specs)} (or give --task-file)")
    return _task_from_dict(specs[name], source="built-in")


def _task_from_dict(d: Any, source: str) -> SequenceTask:
    if not isinstance(d, dict):
        raise DataError(f"{source}: a task must be a JSON object with 'name' and 'members'")
    unknown = set(d) - {"name", "members", "templates", "k", "step", "kind"}
    if unknown:
        raise DataError(f"{source}: unknown task fields {sorted(unknown)}")
    if "name" not in d or "members" not in d:
        raise DataError(f"{source}: a task needs 'name' and 'members' (an ordered list)")
    templates = d.get("templates")
    if templates is not None and (
        not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates)
    ):
        raise DataError(f"{source}: 'templates' must be a non-empty list of strings")
    shown = None if "k" in d else _shown_members(templates, source)
    try:
        k = int(d["k"]) if shown is None else shown
        step = int(d.get("step", 1))
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: k and step must be integers") from e
    return SequenceTask(
        name=d["name"], members=d["members"], templates=templates, k=k, step=step,
        kind=d.get("kind", "sequence"),
    )  # fmt: skip


def _shown_members(templates: list[str] | None, source: str) -> int:
    """``k`` as the templates show it (``{1} {2} {3}`` -> 3); 4 without templates."""
    if not templates:
        return 4
    counts = {max((int(p) for p in _PLACEHOLDER.findall(t) if p.isdigit()), default=0) for t in templates}
    if len(counts) != 1 or 0 in counts:
        raise DataError(
            f"{source}: the templates show different numbers of members ({sorted(counts)}); "
            'give each {1} ... {k} and the same k, or say "k"'
        )
    return counts.pop()


def select_tasks(names: Sequence[str], task_file: str | Path | None = None) -> list[SequenceTask]:
    """The tasks ``--tasks`` names, from the built-ins and the tasks ``task_file`` defines.

    When ``names`` name none of the file's tasks, every task of the file is added after them (a task
    file adds its tasks); when they name some, only the named ones run, in the order given.
    """
    from_file = {t.name: t for t in load_task_file(task_file)} if task_file else {}
    named = [n for n in names if n]
    tasks = [from_file[n] if n in from_file else load_task(n) for n in named]
    if not any(n in from_file for n in named):
        tasks += list(from_file.values())
    return tasks


def load_task_file(path: str | Path) -> list[SequenceTask]:
    """User tasks from a JSON file: one object ``{"name", "members", "templates"?, "k"?, "step"?}``, a
    list of them, or ``{"tasks": [...]}``; ``k`` defaults to the members the templates show
    (``{1}, {2}, {3}``: 3), else 4. Raises :class:`DataError` on a missing or malformed file."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read task file {p}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"task file {p} is not valid UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"task file {p} is not valid JSON: {e}") from e
    if isinstance(d, dict) and "tasks" in d:
        d = d["tasks"]
    items = d if isinstance(d, list) else [d]
    if not items:
        raise DataError(f"task file {p} holds no task")
    tasks = [_task_from_dict(x, source=f"task file {p}") for x in items]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise DataError(f"task file {p}: repeated task names {names}")
    return tasks


# ----------------------------------------------------------------------------------------- tokenizer
def token_ids(tok: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens; an unknown word (the unk token) counts as two, so
    it is never taken for a single token."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and unk in ids and text.strip() != getattr(tok, "unk_token", None):
        return ids + [unk]
    return ids


def answer_forms(tok: Any, members: Sequence[str]) -> tuple[str, dict[str, int], dict[str, str]]:
    """Choose how answers are written for this tokenizer.

    ``"space"``: the answer is the token of ``" X"`` right after the prompt. ``"split"``: the
    tokenizer writes ``" X"`` as a space token then ``X`` (Llama/Qwen digits), so the prompt ends with
    that space token and the answer is the token of ``X``. Returns (mode, member -> answer id,
    member -> why it is not usable).
    """
    space_ok: dict[str, int] = {}
    split_ok: dict[str, int] = {}
    space_tok = token_ids(tok, " ")
    for m in members:
        a = token_ids(tok, " " + m)
        if len(a) == 1:
            space_ok[m] = a[0]
        b = token_ids(tok, m)
        if len(b) == 1 and len(space_tok) == 1 and a == space_tok + b:
            split_ok[m] = b[0]
    mode, ok = ("space", space_ok) if len(space_ok) >= len(split_ok) else ("split", split_ok)
    bad = {}
    for m in members:
        if m not in ok:
            form = f"' {m}'" if mode == "space" else f"'{m}' after a space token"
            pieces = token_ids(tok, " " + m if mode == "space" else m)
            bad[m] = f"{form} is {len(pieces)} tokens"
    return mode, ok, bad


def _single_token_names(tok: Any, words: Sequence[str]) -> list[str]:
    return [w for w in words if len(token_ids(tok, w)) == 1 and len(token_ids(tok, " " + w)) == 1]


# --------------------------------------------------------------------------------------------- metric
def logit_diff(logits: Tensor, answer_ids: Tensor, last_ids: Tensor) -> Tensor:
    """``logit[answer] - logit[last]`` at the last position: logits ``[batch, pos, vocab]`` -> ``[batch]``.

    ``batch`` may be a multiple ``r * n`` of the ``n`` answers (row ``i`` uses answer ``i % n``: the
    prompt set stacked ``r`` times, as batched patching does)."""
    a, b = _tile(answer_ids, last_ids, logits)
    last = logits[:, -1, :].float()
    return last.gather(1, a[:, None]).squeeze(1) - last.gather(1, b[:, None]).squeeze(1)


def _tile(a: Tensor, b: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != 3:
        raise ShapeError(f"metric expects logits [batch, pos, vocab], got shape {tuple(logits.shape)}")
    n, rows = a.shape[0], logits.shape[0]
    if rows % n:
        raise ShapeError(f"metric built for {n} prompts got {rows} rows (not a multiple of {n})")
    reps = rows // n
    dev = logits.device
    return a.to(dev).repeat(reps), b.to(dev).repeat(reps)


class AnswerMetric:
    """Callable ``metric(logits [batch, pos, vocab]) -> [batch]`` for one prompt set.

    ``kind``: ``"logit_diff"`` (logit of the next member minus logit of the last shown member, at the
    last position) or ``"prob"`` (softmax probability of the next member). Rows beyond the set are
    read as the set stacked again (row ``i`` is prompt ``i % n``).
    """

    def __init__(self, answer_ids: Tensor, last_ids: Tensor, kind: str = "logit_diff"):
        if kind not in ("logit_diff", "prob"):
            raise ShapeError(f"metric kind must be 'logit_diff' or 'prob', got {kind!r}")
        self.answer_ids = answer_ids.long().cpu()
        self.last_ids = last_ids.long().cpu()
        self.kind = kind

    def __call__(self, logits: Tensor, rows: Tensor | None = None) -> Tensor:
        """logits ``[batch, pos, vocab]`` -> ``[batch]``; ``rows`` ``[batch]``: which prompts of the set
        the rows are (a chunk), else the whole set (stacked if ``batch`` is a multiple of it)."""
        a, b = self.answer_ids, self.last_ids
        if rows is not None:
            r = torch.as_tensor(rows).long().cpu()
            if r.shape != (logits.shape[0],):
                raise ShapeError(f"rows {tuple(r.shape)} do not match logits batch {logits.shape[0]}")
            a, b = a[r], b[r]
        if self.kind == "logit_diff":
            return logit_diff(logits, a, b)
        a, _ = _tile(a, b, logits)
        return logits[:, -1, :].float().softmax(-1).gather(1, a[:, None]).squeeze(1)


# ----------------------------------------------------------------------------------------- prompt set
@dataclass
class PromptSet:
    """Clean and corrupted prompts of one task for one tokenizer (equal token length, no padding).

    ``clean_ids`` / ``corrupted_ids``: ``[n, pos]``; ``answer_ids`` / ``last_ids``: ``[n]`` (next
    member, last shown member, as answer tokens); ``tokenization``: the single-token report.
    """

    task: str
    texts: list[str]
    corrupted_texts: list[str]
    clean_ids: Tensor
    corrupted_ids: Tensor
    answer_ids: Tensor
    last_ids: Tensor
    answers: list[str]
    lasts: list[str]
    template_index: list[int]
    member_positions: Tensor | None = None  # [n, k] token index of each shown member
    tokenization: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def metric(self, kind: str = "logit_diff") -> AnswerMetric:
        """The task metric for these prompts (see :class:`AnswerMetric`)."""
        return AnswerMetric(self.answer_ids, self.last_ids, kind)

    def subset(self, index: Sequence[int] | Tensor) -> PromptSet:
        """The prompts at ``index`` (a list of rows or a boolean mask ``[n]``)."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        rows = idx.tolist()
        return PromptSet(
            task=self.task, texts=[self.texts[i] for i in rows],
            corrupted_texts=[self.corrupted_texts[i] for i in rows],
            clean_ids=self.clean_ids[idx], corrupted_ids=self.corrupted_ids[idx],
            answer_ids=self.answer_ids[idx], last_ids=self.last_ids[idx],
            answers=[self.answers[i] for i in rows], lasts=[self.lasts[i] for i in rows],
            template_index=[self.template_index[i] for i in rows], tokenization=dict(self.tokenization),
            member_positions=None if self.member_positions is None else self.member_positions[idx],
        )  # fmt: skip

    def examples(self, n: int = 3) -> list[dict[str, str]]:
        return [
            {
                "clean": self.texts[i],
                "corrupted": self.corrupted_texts[i],
                "answer": self.answers[i],
                "last": self.lasts[i],
            }  # fmt: skip
            for i in range(min(n, len(self)))
        ]


def _fill(
    template: str, shown: Sequence[str], names: Sequence[str], name: str, verb: str
) -> tuple[str, list[int]]:
    """The filled template and the character end of each shown member ``{1}..{k}``."""
    out, ends, pos = [], [0] * len(shown), 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(template[pos : m.start()])
        p = m.group(1)
        if p.isdigit():
            val = shown[int(p) - 1]
        elif p == "name":
            val = name
        elif p == "verb":
            val = verb
        else:
            val = names[int(p[4:]) - 1]
        out.append(val)
        if p.isdigit():
            ends[int(p) - 1] = sum(len(x) for x in out)
        pos = m.end()
    out.append(template[pos:])
    return "".join(out), ends


def make_prompts(
    tokenizer: Any,
    task: SequenceTask,
    n: int = 64,
    seed: int = 0,
    strict: bool = False,
    templates: str | Sequence[str] | None = None,
) -> PromptSet:
    """Build up to ``n`` clean prompts of ``task`` with their corrupted twins for ``tokenizer``.

    ``tokenizer`` is a HF tokenizer or a :class:`~rosettalens.hooks.HookedModel`. Prompts cycle over
    the task's items and templates with random names/verbs (seeded). Members that are not one token
    are reported in ``tokenization["not_single_token"]`` (and raise :class:`DataError` with
    ``strict=True``); prompts whose token length differs from the most common one are dropped and
    counted. ``templates``: ``None`` (the task's own, else the built-in ones), ``"paper"`` or ``"bare"``
    (one built-in style) or a list of template strings. Raises :class:`DataError` when no prompt can be
    made.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if n < 1:
        raise DataError("n must be >= 1")
    rng = random.Random(f"{task.name}:{seed}")
    mode, answer_id, bad = answer_forms(tok, task.members)
    if bad and strict:
        listed = ", ".join(f"{m!r} ({why})" for m, why in list(bad.items())[:6])
        raise DataError(
            f"task {task.name!r}: members that are not a single token for this tokenizer: {listed}"
            f"{' ...' if len(bad) > 6 else ''}; use single-token members"
        )
    pools = name_pool()
    names = _single_token_names(tok, pools["names"])
    verbs = [v for v in pools["verbs"] if len(token_ids(tok, " " + v)) == 1]
    tpls: list[str]
    if templates is None:
        tpls = task.templates or task.default_templates()
    elif isinstance(templates, str):
        styles = dict(zip(("paper", "bare"), task.default_templates()))
        if templates not in styles:
            raise DataError(f"templates must be 'paper', 'bare' or a list of templates, got {templates!r}")
        tpls = [styles[templates]]
    else:
        tpls = list(templates)
        for tp in tpls:
            _check_template(task.name, tp, task.k)
    needs_names = max(
        [int(p[4:]) for tp in tpls for p in _PLACEHOLDER.findall(tp) if re.fullmatch(r"name\d+", p)] or [0]
    )
    uses = {p for tp in tpls for p in _PLACEHOLDER.findall(tp)}
    if len(names) < (needs_names or int("name" in uses)) or ("verb" in uses and not verbs):
        raise DataError(
            f"task {task.name!r}: the templates need {needs_names or 1} single-token names and a verb; this "
            f"tokenizer has {len(names)} names and {len(verbs)} verbs of one token (use templates without them)"
        )
    names = names or ["_"]
    verbs = verbs or ["_"]
    usable = set(answer_id)
    items = [it for it in task.items() if all(m in usable for m in (*it[0], it[1]))]
    report: dict[str, Any] = {
        "answer_form": mode,
        "not_single_token": bad,
        "usable_members": [m for m in task.members if m in usable],
        "items": len(items),
        "items_total": len(task.items()),
    }
    if not items:
        raise DataError(
            f"task {task.name!r}: no prompt can be made for this tokenizer: members not single tokens: "
            f"{', '.join(bad) or 'none'}"
        )
    space = " " if mode == "split" else ""
    members_ok = [m for m in task.members if m in usable]

    def encode(text: str) -> list[int]:
        return list(tok(text + space)["input_ids"])

    rows: list[dict] = []
    seen: set[str] = set()
    order = [(i, ti) for ti in range(len(tpls)) for i in range(len(items))]
    rng.shuffle(order)
    tries = 0
    while len(rows) < n * 2 and tries < n * 10 + len(order):
        i, ti = order[tries % len(order)]
        tries += 1
        shown, ans, last = items[i]
        picked = rng.sample(names, needs_names) if needs_names else []
        one, verb = rng.choice(names), rng.choice(verbs)
        text, ends = _fill(tpls[ti], shown, picked, one, verb)
        ids = encode(text)
        if text in seen:
            continue
        full = list(tok(text + " " + ans)["input_ids"])
        if full != ids + [answer_id[ans]]:  # the answer would not be the one token after these ids
            continue
        corrupt = None
        for _ in range(20):
            cand = _corrupt(task, shown, members_ok, rng)
            ctext, _ = _fill(tpls[ti], cand, picked, one, verb)
            cids = encode(ctext)
            if len(cids) == len(ids):
                corrupt = (ctext, cids)
                break
        if corrupt is None:
            continue
        seen.add(text)
        # token index of each shown member: the last token of the text cut after the member
        mpos = [len(tok(text[:e])["input_ids"]) - 1 for e in ends]
        rows.append(dict(text=text, ids=ids, ctext=corrupt[0], cids=corrupt[1], ans=ans, last=last, t=ti,
                         mpos=mpos))  # fmt: skip
    if not rows:
        raise DataError(f"task {task.name!r}: no prompt tokenizes with the answer as one token")
    length = Counter(len(r["ids"]) for r in rows).most_common(1)[0][0]
    kept = [r for r in rows if len(r["ids"]) == length][:n]
    report["dropped_other_length"] = len(rows) - sum(len(r["ids"]) == length for r in rows)
    report["n_tokens"] = length
    report["templates"] = tpls
    return PromptSet(
        task=task.name,
        texts=[r["text"] for r in kept],
        corrupted_texts=[r["ctext"] for r in kept],
        clean_ids=torch.tensor([r["ids"] for r in kept], dtype=torch.long),
        corrupted_ids=torch.tensor([r["cids"] for r in kept], dtype=torch.long),
        answer_ids=torch.tensor([answer_id[r["ans"]] for r in kept], dtype=torch.long),
        last_ids=torch.tensor([answer_id[r["last"]] for r in kept], dtype=torch.long),
        answers=[r["ans"] for r in kept],
        lasts=[r["last"] for r in kept],
        template_index=[r["t"] for r in kept],
        member_positions=torch.tensor([r["mpos"] for r in kept], dtype=torch.long),
        tokenization=report,
    )


def prompt_ids(
    tokenizer: Any, task: SequenceTask, texts: Sequence[str], answers: Sequence[str]
) -> list[list[int] | None]:
    """Each prompt text's token ids for ``tokenizer``, encoded as :func:`make_prompts` encodes its own (a
    trailing space token where the tokenizer splits the space off the answer), or ``None`` where the
    answer would not be the one token after them: the prompts one tokenizer made, read by another."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    mode, answer_id, _ = answer_forms(tok, task.members)
    space = " " if mode == "split" else ""
    out: list[list[int] | None] = []
    for text, ans in zip(texts, answers, strict=True):
        if ans not in answer_id:
            out.append(None)
            continue
        ids = list(tok(text + space)["input_ids"])
        full = list(tok(text + " " + ans)["input_ids"])
        out.append(ids if full == ids + [answer_id[ans]] else None)
    return out


def _corrupt(
    task: SequenceTask, shown: Sequence[str], members: Sequence[str], rng: random.Random
) -> list[str]:
    """Random members in place of the shown ones; the last two are not in task order (no cue)."""
    pos = {m: i for i, m in enumerate(task.members)}
    for _ in range(50):
        cand = [rng.choice(members) for _ in shown]
        if task.kind == "addition":
            if cand != list(shown):
                return cand
            continue
        if len(cand) < 2 or pos[cand[-1]] - pos[cand[-2]] != task.step:
            return cand
    return cand


# ----------------------------------------------------------------------------------------- competence
@torch.no_grad()
def competence(hm: Any, prompts: PromptSet, batch_size: int = 32) -> tuple[Tensor, dict[str, Any]]:
    """The competence filter: keep a prompt when the next member is the top-1 prediction and
    ``p(next) > 2 p(last)``. Returns (mask ``[n]`` bool, stats) with stats ``competence`` (kept share),
    ``top1`` (share with the answer on top), ``n_prompts``, ``n_kept``, ``mean_logit_diff``,
    ``mean_p_next``."""
    keep, top1, diffs, pn = [], [], [], []
    for i in range(0, len(prompts), batch_size):
        ids = prompts.clean_ids[i : i + batch_size]
        logits = hm.forward(ids)[:, -1:, :].float()
        p = logits[:, -1].softmax(-1)
        a = prompts.answer_ids[i : i + batch_size].to(p.device)
        b = prompts.last_ids[i : i + batch_size].to(p.device)
        pa, pb = p.gather(1, a[:, None]).squeeze(1), p.gather(1, b[:, None]).squeeze(1)
        is_top = p.argmax(-1) == a
        top1.append(is_top.cpu())
        keep.append((is_top & (pa > 2 * pb)).cpu())
        diffs.append(logit_diff(logits, a, b).cpu())
        pn.append(pa.cpu())
    mask = torch.cat(keep)
    stats = {
        "n_prompts": len(prompts),
        "n_kept": int(mask.sum()),
        "competence": float(mask.float().mean()),
        "top1": float(torch.cat(top1).float().mean()),
        "mean_logit_diff": float(torch.cat(diffs).mean()),
        "mean_p_next": float(torch.cat(pn).mean()),
    }
    return mask, stats
