"""The embedded reference model (SmolLM2-135M GGUF from PyPI): conversion, reload, save/reload after pruning.

Marked slow: each test takes tens of seconds on 2 CPU cores. Run with `make test-slow`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prune.eval.params import count_params
from prune.models import surgery
from prune.models.adapter import adapter_for
from prune.models.load import load_model_and_tokenizer
from prune.types import PrunePlan
from tests.conftest import REPO, compose_config, random_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    return load_model_and_tokenizer(compose_config().model)


def test_embedded_model_facts(embedded) -> None:
    cfg = embedded.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (9, 3, True)
    assert count_params(adapter_for(embedded.model))["params/total"] == pytest.approx(134.5e6, rel=1e-3)
    assert not hasattr(cfg, "quantization_config")
    assert embedded.provenance["sha256"].startswith("b179c9523d0e")


def test_converted_directory_matches_gguf_load(embedded) -> None:
    gguf = Path(embedded.provenance["source"].removeprefix("gguf:"))
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32).eval()
    ids = random_ids(1000, batch=1, length=32)
    with torch.inference_mode():
        assert torch.equal(direct(ids).logits, embedded.model(ids).logits)


def test_shortgpt_saved_model_reloads_in_fresh_process(embedded, tmp_path: Path) -> None:
    cell = tmp_path / "cell"
    out = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "method=shortgpt", "ratio=0.25", "save=true", "eval=none",
         "calib.nsamples=1", "logger=none", f"hydra.run.dir={cell}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = PrunePlan(**json.loads((cell / "results.json").read_text())["plan"])
    assert len(plan.drop_layers) == 8
    ids = random_ids(1000, batch=1, length=32)
    torch.save(ids, tmp_path / "ids.pt")
    script = ("import torch,sys; from transformers import AutoModelForCausalLM as M; "
              "m=M.from_pretrained(sys.argv[1]).eval(); ids=torch.load(sys.argv[2]); "
              "torch.save(m(ids).logits, sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, str(cell / "model"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, timeout=300)
    surgery.apply(adapter_for(embedded.model), plan)  # the same plan on the in-memory model
    with torch.inference_mode():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), embedded.model(ids).logits)
