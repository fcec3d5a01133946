"""Recovery fine-tuning (RFT): a training stage between surgery and evaluation (``conf/rft/*.yaml``).

ELDeR/TRSP claims that regularising before pruning saves the recovery fine-tuning that other methods need;
BlockPruner (appendix H), DISP-LLM (Table 15) and LLM-Pruner report LoRA recovery. This stage gives any
method's pruned model the same recovery, so the claim can be measured at equal cost:

- ``kind=lora``: LoRA adapters (peft, pinned in pyproject.toml) on the linears named by role (`ROLES`:
  ``q k v o mlp_in mlp_out``, groups ``attention`` and ``mlp``), resolved per family through the adapter, so
  layers whose sub-blocks were removed (no linears left) and width-pruned linears (`IndexAddLinear`,
  `IndexSelectLinear`, with their own LoRA layers below) work. After training the adapters are merged into
  the weights and peft's wrappers removed: the model is the same (derived) type as before, and
  ``save=true`` writes a plain checkpoint.
- ``kind=full``: every weight trains (ELDeR's stage-2 machinery, `prune.methods.training.train_loop`).

The data are windows of a text set built like a calibration set
(`prune.data.calibration.build_calibration`; ``random_windows`` of ``seqlen`` tokens by default). A
recipe's dataset that is not bundled (``alpaca_cleaned``) loads from the Hub; offline its ``stand_in`` (the
bundled Alpaca sample) replaces it, and the log and the record name the substitute. The optimisation is the
shared loop: AdamW, linear schedule, gradient accumulation over ``accelerate launch`` processes, bf16
autocast and gradient checkpointing on GPU, live curves under ``rft/`` in W&B, and a checkpoint of the
trainables, optimiser, schedule and RNG every ``checkpoint_every`` steps (`AdapterCheckpoint`, a
`prune.store.KeyedFile`), from which an interrupted cell resumes.

Budget: ``steps`` wins, else ``tokens`` (the token budget override: steps = ⌈tokens / (global batch ·
seqlen)⌉, so methods can be compared at equal cost), else ``epochs`` over the windows.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from prune.data.calibration import BUILDERS, CalibrationSet, build_calibration
from prune.data.sources import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, BUNDLED, hub_reachable
from prune.errors import PruneError
from prune.eval.memory import PeakMemory
from prune.methods.training import (
    Dist,
    LoopSettings,
    Windows,
    masked_ce,
    train_loop,
    training_mode,
)
from prune.models.adapter import ModelAdapter, module_at
from prune.models.width import IndexAddLinear, IndexSelectLinear
from prune.options import Options, bounded
from prune.store import KeyedFile

log = logging.getLogger(__name__)

# Roles of a decoder layer's linears, resolved through the family's layout (prune/models/families.py).
ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("q", "k", "v", "o"),
    "mlp": ("mlp_in", "mlp_out"),
}
ROLES = ("q", "k", "v", "o", "mlp_in", "mlp_out")
# Datasets that only the Hub holds: name -> Hub id (rows formatted with Alpaca's prompt templates).
HUB_ONLY = {"alpaca_cleaned": "yahma/alpaca-cleaned"}
CHECKPOINT_PREFIX = "rft-checkpoint-"


@dataclass(frozen=True)
class RftOptions(Options):
    """The ``rft`` node (``conf/rft/*.yaml``); each recipe file names its source."""

    prefix: ClassVar[str] = "rft"

    kind: Literal["none", "lora", "full"] = "none"
    recipe: str = "none"  # the recipe's name, recorded with the figures
    # LoRA
    rank: int = bounded(8, ge=1)
    alpha: float = bounded(16.0, gt=0)
    dropout: float = bounded(0.05, ge=0, lt=1)
    targets: tuple[str, ...] = ("attention", "mlp")  # roles (ROLES) or groups (ROLE_GROUPS)
    # optimisation
    lr: float = bounded(2e-4, gt=0)
    epochs: float = bounded(1.0, gt=0)
    steps: int | None = bounded(None, ge=1)  # optimiser steps; wins over tokens and epochs
    tokens: int | None = bounded(None, ge=1)  # token budget: steps = ceil(tokens / (global batch * seqlen))
    batch_size: int = bounded(1, ge=1)  # sequences per forward pass and process
    grad_accum: int = bounded(4, ge=1)  # micro-batches per step over all processes
    warmup_ratio: float = bounded(0.0, ge=0, le=1)
    weight_decay: float = bounded(0.0, ge=0)
    bf16: bool = True  # autocast on CUDA (trainables in float32 meanwhile); ignored on CPU
    gradient_checkpointing: bool = True  # on CUDA only (on a CPU the recomputation costs more than it saves)
    ce_chunk: int = bounded(1024, ge=1)
    seed: int = bounded(0, ge=0)  # window order and LoRA dropout
    progress: bool = True
    checkpoint_every: int = bounded(50, ge=1)  # steps between checkpoints of the trainables (resume)
    eval_before: bool = True  # also evaluate the pruned model before RFT (pre_rft/ metrics; costs one eval)
    # data (a calibration-style set; `prune.data.calibration`)
    dataset: str = "alpaca"
    split: str = "train"
    style: str = "random_windows"
    nsamples: int = bounded(8000, ge=1)  # windows (random_windows) or rows (row_chunks)
    seqlen: int = bounded(1024, ge=1)
    join: str = "\n\n"
    pool: Literal["all", "official"] = "all"
    source: Literal["auto", "hub", "bundled"] = "auto"
    stand_in: str | None = None  # the bundled dataset that replaces a Hub-only one offline

    def check(self) -> None:
        if self.kind == "none":
            return
        known = ROLES + tuple(ROLE_GROUPS)
        for role in self.targets:
            if role not in known:
                raise PruneError(f"rft.targets: unknown target module '{role}'; name roles: "
                                 f"{', '.join(known)}")
        if self.kind == "lora" and not self.targets:
            raise self.error("targets", "is empty; pass e.g. rft.targets=[attention,mlp]")
        if self.style not in BUILDERS:
            raise self.error("style", f"is not one of {', '.join(BUILDERS)}")
        bundled = sorted({d for d, _ in BUNDLED})
        for name in (self.dataset, self.stand_in):
            if name is not None and name not in bundled and name not in HUB_ONLY:
                known = ", ".join(bundled + list(HUB_ONLY))
                raise PruneError(f"rft.dataset={name} is unknown; datasets: {known}")
        if self.dataset not in HUB_ONLY and (self.dataset, self.split) not in BUNDLED:
            raise self.error("split", f"has no {self.dataset} split of that name")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def settings(self) -> LoopSettings:
        return LoopSettings(batch_size=self.batch_size, grad_accum=self.grad_accum,
                            warmup_ratio=self.warmup_ratio, weight_decay=self.weight_decay, bf16=self.bf16,
                            progress=self.progress)


def parse_options(node: Any) -> RftOptions:
    """`RftOptions` from a config node (``None``: no RFT)."""
    if node is None:
        return RftOptions()
    return RftOptions.parse({k: v for k, v in dict(node).items() if not str(k).startswith("_")})


def check_data_available(o: RftOptions) -> None:
    """A Hub-only dataset with no stand-in fails now when the Hub is out of reach (before anything loads)."""
    if o.kind == "none" or o.dataset not in HUB_ONLY or o.stand_in is not None:
        return
    if o.source == "bundled" or not hub_reachable():
        raise PruneError(f"rft.dataset={o.dataset} is not bundled and the Hub is out of reach (offline); "
                         f"pass rft.stand_in=alpaca (the bundled Alpaca sample stands in) or run online")


# ---- data ----------------------------------------------------------------------------------------------


def build_windows(tokenizer: Any, o: RftOptions, preset: str | None = None) -> CalibrationSet:
    """The training windows of `o`'s dataset; a Hub-only dataset is replaced offline by its stand-in."""
    common = {"style": o.style, "nsamples": o.nsamples, "seqlen": o.seqlen, "seed": o.seed, "join": o.join,
              "preset": preset}
    if o.dataset not in HUB_ONLY:
        return build_calibration(tokenizer, dataset=o.dataset, split=o.split, source=o.source, pool=o.pool,
                                 **common)
    if o.source != "bundled" and hub_reachable():
        try:
            return _hub_only_windows(tokenizer, o, common)
        except Exception as err:  # noqa: BLE001 - any Hub failure falls back to the stand-in
            if o.stand_in is None:
                raise PruneError(f"could not load rft.dataset={o.dataset} from the Hub ({err}); pass "
                                 "rft.stand_in=alpaca") from err
            log.warning("Hub load of %s failed (%s)", o.dataset, err)
    if o.stand_in is None:
        raise PruneError(f"rft.dataset={o.dataset} is not bundled and the Hub is out of reach; pass "
                         "rft.stand_in=alpaca")
    log.warning("rft: offline, the bundled %s sample stands in for %s (%s)", o.stand_in, o.dataset,
                HUB_ONLY[o.dataset])
    split = "train" if (o.stand_in, "train") in BUNDLED else o.split
    calib = build_calibration(tokenizer, dataset=o.stand_in, split=split, source="bundled", pool=o.pool,
                              **common)
    calib.info |= {"stands_in_for": o.dataset}
    return calib


def _hub_only_windows(tokenizer: Any, o: RftOptions, common: dict[str, Any]) -> CalibrationSet:
    from datasets import load_dataset

    from prune.data.tokens import tensor_hash

    records = load_dataset(HUB_ONLY[o.dataset], split=o.split)
    rows = [(ALPACA_WITH_INPUT if r.get("input") else ALPACA_NO_INPUT).format(**r) + r["output"]
            for r in records]
    ids, mask = BUILDERS[o.style](tokenizer, rows, o.nsamples, o.seqlen, o.seed, o.join, 50)
    info = {"dataset": o.dataset, "split": o.split, "source": f"hub:{HUB_ONLY[o.dataset]}", "style": o.style,
            "nsamples": o.nsamples, "sequences": int(ids.shape[0]), "seqlen": o.seqlen, "seed": o.seed,
            "preset": common["preset"], "tokens_hash": tensor_hash(ids)}
    return CalibrationSet(ids, mask, info)


def planned_steps(o: RftOptions, windows: int, seqlen: int) -> int:
    """Optimiser steps: ``steps``, else the token budget, else ``epochs`` passes over the windows."""
    if o.steps is not None:
        return o.steps
    if o.tokens is not None:
        return max(1, math.ceil(o.tokens / (o.global_batch * seqlen)))
    return max(1, math.ceil(o.epochs * windows / o.global_batch))


# ---- LoRA ----------------------------------------------------------------------------------------------


def target_names(adapter: ModelAdapter, targets: tuple[str, ...]) -> list[str]:
    """Full module names of the linears the roles name, layer by layer; removed sub-blocks have none."""
    roles = [r for t in targets for r in ROLE_GROUPS.get(t, (t,))]
    layout = adapter.layout
    paths = {"q": [layout.attn_in[0]], "k": [layout.attn_in[1]], "v": [layout.attn_in[2]],
             "o": [layout.attn_out], "mlp_in": list(layout.mlp_in), "mlp_out": [layout.mlp_out]}
    names: list[str] = []
    for i in range(adapter.num_layers()):
        for role in dict.fromkeys(roles):
            for path in paths[role]:
                try:
                    module = module_at(adapter.layer(i), path)
                except AttributeError:  # the sub-block is gone
                    continue
                if isinstance(module, nn.Linear):
                    names.append(f"{layout.layers}.{i}.{path}")
    return names


def _lora_classes() -> dict[type, type]:
    """peft LoRA layers for the width-pruned linears, whose inputs or outputs are gathered or scattered."""
    from peft.tuners.lora import Linear as LoraLinear

    class IndexedLora(LoraLinear):  # type: ignore[misc]
        """LoRA on a width-pruned linear: the low-rank update sees the kept input columns
        (`IndexSelectLinear`) and its output goes to the kept output rows (`IndexAddLinear`), as the base
        weight's do; merging adds B·A to that weight, whose shape it has."""

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters or self.merged:
                return result
            base = self.get_base_layer()
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                inp = self.lora_dropout[name](x).to(a.weight.dtype)
                if isinstance(base, IndexSelectLinear):
                    inp = inp.index_select(-1, base.in_index)
                delta = (b(a(inp)) * self.scaling[name]).to(result.dtype)
                if isinstance(base, IndexAddLinear):
                    result = result.index_add(-1, base.out_index, delta)
                else:
                    result = result + delta
            return result

    return {IndexAddLinear: IndexedLora, IndexSelectLinear: IndexedLora}


def attach_lora(adapter: ModelAdapter, o: RftOptions) -> Any:
    """Inject LoRA adapters in place (the HF model keeps its type and forward); returns peft's LoraModel."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    names = target_names(adapter, o.targets)
    if not names:
        raise PruneError(f"rft.targets={list(o.targets)} match no linear of the pruned model")
    config = LoraConfig(r=o.rank, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=names,
                        bias="none")
    config._register_custom_module(_lora_classes())
    return LoraModel(adapter.model, config, "default")


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def merge_lora(lora_model: Any) -> nn.Module:
    """Merge the adapters into the weights and put the original modules back: the plain (derived) model."""
    return lora_model.merge_and_unload(progressbar=False)


@contextmanager
def frozen_flags(model: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` afterwards (peft freezes the base weights)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])


# ---- checkpoint ----------------------------------------------------------------------------------------


@dataclass
class AdapterCheckpoint:
    """The trainables (by name), optimiser, schedule, curves and RNG state after some step, in a
    `KeyedFile` named by the cell's RFT identity: a file of another run is never resumed."""

    file: KeyedFile
    params: dict[str, nn.Parameter]
    every: int
    resumed_from: int = 0

    def restore(self, opt: torch.optim.Optimizer, sched: Any, curves: dict[str, list]) -> int:
        state = self.file.load_torch(map_location="cpu")
        if state is None:
            return 0
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["params"][name].to(p.device, p.dtype))
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        for key, values in state["curves"].items():
            curves[key] = list(values)
        torch.set_rng_state(state["rng"])
        self.resumed_from = int(state["step"])
        log.info("rft: resumed from step %d (%s)", self.resumed_from, self.file.path)
        return self.resumed_from

    def save(self, step: int, opt: torch.optim.Optimizer, sched: Any, curves: dict[str, list]) -> None:
        self.file.save_torch({
            "step": step, "params": {n: p.detach().cpu() for n, p in self.params.items()},
            "opt": opt.state_dict(), "sched": sched.state_dict(), "curves": curves,
            "rng": torch.get_rng_state(),
        })

    def remove(self) -> None:
        self.file.path.unlink(missing_ok=True)


# ---- the stage -----------------------------------------------------------------------------------------


@dataclass
class RftResult:
    """What the runner records: cost metrics (``time/rft_s``, ...) and the run's details (``rft`` in
    results.json)."""

    metrics: dict[str, Any]
    info: dict[str, Any]


def recover(adapter: ModelAdapter, tokenizer: Any, o: RftOptions, *, checkpoint_dir: Path | None = None,
            identity: dict[str, Any] | None = None, preset: str | None = None) -> RftResult:
    """Train the pruned model in place (LoRA merged afterwards, or every weight) and return the cost."""
    if o.kind == "none":
        return RftResult({}, {})
    dist = Dist.create(adapter.model)
    if dist.n > o.grad_accum:
        raise PruneError(f"{dist.n} processes but rft.grad_accum={o.grad_accum} micro-batches per step; set "
                         f"rft.grad_accum to a multiple of {dist.n}")
    started = time.perf_counter()
    data_set = build_windows(tokenizer, o, preset)
    windows = Windows(data_set.input_ids, data_set.target_mask, o.global_batch)
    seqlen = int(windows.ids.shape[1])
    steps = planned_steps(o, len(windows), seqlen)
    model = adapter.model
    device = dist.device(model)
    with PeakMemory() as peak, frozen_flags(model):
        torch.manual_seed(o.seed)  # the LoRA initialisation and dropout
        lora = attach_lora(adapter, o) if o.kind == "lora" else None
        params = lora_parameters(model) if lora is not None else dict(model.named_parameters())
        ckpt = None
        if checkpoint_dir is not None:
            key = {"rft": o.as_dict(exclude=("progress", "eval_before", "checkpoint_every")),
                   "identity": identity or {}, "data": data_set.info.get("tokens_hash")}
            ckpt = AdapterCheckpoint(KeyedFile(Path(checkpoint_dir), key, CHECKPOINT_PREFIX, ".pt"),
                                     params, o.checkpoint_every)
        curves: dict[str, list] = {"ce": [], "loss": [], "lr": []}

        def data_loss(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"ce": masked_ce(model, ids, mask, o.ce_chunk)}

        checkpointing = o.gradient_checkpointing and device.type == "cuda"
        t0 = time.perf_counter()
        with training_mode(model, checkpointing):
            groups = [{"params": list(params.values()), "lr": o.lr}]
            train_loop(model, windows, windows.stream(o.seed), groups, steps, data_loss, dist, o.settings(),
                       desc=f"rft {o.recipe}", live_prefix="rft",
                       curves=curves, snapshot=dict, step_checkpoint=ckpt)
        train_s = time.perf_counter() - t0
        if lora is not None:
            merge_lora(lora)  # in place: the adapter's model object stays the one the runner holds
    model.eval()
    if ckpt is not None:
        ckpt.remove()  # the cell is trained; its results.json (written next) is what a rerun skips on
    seconds = time.perf_counter() - started
    tokens = steps * o.global_batch * seqlen
    gpu_hours = seconds * dist.n / 3600 if device.type == "cuda" else None
    metrics = {"time/rft_s": seconds, "time/rft_train_s": train_s, "mem/rft_peak_gb": peak.peak_gb,
               "rft/steps": steps, "rft/tokens": tokens,
               "rft/trainable_params": sum(p.numel() for p in params.values())}
    if gpu_hours is not None:
        metrics["time/rft_gpu_h"] = gpu_hours
    info = {"recipe": o.recipe, "kind": o.kind, "options": o.as_dict(), "data": data_set.info,
            "steps": steps, "tokens": tokens, "global_batch": o.global_batch, "seqlen": seqlen,
            "processes": dist.n, "preset": preset, "resumed_from_step": ckpt.resumed_from if ckpt else 0,
            "curves": curves, "mem": peak.kind}
    log.info("rft %s: %d steps, %d tokens, %.1f s", o.recipe, steps, tokens, seconds)
    return RftResult(metrics, info)

