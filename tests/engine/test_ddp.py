"""Distributed training through torchrun: 2 CPU processes (Gloo) on shapes-tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from harmonic.engine import load_checkpoint, read_log

# Run by each process. It counts the checkpoint writes of its process and, after the last iteration,
# writes a hash of its model's weights, so the test can compare the two processes. (Buffers such as BN
# running statistics are updated by each process's own last forward; DDP broadcasts process 0's at the
# start of every forward, and the checkpoint holds process 0's.)
WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys

    import harmonic.engine as engine
    import harmonic.engine.training as training

    out_dir, run_dir = sys.argv[1], sys.argv[2]
    writes = []
    real_save = training.atomic_torch_save

    def counting_save(path, obj):
        writes.append(os.path.basename(str(path)))
        return real_save(path, obj)

    training.atomic_torch_save = counting_save  # the training loop writes its checkpoints through it
    final = {}

    def on_iteration(state):
        if state.iteration == state.total_iters:
            digest = hashlib.sha256()
            for name, value in sorted(state.model.named_parameters()):
                digest.update(name.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
            final.update(hash=digest.hexdigest(), world_size=state.world_size, rank=state.rank)

    cfg = engine.TrainConfig.preset("shapes-tiny", output_dir=run_dir, max_iters=3, checkpoint_every=2,
                                    num_threads=1, device="cpu")
    engine.train(cfg, progress=False, on_iteration=on_iteration)
    rank = int(os.environ["RANK"])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({**final, "writes": writes}, handle)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_training(tmp_path):
    from harmonic.data import ensure_default_dataset

    data_root = tmp_path / "data"
    ensure_default_dataset("shapes-tiny", root=data_root)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_dir = tmp_path / "run"
    env = {**os.environ, "HARMONIC_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path), str(run_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["hash"] == ranks[1]["hash"]  # gradients were averaged: the same weights everywhere
    assert ranks[0]["writes"] == ["last.pt", "last.pt", "final.pt"]  # iterations 2 and 3, then the final model
    assert ranks[1]["writes"] == []  # only process 0 writes

    records = read_log(run_dir)
    assert [r["iter"] for r in records] == [1, 2, 3]  # one line per iteration, not one per process
    saved = json.loads((run_dir / "config.json").read_text())["resolved"]
    assert saved["world_size"] == 2 and saved["global_batch_size"] == 4 and saved["iters_per_epoch"] == 6
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["iteration"] == 3 and last["world_size"] == 2 and len(last["rng"]["torch"]) == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["final.pt", "last.pt"]
