"""tools/gpu_check.py in its dry mode: the same three steps on the CPU at toy sizes."""

import json

import gpu_check
import pytest


@pytest.mark.slow
def test_dry_run_writes_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("HARMONIC_DATA", str(tmp_path / "data"))
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["dry_run"] is True and record["device"] == "cpu" and record["ok"] is True
    assert set(record["steps"]) == {"cuda_tests", "bench", "training"}
    assert "tests collected" in record["steps"]["cuda_tests"]["summary"]  # listed, not run, without a GPU
    engine = record["steps"]["bench"]["summaries"]["engine_step"][0]
    assert engine["engine_over_plain_images_per_s"] > 0 and engine["setting"] == "shapes_cpu"
    training = record["steps"]["training"]
    assert training["iterations"] == 2 and training["images_per_s"] > 0
    assert record["provenance"]["parameters"] == {"dry_run": True}


def test_without_a_gpu_the_real_check_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main(["--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
