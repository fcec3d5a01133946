"""DISP-LLM (Gao, Lin, Hua, Zheng, Shen, Jin, Hsu; NeurIPS 2024, arXiv 2410.11988): dimension-independent
structural pruning. Ratio unit: params, the fraction of ALL parameters removed (``ratio_params=all``, as the
paper reports it) or of the decoder's linear weights only (``ratio_params=linear``, the official script's
count); the plan records both achieved figures.

Every decoder layer gets five binary masks over the full widths (`prune.models.width`: S1 on q/k/v's
normalised input, S2 on the o_proj output, S3 on the normalised MLP input, S4 on the intermediate, S5 on the
down output). A hypernetwork generates them: a fixed z ~ N(0, 1) of size 32 per structure (ordered layer by
layer, [S1..S5]) -> bidirectional GRU (32 -> 64 per direction) -> per structure LayerNorm(128) -> GELU ->
bias-free Linear(128 -> width). Only the hypernetwork trains (the LLM is frozen, no gradients, no optimiser
state), on

    CE(X; W, s) + λ·|log(T(s) / (p·T_total))|        (paper Eq. 5; R(x, y) = log(max/min))

with T(s) the parameter count the masks imply (`WidthCost`), p = 1 - ratio the kept fraction. AdamW, constant
lr 1e-3, weight decay 0.05, 10,000 iterations, one 2048-token sequence per process and step. The final masks
are deterministic (a threshold on the logits), the weights sliced by the kept index sets (`surgery.apply`).

Official code read as a hint only: github.com/ZhengaoLi/DISP-LLM-Dimension-Independent-Structural-Pruning
(``pruning/hypernetwork.py``, ``pruning/pruning_helper.py``, ``train_hypernetwork.py``, ``prune_model.py``).

NOTE(faithfulness), paper vs code vs here:
- Binarisation: paper ReinMax (Alg. 2; c = 3.0, τ = 1.0; the CE and the regulariser see one hard sample);
  code Gumbel-sigmoid (T = 0.4, offset 3.0; *soft* gates in the LLM, an independent hard straight-through
  sample in the regulariser). Default ``binarizer=reinmax``; ``gumbel`` is the code's. With ``gumbel`` the
  intermediate gate is m² for gate/up MLPs, because the code gates act(gate(x)) and up(x) by m each.
- λ: paper 6 (default), the scripts 16 (``lam=16``).
- Ratio: the paper reports the fraction of all parameters; the code's T_total is the decoder linear weights
  (hence its p = 0.48 for ~50% of LLaMA-2-7B). ``ratio_params=all`` (default) puts the embeddings, head, norms
  and biases into both T(s) and T_total; ``linear`` is the code's count.
- Final mask: the code samples Gumbel noise at export (unseeded, stochastic); the paper does not say. Here
  the default (``budget``) keeps x + offset > τ with one τ for all structures, found by bisection so that
  T(s) is closest to p·T_total: deterministic, the hypernetwork's ranking, and the requested ratio even when
  the gates are not yet saturated (then sampled masks meet the ratio only in expectation and the plain
  threshold τ = 0 keeps too much); τ is near 0 once they are. ``threshold`` is τ = 0 (σ(x + c) > 0.5);
  ``sample`` draws a seeded sample of the chosen binariser. A structure always keeps its arg-max index.
- Hypernetwork norm: the code shares one LayerNorm(128) over all structures; the paper (and the issue) give
  each structure its own (default); ``shared_norm=true`` is the code's.
- Data: the code streams WikiText-103 lines (BOS per line, 50-line groups, 2049-token blocks); here the run's
  calibration set (``calib=wikitext2`` / ``calib=alpaca``), cut into ``seqlen`` pieces and cycled in seeded
  order. The LLM runs in eval mode (no dropout) like the code; the hypernetwork runs in float32.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from prune.data.calibration import CalibrationSet
from prune.data.tokens import tensor_hash
from prune.errors import PruneError
from prune.methods import WithOptions, require_calibration
from prune.methods.training import Dist, Windows, calibration_pieces, live_log, masked_ce, training_mode
from prune.models.adapter import ModelAdapter
from prune.models.width import SITES, KeepDims, Masks, WidthCost, gated
from prune.options import Options, bounded
from prune.paths import cache_dir
from prune.provenance import model_fingerprint
from prune.quality import UNTRAINED, raised
from prune.store import KeyedFile, digest
from prune.types import PrunePlan

log = logging.getLogger(__name__)

# How close (in fraction of parameters) the sampled masks of the last TARGET_POINTS curve points must come, on
# average, to the ratio for a run to count as having trained to its target (single samples are noisy).
TARGET_TOLERANCE, TARGET_POINTS = 0.05, 5
# The steps an untrained run's fix asks for (at least twice its own), by ratio: on the embedded model 500
# steps train 20% (128- or 256-token pieces) and 1500 reach 46.7% of 50% (experiments/table2, DISP-LLM).
FIX_STEPS = {0.25: 1000, 1.0: 1500}  # up to this ratio: steps
CHECKPOINT_VERSION = 1


class HyperNetwork(nn.Module):
    """Logits of every structure's mask from a fixed random input (paper App. A.3, Table 5).

    Args:
        widths: the width of every structure, in order (layer by layer, S1..S5).
        z_dim: size of the fixed input per structure (32). hidden: GRU size per direction (64).
        seed: seed of the fixed input z.
        shared_norm: one LayerNorm for all structures (the code) instead of one each (the paper).
    """

    def __init__(self, widths: list[int], z_dim: int = 32, hidden: int = 64, seed: int = 0,
                 shared_norm: bool = False) -> None:
        super().__init__()
        z = torch.randn(len(widths), 1, z_dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("z", z)  # [S, 1, z_dim]: a sequence of S steps, batch 1; never trained
        self.gru = nn.GRU(z_dim, hidden, bidirectional=True)  # h0 = 0
        n_norms = 1 if shared_norm else len(widths)
        self.norms = nn.ModuleList([nn.LayerNorm(2 * hidden) for _ in range(n_norms)])
        self.heads = nn.ModuleList([nn.Linear(2 * hidden, w, bias=False) for w in widths])

    def forward(self) -> list[torch.Tensor]:
        """One logit vector per structure, ``Tensor[width]``."""
        h = self.gru(self.z)[0][:, 0]  # [S, 2*hidden]
        norms = list(self.norms) if len(self.norms) > 1 else [self.norms[0]] * len(self.heads)
        return [head(F.gelu(norm(h[k]))) for k, (norm, head) in enumerate(zip(norms, self.heads))]


def reinmax(logits: torch.Tensor, offset: float, tau: float, gen: torch.Generator) -> torch.Tensor:
    """Binary ReinMax (paper Alg. 2): forward value B ~ Bernoulli(σ(x + c)), second-order gradient."""
    theta = logits + offset
    pi0 = torch.sigmoid(theta)
    b = torch.bernoulli(pi0.detach(), generator=gen)
    pi1 = ((b + torch.sigmoid(theta / tau)) / 2).detach()
    # σ(sg(logit(π1) − θ) + θ): the value π1 with dπ1/dθ = π1(1 − π1), written without logit(1) = inf.
    pi1 = pi1 + pi1 * (1 - pi1) * (theta - theta.detach())
    pi2 = 2 * pi1 - pi0 / 2
    return pi2 - pi2.detach() + b


def gumbel_sigmoid(logits: torch.Tensor, offset: float, temperature: float, gen: torch.Generator
                   ) -> torch.Tensor:
    """The code's relaxed sample σ((x + g + offset) / T), g ~ Gumbel(0, 1)."""
    u = torch.rand(logits.shape, generator=gen, device=logits.device)
    g = -torch.log(-torch.log(u + 1e-20) + 1e-20)
    return torch.sigmoid((logits + g + offset) / temperature)


def hard_st(y: torch.Tensor) -> torch.Tensor:
    """round(y) forward, identity gradient (straight-through)."""
    return (torch.round(y) - y).detach() + y


def _threshold(logits: list[torch.Tensor], offset: float, tau: float) -> list[torch.Tensor]:
    return [_at_least_one(x + offset > tau, x) for x in logits]


def _at_least_one(hard: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    if not hard.any():
        hard = hard.clone()
        hard[score.argmax()] = True
    return hard


@dataclass(frozen=True)
class DispOptions(Options):
    """DISP-LLM's knobs (``conf/method/disp.yaml``); paper vs code choices as in the module docstring."""

    lam: float = 6.0  # λ of the regulariser (paper 6, scripts 16)
    # reinmax (paper) | gumbel (code: soft gates, a hard straight-through sample for the regulariser)
    binarizer: Literal["reinmax", "gumbel"] = "reinmax"
    offset: float = 3.0  # c added to the logits (3.0: every gate starts open)
    tau: float = bounded(1.0, gt=0)  # ReinMax τ
    temperature: float = bounded(0.4, gt=0)  # Gumbel-sigmoid T
    ratio_params: Literal["all", "linear"] = "all"  # all (the paper's unit) | linear (decoder linear weights)
    # budget (one threshold on x + offset, chosen so T(s) meets the ratio) | threshold (x + offset > 0, i.e.
    # σ(x + c) > 0.5) | sample (seeded, code-like); the first two are deterministic
    final_mask: Literal["budget", "threshold", "sample"] = "budget"
    steps: int = bounded(10000, ge=0)  # hypernetwork iterations (paper 10,000)
    seqlen: int | None = 2048  # tokens per sequence
    nsamples: int | None = None  # use at most this many sequences (None: every piece of the calibration set)
    lr: float = 1e-3  # AdamW, constant
    weight_decay: float = 0.05
    bf16: bool = True  # autocast the LLM to bfloat16 on CUDA; ignored on CPU
    z_dim: int = bounded(32, ge=1)  # hypernetwork shape: fixed input per structure, GRU size per direction,
    hidden: int = bounded(64, ge=1)  # ... one LayerNorm per structure (paper) or one shared (code)
    shared_norm: bool = False
    # save the hypernetwork (and optimiser) every checkpoint_every steps and at the end, and resume from it;
    # kept in checkpoint_dir (None: the cache) under a key of the model, the calibration tokens, the ratio
    # and every option that changes training
    checkpoint: bool = True
    checkpoint_every: int = bounded(500, ge=1)
    checkpoint_dir: str | None = None
    log_every: int = bounded(10, ge=1)  # steps between curve points (plan info, W&B)
    seed: int = 0  # z, initialisation, noise and data order
    progress: bool = True  # tqdm progress bar (main process only)

    def recorded(self) -> dict[str, Any]:
        """The options ``plan.info["options"]`` records and (less steps and final_mask) the checkpoint key
        holds: all but where and how often the run saves, logs and shows progress, and bf16 (never part of
        them; adding it now would change every checkpoint's file name)."""
        return self.as_dict(exclude=("bf16", "checkpoint", "checkpoint_every", "checkpoint_dir", "log_every",
                                     "progress"))


class Disp(WithOptions[DispOptions]):
    """DISP-LLM: hypernetwork-learned dimension-independent widths, physically pruned."""

    ratio_unit = "params"
    needs_calibration = True

    # ---- the method ----------------------------------------------------------------------------------

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        calib = require_calibration("disp", calib)
        cost = WidthCost.of(adapter)
        self._check_reachable(cost, ratio)
        if ratio == 0:
            return PrunePlan(method="disp", ratio=ratio, ratio_unit=self.ratio_unit, info={"achieved": {}})
        o = self.options
        dist = Dist.create(adapter.model)
        device = dist.device(adapter.model)
        with torch.random.fork_rng(devices=[]):  # the same initial hypernetwork on every process
            torch.manual_seed(o.seed)
            hn = HyperNetwork([w for ws in cost.widths for w in ws], o.z_dim, o.hidden, o.seed,
                              o.shared_norm).to(device)
        ckpt = self._checkpoint(adapter, calib, ratio)
        t0 = time.perf_counter()
        with training_mode(adapter.model, gradient_checkpointing=False):
            adapter.model.eval()  # frozen LLM, no dropout (the code never calls model.train())
            train = self._train(adapter, hn, self._windows(calib, dist.n), dist, cost, ratio, ckpt)
        train |= self._reached_target(train["curves"], ratio)
        masks, tau = self.final_masks(hn, cost, ratio)
        keep = keep_dims_from(masks, len(cost.widths))
        sizes = _sizes(masks, len(cost.widths))
        achieved = achieved_ratios(cost, sizes)
        log.info("disp: removed %.4f of all parameters, %.4f of the decoder linear weights (target %.4f, %s)",
                 achieved["all"], achieved["linear"], ratio, o.ratio_params)
        info = train | {
            "achieved": achieved, "achieved_ratio": achieved[o.ratio_params], "kept_widths": sizes,
            "dense_widths": cost.widths, "T_total": {"all": cost.total, "linear": cost.linear_total},
            "final_threshold": tau, "p_kept": 1 - ratio, "time_train_s": time.perf_counter() - t0,
            "processes": dist.n, "options": o.recorded(), "checkpoint": str(ckpt.path) if ckpt else None,
        }
        info["quality_flags"] = self._quality_flags(info, ratio)
        kept = [cost.count([s], True) / cost.count([w], True) for s, w in zip(sizes, cost.widths)]
        return PrunePlan(method="disp", ratio=ratio, ratio_unit=self.ratio_unit, keep_dims=keep,
                         scores={"kept_linear_frac_per_layer": kept}, info=info)

    def _reached_target(self, curves: dict[str, list[float]], ratio: float) -> dict[str, Any]:
        """Whether training itself reached the ratio: the removed fraction of the last sampled masks within
        TARGET_TOLERANCE of it. If not, the budget threshold still meets the ratio exactly, but it ranks
        logits that barely moved from their start (every gate open), so the widths say little about the
        method."""
        if not curves.get("removed_frac_sampled"):
            return {}
        last = curves["removed_frac_sampled"][-TARGET_POINTS:]
        trained = sum(last) / len(last)
        reached = abs(trained - ratio) <= TARGET_TOLERANCE
        if not reached:
            log.warning("disp: after %d steps the hypernetwork's sampled masks remove %.3f of %s parameters, "
                        "target %.3f: training has not reached the ratio and the final masks are mostly the "
                        "threshold's doing; raise method.steps (paper 10,000)",
                        curves["step"][-1], trained, self.options.ratio_params, ratio)
        return {"trained_removed_frac": trained, "reached_target": reached}

    def _quality_flags(self, info: dict[str, Any], ratio: float) -> list[dict[str, str]]:
        """``untrained`` when training ended away from the ratio (`_reached_target`), with the fix: more
        steps (resuming this run's checkpoint when it has one) and their cost at this run's pace."""
        if info.get("reached_target", True):
            return []
        steps = self.options.steps
        fix_steps = max(2 * steps, next(n for upto, n in FIX_STEPS.items() if ratio <= upto))
        trained_here = steps - info["resumed_from_step"]
        pace = info["time_train_s"] / trained_here if trained_here else None
        more = fix_steps - steps if info["checkpoint"] else fix_steps  # without a checkpoint it starts over
        cost = f"about {pace * more / 60:.0f} min more at this run's pace" if pace else "more steps"
        start = "resumes the checkpoint" if info["checkpoint"] else "starts over"
        detail = (f"sampled masks remove {info['trained_removed_frac']:.3f} after {steps} steps, "
                  f"target {ratio:.3f}")
        fix = f"method.steps={fix_steps} ({start}: {cost})"
        return [raised(UNTRAINED, detail, fix)]

    def _check_reachable(self, cost: WidthCost, ratio: float) -> None:
        if not 0 <= ratio < 1:
            raise PruneError(f"ratio={ratio} must be in [0, 1)")
        unit = self.options.ratio_params
        linear = unit == "linear"
        floor = cost.count([[1] * 5 for _ in cost.widths], linear) / cost.dense_total(linear)
        if 1 - ratio < floor:
            raise PruneError(
                f"ratio={ratio} of {unit} parameters is unreachable: one index per structure "
                f"already keeps {floor:.4f} (embeddings, head and norms are never pruned); at most "
                f"{1 - floor:.4f} can be removed (or use method.ratio_params=linear)")

    # ---- training -------------------------------------------------------------------------------------

    def _sample(self, logits: list[torch.Tensor], gen: torch.Generator
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(gates the LLM sees, gates the regulariser counts)."""
        o = self.options
        if o.binarizer == "reinmax":
            gates = [reinmax(x, o.offset, o.tau, gen) for x in logits]
            return gates, gates
        soft = [gumbel_sigmoid(x, o.offset, o.temperature, gen) for x in logits]
        hard = [hard_st(gumbel_sigmoid(x, o.offset, o.temperature, gen)) for x in logits]
        return soft, hard

    def _train(self, adapter: ModelAdapter, hn: HyperNetwork, data: Windows, dist: Dist, cost: WidthCost,
               ratio: float, ckpt: KeyedFile | None) -> dict[str, Any]:
        """AdamW on the hypernetwork; one sequence per process and step, gradients averaged over processes."""
        o = self.options
        device = dist.device(adapter.model)
        linear = o.ratio_params == "linear"
        target = (1 - ratio) * cost.dense_total(linear)
        opt = torch.optim.AdamW(hn.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        gen = torch.Generator(device).manual_seed(o.seed * 1000 + dist.rank)
        start, curves = self._resume(ckpt, hn, opt, gen, dist)
        stream = data.stream(o.seed)
        for _ in range(start):  # the same data order as an uninterrupted run
            next(stream)
        masks: Masks = {i: {s: torch.ones(w, device=device) for s, w in zip(SITES, ws)}
                        for i, ws in enumerate(cost.widths)}
        live = live_log() if dist.main else None
        bar = tqdm(range(start, o.steps), desc="disp hypernetwork", leave=False,
                   disable=not (o.progress and dist.main))
        with gated(adapter, masks, square_mid=o.binarizer == "gumbel"):
            for step in bar:
                j = int(next(stream)[dist.rank])
                ce, reg, kept = self._step(adapter.model, hn, masks, data.ids[j : j + 1].to(device),
                                           data.mask[j : j + 1].to(device), gen, cost, target)
                dist.sum_grads(list(hn.parameters()))
                for p in hn.parameters():
                    if p.grad is not None:
                        p.grad /= dist.n
                opt.step()
                opt.zero_grad(set_to_none=True)
                done = step + 1
                if done % o.log_every == 0 or done == o.steps:
                    point = self._point(hn, cost, done, dist.sum_value(ce) / dist.n, reg,
                                        1 - kept / cost.dense_total(linear))
                    for k, v in point.items():
                        curves.setdefault(k, []).append(v)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in point.items() if k != "step"})
                    if live:
                        live({f"disp/{k}": v for k, v in point.items()})
                if ckpt and dist.main and (done % o.checkpoint_every == 0 or done == o.steps):
                    ckpt.save_torch({"step": done, "hn": hn.state_dict(), "opt": opt.state_dict(),
                                     "gen": gen.get_state(), "curves": curves})
        return {"curves": curves, "resumed_from_step": start, "train_pieces": list(data.ids.shape)}

    def _step(self, model: nn.Module, hn: HyperNetwork, masks: Masks, ids: torch.Tensor, keep: torch.Tensor,
              gen: torch.Generator, cost: WidthCost, target: float) -> tuple[torch.Tensor, float, float]:
        """Sample the masks, backpropagate CE + λ·|log(T(s) / (p·T_total))| into the hypernetwork.

        Returns:
            (this process's CE as a detached float32 tensor, the regulariser, T(s) of the counted masks).
        """
        gates, counted = self._sample(hn(), gen)
        masks.update(_by_layer(gates, len(cost.widths)))  # the hooks read these on the next forward pass
        autocast = self.options.bf16 and ids.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if autocast else nullcontext():
            ce = masked_ce(model, ids, keep)
        t = cost.count(_sizes(counted, len(cost.widths)), self.options.ratio_params == "linear")
        reg = self.options.lam * torch.log(t / target).abs()
        (ce.float() + reg).backward()
        return ce.detach().float(), float(reg.detach()), float(t.detach())

    @torch.no_grad()
    def _point(self, hn: HyperNetwork, cost: WidthCost, step: int, ce: float, reg: float,
               sampled: float) -> dict[str, float]:
        """One curve point: CE, regulariser, removed fraction (ratio_params unit) of the regulariser's
        masks and of the plain threshold x + offset > 0 (how saturated the gates are)."""
        plain = achieved_ratios(cost, _sizes(_threshold(hn(), self.options.offset, 0.0), len(cost.widths)))
        return {"step": step, "ce": ce, "reg": reg, "removed_frac_sampled": sampled,
                "removed_frac_threshold": plain[self.options.ratio_params]}

    @torch.no_grad()
    def final_masks(self, hn: HyperNetwork, cost: WidthCost, ratio: float
                    ) -> tuple[list[torch.Tensor], float | None]:
        """(boolean keep-mask per structure, at least one index each; the threshold used, if any)."""
        was = hn.training
        hn.eval()
        logits = hn()
        hn.train(was)
        o = self.options
        if o.final_mask != "sample":  # NOTE(faithfulness): deterministic; the code samples
            tau = 0.0 if o.final_mask == "threshold" else self._budget_threshold(logits, cost, ratio)
            return _threshold(logits, o.offset, tau), tau
        gen = torch.Generator(logits[0].device).manual_seed(o.seed)
        if o.binarizer == "reinmax":
            return [_at_least_one(torch.bernoulli(torch.sigmoid(x + o.offset), generator=gen).bool(), x)
                    for x in logits], None
        soft = [gumbel_sigmoid(x, o.offset, o.temperature, gen) for x in logits]
        return [_at_least_one(y.round().bool(), y) for y in soft], None

    def _budget_threshold(self, logits: list[torch.Tensor], cost: WidthCost, ratio: float) -> float:
        """The one threshold τ on x + offset whose masks' T(s) is closest to p·T_total (bisection; T falls
        as τ rises). With saturated gates it lies near 0, where the plain threshold meets the budget too."""
        offset, linear = self.options.offset, self.options.ratio_params == "linear"
        target = (1 - ratio) * cost.dense_total(linear)

        def kept(tau: float) -> float:
            return float(cost.count(_sizes(_threshold(logits, offset, tau), len(cost.widths)), linear))

        lo = min(float(x.min()) for x in logits) + offset - 1.0  # keeps everything: T >= target
        hi = max(float(x.max()) for x in logits) + offset + 1.0  # one index each: T <= target
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if kept(mid) >= target else (lo, mid)
        return lo if kept(lo) - target <= target - kept(hi) else hi

    # ---- data and checkpoints ---------------------------------------------------------------------------

    def _windows(self, calib: CalibrationSet, processes: int) -> Windows:
        # A window of seqlen + 1 tokens (the code's 2049-token blocks) already holds seqlen targets: kept
        # whole rather than cut into one piece and a dropped token.
        ids, mask = calibration_pieces(calib, self.options.seqlen, slack=1)
        if self.options.nsamples:
            ids, mask = ids[: self.options.nsamples], mask[: self.options.nsamples]
        return Windows(ids, mask, global_batch=processes)  # one sequence per process and step

    def _checkpoint(self, adapter: ModelAdapter, calib: CalibrationSet, ratio: float) -> KeyedFile | None:
        """The hypernetwork's checkpoint file, ``<checkpoint_dir or cache/disp>/hn-<digest>.pt``, keyed by
        everything that shapes training; None when ``checkpoint=false``."""
        if not self.options.checkpoint:
            return None
        # steps and final_mask are left out: a longer run resumes a shorter one, and masks come after training
        options = {k: v for k, v in self.options.recorded().items() if k not in ("final_mask", "steps")}
        key = {"version": CHECKPOINT_VERSION, "model": model_fingerprint(adapter.model), "ratio": ratio,
               "calibration": tensor_hash(calib.input_ids), "target_mask": tensor_hash(calib.target_mask),
               "options": options}
        folder = Path(self.options.checkpoint_dir or cache_dir() / "disp")
        return KeyedFile(folder, key, prefix="hn-", suffix=".pt")

    def _resume(self, ckpt: KeyedFile | None, hn: HyperNetwork, opt: torch.optim.Optimizer,
                gen: torch.Generator, dist: Dist) -> tuple[int, dict[str, list]]:
        """Load a matching checkpoint at or before ``steps``: (steps already done, curves so far)."""
        state = ckpt.load_torch(map_location=dist.device(hn)) if ckpt else None
        if state is None or state["step"] > self.options.steps:
            return 0, {}
        hn.load_state_dict(state["hn"])
        opt.load_state_dict(state["opt"])
        if dist.n == 1:  # other processes keep their own noise stream (seeded by rank)
            gen.set_state(state["gen"].cpu())
        log.info("disp: resuming training from step %d of %s (key %s)", state["step"], ckpt.path,
                 digest(ckpt.key))
        return int(state["step"]), state["curves"]


def _by_layer(gates: list[torch.Tensor], n_layers: int) -> Masks:
    return {i: dict(zip(SITES, gates[5 * i : 5 * i + 5])) for i in range(n_layers)}


def _sizes(gates: list[torch.Tensor], n_layers: int) -> list[list[Any]]:
    """Kept widths per layer and site (differentiable sums for soft / straight-through gates)."""
    return [[g.sum() if g.dtype != torch.bool else int(g.sum()) for g in gates[5 * i : 5 * i + 5]]
            for i in range(n_layers)]


def keep_dims_from(masks: list[torch.Tensor], n_layers: int) -> KeepDims:
    """Boolean masks (layer by layer, S1..S5) -> the plan's index sets, fully kept sites left out."""
    keep: KeepDims = {}
    for i, sites in _by_layer(masks, n_layers).items():
        for site, m in sites.items():
            if not bool(m.all()):
                keep.setdefault(str(i), {})[site] = m.nonzero().flatten().tolist()
    return keep


def achieved_ratios(cost: WidthCost, sizes: list[list[Any]]) -> dict[str, float]:
    """Removed fraction of all parameters and of the decoder linear weights."""
    return {"all": 1 - float(cost.count(sizes, False)) / cost.total,
            "linear": 1 - float(cost.count(sizes, True)) / cost.linear_total}
