"""The CLI end to end on tiny models: a multirun grid, skip-on-rerun, bad input, save and reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tests.conftest import REPO

METHODS = "dense,shortgpt,relative_magnitude,last_layers,random_layers"


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args, f"paths.outputs_root={cwd}/outputs"],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_multirun_grid_writes_results_and_resumes(tmp_path: Path) -> None:
    first = run_cli("-m", "debug=tiny", f"method={METHODS}", "ratio=0.25", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    files = sorted((tmp_path / "outputs" / "adhoc").glob("*/results.json"))
    assert len(files) == 5
    for f in files:
        record = json.loads(f.read_text())
        assert record["status"] == "complete"
        m = record["metrics"]
        assert {"ppl/wikitext2", "params/total", "params/non_embedding", "params/removed_frac",
                "time/prune_s", "mem/prune_peak_gb"} <= set(m)
        assert record["provenance"]["git_commit"] is None or len(record["provenance"]["git_commit"]) == 40
        assert "method=" in f.parent.name and "ratio=0.25" in f.parent.name
        if record["plan"]["method"] != "dense":
            assert m["layers/removed"] == 1 and m["params/removed_frac"] > 0
    second = run_cli("-m", "debug=tiny", f"method={METHODS}", "ratio=0.25", cwd=tmp_path)
    assert second.returncode == 0
    assert second.stdout.count("skip:") == 5


def test_bad_ratio_is_one_line_error_and_no_results(tmp_path: Path) -> None:
    out = run_cli("debug=tiny", "method=shortgpt", "ratio=1.5", cwd=tmp_path)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ratio=1.5" in errors[0] and "ratio=0.25" in errors[0]
    assert not list(tmp_path.rglob("results.json"))


def test_sweep_runs_past_a_bad_cell_then_fails(tmp_path: Path) -> None:
    out = run_cli("-m", "debug=tiny", "method=shortgpt", "ratio=1.5,0.25", cwd=tmp_path)
    assert out.returncode == 2
    errors = [line[line.index("error:"):] for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 2 and "ratio=1.5 is outside" in errors[0]
    assert errors[1].startswith("error: 1 sweep cell(s) failed") and errors[1].endswith("ratio=1.5")
    cells = tmp_path / "outputs" / "adhoc"
    assert [p.parent.name for p in cells.glob("*/results.json")] == ["debug=tiny,method=shortgpt,ratio=0.25"]
    error = (cells / "debug=tiny,method=shortgpt,ratio=1.5" / "error.txt").read_text()
    assert error.startswith("error: ratio")


def test_unreachable_ratio_and_unknown_names_fail(tmp_path: Path) -> None:
    out = run_cli("debug=tiny", "method=last_layers", "ratio=0.9", cwd=tmp_path)
    assert out.returncode == 2 and "at most 3 can be removed" in out.stderr
    assert not list(tmp_path.rglob("results.json"))
    for bad in ("method=nope", "model=nope", "calib=nope"):
        out = run_cli("debug=tiny", bad, cwd=tmp_path)
        assert out.returncode != 0 and "Could not find" in out.stderr
    out = run_cli("debug=tiny", "model.gguf_file=/nonexistent.gguf", "model.random_config=null", cwd=tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file")
    out = run_cli("debug=tiny", f"model.gguf_file={fake}", "model.gguf_sha256=00ff",
                  "model.random_config=null", cwd=tmp_path)
    assert out.returncode == 2 and "checksum mismatch" in out.stderr
    out = run_cli("debug=tiny", "model.path=/nonexistent/dir", "model.random_config=null", cwd=tmp_path)
    assert out.returncode == 2 and "model.path" in out.stderr
    out = run_cli("model=llama2_7b", "logger=none", "eval=none", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "model.path=" in out.stderr
    assert not list(tmp_path.rglob("results.json"))


def test_save_true_reloads_with_stock_transformers(tmp_path: Path) -> None:
    out = run_cli("debug=tiny", "method=shortgpt", "ratio=0.5", "save=true",
                  "hydra.run.dir=" + str(tmp_path / "cell"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    model_dir = tmp_path / "cell" / "model"
    assert (tmp_path / "cell" / "results.json").is_file() and (model_dir / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert reloaded.config.num_hidden_layers == 2
    # the reloaded model must reproduce the run's own perplexity figure
    from prune.eval.perplexity import PerplexityEvaluator
    from prune.models.load import load_tokenizer

    record = json.loads((tmp_path / "cell" / "results.json").read_text())
    ppl = PerplexityEvaluator(max_windows=2, source="bundled")(reloaded, load_tokenizer("bundled:gpt2"))
    assert ppl["ppl/wikitext2"] == record["metrics"]["ppl/wikitext2"]
    assert torch.is_tensor(reloaded.lm_head.weight)


def test_wandb_offline_run_is_written(tmp_path: Path) -> None:
    env_mode = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run([sys.executable, str(REPO / "run.py"), "debug=tiny", "logger=wandb",
                          "method=last_layers", "ratio=0.25", f"hydra.run.dir={tmp_path}/cell"],
                         capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, **env_mode}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = list((tmp_path / "cell" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_provenance_records_the_commit_imported_not_the_one_checked_out_later(monkeypatch) -> None:
    from prune import provenance

    imported = provenance.manifest()["git_commit"]
    monkeypatch.setattr(provenance, "_git", lambda *args: "f" * 40)  # as if HEAD moved during a sweep
    assert provenance.manifest()["git_commit"] == imported


def test_dense_speed_per_cell_measures_the_dense_model_in_the_cell(tmp_path: Path) -> None:
    args = ("debug=tiny", "method=shortgpt", "ratio=0.25", "eval=fast", "~eval.zeroshot", "~eval.ppl")
    env = {"PRUNE_CACHE_DIR": str(tmp_path / "cache")}
    # An empty dense cache: one measurement
    first = run_cli(*args, "dense_speed=per_cell", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "speed in this cell: the dense evaluation just run" in first.stderr + first.stdout
    for f in tmp_path.rglob("results.json"):
        f.unlink()
    out = run_cli(*args, "dense_speed=per_cell", cwd=tmp_path, env=env)  # cached reference: measured again
    assert out.returncode == 0, out.stderr[-2000:]
    assert "measuring the dense model's speed in this cell" in out.stderr + out.stdout
    (record,) = [json.loads(f.read_text()) for f in tmp_path.rglob("results.json")]
    dense, pruned = record["dense_metrics"], record["metrics"]
    assert record["metric_config"]["dense_speed"] == "per_cell"
    assert pruned["speed/prefill_speedup"] == dense["speed/prefill_ms"] / pruned["speed/prefill_ms"]
    bad = run_cli(*args, "dense_speed=sometimes", cwd=tmp_path)
    assert bad.returncode == 2 and "dense_speed=sometimes" in bad.stderr and "per_cell" in bad.stderr


def test_deterministic_switch_sets_and_clears_torch_flags(monkeypatch) -> None:
    from prune.runner import set_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        set_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
                    or torch.backends.cuda.cudnn_sdp_enabled())
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        set_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()



def test_sweep_records_a_cell_that_raises_unexpectedly_and_runs_the_next(tmp_path: Path) -> None:
    # A target that builds no method: the cell dies on an AttributeError, as a bug would (not a PruneError).
    out = run_cli("-m", "debug=tiny", "method._target_=builtins.dict,prune.methods.dense.Dense", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" in out.stderr and "AttributeError" in out.stderr  # a bug keeps its traceback
    cells = tmp_path / "outputs" / "adhoc"
    broken = cells / "debug=tiny,method._target_=builtins.dict" / "error.txt"
    assert broken.read_text().startswith("error: unexpected AttributeError: 'dict' object has no attribute")
    assert (cells / "debug=tiny,method._target_=prune.methods.dense.Dense" / "results.json").is_file()
    last = [line for line in out.stderr.splitlines() if line.startswith("error:")][-1]
    assert last.startswith("error: 1 sweep cell(s) failed") and last.endswith("method._target_=builtins.dict")
