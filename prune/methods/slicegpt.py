"""SliceGPT (Ashkboos et al., ICLR 2024, "SliceGPT: Compress Large Language Models by Deleting Rows and
Columns"); official code microsoft/TransformerCompression @ 6b12cde (``experiments/run_slicegpt.py``,
``src/slicegpt/rotate.py`` ``rotate_and_slice_sequential`` / ``_parallel``).

The norms are folded into the linears (`prune.models.rotation.fold_model`), then the residual sites are
visited in order on the calibration set; each site's rotation is the PCA of the signal the *already rotated
and sliced* model feeds it (sequential, as the official code):

- layer 0's input (the embeddings): ``Q_0``;
- per layer (LLaMA / Mistral / Qwen2 / Qwen3 / OPT): the attention inputs rotate by the entry site's ``Q``
  and keep ``w`` columns; the layer runs with the attention shortcut ``Q^T`` (attention output not yet
  rotated), the MLP norm's input gives ``Q_mid``; the attention output and MLP input rotate by it and the
  layer runs again (MLP shortcut ``Q_mid^T``); its output gives the exit site's ``Q``;
- Phi-2 (attention and MLP in parallel off one norm): one PCA per layer, of the layer's output;
- the last layer's output (the LM head's input) is rotated but not sliced (the official default).

PCA: ``H = sum X^T X`` in float64 over every calibration token, plus 1% of its mean diagonal, ``eigh``,
eigenvectors by decreasing eigenvalue. The next layer's input is the output times the new ``Q`` (sliced).

Ratio unit: SliceGPT's slicing ratio of the embedding (residual) dimension: ``w = int((1 - ratio) * d)``
rounded down to a multiple of ``round_interval`` (official 8). The parameter change is reported
separately (``plan.info``): the shortcut matrices and an untied LM head add parameters, so small slicing
ratios can *grow* the model; ``params/removed_frac`` counts what the model really holds.

The plan carries ``rotations/<site norm>`` = ``Q[:, :w]`` (float32) per site; `prune.models.rotation`
applies them (the same functions this method used on its working copy of each layer).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prune.data.calibration import CalibrationSet
from prune.errors import PruneError
from prune.methods import WithOptions, require_calibration
from prune.models import rotation
from prune.models.adapter import ModelAdapter, module_at
from prune.options import Options, bounded
from prune.types import PrunePlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceGPTOptions(Options):
    round_interval: int = bounded(8, ge=1)        # the sliced width is a multiple of this (official 8)
    final_orientation: Literal["pca", "random"] = "pca"  # pca (paper) | random (official script default)
    damping: float = bounded(0.01, ge=0)          # fraction of mean(diag H) added to H (official 0.01)
    batch_size: int = bounded(16, ge=1)           # calibration sequences per forward (official 16)
    seed: int = 42                                # random orientation's draw
    # layernorm (paper: only LayerNorm families get zero-mean embeddings) | always (official fuse_modules
    # centres every family's embeddings, which slightly changes an RMSNorm model's function)
    center_embeddings: Literal["layernorm", "always"] = "layernorm"


def sliced_width(hidden: int, ratio: float, round_interval: int) -> int:
    """The official rule: ``int((1 - ratio) * d)``, rounded down to a multiple of `round_interval`."""
    width = int((1 - ratio) * hidden)
    return width - width % round_interval


def pca_rotation(batches: list[torch.Tensor], damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (decreasing) and eigenvectors (columns) of ``sum X^T X`` (float64) + damping."""
    h = None
    for x in batches:
        x2 = x.reshape(-1, x.shape[-1]).double()
        h = x2.T @ x2 if h is None else h + x2.T @ x2
    assert h is not None
    h.diagonal().add_(damping * h.diagonal().mean())
    values, vectors = torch.linalg.eigh(h)
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]


def random_upper_left(width: int, seed: int) -> torch.Tensor:
    """A random orthogonal ``width x width`` matrix (QR of uniform noise, as the official code draws)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.rand(width, width, generator=g, dtype=torch.float64))
    return q


class _Stop(Exception):
    pass


def layer0_inputs(adapter: ModelAdapter, ids: torch.Tensor, batch_size: int
                  ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Layer 0's hidden-state input and keyword arguments, per batch of calibration sequences."""
    inputs, kwargs_list = [], []

    def catch(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append(adapter.layer_input(args, kwargs).detach())
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    device = adapter.lm_head().weight.device
    handle = adapter.layer(0).register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(ids), batch_size):
            try:
                adapter.model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, kwargs_list


class SliceGPT(WithOptions[SliceGPTOptions]):
    """Rotate each residual site onto its principal components and delete the trailing ones."""

    ratio_unit = "slicing"
    needs_calibration = True

    def prune(self, adapter: ModelAdapter, calib: CalibrationSet | None, ratio: float) -> PrunePlan:
        calib = require_calibration("slicegpt", calib)
        if not 0 <= ratio < 1:
            raise PruneError(f"slicegpt: ratio={ratio} is a slicing ratio and must be in [0, 1)")
        rotation.check_model(adapter)
        hidden = adapter.model.config.hidden_size
        width = sliced_width(hidden, ratio, self.options.round_interval)
        info: dict[str, Any] = {"options": self.options.as_dict(), "hidden_size": hidden,
                                "center_embeddings": self.options.center_embeddings,
                                "sliced_width": width, "slicing_ratio_achieved": 1 - width / hidden}
        if width <= 0:
            raise PruneError(f"slicegpt: ratio={ratio} leaves no dimension of {hidden} (round_interval="
                             f"{self.options.round_interval}); lower the ratio")
        if width == hidden:  # nothing to delete: rotating alone only adds the shortcut parameters
            log.info("slicegpt: ratio %s keeps all %d dimensions; no edit", ratio, hidden)
            return PrunePlan("slicegpt", ratio, self.ratio_unit, info=info | {"no_op": True})
        rotations = self.rotations(adapter, calib.input_ids, width)
        info |= self.parameter_change(adapter, rotations)
        log.info("slicegpt: width %d of %d (slicing %.4f); parameters %d -> %d (%+.2f%% change)", width,
                 hidden, info["slicing_ratio_achieved"], info["params_dense"], info["params_sliced"],
                 100 * info["params_change_frac"])
        tensors = {f"rotations/{name}": q for name, q in rotations.items()}
        return PrunePlan("slicegpt", ratio, self.ratio_unit, tensors=tensors, info=info)

    @staticmethod
    def parameter_change(adapter: ModelAdapter, rotations: dict[str, torch.Tensor]) -> dict[str, Any]:
        from prune.eval.params import count_params

        names = rotation.site_names(adapter)
        layers = []
        for i in range(adapter.num_layers()):
            base = f"{adapter.layout.layers}.{i}."
            k = names.index(base + adapter.layout.attn_norm)
            w_in = rotations[names[k]].shape[1]
            w_mid = rotations[names[k + 1]].shape[1]
            w_out = rotations[names[k + (1 if adapter.parallel_blocks else 2)]].shape[1]
            layers.append([w_in, w_mid, w_out])
        widths = {"embedding": rotations[names[0]].shape[1], "layers": layers,
                  "head": rotations[names[-1]].shape[1]}
        dense = count_params(adapter)["params/total"]
        sliced = rotation.sliced_param_count(adapter, widths)
        return {"params_dense": dense, "params_sliced": sliced, "params_change_frac": sliced / dense - 1}

    # -- the sequential pass --------------------------------------------------------------------------

    def rotations(self, adapter: ModelAdapter, ids: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
        """``{site: Q[:, :w]}`` for every residual site (`rotation.site_names`), w = `width` except the
        LM head's input (unsliced)."""
        o, layout = self.options, adapter.layout
        names = rotation.site_names(adapter)
        hidden = adapter.model.config.hidden_size
        was_training = adapter.model.training
        adapter.model.eval()
        try:
            with torch.no_grad():
                inputs, kwargs = layer0_inputs(adapter, ids, o.batch_size)
                if rotation.centers_embeddings(adapter, o.center_embeddings):  # as the folded embeddings
                    inputs = [(x.double() - x.double().mean(-1, keepdim=True)).to(x.dtype) for x in inputs]
                out: dict[str, torch.Tensor] = {}
                q = self._site(inputs, width, 0)
                out[names[0]] = q
                for i in range(adapter.num_layers()):
                    last = i == adapter.num_layers() - 1
                    exit_width = hidden if last else width
                    layer = copy.deepcopy(adapter.layer(i))
                    rotation.fold_layer(layer, layout)
                    if layout.parallel_blocks:
                        q, inputs = self._parallel_layer(layer, layout, q, inputs, kwargs, exit_width, i)
                        out[names[names.index(f"{layout.layers}.{i}.{layout.attn_norm}") + 1]] = q
                    else:
                        q_mid, q, inputs = self._sequential_layer(layer, layout, q, inputs, kwargs, width,
                                                                  exit_width, i)
                        k = names.index(f"{layout.layers}.{i}.{layout.mlp_norm}")
                        out[names[k]], out[names[k + 1]] = q_mid, q
                    del layer
                    log.info("slicegpt: layer %d of %d rotated", i + 1, adapter.num_layers())
        finally:
            adapter.model.train(was_training)
        return out

    def _site(self, signals: list[torch.Tensor], width: int, salt: int) -> torch.Tensor:
        """The site's ``Q[:, :width]`` (float32, the precision the plan stores and this pass then uses)."""
        _, vectors = pca_rotation(signals, self.options.damping)
        q = vectors[:, :width]
        if self.options.final_orientation == "random":
            q = q @ random_upper_left(width, self.options.seed + salt)
        return q.float()

    @staticmethod
    def _run(layer: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict[str, Any]]
             ) -> list[torch.Tensor]:
        return [ModelAdapter.hidden(layer(x, **kw)) for x, kw in zip(inputs, kwargs)]

    @staticmethod
    def _enter(inputs: list[torch.Tensor], q: torch.Tensor) -> list[torch.Tensor]:
        """Signals in the dense basis, in the rotated and sliced basis of their site (official order)."""
        return [x @ q.to(x.device, x.dtype) for x in inputs]

    def _sequential_layer(self, layer: nn.Module, layout: Any, q_in: torch.Tensor, inputs: list[torch.Tensor],
                          kwargs: list[dict[str, Any]], width: int, exit_width: int, i: int
                          ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        like = module_at(layer, layout.attn_out).weight
        eye = torch.eye(q_in.shape[0], dtype=torch.float64)
        rotation.rotate_in([module_at(layer, p) for p in layout.attn_in], q_in)
        rotation.set_shortcuts(layer, layout, rotation.shortcut(q_in, eye, like), None)
        xs = self._enter(inputs, q_in)
        mids: list[torch.Tensor] = []

        def keep_and_stop(_m: nn.Module, args: tuple) -> None:  # the MLP's output is not needed yet
            mids.append(args[0].detach())
            raise _Stop

        handle = module_at(layer, layout.mlp_norm).register_forward_pre_hook(keep_and_stop)
        try:
            for x, kw in zip(xs, kwargs):
                try:
                    layer(x, **kw)
                except _Stop:
                    pass
        finally:
            handle.remove()
        q_mid = self._site(mids, width, 2 * i + 1)
        mids.clear()
        rotation.rotate_out([module_at(layer, layout.attn_out)], q_mid)
        rotation.rotate_in([module_at(layer, p) for p in layout.mlp_in], q_mid)
        rotation.set_shortcuts(layer, layout, rotation.shortcut(q_in, q_mid, like),
                               rotation.shortcut(q_mid, eye, like))
        outs = self._run(layer, xs, kwargs)
        q_out = self._site(outs, exit_width, 2 * i + 2)
        return q_mid, q_out, outs

    def _parallel_layer(self, layer: nn.Module, layout: Any, q_in: torch.Tensor, inputs: list[torch.Tensor],
                        kwargs: list[dict[str, Any]], exit_width: int, i: int
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        like = module_at(layer, layout.attn_out).weight
        eye = torch.eye(q_in.shape[0], dtype=torch.float64)
        readers = [module_at(layer, p) for p in layout.attn_in + layout.mlp_in]
        rotation.rotate_in(readers, q_in)
        rotation.set_shortcuts(layer, layout, rotation.shortcut(q_in, eye, like), None)
        outs = self._run(layer, self._enter(inputs, q_in), kwargs)
        return self._site(outs, exit_width, i + 1), outs


def slicing_summary(plan: PrunePlan) -> str:
    """One line for logs: the slicing ratio next to the real parameter change."""
    info = plan.info
    if "params_sliced" not in info:
        return "slicegpt: no edit"
    change = 100 * info["params_change_frac"]
    return (f"slicegpt: slicing {info['slicing_ratio_achieved']:.4f} of the embedding dimension; parameters "
            f"{'+' if change >= 0 else ''}{change:.2f}%")


