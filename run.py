"""Entry point: ``python run.py [-m] key=value ...``; see README.md and conf/config.yaml."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from prune.errors import PruneError
from prune.sweep import clear_failure, record_failure


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from prune.runner import run  # late import keeps `--help` fast

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    clear_failure(run_dir)
    try:
        return run(cfg)
    except PruneError as err:  # bad input: one line that names the fix, non-zero exit, no results.json
        print(f"error: {err}", file=sys.stderr)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(2)
        record_failure(run_dir, err)  # the sweep runs its other cells, then exits 2 (prune/sweep.py)
        return None


if __name__ == "__main__":
    main()
