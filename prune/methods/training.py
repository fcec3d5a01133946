"""Training utilities shared by the methods that train (ELDeR's two stages, DISP-LLM's hypernetwork).

The calibration windows (cut into pieces) and their per-step order, the process group under ``accelerate
launch``, a sliced LM-head loss, live W&B curves, and context managers that freeze, unfreeze and checkpoint a
model for one loop and undo all of it afterwards.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from prune.data.calibration import CalibrationSet


def nll_sum(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of hidden states `h` [K, d] against `targets` [K], logits in float32."""
    return F.cross_entropy(head(h).float(), targets, reduction="sum")


def masked_ce(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
              chunk: int | None = None) -> torch.Tensor:
    """Mean next-token CE over the target positions of `mask`; the LM head runs on those positions only.

    With `chunk`, it runs on slices of that many targets, each recomputed in the backward pass, so no
    [targets, vocab] logits tensor is kept for the backward pass.
    """
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]  # [B, T-1, d]
    keep = mask[:, 1:]
    h, targets = hidden[keep], ids[:, 1:][keep]  # [K, d], [K]
    head = model.get_output_embeddings()
    if chunk is None or len(targets) <= chunk:  # one slice: recomputing it would save no memory
        return nll_sum(head, h, targets) / max(len(targets), 1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, len(targets), chunk):
        piece = slice(s, s + chunk)
        total = total + checkpoint(nll_sum, head, h[piece], targets[piece], use_reentrant=False)
    return total / len(targets)


def live_log() -> Callable[[dict[str, float]], None] | None:
    """``wandb.run.log`` when the runner opened a W&B run (never imports wandb itself), else None."""
    run = getattr(sys.modules.get("wandb"), "run", None)
    return run.log if run is not None else None


def flat_point(prefix: str, point: dict[str, Any], names: list | None = None) -> dict[str, float]:
    """One curve point as W&B keys: a list becomes one key per entry (``elder/stage1/scales/3``), named by
    its index or, when `names` lists what the entries describe (e.g. their layers), by ``names[index]``."""
    flat: dict[str, float] = {}
    for key, value in point.items():
        if isinstance(value, (list, tuple)):
            labels = range(len(value)) if names is None else names
            flat |= {f"{prefix}/{key}/{name}": float(v) for name, v in zip(labels, value, strict=True)}
        else:
            flat[f"{prefix}/{key}"] = float(value)
    return flat


def calibration_pieces(calib: CalibrationSet, seqlen: int | None, slack: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration windows (ids, target mask), each cut into pieces of `seqlen` tokens.

    Windows longer than ``seqlen + slack`` tokens are cut; a window's remainder shorter than `seqlen` is
    dropped, and each piece's first token stops being a target (it has no context inside the piece).
    Shorter windows, or every window when `seqlen` is unset (``None`` or 0), are returned whole.
    ``slack`` is why the callers differ: DISP passes 1, because a window of seqlen + 1 tokens (the official
    code's 2049-token blocks for seqlen 2048) already holds seqlen next-token targets; ELDeR passes 0 and
    cuts every window longer than seqlen.
    """
    ids, mask = calib.input_ids, calib.target_mask
    if not seqlen or ids.shape[1] <= seqlen + slack:
        return ids, mask
    usable = ids.shape[1] // seqlen * seqlen
    ids = ids[:, :usable].reshape(-1, seqlen)
    mask = mask[:, :usable].reshape(-1, seqlen).clone()
    mask[:, 0] = False
    return ids, mask


@dataclass
class Windows:
    """Training windows and the order in which steps draw them (identical on every process)."""

    ids: torch.Tensor  # [N, T]
    mask: torch.Tensor  # [N, T], target positions
    global_batch: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def stream(self, seed: int) -> Iterator[torch.Tensor]:
        """Yield ``global_batch`` window indices per step: seeded permutations, epoch after epoch."""
        gen = torch.Generator().manual_seed(seed)
        pool = torch.empty(0, dtype=torch.long)
        while True:
            while len(pool) < self.global_batch:
                pool = torch.cat([pool, torch.randperm(len(self), generator=gen)])
            yield pool[: self.global_batch]
            pool = pool[self.global_batch :]


class Dist:
    """Process group view through `accelerate.Accelerator` (one process when not launched by accelerate)."""

    def __init__(self, accelerator: Any | None) -> None:
        self.acc = accelerator
        self.n = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.main = self.rank == 0

    @classmethod
    def create(cls, model: nn.Module) -> Dist:
        try:
            from accelerate import Accelerator
        except ImportError:  # single process without accelerate
            return cls(None)
        acc = Accelerator()
        dist = cls(acc)
        if dist.n > 1 and getattr(model, "hf_device_map", None) is None and acc.device.type != "cpu":
            model.to(acc.device)  # one device per process (the runner loaded every copy on the default one)
        return dist

    def device(self, model: nn.Module) -> torch.device:
        """This process's device: where the model's first parameter lives."""
        return next(model.parameters()).device

    def sum_grads(self, params: list[nn.Parameter]) -> None:
        """Sum the gradients of `params` over all processes, in one flat all-reduce."""
        if self.n == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()

    def sum_value(self, value: torch.Tensor) -> float:
        """A scalar summed over all processes (for the loss curves)."""
        if self.n > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
        return float(value)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether the model's activation (gradient) checkpointing is on, under either transformers name."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 name first
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def checkpointing_call(model: nn.Module, action: str) -> Callable[..., None]:
    """``model.<activation|gradient>_checkpointing_<action>``: recent transformers 5 releases renamed the
    gradient_* methods (kept as deprecated aliases); earlier ones (5.17 on GPU images) lack the new names."""
    for prefix in ("activation", "gradient"):
        if hasattr(model, f"{prefix}_checkpointing_{action}"):
            return getattr(model, f"{prefix}_checkpointing_{action}")
    raise AttributeError(f"{type(model).__name__} has no checkpointing_{action} method")


@contextmanager
def training_mode(model: nn.Module, gradient_checkpointing: bool) -> Iterator[None]:
    """Train mode, all weights frozen (loops unfreeze what they train), optional checkpointing; all undone."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    had_attr = hasattr(model, "_require_grads_hooks")
    checkpointing = gradient_checkpointing and not is_checkpointing(model)
    for p, _ in flags:
        p.requires_grad_(False)
    if checkpointing:
        checkpointing_call(model, "enable")({"use_reentrant": False})
        model.disable_input_require_grads()  # type: ignore[operator]  # only reentrant checkpointing needs it
    model.train()
    try:
        yield
    finally:
        if checkpointing:
            checkpointing_call(model, "disable")()
            for attr in ("_require_grads_hooks", "_require_grads_hook"):
                if not had_attr and hasattr(model, attr):
                    delattr(model, attr)
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


@contextmanager
def trainable(model: nn.Module, params: list[nn.Parameter], upcast: bool) -> Iterator[None]:
    """Unfreeze `params` (model weights in float32 under autocast) for one loop; refreeze, cast back after."""
    casts = []
    in_model = {id(q) for q in model.parameters()}
    for p in params:
        p.requires_grad_(True)
        if upcast and p.dtype in (torch.bfloat16, torch.float16):
            casts.append((p, p.dtype))
            p.data = p.data.float()
    try:
        yield
    finally:
        for p in params:
            p.grad = None
        for p, dtype in casts:
            p.data = p.data.to(dtype)
        for p in params:
            if id(p) in in_model:
                p.requires_grad_(False)


# ---- the shared optimisation loop (ELDeR's stages, recovery fine-tuning) -------------------------------

# (input_ids[B, T], target_mask[B, T]) -> named scalar loss terms of one micro-batch.
DataLoss = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LoopSettings:
    """The knobs of `train_loop` that its callers read from their own options."""

    batch_size: int  # sequences per forward pass (micro-batch) and process
    grad_accum: int  # micro-batches per optimiser step in total, split over the processes
    warmup_ratio: float  # share of the steps with a linear warm-up (then linear decay to 0)
    weight_decay: float  # AdamW decay
    bf16: bool  # autocast to bfloat16 on CUDA (trainable weights upcast to float32 meanwhile)
    progress: bool  # a tqdm bar on the main process


class StepCheckpoint(Protocol):
    """Where a loop saves its state every ``every`` steps and resumes from (`prune.rft.AdapterCheckpoint`)."""

    every: int

    def restore(self, opt: torch.optim.Optimizer, sched: Any, curves: dict[str, list]) -> int:
        """Load the saved state into the trainables, `opt`, `sched` and `curves`; the steps already done."""
        ...

    def save(self, step: int, opt: torch.optim.Optimizer, sched: Any, curves: dict[str, list]) -> None:
        """Save the state after `step` steps."""
        ...


def train_loop(model: nn.Module, data: Windows, stream: Iterator[torch.Tensor], groups: list[dict[str, Any]],
               steps: int, data_loss: DataLoss, dist: Dist, settings: LoopSettings, *, desc: str,
               live_prefix: str, curves: dict[str, list], snapshot: Callable[[], dict[str, Any]],
               penalty: Callable[[], torch.Tensor] | None = None,
               after_step: Callable[[], None] | None = None,
               step_checkpoint: StepCheckpoint | None = None) -> None:
    """AdamW, linear warm-up/decay schedule; one step = ``grad_accum`` micro-batches over all processes.

    Every step appends one point (the loss terms, lr and ``snapshot()``) to `curves` and, when the runner
    opened a W&B run, logs it live under `live_prefix` (list entries keyed by ``curves["layers"]`` when
    present).

    Each process runs the micro-batches ``rank, rank + n, ...`` of the step; gradients are summed across
    processes (each micro-batch loss is already divided by ``grad_accum``), then the penalty, which is the
    same on every process, adds its gradient once. ``after_step`` runs after every optimiser step (ELDeR's
    projection of the split L1 form). With `step_checkpoint`, the loop resumes from its saved state (the
    window stream is replayed up to that step, so the run continues on the same windows) and saves every
    ``step_checkpoint.every`` steps and at the end.
    """
    from transformers import get_linear_schedule_with_warmup

    device = dist.device(model)
    autocast = settings.bf16 and device.type == "cuda"
    params = [p for g in groups for p in g["params"]]
    with trainable(model, params, upcast=autocast):
        opt = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
        sched = get_linear_schedule_with_warmup(opt, int(settings.warmup_ratio * steps), steps)
        start = step_checkpoint.restore(opt, sched, curves) if step_checkpoint is not None else 0
        for _ in range(start):  # the windows of the steps already done
            next(stream)
        bar = tqdm(range(start, steps), desc=desc, leave=False, disable=not (settings.progress and dist.main),
                   initial=start, total=steps)
        live = live_log() if dist.main else None
        for step in bar:
            opt.zero_grad(set_to_none=True)
            batch = next(stream)  # [batch_size * grad_accum] window indices, identical on every process
            sums: dict[str, torch.Tensor] = {}
            for j in range(dist.rank, settings.grad_accum, dist.n):
                idx = batch[j * settings.batch_size : (j + 1) * settings.batch_size]
                ids, mask = data.ids[idx].to(device), data.mask[idx].to(device)
                ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else nullcontext()
                with ctx:
                    parts = data_loss(ids, mask)
                (sum(parts.values()) / settings.grad_accum).backward()  # type: ignore[union-attr]
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() / settings.grad_accum
            dist.sum_grads(params)
            logged = {k: dist.sum_value(v) for k, v in sorted(sums.items())}
            if penalty is not None:
                pen = penalty()
                pen.backward()
                logged["l1"] = pen.item()
            lr = sched.get_last_lr()[0]
            opt.step()
            if after_step is not None:
                after_step()
            sched.step()
            logged["loss"] = sum(logged.values())
            point = snapshot() | logged | {"lr": lr}
            for key, value in point.items():
                curves[key].append(value)
            if live:
                live(flat_point(live_prefix, point, curves.get("layers")))
            bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items()})
            done = step + 1
            due = step_checkpoint is not None and (done % step_checkpoint.every == 0 or done == steps)
            if due and dist.main:
                step_checkpoint.save(done, opt, sched, curves)  # type: ignore[union-attr]
