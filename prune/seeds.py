"""Spread over seeds: the cells of a sweep that differ only in their seed, grouped, with each metric's
mean, standard deviation, median, minimum and maximum.

The seed (top-level ``seed``, which ``calib.seed`` and ``method.seed`` follow unless set apart) draws the
calibration windows and orders them, and some methods are very sensitive to it: on the embedded model three
seeds of ELDeR gave 453-2430 perplexity (experiments/reference_gpu). The papers report one draw; this shows
how far one draw is from the next.

    python run.py -m method=elder,shortgpt ratio=0.25 seed=0,1,2 experiment_name=seeds
    python -m prune.seeds outputs/seeds [--metrics ppl/wikitext2 zs/mean] [--csv seeds.csv]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from prune.errors import PruneError

DEFAULT_METRICS = ("ppl/wikitext2", "zs/mean", "params/removed_frac", "time/prune_s")
SEED_KEYS = ("seed", "method.seed", "calib.seed")


def load_records(sweep_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(path, record) of every finished ``results.json`` below `sweep_dir`."""
    found = [(p, json.loads(p.read_text())) for p in sorted(sweep_dir.rglob("results.json"))]
    found = [(p, r) for p, r in found if r.get("status") == "complete"]
    if not found:
        raise PruneError(f"no finished results.json under {sweep_dir}; point at a sweep directory "
                         "such as outputs/<experiment_name>")
    return found


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if not isinstance(node, dict):
        return {prefix: json.dumps(node, sort_keys=True)}
    out: dict[str, str] = {}
    for key, value in node.items():
        out |= _flatten(value, f"{prefix}.{key}" if prefix else key)
    return out


def _overrides(results_path: Path) -> list[str]:
    """The cell's command-line overrides (Hydra's record of them), its seeds left out."""
    path = results_path.parent / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in SEED_KEYS]


def group_by_setting(found: list[tuple[Path, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """{label: records}: a group's records have the same resolved config but for the seeds. The label is
    the group's overrides that not every group shares (e.g. ``method=elder``)."""
    groups: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    settings: dict[str, dict[str, str]] = {}
    for path, record in found:
        setting = {k: v for k, v in _flatten(record["config"]).items() if k not in SEED_KEYS}
        key = json.dumps(setting, sort_keys=True)
        settings.setdefault(key, setting)
        groups.setdefault(key, []).append((path, record))
    firsts = [_overrides(members[0][0]) for members in groups.values()]
    if not any(firsts):  # no Hydra record (results.json copied elsewhere): the config keys telling them apart
        keys = sorted({k for s in settings.values() for k in s})
        varying = [k for k in keys if len({s[k] for s in settings.values() if k in s}) > 1]
        firsts = [[f"{k}={json.loads(s[k])}" for k in varying if k in s] for s in settings.values()]
    shared = set.intersection(*(set(o) for o in firsts))
    labelled: dict[str, list[dict[str, Any]]] = {}
    for i, (own, members) in enumerate(zip(firsts, groups.values())):
        label = " ".join(o for o in own if o not in shared) or "all"
        labelled[label if label not in labelled else f"{label} #{i + 1}"] = [r for _, r in members]
    return labelled


def spread(values: list[float]) -> dict[str, float]:
    """n, mean, sample standard deviation (NaN for one value), median, min, max."""
    return {"n": len(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
            "median": statistics.median(values), "min": min(values), "max": max(values)}


def seeds_of(records: list[dict[str, Any]]) -> list[Any]:
    """The group's seeds: of the first of ``seed``, ``method.seed``, ``calib.seed`` that varies in it."""
    flat = [_flatten(r["config"]) for r in records]
    varying = [k for k in SEED_KEYS if len({f.get(k) for f in flat}) > 1]
    key = varying[0] if varying else "seed"
    return sorted(json.loads(f[key]) for f in flat if key in f)


def summarize(groups: dict[str, list[dict[str, Any]]], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per group: its label, the seeds it holds, and the spread of each metric it has."""
    rows = []
    for label, records in groups.items():
        row: dict[str, Any] = {"setting": label, "seeds": seeds_of(records)}
        for metric in metrics:
            values = [float(r["metrics"][metric]) for r in records if metric in r["metrics"]]
            if values:
                row[metric] = spread(values)
        rows.append(row)
    return rows


def metrics_to_show(groups: dict[str, list[dict[str, Any]]], asked: list[str] | None) -> list[str]:
    """The metrics asked for, each of which some cell must have; without a request, the defaults the cells
    have (a perplexity-only sweep has no zs/mean)."""
    known = {k for records in groups.values() for r in records for k in r["metrics"]}
    if asked is None:
        return [m for m in DEFAULT_METRICS if m in known]
    unknown = [m for m in asked if m not in known]
    if unknown:
        raise PruneError(f"no cell has the metric(s) {unknown}; choose among: {', '.join(sorted(known))}")
    return asked


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4g}"


def markdown(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    head = ["setting", "seeds", *(f"{m} mean ± sd [min, max]" for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["setting"], ", ".join(map(str, row["seeds"]))]
        for metric in metrics:
            s = row.get(metric)
            cells.append("" if s is None else
                         f"{_fmt(s['mean'])} ± {_fmt(s['sd'])} [{_fmt(s['min'])}, {_fmt(s['max'])}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], metrics: list[str], path: Path) -> None:
    import pandas as pd

    flat = [{"setting": r["setting"], "seeds": " ".join(map(str, r["seeds"]))}
            | {f"{m}/{stat}": v for m in metrics if m in r for stat, v in r[m].items()} for r in rows]
    pd.DataFrame(flat).to_csv(path, index=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prune.seeds", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path, help="a sweep directory, e.g. outputs/<experiment_name>")
    ap.add_argument("--metrics", nargs="+", help=f"metric keys of results.json (default: those of "
                    f"{', '.join(DEFAULT_METRICS)} that the cells have)")
    ap.add_argument("--csv", type=Path, help="also write the rows (every statistic) to this CSV file")
    args = ap.parse_args(argv)
    try:
        groups = group_by_setting(load_records(args.sweep_dir))
        metrics = metrics_to_show(groups, args.metrics)
    except PruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = summarize(groups, metrics)
    print(markdown(rows, metrics))
    if args.csv:
        write_csv(rows, metrics, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
