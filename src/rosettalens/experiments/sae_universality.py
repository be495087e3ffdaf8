"""SAE feature-space universality across two models (Lan et al. 2024), across families and tokenizers.

Stages (run directory outputs in brackets; ``--resume`` skips a stage whose outputs exist):

1. setup: both models, a randomly initialised copy of model A (the random-model control), the layer
   grid (``--layers``), and one shared corpus (built-in names, files, and optionally a corpus sampled
   from a zoo model, comma-separated) cut to the documents that hold ``--max-tokens`` tokens of model A;
2. extract [``acts/a``, ``acts/b``]: activation stores of both models at ``resid_post`` of every grid
   layer; rows are paired by position when the tokenizers agree and by character offsets when they
   differ (:class:`rosettalens.align.PairedStores`) [``pairing.json``];
3. saes [``saes.json``, ``saes/``]: one SAE per model and grid layer, trained on that model's tokens
   (the last ``--eval-fraction`` held out for FVU / L0 / dead %);
4. match [``pairs.json``, ``correlations.safetensors``]: for every layer pair, features of A matched to
   B by activation correlation over the paired tokens, filtered as in the paper (non-concept top
   tokens, a shared top token, a correlation threshold, one-to-one keeping the best match), and SVCCA,
   RSA and linear CKA of the paired decoder rows against ``--n-permutations`` shuffled pairings;
5. subspaces [``subspaces.json``]: at the best layer pair, the pairs grouped by team-written keyword
   lists (``data/semantic_subspaces.json``), each scored against ``--n-subspace-permutations`` shuffles;
6. controls [``controls.json``]: at every layer pair (``--controls all``) or the best one, two SAEs of
   model A's layer with different seeds (the ceiling, and their median best decoder cosine) and an SAE
   of the random-init copy of A matched to B's SAE (trained must beat it), each with its SVCCA, null
   and p-value;
7. heatmaps, correlation histogram, the controls figure (ceiling, cross-model, null and random-init
   side by side per layer pair), ``results.json`` and ``report.html``.

The positions left out of SAE training and matching follow :mod:`rosettalens.sae.sinks`
(``--skip-first``, ``--norm-ratio``); the default documents are the offline corpus
(:mod:`rosettalens.data.corpus`).
"""

from __future__ import annotations

import gc
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..config import option
from ..errors import ConfigError, DataError
from ..names import hook_name
from ..sae import load_sae
from ..sae.sinks import NORM_RATIO, SKIP_FIRST, SinkRule
from ..similarity.universality import ONE_TO_ONE
from .base import Experiment, RunContext, Stage

DEFAULT_MODELS = "smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct"
DEFAULT_DATA = "corpus"
MIN_PAIRED_TOKENS = 64
HOOK_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


@dataclass
class SAEUniversalityConfig:
    """Everything needed to rerun the experiment (saved as the run directory's ``config.json``)."""

    models: str = option(DEFAULT_MODELS, "the two models A,B (zoo names, HF folders, .gguf files or hub ids)")
    layers: str = option("auto", "layer grid: auto (5 per model over the depth), auto:N, all, stride:K, "
                         "3,6,9 (both models) or 3,6,9/4,8 (A/B)")  # fmt: skip
    hook: Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"] = option(
        "resid_post", "hook kind read at every grid layer"
    )
    data: str = option(DEFAULT_DATA, "comma-separated documents: corpus (rosetta data corpus build), built-in "
                       "names, .txt/.jsonl files or hf:<id>")  # fmt: skip
    generate_tokens: int = option(0, "> 0: also sample a corpus of this many tokens from --generate-model")
    generate_model: str | None = option(None, "model that writes the generated corpus", shown="model A")
    max_tokens: int = option(
        60000, "tokens of model A to extract (documents are kept whole)", aliases=("tokens",)
    )
    max_length: int = option(256, "tokens per document")
    width: int = option(256, "SAE latents")
    arch: Literal["topk", "batchtopk", "relu", "jumprelu"] = option("topk", "SAE architecture")
    k: int = option(8, "active latents per token (topk / batchtopk)")
    epochs: int = option(10, "passes over the training tokens")
    batch_size: int = option(256, "SAE training batch (tokens)")
    lr: float | None = option(None, "SAE learning rate", shown="2e-4 * sqrt(16384 / width)")
    eval_fraction: float = option(0.1, "fraction of the tokens (the last documents) held out for the SAE "
                                  "metrics")  # fmt: skip
    skip_first: int = option(SKIP_FIRST, "positions left out at the start of every document (attention "
                             "sinks), in SAE training and matching")  # fmt: skip
    norm_ratio: float = option(NORM_RATIO, "tokens whose norm at some grid layer exceeds this multiple of the "
                               "layer's median norm are left out (0: off)", aliases=("--outlier-norm",))  # fmt: skip
    min_corr: float = option(0.3, "pair filter: activation correlation threshold")
    drop_nonconcept: bool = option(
        True, "pair filter: drop pairs whose top tokens are all non-concept tokens"
    )
    shared_top_token: bool = option(
        True, "pair filter: the two features' top tokens share at least one token"
    )
    one_to_one: Literal["best", "first", "none"] = option(
        "best", "one-to-one pairing: best (keep the best match of each B feature), first (the paper's code) "
        "or none"
    )  # fmt: skip
    top_k_tokens: int = option(5, "top-activating tokens per feature used by the filters")
    n_permutations: int = option(100, "shuffled pairings per layer pair (the null and its p-value)")
    n_subspace_permutations: int = option(1000, "shuffled pairings per semantic subspace")
    subspaces: str | None = option(None, "keyword JSON file of semantic subspaces", shown="the bundled lists")
    subspace_side: Literal["a", "b", "both", "either"] = option(
        "a", "whose top token assigns a pair to a subspace"
    )
    keep_variance: float = option(0.99, "SVCCA: variance kept per side (at most a quarter of the rows)")
    controls: Literal["all", "best", "none"] = option(
        "all", "controls (two-seed ceiling of model A, SAE of a randomly initialised copy of A) at every "
        "layer pair, at the best pair only, or none"
    )  # fmt: skip
    extract_batch_size: int = option(8, "documents per forward pass in extraction")
    seed: int = option(0, "random seed")
    device: str | None = option(None, "torch device", shown="cuda if available, else cpu")
    out: str | None = option(None, "run directory", shown="runs/sae-universality-TIMESTAMP")

    def validate(self) -> None:
        names = [m.strip() for m in self.models.split(",")]
        if len(names) != 2 or not all(names):
            raise ConfigError(f"--models takes two models 'A,B', got {self.models!r}")
        for name in ("max_tokens", "width", "k", "epochs", "batch_size", "n_permutations", "max_length",
                     "n_subspace_permutations", "top_k_tokens", "extract_batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.k >= self.width:
            raise ConfigError(f"--k ({self.k}) must be smaller than --width ({self.width})")
        for name, allowed in (("arch", ("topk", "batchtopk", "relu", "jumprelu")), ("one_to_one", ONE_TO_ONE),
                              ("subspace_side", ("a", "b", "both", "either")), ("hook", HOOK_KINDS),
                              ("controls", ("all", "best", "none"))):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")  # fmt: skip
        if not 0.0 < self.eval_fraction < 0.5:
            raise ConfigError(f"--eval-fraction must be in (0, 0.5), got {self.eval_fraction}")
        if not 0.0 < self.keep_variance <= 1.0:
            raise ConfigError(f"--keep-variance must be in (0, 1], got {self.keep_variance}")
        if not -1.0 <= self.min_corr <= 1.0:
            raise ConfigError(f"--min-corr must be in [-1, 1], got {self.min_corr}")
        self.sink_rule()
        if self.generate_tokens < 0:
            raise ConfigError("--generate-tokens must be >= 0")

    def sink_rule(self) -> SinkRule:
        """The positions left out (:mod:`rosettalens.sae.sinks`)."""
        return SinkRule(self.skip_first, self.norm_ratio)

    @property
    def model_names(self) -> tuple[str, str]:
        a, b = (m.strip() for m in self.models.split(","))
        return a, b


# -------------------------------------------------------------------------------------- helpers
def peak_rss_mb() -> float | None:
    """This process's peak resident set size (VmHWM) in MB, None where /proc is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / 1024, 1) if r else None


def random_copy(hm, seed: int):
    """A randomly initialised model of ``hm``'s architecture and size (same tokenizer), as a HookedModel."""
    from transformers import AutoModelForCausalLM

    from ..hooks import HookedModel

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hm.model.config, dtype=torch.float32).eval().to(hm.device)
    return HookedModel(model, hm.tokenizer, name=f"{hm.name}-random-init")


def load_corpus(cfg: SAEUniversalityConfig, hm_a, progress: bool):
    """The shared corpus: every spec of ``--data`` in order, plus a generated corpus, cut to
    ``--max-tokens`` tokens of model A (whole documents). Returns a :class:`rosettalens.data.Corpus`."""
    from ..data import Corpus, load_documents

    docs: list[str] = []
    specs = [s.strip() for s in cfg.data.split(",") if s.strip()]
    if not specs and not cfg.generate_tokens:
        raise DataError("--data is empty: give built-in names, .txt/.jsonl files or hf:<id>")
    for s in specs:
        docs.extend(load_documents(s).documents)
    if cfg.generate_tokens:
        docs.extend(_generated(cfg, hm_a, progress))
    uniq = [d for d in dict.fromkeys(docs) if d.strip()]  # first occurrence of each document, in order
    chosen, total = [], 0
    for d in uniq:
        if total >= cfg.max_tokens:
            break
        n = min(len(hm_a.tokenizer(d, add_special_tokens=False)["input_ids"]), cfg.max_length)
        chosen.append(d)
        total += n
    if not chosen:
        raise DataError(f"--data {cfg.data!r} holds no non-empty documents")
    return Corpus("+".join(specs + ([f"generated:{cfg.generate_tokens}"] if cfg.generate_tokens else [])),
                  chosen, {"source": "sae-universality", "n_tokens_a": total})  # fmt: skip


def _generated(cfg: SAEUniversalityConfig, hm_a, progress: bool) -> list[str]:
    import rosettalens

    from ..data.generate import generate_to_file
    from ..models.zoo import cache_root

    gm = (
        hm_a
        if cfg.generate_model in (None, hm_a.name)
        else rosettalens.load(cfg.generate_model, device=cfg.device)
    )
    out = cache_root() / "corpora" / f"{gm.name}-{cfg.generate_tokens}-seed{cfg.seed}.jsonl"
    # the cache of generated corpora is ours: a corpus of other options is replaced
    generate_to_file(gm, out, cfg.generate_tokens, seed=cfg.seed, progress=progress, overwrite=True)
    from ..data import load_documents

    return load_documents(str(out)).documents


def _filter_pairs(pair: Any, keep_a: torch.Tensor, keep_b: torch.Tensor) -> Any:
    """``pair`` (a PairedStores) restricted to pairs whose rows are kept on both sides (in place)."""
    m = keep_a[pair.rows_a] & keep_b[pair.rows_b]
    pair.rows_a, pair.rows_b = pair.rows_a[m], pair.rows_b[m]
    n = int(m.sum())
    pair.fraction_a, pair.fraction_b = n / max(len(keep_a), 1), n / max(len(keep_b), 1)
    pair.paired_fraction = 2 * n / max(len(keep_a) + len(keep_b), 1)
    return pair


def _chunks(n: int, size: int) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


# ------------------------------------------------------------------------------------ SAE access
# Everything the experiment needs from rosettalens.sae goes through these four functions.
def train_layer_sae(store: Any, hook: str, rows: torch.Tensor, cfg: SAEUniversalityConfig, seed: int,
                    progress: bool) -> Any:  # fmt: skip
    """An SAE on the store's rows ``rows [n]`` at ``hook`` (``--epochs`` passes over them)."""
    from ..sae import SAEConfig, TrainConfig, train_saes

    n = len(rows)
    batch = min(cfg.batch_size, n)
    sc = SAEConfig(d_in=store.d_model, width=cfg.width, arch=cfg.arch, k=cfg.k if cfg.arch in ("topk", "batchtopk") else None,
                   seed=seed, model=store.manifest["model"]["name"], hook=hook, skip_first=cfg.skip_first,
                   norm_ratio=cfg.norm_ratio)  # fmt: skip
    tc = TrainConfig(batch_size=batch, tokens=max(batch, cfg.epochs * n), lr=cfg.lr, seed=seed,
                     device=_sae_device(cfg))  # fmt: skip
    x = store.read(hook, rows=rows).to(torch.float32)  # [n, d]: the kept rows are not one contiguous range
    return train_saes(x, [sc], tc, positions=store.pos_index[rows], progress=progress)[0]


def kept_rows(store: Any, cfg: SAEUniversalityConfig, hooks: list[str] | None = None) -> torch.Tensor:
    """``[rows]`` bool: rows used for SAEs and matching, under the sink rule of ``--skip-first`` and
    ``--norm-ratio`` (:func:`rosettalens.sae.keep_rows`; a row left out at one hook is left out at all)."""
    from ..sae import keep_rows

    return keep_rows(store, hooks, cfg.sink_rule())[0]


def _sae_device(cfg: SAEUniversalityConfig) -> str:
    """Where SAEs train: ``--device``, else CUDA when there is one (as model loading does), else CPU."""
    if cfg.device not in (None, "auto"):
        return str(cfg.device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def encode(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """Feature activations ``[n, width]`` of ``x [n, d_in]``."""
    with torch.no_grad():
        return sae.encode(x.to(device=sae.device, dtype=torch.float32)).cpu()


def decoder_rows(sae: Any) -> torch.Tensor:
    """``W_dec [width, d_in]`` (rows are the features' directions)."""
    return sae.W_dec.detach().to(torch.float64).cpu()


def sae_metrics(sae: Any, x: torch.Tensor) -> dict[str, float]:
    """FVU (variance about the mean), L0 and dead fraction of ``sae`` on held-out ``x [n, d_in]``."""
    from ..sae import evaluate_sae

    m = evaluate_sae(sae, x)
    return {k: float(m[k]) for k in ("fvu", "l0", "dead_fraction", "dense_fraction")}


# ------------------------------------------------------------------------------------ experiment
def _hook(cfg: SAEUniversalityConfig, layer: int) -> str:
    return hook_name(cfg.hook, layer)


def _filters(cfg: SAEUniversalityConfig):
    from ..similarity.universality import MatchFilters

    return MatchFilters(min_corr=cfg.min_corr, drop_nonconcept=cfg.drop_nonconcept,
                        shared_top_token=cfg.shared_top_token, one_to_one=cfg.one_to_one,
                        top_k=cfg.top_k_tokens)  # fmt: skip


def _codes(sae: Any, store: Any, hook: str, rows: torch.Tensor, chunk: int = 4096) -> Iterator[torch.Tensor]:
    """SAE codes ``[chunk, width]`` of the store's rows ``rows``, chunk by chunk (bounded memory)."""
    for sl in _chunks(len(rows), chunk):
        yield encode(sae, store.read(hook, rows=rows[sl]).to(torch.float32))


def match_pair(sae_a, sae_b, store_a, store_b, hook_a, hook_b, rows_a, rows_b, tok_a, tok_b, filters):
    """Filtered feature match of two SAEs over paired store rows (``rows_a``, ``rows_b`` ``[n_pairs]``)."""
    from ..similarity.universality import match_saes

    return match_saes(
        _codes(sae_a, store_a, hook_a, rows_a),
        _codes(sae_b, store_b, hook_b, rows_b),
        store_a.token_ids[rows_a].numpy(),
        store_b.token_ids[rows_b].numpy(),
        tok_a,
        tok_b,
        filters,
    )


class SAEUniversality(Experiment):
    name = "sae-universality"
    config_cls = SAEUniversalityConfig
    title = "rosettalens: SAE feature-space universality"

    def plan(self, cfg: SAEUniversalityConfig) -> dict[str, Any]:
        """What a run will load, and its cost: measured for the default (SmolLM2 vs Qwen 0.5B, 60k tokens,
        5 x 5 layer pairs with controls: 18.9 min, 5.5 GB on one thread of a 2-core CPU, docs/results/),
        scaled by the token budget."""
        models = [m.strip() for m in cfg.models.split(",") if m.strip()]
        default = SAEUniversalityConfig()
        scale = cfg.max_tokens / default.max_tokens
        return {
            "models": models,
            "organisms_to_build": [],
            "minutes": round(18.9 * scale, 1),
            "peak_gb": round(max(5.5 * scale, 2.0), 1),
            "notes": "measured for the default run, scaled by --max-tokens (other options change it too)",
        }

    def stages(self, cfg: SAEUniversalityConfig) -> list[Stage]:
        return [
            Stage("setup", (), self.setup),
            Stage(
                "extract",
                ("acts/a/manifest.json", "acts/b/manifest.json", "pairing.json"),
                self.extract,
                self.load_extract,
            ),  # fmt: skip
            Stage("saes", ("saes.json",), self.saes, self.load_saes),
            Stage("match", ("pairs.json", "correlations.safetensors"), self.match, self.load_match),
            Stage("subspaces", ("subspaces.json",), self.subspaces, self.load_subspaces),
            Stage("controls", ("controls.json",), self.controls, self.load_controls),
            Stage("plots", ("heatmaps.png", "correlations.png", "controls.png"), self.plots),
        ]

    # --------------------------------------------------------------------------------- 1 setup
    def setup(self, ctx: RunContext) -> None:
        import rosettalens

        from ..similarity.universality import load_subspaces, parse_layers

        cfg: SAEUniversalityConfig = ctx.config
        torch.manual_seed(cfg.seed)
        name_a, name_b = cfg.model_names
        hm_a = rosettalens.load(name_a, device=cfg.device, progress=ctx.progress)
        hm_b = (
            hm_a if name_b == name_a else rosettalens.load(name_b, device=cfg.device, progress=ctx.progress)
        )
        la, lb = parse_layers(cfg.layers, hm_a.cfg.n_layers, hm_b.cfg.n_layers)
        ctx.state.update(
            hm_a=hm_a, hm_b=hm_b, layers_a=la, layers_b=lb, tok_a=hm_a.tokenizer, tok_b=hm_b.tokenizer
        )
        ctx.state["keywords"] = load_subspaces(cfg.subspaces)  # bad file: fail before any work
        ctx.results["models"] = {"a": hm_a.name, "b": hm_b.name}
        ctx.results["layers"] = {"a": [_hook(cfg, x) for x in la], "b": [_hook(cfg, x) for x in lb]}

    # ------------------------------------------------------------------------------- 2 extract
    def extract(self, ctx: RunContext) -> None:
        from ..store import extract

        cfg: SAEUniversalityConfig = ctx.config
        corpus = load_corpus(cfg, ctx.state["hm_a"], ctx.progress)
        for side in ("a", "b"):
            hooks = [_hook(cfg, x) for x in ctx.state[f"layers_{side}"]]
            extract(ctx.state[f"hm_{side}"], hooks, corpus, ctx.path(f"acts/{side}/manifest.json").parent,
                    max_length=cfg.max_length, batch_size=cfg.extract_batch_size, progress=ctx.progress)  # fmt: skip
        ctx.state["corpus"] = corpus
        self._pair(ctx, write=True)

    def load_extract(self, ctx: RunContext) -> None:
        self._pair(ctx, write=False)

    def _pair(self, ctx: RunContext, write: bool) -> None:
        from ..align import PairedStores
        from ..store import ActivationStore

        sa = ActivationStore.open(ctx.run_dir / "acts" / "a")
        sb = ActivationStore.open(ctx.run_dir / "acts" / "b")
        pair = PairedStores(sa, sb, mode="aligned")
        same_tok = sa.manifest["tokenizer"]["sha256"] == sb.manifest["tokenizer"]["sha256"]
        keep_a, keep_b = kept_rows(sa, ctx.config), kept_rows(sb, ctx.config)
        n_all = len(pair)
        pair = _filter_pairs(pair, keep_a, keep_b)
        info = {
            "mode": "position (same tokenizer)" if same_tok else "character offsets (different tokenizers)",
            "n_pairs": len(pair),
            "n_pairs_before_row_filter": n_all,
            "rows_a": len(sa),
            "rows_b": len(sb),
            "rows_left_out_a": int((~keep_a).sum()),
            "rows_left_out_b": int((~keep_b).sum()),
            "fraction_a": pair.fraction_a,
            "fraction_b": pair.fraction_b,
            "n_documents": sa.manifest["n_documents"],
            "corpus": sa.manifest["dataset"],
        }
        if len(pair) < MIN_PAIRED_TOKENS:
            raise DataError(
                f"only {len(pair)} tokens of {sa.manifest['model']['name']} and {sb.manifest['model']['name']} "
                f"pair up on this corpus (need {MIN_PAIRED_TOKENS}): the models share too little text; "
                "give more or other --data"
            )
        ctx.state.update(store_a=sa, store_b=sb, pair=pair, keep_a=keep_a, keep_b=keep_b)
        # model B is not run again (its tokenizer is kept): free its weights
        ctx.state.pop("hm_b", None)
        gc.collect()
        ctx.results["pairing"] = info
        if write:
            ctx.save_json("pairing.json", info)

    # ---------------------------------------------------------------------------------- 3 saes
    def _split(self, keep: torch.Tensor, cfg: SAEUniversalityConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept training rows and kept held-out rows (the last ``--eval-fraction`` of the store: its last
        documents)."""
        n = len(keep)
        cut = n - max(1, int(round(n * cfg.eval_fraction)))
        idx = torch.arange(n)
        return idx[:cut][keep[:cut]], idx[cut:][keep[cut:]]

    def _train_eval(
        self, ctx: RunContext, store: Any, keep: torch.Tensor, hook: str, seed: int
    ) -> tuple[Any, dict[str, float]]:
        cfg: SAEUniversalityConfig = ctx.config
        tr, ev = self._split(keep, cfg)
        sae = train_layer_sae(store, hook, tr, cfg, seed, ctx.progress)
        return sae, sae_metrics(sae, store.read(hook, rows=ev).to(torch.float32))

    def saes(self, ctx: RunContext) -> None:
        cfg: SAEUniversalityConfig = ctx.config
        metrics: dict[str, dict[str, Any]] = {}
        saes: dict[str, dict[int, Any]] = {}
        for side in ("a", "b"):
            store = ctx.state[f"store_{side}"]
            saes[side], metrics[side] = {}, {}
            for layer in ctx.state[f"layers_{side}"]:
                keep = ctx.state[f"keep_{side}"]
                sae, metrics[side][str(layer)] = self._train_eval(
                    ctx, store, keep, _hook(cfg, layer), cfg.seed
                )
                saes[side][layer] = sae
                sae.save(ctx.path(f"saes/{side}/layer{layer}/.keep").parent)
        ctx.state["saes"] = saes
        ctx.results["sae_metrics"] = self._named_metrics(ctx, metrics)
        ctx.save_json("saes.json", metrics)

    def _named_metrics(self, ctx: RunContext, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {ctx.results["models"][s]: {_hook(ctx.config, int(k)): v for k, v in m.items()}
                for s, m in metrics.items()}  # fmt: skip

    def load_saes(self, ctx: RunContext) -> None:
        metrics = ctx.load_json("saes.json")
        ctx.state["saes"] = {
            side: {layer: load_sae(ctx.run_dir / "saes" / side / f"layer{layer}") for layer in ctx.state[f"layers_{side}"]}
            for side in ("a", "b")
        }  # fmt: skip
        ctx.results["sae_metrics"] = self._named_metrics(ctx, metrics)

    # --------------------------------------------------------------------------------- 4 match
    def _match(self, ctx: RunContext, la: int, lb: int):
        cfg: SAEUniversalityConfig = ctx.config
        pair = ctx.state["pair"]
        return match_pair(
            ctx.state["saes"]["a"][la], ctx.state["saes"]["b"][lb], ctx.state["store_a"], ctx.state["store_b"],
            _hook(cfg, la), _hook(cfg, lb), pair.rows_a, pair.rows_b,
            ctx.state["tok_a"], ctx.state["tok_b"], _filters(cfg),
        )  # fmt: skip

    def match(self, ctx: RunContext) -> None:
        from tqdm.auto import tqdm

        from ..similarity.universality import paired_similarity

        cfg: SAEUniversalityConfig = ctx.config
        grid = [(la, lb) for la in ctx.state["layers_a"] for lb in ctx.state["layers_b"]]
        rows, corrs = [], {}
        for i, (la, lb) in enumerate(
            tqdm(grid, desc="match layer pairs", disable=not ctx.progress, file=sys.stderr)
        ):
            fm = self._match(ctx, la, lb)
            wa, wb = decoder_rows(ctx.state["saes"]["a"][la]), decoder_rows(ctx.state["saes"]["b"][lb])
            s = paired_similarity(wa, wb, fm.kept, n_permutations=cfg.n_permutations, seed=cfg.seed + 7919 * i,
                                  keep_variance=cfg.keep_variance)  # fmt: skip
            rows.append(
                {
                    "layer_a": la,
                    "layer_b": lb,
                    **s,
                    **{k: v for k, v in fm.to_dict().items() if k != "n_pairs"},
                }
            )
            corrs[f"{la}_{lb}_all"] = torch.from_numpy(fm.all.corr.astype(np.float32))
            corrs[f"{la}_{lb}_kept"] = torch.from_numpy(fm.kept.corr.astype(np.float32))
        ctx.save_tensors("correlations.safetensors", corrs)
        ctx.save_json("pairs.json", rows)
        self._set_pairs(ctx, rows, corrs)

    def load_match(self, ctx: RunContext) -> None:
        self._set_pairs(ctx, ctx.load_json("pairs.json"), ctx.load_tensors("correlations.safetensors"))

    def _set_pairs(self, ctx: RunContext, rows: list[dict], corrs: dict[str, torch.Tensor]) -> None:
        ctx.state["pairs"], ctx.state["correlations"] = rows, corrs
        ctx.results["pairs"] = rows
        scored = [r for r in rows if r.get("svcca") is not None]
        best = max(scored, key=lambda r: r["svcca"]) if scored else None
        ctx.results["best"] = best
        ctx.state["best"] = best

    # ----------------------------------------------------------------------------- 5 subspaces
    def subspaces(self, ctx: RunContext) -> None:
        from ..similarity.universality import subspace_scores

        cfg: SAEUniversalityConfig = ctx.config
        best = ctx.state["best"]
        out: list[dict[str, Any]] = []
        if best is not None:
            la, lb = best["layer_a"], best["layer_b"]
            fm = self._match(ctx, la, lb).kept
            wa, wb = decoder_rows(ctx.state["saes"]["a"][la]), decoder_rows(ctx.state["saes"]["b"][lb])
            rows = subspace_scores(wa, wb, fm, ctx.state["keywords"], side=cfg.subspace_side,
                                   n_permutations=cfg.n_subspace_permutations, seed=cfg.seed,
                                   keep_variance=cfg.keep_variance)  # fmt: skip
            from ..similarity.matching import semantic_subspaces

            groups = semantic_subspaces(fm, ctx.state["keywords"], side=cfg.subspace_side)
            for r in rows:
                idx = groups[r["name"]]
                examples = [f"{fm.top_text_a[i]}|{fm.top_text_b[i]}" for i in idx[:12]]  # type: ignore[index]
                out.append({"name": r["name"], "layer_a": la, "layer_b": lb, **{k: v for k, v in r.items() if k != "name"},
                            "examples": examples})  # fmt: skip
        ctx.save_json("subspaces.json", out)
        ctx.results["subspaces"] = out

    def load_subspaces(self, ctx: RunContext) -> None:
        ctx.results["subspaces"] = ctx.load_json("subspaces.json")

    # ------------------------------------------------------------------------------ 6 controls
    def controls(self, ctx: RunContext) -> None:
        from ..align import PairedStores
        from ..sae import best_decoder_cosine
        from ..similarity.universality import paired_similarity
        from ..store import extract

        cfg: SAEUniversalityConfig = ctx.config
        best = ctx.state["best"]
        out: dict[str, Any] = {"same_model_svcca": None, "random_model_svcca": None, "per_pair": []}
        if best is None or cfg.controls == "none":
            out["note"] = (
                "controls disabled" if best is not None else "no layer pair has enough filtered pairs"
            )
            ctx.save_json("controls.json", out)
            ctx.results["controls"] = out
            return
        grid = (
            [(r["layer_a"], r["layer_b"]) for r in ctx.state["pairs"]]
            if cfg.controls == "all"
            else [(best["layer_a"], best["layer_b"])]
        )
        layers_a = sorted({la for la, _ in grid})
        sa, sb, pair = ctx.state["store_a"], ctx.state["store_b"], ctx.state["pair"]
        tok_a, tok_b = ctx.state["tok_a"], ctx.state["tok_b"]
        filters = _filters(cfg)

        def score(fm, w1, w2, seed):
            s = paired_similarity(w1, w2, fm.kept, n_permutations=cfg.n_permutations, seed=seed,
                                  keep_variance=cfg.keep_variance)  # fmt: skip
            return {**s, **{k: v for k, v in fm.to_dict().items() if k != "n_pairs"}}

        # ceiling: model A's layer, a second SAE with another seed, matched over A's paired tokens
        ceiling: dict[int, dict[str, Any]] = {}
        for la in layers_a:
            ha = _hook(cfg, la)
            sae_a, (sae_a2, _) = (
                ctx.state["saes"]["a"][la],
                self._train_eval(ctx, sa, ctx.state["keep_a"], ha, cfg.seed + 1),
            )
            sae_a2.save(ctx.path(f"saes/a_seed{cfg.seed + 1}/layer{la}/.keep").parent)
            fm = match_pair(sae_a, sae_a2, sa, sa, ha, ha, pair.rows_a, pair.rows_a, tok_a, tok_a, filters)
            ceiling[la] = score(fm, decoder_rows(sae_a), decoder_rows(sae_a2), cfg.seed + 11 + la)
            ceiling[la]["decoder_cosine_median"] = float(best_decoder_cosine(sae_a, sae_a2).median())
        # floor: SAEs of a randomly initialised copy of model A, matched to model B's SAEs
        hm_r = random_copy(ctx.state["hm_a"], cfg.seed + 2)
        corpus = ctx.state.get("corpus") or load_corpus(cfg, ctx.state["hm_a"], ctx.progress)
        sr = extract(hm_r, [_hook(cfg, la) for la in layers_a], corpus, ctx.path("acts/random/manifest.json").parent,
                     max_length=cfg.max_length, batch_size=cfg.extract_batch_size, progress=ctx.progress)  # fmt: skip
        del hm_r
        keep_r = kept_rows(sr, cfg)
        pr = _filter_pairs(PairedStores(sr, sb, mode="aligned"), keep_r, ctx.state["keep_b"])
        rand_saes, rand_metrics = {}, {}
        for la in layers_a:
            rand_saes[la], rand_metrics[la] = self._train_eval(ctx, sr, keep_r, _hook(cfg, la), cfg.seed)
            rand_saes[la].save(ctx.path(f"saes/random/layer{la}/.keep").parent)
        cross = {(r["layer_a"], r["layer_b"]): r for r in ctx.state["pairs"]}
        for i, (la, lb) in enumerate(grid):
            sae_r, sae_b = rand_saes[la], ctx.state["saes"]["b"][lb]
            fm = match_pair(sae_r, sae_b, sr, sb, _hook(cfg, la), _hook(cfg, lb), pr.rows_a, pr.rows_b, tok_a, tok_b,
                            filters)  # fmt: skip
            rand = score(fm, decoder_rows(sae_r), decoder_rows(sae_b), cfg.seed + 13 + 7919 * i)
            c = cross[(la, lb)]
            out["per_pair"].append({
                "layer_a": la, "layer_b": lb,
                "cross_svcca": c.get("svcca"), "null_svcca": c.get("svcca_null_mean"), "cross_p": c.get("svcca_p"),
                "ceiling_svcca": ceiling[la].get("svcca"), "ceiling_p": ceiling[la].get("svcca_p"),
                "random_svcca": rand.get("svcca"), "random_null_svcca": rand.get("svcca_null_mean"),
                "random_p": rand.get("svcca_p"), "random_n_pairs": rand.get("n_pairs"),
            })  # fmt: skip
            if (la, lb) == (best["layer_a"], best["layer_b"]):
                rand["sae_metrics"] = rand_metrics[la]
                out["random_model"] = rand
        la, lb = best["layer_a"], best["layer_b"]
        out.update(layer_a=la, layer_b=lb, trained_svcca=best["svcca"], trained_svcca_null_mean=best["svcca_null_mean"],
                   same_model_svcca=ceiling[la].get("svcca"), same_model=ceiling[la],
                   same_model_decoder_cosine_median=ceiling[la]["decoder_cosine_median"],
                   random_model_svcca=out.get("random_model", {}).get("svcca"))  # fmt: skip
        ctx.save_json("controls.json", out)
        ctx.results["controls"] = out

    def load_controls(self, ctx: RunContext) -> None:
        ctx.results["controls"] = ctx.load_json("controls.json")

    # --------------------------------------------------------------------------------- 7 plots
    def plots(self, ctx: RunContext) -> None:
        from ..report.html import pyplot

        plt = pyplot()
        la, lb = ctx.state["layers_a"], ctx.state["layers_b"]
        rows = {(r["layer_a"], r["layer_b"]): r for r in ctx.state["pairs"]}
        name_a, name_b = ctx.results["models"]["a"], ctx.results["models"]["b"]
        fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
        for ax, key, title in (
            (axes[0, 0], "svcca", "paired SVCCA"),
            (axes[0, 1], "rsa", "paired RSA"),
            (axes[1, 0], "svcca_p", "SVCCA p-value (shuffled pairings)"),
            (axes[1, 1], "rsa_p", "RSA p-value"),
        ):
            m = np.full((len(la), len(lb)), np.nan)
            for i, a in enumerate(la):
                for j, b in enumerate(lb):
                    v = rows[(a, b)].get(key)
                    m[i, j] = np.nan if v is None else v
            is_p = key.endswith("_p")
            shown = np.log10(m) if is_p else m
            ok = np.isfinite(shown)
            lo, hi = (float(shown[ok].min()), float(shown[ok].max())) if ok.any() else (0.0, 1.0)
            im = ax.imshow(shown, cmap="viridis_r" if is_p else "viridis", aspect="auto")
            for i in range(len(la)):
                for j in range(len(lb)):
                    if np.isfinite(m[i, j]):
                        bright = (shown[i, j] - lo) / max(hi - lo, 1e-12)
                        bright = 1 - bright if is_p else bright  # viridis_r for p-values
                        ax.text(j, i, f"{m[i, j]:.2g}" if is_p else f"{m[i, j]:.2f}", ha="center", va="center",
                                fontsize=7, color="k" if bright > 0.6 else "w")  # fmt: skip
            ax.set(xticks=range(len(lb)), xticklabels=lb, yticks=range(len(la)), yticklabels=la,
                   xlabel=f"{name_b} layer", ylabel=f"{name_a} layer", title=title + (" (log10)" if is_p else ""))  # fmt: skip
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        ctx.save_figure("heatmaps.png", fig)

        fig, ax = plt.subplots(figsize=(7, 3.8))
        best = ctx.state["best"] or (ctx.state["pairs"][0] if ctx.state["pairs"] else None)
        if best is not None:
            c = ctx.state["correlations"]
            key = f"{best['layer_a']}_{best['layer_b']}"
            bins = np.linspace(-0.2, 1.0, 49)
            ax.hist(
                c[f"{key}_all"].numpy(), bins=bins, alpha=0.6, label=f"all matches ({len(c[f'{key}_all'])})"
            )
            ax.hist(
                c[f"{key}_kept"].numpy(),
                bins=bins,
                alpha=0.8,
                label=f"after filters ({len(c[f'{key}_kept'])})",
            )
            ax.set(title=f"activation correlation of matched features, layers {best['layer_a']} / {best['layer_b']}",
                   xlabel="Pearson correlation over paired tokens", ylabel="features")  # fmt: skip
            ax.legend(fontsize=8)
        fig.tight_layout()
        ctx.save_figure("correlations.png", fig)
        ctx.save_figure("controls.png", controls_figure(plt, ctx.results.get("controls", {}), name_a, name_b))

    # -------------------------------------------------------------------------------- outputs
    def summary(self, ctx: RunContext) -> dict[str, Any]:
        keys = ("layer_a", "layer_b", "n_pairs", "svcca", "svcca_null_mean", "svcca_p", "rsa", "rsa_null_mean",
                "rsa_p", "linear_cka", "linear_cka_null_mean", "linear_cka_p")  # fmt: skip
        sub_keys = ("name", "layer_a", "layer_b", "n_pairs", "svcca", "svcca_null_mean", "svcca_p", "rsa",
                    "rsa_null_mean", "rsa_p")  # fmt: skip
        r = ctx.results
        best = r.get("best")
        c = r.get("controls", {})
        return {
            "models": [r["models"]["a"], r["models"]["b"]],
            "pairs": [{k: p.get(k) for k in keys} for p in r.get("pairs", [])],
            "best": None if best is None else {k: best.get(k) for k in keys},
            "subspaces": [{k: s.get(k) for k in sub_keys} for s in r.get("subspaces", [])],
            "controls": {
                "same_model_svcca": c.get("same_model_svcca"),
                "random_model_svcca": c.get("random_model_svcca"),
                "same_model_decoder_cosine_median": c.get("same_model_decoder_cosine_median"),
                "layer_a": c.get("layer_a"),
                "layer_b": c.get("layer_b"),
                "per_pair": c.get("per_pair", []),
            },  # fmt: skip
            "sae_metrics": r.get("sae_metrics", {}),
            "pairing": r.get("pairing"),
            "peak_rss_mb": r.get("peak_rss_mb"),
            "timings_s": r.get("timings_s"),
            "run_dir": str(ctx.run_dir),
        }

    def report(self, ctx: RunContext) -> None:
        ctx.results["peak_rss_mb"] = peak_rss_mb()
        ctx.save_json("results.json", ctx.results)
        _write_report(ctx)

    def print_summary(self, summary: dict[str, Any]) -> None:
        a, b = summary["models"]
        print(f"{a} vs {b}: {len(summary['pairs'])} layer pairs ({summary['pairing']['mode']}, "
              f"{summary['pairing']['n_pairs']} paired tokens)")  # fmt: skip
        best = summary["best"]
        if best is None:
            print("no layer pair kept enough feature pairs after the filters")
        else:
            print(f"best pair: layers {best['layer_a']} / {best['layer_b']}, {best['n_pairs']} feature pairs, "
                  f"SVCCA {best['svcca']:.3f} (null {best['svcca_null_mean']:.3f}, p {best['svcca_p']:.3g}), "
                  f"RSA {best['rsa']:.3f} (null {best['rsa_null_mean']:.3f}, p {best['rsa_p']:.3g})")  # fmt: skip
        c = summary["controls"]
        print(f"controls: same model, other seed SVCCA {_f(c['same_model_svcca'])}; "
              f"random-init model A SVCCA {_f(c['random_model_svcca'])}")  # fmt: skip
        print(f"run directory: {summary['run_dir']} (report.html)")


def controls_figure(plt, controls: dict[str, Any], name_a: str, name_b: str):
    """Per layer pair, side by side: the two-seed ceiling (model A against itself), the cross-model SVCCA,
    its shuffle null and the random-init control; the cross-model p-value above each group."""
    rows = controls.get("per_pair") or []
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 3.8))
    if not rows:
        ax.text(0.5, 0.5, controls.get("note", "no controls"), ha="center", va="center")
        ax.set_axis_off()
        return fig
    bars = (("ceiling_svcca", "ceiling (A, two seeds)", "tab:green"), ("cross_svcca", "cross-model", "tab:blue"),
            ("null_svcca", "shuffle null", "tab:gray"), ("random_svcca", "random-init A vs B", "tab:red"))  # fmt: skip
    x = np.arange(len(rows))
    w = 0.2
    for j, (key, label, color) in enumerate(bars):
        vals = [np.nan if r.get(key) is None else r[key] for r in rows]
        ax.bar(x + (j - 1.5) * w, vals, w, label=label, color=color)
        for i, v in enumerate(vals):
            if not np.isfinite(v):  # too few filtered pairs to score
                ax.text(
                    i + (j - 1.5) * w,
                    0.02,
                    "too few pairs",
                    rotation=90,
                    fontsize=6,
                    ha="center",
                    va="bottom",
                )
    for i, r in enumerate(rows):
        if r.get("cross_p") is not None:
            top = max(v for v in (r.get(k) for k, _, _ in bars) if v is not None) if any(
                r.get(k) is not None for k, _, _ in bars) else 0.0  # fmt: skip
            ax.text(i, top + 0.02, f"p={r['cross_p']:.2g}", ha="center", fontsize=7)
    ax.set(xticks=x, xticklabels=[f"{r['layer_a']}/{r['layer_b']}" for r in rows], ylabel="paired SVCCA",
           xlabel=f"layer pair ({name_a} / {name_b})", ylim=(0, 1.1),
           )  # fmt: skip
    ax.set_title("paired SVCCA per layer pair: ceiling, cross-model, null, random-init", fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    fig.tight_layout()
    return fig


def _f(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _write_report(ctx: RunContext) -> None:
    """``report.html``: what was run, the best layer pair's scores beside their nulls and p-values and the
    controls, the plots, the top matched features."""
    from ..report.html import config_defaults, experiment_report, kv_table, records_table

    r = ctx.results
    best = r.get("best") or {}
    c = r.get("controls", {})
    keys = ("layer_a", "layer_b", "n_pairs", "svcca", "svcca_null_mean", "svcca_p", "rsa", "rsa_null_mean",
            "rsa_p", "linear_cka", "linear_cka_null_mean", "linear_cka_p")  # fmt: skip
    headline = kv_table([
        ("models", f"{r['models']['a']} vs {r['models']['b']}"),
        ("best layer pair (paired SVCCA) with its shuffled-pairing nulls and p-values",
         {k: best.get(k) for k in keys} if best else None),
        ("control: same model, other SAE seed (ceiling), SVCCA", c.get("same_model_svcca")),
        ("control: random-init model A, SVCCA", c.get("random_model_svcca")),
        ("control: same model, decoder cosine (median)", c.get("same_model_decoder_cosine_median")),
    ])  # fmt: skip
    top: list[dict[str, Any]] = []
    for p in r.get("pairs", []):
        if best and (p.get("layer_a"), p.get("layer_b")) == (best.get("layer_a"), best.get("layer_b")):
            trip = sorted(
                zip(p.get("a", []), p.get("b", []), p.get("corr", []), strict=False), key=lambda t: -t[2]
            )
            top = [{"feature A": a, "feature B": b, "activation correlation": cr} for a, b, cr in trip[:10]]
    subs = [{k: s.get(k) for k in ("name", "n_pairs", "svcca", "svcca_null_mean", "svcca_p", "rsa", "rsa_null_mean",
                                   "rsa_p")} | {"examples (A|B)": ", ".join(s.get("examples", []))}
            for s in r.get("subspaces", [])]  # fmt: skip
    ex = (f"<h3>Top matched features of the best layer pair ({best.get('layer_a')} / {best.get('layer_b')})</h3>"
          + records_table(top)
          + "<h3>Semantic subspaces of the best layer pair</h3>" + records_table(subs))  # fmt: skip
    pair_rows = [{k: p.get(k) for k in keys} for p in r.get("pairs", [])]
    mrows = [(f"{m} {h}", v) for m, per in r.get("sae_metrics", {}).items() for h, v in per.items()]
    details = [
        ("Pairing", kv_table(list((r.get("pairing") or {}).items()))),
        ("Layer pairs", records_table(pair_rows)),
        ("Controls", kv_table([(k, v) for k, v in c.items() if k != "per_pair"])),
        ("Controls per layer pair", records_table(c.get("per_pair") or [])),
        ("SAE quality (held-out tokens; FVU with the variance about the mean)", kv_table(mrows)),
    ]
    experiment_report(
        ctx, EXPERIMENT.name, "rosettalens: SAE feature-space universality",
        config_defaults(EXPERIMENT.config_cls), headline, ex,
        captions={"heatmaps.png": "paired SVCCA and RSA per layer pair",
                  "correlations.png": "activation correlations of the matched pairs before and after filtering",
                  "controls.png": "controls per layer pair: same model (other seed) and random-init model"},
        details=details,
    )  # fmt: skip


EXPERIMENT = SAEUniversality()


def run(
    cfg: SAEUniversalityConfig | None = None, progress: bool = True, resume: str | os.PathLike | None = None,
    overwrite: bool = False,
):  # fmt: skip
    """Run the experiment (the ``rosetta run sae-universality`` entry point as a function)."""
    from .base import run_experiment

    return run_experiment(EXPERIMENT, cfg, resume=resume, progress=progress, overwrite=overwrite)
