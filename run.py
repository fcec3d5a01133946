"""Entry point: ``python run.py [-m] key=value ...``; see README.md and conf/config.yaml."""

import sys

import hydra
from omegaconf import DictConfig

from prune.errors import PruneError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from prune.runner import run  # late import keeps `--help` fast

    try:
        return run(cfg)
    except PruneError as err:  # bad input: one line that names the fix, non-zero exit, no results.json
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
