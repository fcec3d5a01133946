"""A compressed checkpoint of an N:M-sparse model, in the compressed-tensors format vLLM serves.

A weight-sparse model saved by ``save_pretrained`` is a stock dense checkpoint: it loads anywhere and is not
smaller. For N:M patterns the runner also writes ``model_compressed/``: the same checkpoint with every
decoder-layer linear weight replaced by compressed-tensors' bitmask encoding, and ``config.json`` recording
the sparsity (``quantization_config.sparsity_config``: format, structure, global sparsity, targets, ignore):

- 2:4 is ``sparse-24-bitmask``: ``<linear>.compressed`` (the 2 kept values of every 4, ``[rows, cols/2]``),
  ``<linear>.bitmask`` (``[rows, cols/8]`` uint8, bits little-endian along a row) and ``<linear>.shape``;
  vLLM's ``CompressedTensors24`` scheme loads it for its 2:4 sparse kernels.
- other N:M patterns (4:8, ...) are ``sparse-bitmask``: the non-zero values of the matrix, the bitmask,
  ``row_offsets`` (where each row's values start) and ``shape``; readable by the library, not served by
  vLLM's sparse kernels (which are 2:4 only).

Why written here and not by the library: compressed-tensors 0.20 (the release that installs beside
transformers 5.23) dropped its sparse compressors; the last release with them (0.14) requires transformers
4.57. The bit packing (`pack_bitmasks` / `unpack_bitmasks`) and the sparsity config classes are the
library's own; `read_dense_weights` reads a checkpoint back to dense tensors with them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prune.errors import PruneError

SAFETENSORS_INDEX = "model.safetensors.index.json"


def _library() -> Any:
    try:
        import compressed_tensors
        from compressed_tensors.utils.helpers import pack_bitmasks, unpack_bitmasks
    except ImportError as e:  # an optional dependency: the dense checkpoint is written either way
        raise PruneError("writing a compressed sparse checkpoint needs compressed-tensors; "
                         "pip install compressed-tensors==0.20.1") from e
    return compressed_tensors, pack_bitmasks, unpack_bitmasks


def compress_24(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """sparse-24-bitmask of a 2:4 matrix: its kept values, bitmask and shape (suffixes of the linear)."""
    _, pack_bitmasks, _ = _library()
    rows, cols = weight.shape
    groups = weight.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.abs().float().topk(2, dim=1).indices, True)  # the 2 largest: all non-zeros
    if ((groups != 0) & ~keep).any():
        raise PruneError("a weight has more than 2 non-zeros in a group of 4; it is not 2:4-sparse")
    keep = keep.reshape(rows, cols)
    return {"compressed": weight[keep].reshape(rows, cols // 2).contiguous(),
            "bitmask": pack_bitmasks(keep.cpu()), "shape": torch.tensor([rows, cols])}


def compress_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """sparse-bitmask of any matrix: its non-zero values, bitmask, row offsets and shape."""
    _, pack_bitmasks, _ = _library()
    nonzero = weight != 0
    counts = nonzero.sum(dim=1)
    return {"compressed": weight[nonzero].contiguous(), "bitmask": pack_bitmasks(nonzero.cpu()),
            "row_offsets": torch.cumsum(counts, 0) - counts, "shape": torch.tensor(list(weight.shape))}


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense matrix of either encoding (the library's unpack_bitmasks)."""
    _, _, unpack_bitmasks = _library()
    shape = [int(s) for s in parts["shape"]]
    mask = unpack_bitmasks(parts["bitmask"], shape)
    dense = torch.zeros(shape, dtype=parts["compressed"].dtype)
    dense[mask] = parts["compressed"].flatten()
    return dense


def sparsity_config(structure: str, global_sparsity: float) -> dict[str, Any]:
    """``quantization_config`` of config.json: a sparse-only compressed-tensors model (no quantisation)."""
    compressed_tensors, _, _ = _library()
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    kind = Sparse24BitMaskConfig if structure == "2:4" else BitmaskConfig
    sparse = kind(global_sparsity=global_sparsity, sparsity_structure=structure, targets=["Linear"],
                  ignore=["lm_head"]).model_dump()
    return {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
            "quantization_status": "compressed", "version": compressed_tensors.__version__,
            "sparsity_config": sparse}


def write_compressed(dense_dir: Path, target: Path, linear_weights: set[str], structure: str,
                     global_sparsity: float) -> None:
    """Copy the dense checkpoint `dense_dir` to `target`, encoding the named linear weights
    (``<module>.weight``, 2-D) for `structure` (``2:4`` or another ``N:M``) and recording the sparsity in
    config.json."""
    encode = compress_24 if structure == "2:4" else compress_bitmask
    target.mkdir(parents=True, exist_ok=True)
    index_path = dense_dir / SAFETENSORS_INDEX
    weight_map: dict[str, str] = {}
    for path in sorted(dense_dir.iterdir()):
        if path.suffix == ".safetensors":
            tensors = {}
            for name, value in load_file(path).items():
                if name in linear_weights:
                    prefix = name.removesuffix(".weight")
                    tensors |= {f"{prefix}.{k}": v for k, v in encode(value).items()}
                else:
                    tensors[name] = value
            save_file(tensors, target / path.name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, path.name)
        elif path.is_file() and path.name != SAFETENSORS_INDEX:
            shutil.copy2(path, target / path.name)
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = weight_map
        (target / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = sparsity_config(structure, global_sparsity)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def read_dense_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed checkpoint, compressed linears decoded back to ``<module>.weight``."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors |= load_file(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name in [n for n in tensors if n.endswith((".compressed", ".bitmask", ".shape", ".row_offsets"))]:
        prefix, _, suffix = name.rpartition(".")
        parts.setdefault(prefix, {})[suffix] = tensors.pop(name)
    return tensors | {f"{prefix}.weight": decompress(p) for prefix, p in parts.items()}


def n_m_structure(plan: Any) -> str | None:
    """The plan's N:M pattern (``"2:4"``), from its recorded options; None for any other plan."""
    pattern = plan.info.get("options", {}).get("pattern")
    return pattern if isinstance(pattern, str) and pattern != "unstructured" else None


def save_compressed(adapter: Any, plan: Any, dense_dir: Path, target: Path) -> bool:
    """For an N:M plan, write `target` beside the saved dense checkpoint `dense_dir`; False otherwise."""
    structure = n_m_structure(plan)
    if structure is None:
        return False
    from torch import nn

    names, zeros, total = set(), 0, 0
    for i, layer in enumerate(adapter.layers()):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                names.add(f"{adapter.layout.layers}.{i}.{name}.weight")
                zeros += int((module.weight == 0).sum())
                total += module.weight.numel()
    write_compressed(dense_dir, target, names, structure, zeros / total)
    return True
