"""The project's GPU check: ``make gpu-check`` (``python tools/gpu_check.py --out results/gpu_check.json``).

One prepared script for a machine with a CUDA GPU, sized to finish within about 8 minutes on one GPU:

1. the tests marked ``cuda`` (``pytest -m cuda``), which the CPU-only test runs skip;
2. the benchmark on the GPU (``tools/bench.py``): the dense-loss rows with the achieved memory bandwidth
   as a fraction of the device's peak, and the engine's step against a plain float32 loop;
3. a short training run of the default study's detector (the ``shapes-cpu`` preset's RetinaNet) with the
   engine's default precision, timed in images per second.

Each step's outcome, duration and numbers go to one JSON file, written atomically with provenance. A step
that fails is recorded and the next one runs; the exit status is non-zero if any failed.

``--dry-run`` runs the same steps on the CPU at toy sizes (the CUDA tests are listed, not run; the bench
in its quick mode, engine section only; two training iterations of the ``shapes-tiny`` preset): it is what
the test suite runs, so the script cannot rot on machines without a GPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

#: wall-clock budget of each step in seconds on a GPU (the whole check stays under 8 minutes)
BUDGET_S = {"cuda_tests": 150, "bench": 210, "training": 90}


def _cuda_tests(dry_run: bool) -> dict[str, Any]:
    """``pytest -m cuda``; in a dry run only collected (``--collect-only``), since there is no GPU."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")]
    if dry_run:
        command.append("--collect-only")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=BUDGET_S["cuda_tests"])
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return {"command": " ".join(["python", *command[1:-1], "tests"]), "returncode": result.returncode,
            "summary": lines[-1] if lines else "", "ok": result.returncode == 0}


def _bench(device: str, dry_run: bool, out_dir: Path) -> dict[str, Any]:
    """The benchmark's dense-loss and engine-step sections on ``device`` (quick and engine-only when dry)."""
    import bench  # tools/bench.py

    sections = "engine_step" if dry_run else "dense_loss,engine_step"
    argv = ["--out", str(out_dir / "bench.json"), "--device", device, "--sections", sections, "--no-compile"]
    if dry_run:
        argv += ["--quick", "--threads", "1"]
    status = bench.main(argv)
    import json

    result = json.loads((out_dir / "bench.json").read_text())
    summaries = {name: section.get("summary", []) for name, section in result["sections"].items()}
    return {"argv": ["python tools/bench.py", *argv[2:]], "returncode": status, "summaries": summaries,
            "ok": status == 0}


def _training(device: str, dry_run: bool, out_dir: Path) -> dict[str, Any]:
    """A short run of the default study's detector through the engine; images per second from its log."""
    from harmonic.engine import TrainConfig, read_log, train

    if dry_run:
        cfg = TrainConfig.preset("shapes-tiny", max_iters=2, checkpoint_every=2, device=device,
                                 output_dir=str(out_dir / "run"), num_threads=1)
    else:
        cfg = TrainConfig.preset("shapes-cpu", max_iters=300, warmup_iters=50, checkpoint_every=300,
                                 device=device, output_dir=str(out_dir / "run"), num_threads=None)
    start = time.perf_counter()
    run_dir = train(cfg, progress=False)
    wall = time.perf_counter() - start
    log = read_log(run_dir)
    steady = log[len(log) // 5:] or log  # the first iterations include warm-up (cudnn, allocator)
    seconds = sum(record["time"] for record in steady)
    import json

    resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
    return {
        "preset": "shapes-tiny" if dry_run else "shapes-cpu", "iterations": len(log), "wall_s": wall,
        "images_per_s": cfg.batch_size * len(steady) / seconds if seconds > 0 else None,
        "final_loss": log[-1]["loss"], "autocast_dtype": resolved["autocast_dtype"],
        "channels_last": resolved["channels_last"], "ok": True,
    }


def run_check(out: Path, *, dry_run: bool) -> dict[str, Any]:
    """Run the three steps and write ``out``; returns the record written."""
    from harmonic.utils.files import atomic_write_json
    from harmonic.utils.provenance import provenance

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    if not dry_run and device != "cuda":
        raise SystemExit("gpu_check: no CUDA device here; use --dry-run to exercise the script on the CPU")
    steps: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        for name, step in (("cuda_tests", lambda: _cuda_tests(dry_run)),
                           ("bench", lambda: _bench(device, dry_run, work)),
                           ("training", lambda: _training(device, dry_run, work))):
            start = time.perf_counter()
            try:
                steps[name] = step()
            except Exception as err:  # noqa: BLE001 - a failed step is recorded, the next one still runs
                steps[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}
            steps[name]["seconds"] = time.perf_counter() - start
            print(f"[gpu-check] {name}: {'ok' if steps[name]['ok'] else 'FAILED'} "
                  f"({steps[name]['seconds']:.0f} s)", flush=True)
    record = {"dry_run": dry_run, "device": device, "steps": steps,
              "ok": all(step["ok"] for step in steps.values()),
              "provenance": provenance({"dry_run": dry_run}, device=device)}
    atomic_write_json(out, record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check.json", help="JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    args = parser.parse_args(argv)
    record = run_check(args.out, dry_run=args.dry_run)
    print(f"[gpu-check] wrote {args.out}: {'all steps ok' if record['ok'] else 'some steps FAILED'}")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
