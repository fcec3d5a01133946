"""Acceptance battery: every bad input on the tiny model ends as one `error:` line, exit 2, no traceback, no
results.json (issue 29: one error path for bad input).

Most cases compose the configuration with Hydra's compose API and call `run.run_cell`, the function that
``python run.py`` runs for every cell, in this process (milliseconds per case, or one tiny model load). A
handful run the real CLI in a subprocess: Hydra's own failures (composition, output folder) happen before
`run_cell`, and one constructor error and one input that used to end in a traceback check the whole path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

import run
from prune.sweep import ERROR_FILE
from tests.conftest import CONF, REPO, load_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


# (overrides, a fragment the error line must hold: the key it names, or the fix). Files the cases need are
# named {name} and made by the `files` fixture.
CASES: dict[str, tuple[list[str], str]] = {
    # top-level keys
    "ratio_text": (["ratio=abc"], "ratio=abc must be a float"),
    "ratio_above_one": (["ratio=1.5"], "ratio=1.5 is outside [0, 1)"),
    "ratio_one": (["ratio=1.0"], "ratio=1.0 is outside"),
    "ratio_negative": (["ratio=-0.1"], "ratio=-0.1 is outside"),
    "ratio_nan": (["ratio=nan"], "ratio=nan is outside"),
    "ratio_list": (["ratio=[0.1,0.2]"], "ratio=[0.1, 0.2] must be a float"),
    "seed_text": (["seed=abc"], "seed=abc must be an int"),
    "seed_negative": (["seed=-1"], "seed=-1 must be >= 0"),
    "seed_float": (["seed=1.5"], "seed=1.5 must be an int"),
    "seed_huge": (["seed=99999999999"], "seed=99999999999 must be <="),
    "force_text": (["force=maybe"], "force=maybe must be a bool"),
    "save_text": (["save=abc"], "save=abc must be a bool"),
    "dense_reference_number": (["dense_reference=3"], "dense_reference=3 must be a bool"),
    "deterministic_text": (["deterministic=abc"], "deterministic=abc must be a bool"),
    "dense_speed_unknown": (["dense_speed=bogus"], "dense_speed=bogus is not one of cached, per_cell"),
    "outputs_root_unwritable": (["paths.outputs_root=/proc/x"], "outputs_root=/proc/x cannot be created"),
    "unresolved_interpolation": (["ratio=${{nope}}"], "does not resolve"),
    # calib.* (method=shortgpt reads a calibration set)
    "calib_nsamples_zero": (["method=shortgpt", "ratio=0.25", "calib.nsamples=0"],
                            "calib.nsamples=0 must be >= 1"),
    "calib_nsamples_negative": (["method=shortgpt", "calib.nsamples=-3"], "calib.nsamples=-3 must be >= 1"),
    "calib_nsamples_text": (["method=shortgpt", "calib.nsamples=abc"], "calib.nsamples='abc' must be an int"),
    "calib_seqlen_zero": (["method=shortgpt", "calib.seqlen=0"], "calib.seqlen=0 must be >= 1"),
    "calib_seqlen_float": (["method=shortgpt", "calib.seqlen=12.5"], "calib.seqlen=12.5 must be an int"),
    "calib_seqlen_over_model": (["method=shortgpt", "ratio=0.25", "calib.seqlen=100000"],
                                "longer than the model's 4096 positions"),
    "calib_seed_negative": (["method=shortgpt", "calib.seed=-1"], "calib.seed=-1 must be >= 0"),
    "calib_group_lines_zero": (["method=shortgpt", "calib.group_lines=0"],
                               "calib.group_lines=0 must be >= 1"),
    "calib_source_unknown": (["method=shortgpt", "calib.source=ftp"], "calib.source='ftp' is not one of"),
    "calib_style_unknown": (["method=shortgpt", "ratio=0.25", "calib.style=bogus"],
                            "unknown calibration style 'bogus'"),
    "calib_dataset_unknown": (["method=shortgpt", "ratio=0.25", "calib.dataset=bogus",
                               "calib.source=bundled"], "unknown dataset"),
    # model.*
    "dtype_unknown": (["model.dtype=bogus"], "model.dtype=bogus is not a dtype"),
    "dtype_not_float": (["model.dtype=int8"], "model.dtype=int8 is not a dtype"),
    "device_unknown": (["model.device=toaster"], "model.device=toaster is not a device"),
    "device_cuda_without_gpu": (["model.device=cuda"], "no CUDA GPU; pass model.device=cpu"),
    "device_cuda_index_without_gpu": (["model.device=cuda:7"], "no CUDA GPU"),
    "path_beside_random_config": (["model.path={model_dir}"],
                                  "model.random_config and model.path are both set"),
    "gguf_beside_random_config": (["model.gguf_file={text_file}"],
                                  "model.random_config and model.gguf_file are both set"),
    "path_and_gguf": (["model.random_config=null", "model.path={model_dir}", "model.gguf_file={text_file}"],
                      "model.path and model.gguf_file are both set"),
    "path_truncated_safetensors": (["model.random_config=null", "model.path={truncated_dir}"],
                                   "model.path={truncated_dir} could not be loaded"),
    "path_missing": (["model.random_config=null", "model.path=/nonexistent/dir"], "no config.json"),
    "gguf_text_file": (["model.random_config=null", "model.gguf_file={text_file}"],
                       "could not be read as a GGUF model"),
    "gguf_missing": (["model.random_config=null", "model.gguf_file=/nonexistent.gguf"], "does not exist"),
    "tokenizer_missing": (["model.tokenizer=/nonexistent/tokenizer"], "could not load the tokenizer"),
    "tokenizer_empty_dir": (["model.tokenizer={empty_dir}"], "pass model.tokenizer="),
    "model_type_unknown": (["model.random_config.model_type=bogus"], "model_type=bogus is not an HF model"),
    "no_model_source": (["model.random_config=null"], "names no source"),
    # eval.* (checked in the evaluators' constructors, which Hydra's instantiate wraps)
    "ppl_batch_size_zero": (["eval.ppl.batch_size=0"], "eval.ppl.batch_size=0 must be >= 1"),
    "ppl_batch_size_text": (["eval.ppl.batch_size=abc"], "eval.ppl.batch_size='abc' must be an int"),
    "ppl_max_windows_zero": (["eval.ppl.max_windows=0"], "eval.ppl.max_windows=0 must be >= 1, or null"),
    "ppl_max_windows_negative": (["eval.ppl.max_windows=-2"], "eval.ppl.max_windows=-2 must be >= 1"),
    "ppl_dataset_unknown": (["eval.ppl.datasets=[bogus]"], "unknown perplexity dataset"),
    "ppl_convention_unknown": (["eval.ppl.conventions=[seq9]"], "unknown perplexity dataset/convention"),
    "ppl_no_dataset": (["eval.ppl.datasets=[]"], "eval.ppl.datasets=[] must name at least one"),
    "ppl_source_unknown": (["eval.ppl.source=ftp"], "eval.ppl.source='ftp' is not one of"),
    "ppl_unknown_option": (["+eval.ppl.bogus=1"], "eval.ppl.bogus is not an option"),
    "zeroshot_limit_negative": (["eval=fast", "eval.zeroshot.limit=-1"],
                                "eval.zeroshot.limit=-1 must be > 0"),
    "zeroshot_limit_share_above_one": (["eval=fast", "eval.zeroshot.limit=1.5"], "eval.zeroshot.limit=1.5"),
    "zeroshot_batch_size_zero": (["eval=fast", "eval.zeroshot.batch_size=0"], "eval.zeroshot.batch_size=0"),
    "zeroshot_fewshot_negative": (["eval=fast", "eval.zeroshot.num_fewshot=-1"],
                                  "eval.zeroshot.num_fewshot=-1"),
    "zeroshot_task_unknown": (["eval=fast", "eval.zeroshot.tasks=[mmlu_x]"], "unknown zero-shot task"),
    "zeroshot_source_unknown": (["eval=fast", "eval.zeroshot.source=ftp"], "unknown zero-shot source"),
    "speed_prefill_len_zero": (["eval=default", "eval.speed.prefill_len=0"],
                               "eval.speed.prefill_len=0 must be"),
    "speed_warmup_negative": (["eval=default", "eval.speed.warmup=-1"], "eval.speed.warmup=-1 must be >= 0"),
    "speed_protocol_unknown": (["eval=default", "eval.speed.protocols=[bogus]"], "unknown speed protocol"),
    "speed_decode_no_tokens": (["eval=default", "eval.speed.decode_new_tokens=0"],
                               "eval.speed.decode_new_tokens=0 must be >= 1"),
    # method.*
    "dense_unknown_option": (["+method.bogus=1"], "method.bogus is not an option"),
    "shortgpt_unknown_option": (["method=shortgpt", "+method.bogus=1"], "method.bogus is not an option"),
    "shortgpt_batch_size_zero": (["method=shortgpt", "method.batch_size=0"],
                                 "method.batch_size=0 must be >= 1"),
    "laco_merge_layers_one": (["method=laco", "method.merge_layers=1"], "method.merge_layers=1 must be >= 2"),
    "sleb_barrier_negative": (["method=sleb", "method.early_barrier=-1"], "method.early_barrier=-1"),
    "blockpruner_block_type": (["method=blockpruner", "method.block_type=bogus"],
                               "method.block_type='bogus'"),
    "elder_batch_size_zero": (["method=elder", "method.batch_size=0"], "method.batch_size=0 must be >= 1"),
    "last_layers_unreachable": (["method=last_layers", "ratio=0.9"], "at most 3 can be removed"),
    "sparse_pattern_bogus": (["method=wanda", "method.pattern=2-4"], "method.pattern='2-4' must be"),
    "sparse_n_m_ratio": (["method=magnitude", "method.pattern=2:4", "ratio=0.3"], "pass ratio=0.5"),
    "sparsegpt_blocksize": (["method=sparsegpt", "method.pattern=4:8", "method.blocksize=100"],
                            "method.blocksize=100 must be a multiple of M=8"),
    "plan_without_path": (["method=plan"], "method.path=None is not a file"),
    "plan_steps_negative": (["method=plan", "method.steps=-1"], "method.steps=-1 must be >= 0"),
    "plan_steps_text": (["method=plan", "method.steps=abc"], "method.steps='abc' must be an int"),
    "plan_truncated_json": (["method=plan", "method.path='{plan_truncated}'"], "cannot read a plan"),
    "plan_binary_file": (["method=plan", "method.path='{plan_binary}'"], "cannot read a plan"),
    "plan_json_list": (["method=plan", "method.path='{plan_list}'"], "holds no readable plan"),
    "plan_json_number": (["method=plan", "method.path='{plan_number}'"], "holds no readable plan"),
    "plan_missing_fields": (["method=plan", "method.path='{plan_empty}'"], "a plan needs method, ratio"),
    "plan_layers_text": (["method=plan", "method.path='{plan_layers_text}'"], "drop_layers is str, not list"),
    "plan_layer_out_of_range": (["method=plan", "method.path='{plan_layer_99}'"], "names layer 99"),
    "plan_bad_tensors": (["method=plan", "method.path='{plan_bad_tensors}'"], "tensors entry needs"),
}

GPU_FREE = {"device_cuda_without_gpu", "device_cuda_index_without_gpu"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The files the cases name: a saved tiny model, a truncated copy, a text 'GGUF', damaged plans."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model_dir, truncated = root / "model", root / "truncated"
    tiny = load_tiny("llama")
    for folder in (model_dir, truncated):
        tiny.model.save_pretrained(folder)
        tiny.tokenizer.save_pretrained(folder)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "text.gguf").write_text("not a GGUF file\n")
    (root / "empty").mkdir()
    good = {"method": "shortgpt", "ratio": 0.25, "ratio_unit": "layers", "drop_layers": [1]}
    plans = {
        "plan_truncated": '{"plan": {"method": "shortgpt", "ra',
        "plan_list": "[1, 2, 3]",
        "plan_number": '{"plan": 3}',
        "plan_empty": "{}",
        "plan_layers_text": json.dumps(good | {"drop_layers": "abc"}),
        "plan_layer_99": json.dumps({"plan": good | {"drop_layers": [99]}}),
        "plan_bad_tensors": json.dumps(good | {"tensors": {"file": "x.safetensors"}}),
    }
    paths = {name: root / f"{name}.json" for name in plans}
    for name, text in plans.items():
        paths[name].write_text(text)
    (root / "plan_binary.json").write_bytes(bytes(range(256)) * 4)
    named = {"model_dir": model_dir, "truncated_dir": truncated, "text_file": root / "text.gguf",
             "empty_dir": root / "empty", "plan_binary": root / "plan_binary.json"} | paths
    return {name: str(path) for name, path in named.items()}


def run_in_process(overrides: list[str], out: Path, mode: RunMode = RunMode.RUN) -> tuple[int, object]:
    """Compose the config as ``python run.py debug=tiny <overrides>`` would and call `run.run_cell` on it;
    returns the exit status (0 when it returned) and what it returned."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["debug=tiny", f"paths.outputs_root={out}", *overrides])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out / "cell")
        cfg.hydra.mode = mode
    HydraConfig.instance().set_config(cfg)
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    (out / "cell").mkdir(parents=True, exist_ok=True)  # Hydra makes the cell's folder before the task runs
    try:
        return 0, run.run_cell(task_cfg)
    except SystemExit as stop:
        return int(stop.code or 0), None
    finally:  # Hydra's job config is process-global: later tests must not see this job's overrides
        HydraConfig.instance().cfg = None  # type: ignore[assignment]


def assert_one_error_line(stderr: str, fragment: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in stderr, stderr[-3000:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_exit_2(case: str, files: dict[str, str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    if case in GPU_FREE and torch.cuda.is_available():
        pytest.skip("checks the message on a machine without a GPU")
    overrides, fragment = CASES[case]
    code, _ = run_in_process([o.format(**files) for o in overrides], tmp_path / "out")
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, fragment.format(**files))
    assert not list(tmp_path.rglob("results.json"))


def test_the_battery_has_at_least_50_inputs() -> None:
    assert len(CASES) >= 50


def test_a_bug_in_a_sweep_cell_is_recorded_and_the_sweep_goes_on(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(cfg: object) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("prune.runner.run", broken)
    code, returned = run_in_process([], tmp_path / "out", mode=RunMode.MULTIRUN)
    assert code == 0 and returned is None  # the cell returns: the launcher goes on to the next one
    assert "Traceback" in capsys.readouterr().err  # a bug keeps its traceback
    error = (tmp_path / "out" / "cell" / ERROR_FILE).read_text()
    assert error == "error: unexpected RuntimeError: boom (a bug; its traceback is in the sweep's stderr)\n"


def test_a_bug_in_a_single_run_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(cfg: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("prune.runner.run", broken)
    with pytest.raises(RuntimeError, match="boom"):
        run_in_process([], tmp_path / "out")


# ---------------------------------------------------------------------------------------- the real CLI
def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args, f"paths.outputs_root={cwd}/outputs"],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_cli_hydra_failures_and_cell_errors_exit_2_with_one_error_line(tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = {  # arguments -> a fragment of the error line
        ("method=nope",): "Hydra could not compose",  # unknown config group option
        ("ratio=[0.1",): "Hydra could not compose",  # bad override syntax
        ("method.bogus=1",): "Hydra could not compose",  # a key the method's config does not have
        ("hydra.run.dir=/proc/x",): "cannot write the output folder /proc/x",
        (f"hydra.run.dir={a_file}/cell",): f"cannot write the output folder {a_file}/cell",
        ("method=plan", "method.steps=-1"): "method.steps=-1 must be >= 0",  # a constructor error
        ("seed=abc",): "seed=abc must be an int",  # used to end in a traceback
    }
    stderr = {}
    for args, fragment in cases.items():
        out = run_cli("debug=tiny", *args, cwd=tmp_path)
        assert out.returncode == 2, (args, out.stderr[-3000:])
        assert_one_error_line(out.stderr, fragment)
        stderr[args] = out.stderr
    assert not list(tmp_path.rglob("results.json"))
    assert "Could not find 'method/nope'" in stderr[("method=nope",)]  # Hydra's own message, above the line


def test_sweep_with_a_constructor_error_writes_error_txt_and_exits_2(tmp_path: Path) -> None:
    out = run_cli("-m", "debug=tiny", "method=plan", "method.steps=-1,-2", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    cells = tmp_path / "outputs" / "adhoc"
    for steps in (-1, -2):
        error = (cells / f"debug=tiny,method.steps={steps},method=plan" / ERROR_FILE).read_text()
        assert error == f"error: method.steps={steps} must be >= 0\n"
    last = [line for line in out.stderr.splitlines() if line.startswith("error:")][-1]
    assert last.startswith("error: 2 sweep cell(s) failed") and "method.steps=-1" in last
    assert "Traceback" not in out.stderr and not list(tmp_path.rglob("results.json"))
