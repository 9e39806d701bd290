"""Per variant, what the training logs say about the end of training: the positives' watch statistics
averaged over the last part of each run's log, beside the run's AP and AP75, mean over seeds.

The report (notebook 05) pairs variants by their final metrics; this tool reads *how* a variant ended:
the positives' median score and decoded IoU, the share whose score is pushed down (dF/dx < 0, Eq. 8-9),
the mean net multiplier of dCE/dlogit, and the mean harmonic factors beta_r and beta_c. The figures are
ours [D].

    python tools/watch_summary.py results/runs/default-* [--tail 0.1] [--dead results/testbed/dead_channels*.json]
                                  [--out results/testbed/watch_summary.json]

``--dead`` adds, from the files ``tools/grad_scale.py --dead-only`` wrote, the share of dead channels of
the last ReLU layer of each run's regression tower and its positives' mean IoU, averaged per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: log keys averaged over the tail of training, with the column each becomes
KEYS = {
    "watch/score_p50": "score p50",
    "watch/iou_p50": "IoU p50",
    "watch/reversed_share": "dF/dx < 0",
    "watch/cls_multiplier": "mean dF/dx",
    "beta_r": "beta_r",
    "beta_c": "beta_c",
}
#: final metrics read from each run's metrics.json (COCO AP in percent)
METRICS = ("AP", "AP75")


def run_record(run_dir: Path, tail: float) -> dict[str, Any]:
    """One run: its variant and seed (run.json), AP and AP75 (metrics.json, percent) and the mean of each
    :data:`KEYS` entry over the last ``tail`` of the log's records that carry it (None where none do)."""
    from harmonic.experiments.report import load_run
    from harmonic.utils.runlog import find_log, read_log, tail_means

    run = load_run(run_dir)
    if run is None:
        raise FileNotFoundError(f"{run_dir}: not a finished run folder (no run.json or metrics.json)")
    records = read_log(find_log(run_dir))
    out: dict[str, Any] = {"run": run.name, "variant": run.variant, "seed": run.seed}
    out.update({metric: None if run.metrics[metric] is None else 100 * run.metrics[metric] for metric in METRICS})
    # a baseline logs the watch statistics of the factors it would have had, not of the loss it trained with
    out["counterfactual"] = any(bool(r.get("watch/counterfactual")) for r in records)
    out.update(tail_means(records, KEYS, tail))
    return out


#: columns filled from ``tools/grad_scale.py --dead-only`` measurements (``--dead``)
DEAD_KEYS = {"dead_last_regression": "dead share, last regression layer", "dead_mean_iou": "positives' IoU (64 images)"}


def add_dead_channels(records: list[dict[str, Any]], measurements: list[dict[str, Any]]) -> None:
    """Fill :data:`DEAD_KEYS` of each record from the grad_scale measurement of the same run (by folder
    name; None where none was measured)."""
    by_run = {m["run"]: m["after_training"] for m in measurements if "after_training" in m}
    for record in records:
        found = by_run.get(record["run"])
        record["dead_last_regression"] = None if found is None else found["dead_channels"]["regression"][-1]
        record["dead_mean_iou"] = None if found is None else found["mean_iou"]


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{variant: {"runs": n, key: mean over its runs (None if any run lacks it)}}``, variants in first-seen order."""
    table: dict[str, dict[str, Any]] = {}
    for variant in dict.fromkeys(r["variant"] for r in records):
        mine = [r for r in records if r["variant"] == variant]
        row: dict[str, Any] = {"runs": len(mine), "counterfactual": any(r["counterfactual"] for r in mine)}
        for key in (*METRICS, *KEYS, *(k for k in DEAD_KEYS if k in mine[0])):
            values = [r[key] for r in mine]
            row[key] = None if any(v is None for v in values) else sum(values) / len(values)
        table[variant] = row
    return table


def markdown(table: dict[str, dict[str, Any]], tail: float) -> str:
    """The summary as a Markdown table; a variant whose watch statistics are counterfactual is marked."""
    dead = [k for k in DEAD_KEYS if any(k in row for row in table.values())]
    header = ["variant", "runs", *METRICS, *(f"{label}, last {tail:.0%}" for label in KEYS.values()),
              *(DEAD_KEYS[k] for k in dead)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for variant, row in table.items():
        cells = [f"`{variant}`" + (" (counterfactual)" if row["counterfactual"] else ""), str(row["runs"])]
        cells += ["n/a" if row[m] is None else f"{row[m]:.1f}" for m in METRICS]
        cells += ["n/a" if row.get(k) is None else f"{row[k]:.3f}" for k in (*KEYS, *dead)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (no machine's absolute paths in results)."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (run.json, metrics.json, log)")
    parser.add_argument("--tail", type=float, default=0.1, help="share of each log averaged (default 0.1)")
    parser.add_argument("--dead", type=Path, nargs="*", default=[],
                        help="JSON files of tools/grad_scale.py --dead-only to merge by run")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "testbed" / "watch_summary.json")
    args = parser.parse_args(argv)
    if not 0 < args.tail <= 1:
        parser.error(f"--tail must be in (0, 1], got {args.tail}")
    from harmonic.utils.files import atomic_write_json

    try:
        records = [run_record(run, args.tail) for run in args.runs]
        measurements = [m for path in args.dead for m in json.loads(path.read_text())["runs"]]
    except (FileNotFoundError, KeyError, ValueError) as err:
        parser.error(f"{type(err).__name__}: {err}")
    if args.dead:
        add_dead_channels(records, measurements)
    table = summarize(records)
    atomic_write_json(args.out, {"tag": "[D]", "tail": args.tail, "runs": [_shown(p) for p in args.runs],
                                 "dead_channel_files": [_shown(p) for p in args.dead], "variants": table,
                                 "records": records})
    print(markdown(table, args.tail))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
