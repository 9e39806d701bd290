"""tools/watch_summary.py: the tail of each run's log and its final metrics, averaged per variant."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import watch_summary  # noqa: E402


def _run(root, name, variant, seed, ap, scores, counterfactual=False):
    folder = root / name
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"variant": variant, "seed": seed}))
    (folder / "metrics.json").write_text(json.dumps({"coco": {"AP": ap, "AP75": ap / 2}}))
    lines = [{"iter": i + 1, "watch/score_p50": s, "watch/counterfactual": int(counterfactual)} for i, s in enumerate(scores)]
    lines.insert(0, {"iter": 0, "loss": 1.0})  # a record without the key is not counted
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_tail_means_per_run_and_means_over_seeds(tmp_path):
    a = _run(tmp_path, "h-s0", "harmonic_hiou", 0, 0.10, [0.9] * 8 + [0.1, 0.3])
    b = _run(tmp_path, "h-s1", "harmonic_hiou", 1, 0.20, [0.9] * 8 + [0.3, 0.5])
    c = _run(tmp_path, "b-s0", "baseline", 0, 0.30, [0.5] * 10, counterfactual=True)
    records = [watch_summary.run_record(run, tail=0.2) for run in (a, b, c)]
    assert records[0]["watch/score_p50"] == pytest.approx(0.2)  # the last 2 of 10 values
    assert records[0]["AP"] == pytest.approx(10.0) and records[0]["AP75"] == pytest.approx(5.0)
    assert records[0]["beta_c"] is None
    table = watch_summary.summarize(records)
    assert list(table) == ["harmonic_hiou", "baseline"]
    assert table["harmonic_hiou"]["runs"] == 2 and table["harmonic_hiou"]["AP"] == pytest.approx(15.0)
    assert table["harmonic_hiou"]["watch/score_p50"] == pytest.approx(0.3)  # (0.2 + 0.4) / 2
    assert table["baseline"]["counterfactual"] and not table["harmonic_hiou"]["counterfactual"]
    text = watch_summary.markdown(table, 0.2)
    assert "| `harmonic_hiou` | 2 | 15.0 | 7.5 | 0.300 |" in text and "`baseline` (counterfactual)" in text


def test_main_writes_json_and_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    run = _run(tmp_path, "h-s0", "harmonic_hiou", 0, 0.10, [0.2] * 10)
    out = tmp_path / "summary.json"
    assert watch_summary.main([str(run), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["tag"] == "[D]" and data["variants"]["harmonic_hiou"]["watch/score_p50"] == pytest.approx(0.2)
    with pytest.raises(SystemExit):
        watch_summary.main([str(tmp_path), "--out", str(out)])
    assert "not a finished run folder" in capsys.readouterr().err


def test_dead_channel_measurements_are_merged_by_run(tmp_path, capsys):
    runs = [_run(tmp_path, f"h-s{i}", "harmonic_hiou", i, 0.1, [0.2] * 10) for i in range(2)]
    dead = tmp_path / "dead.json"
    dead.write_text(json.dumps({"runs": [
        {"run": f"h-s{i}", "after_training": {"dead_channels": {"regression": [0.0, 0.1, 0.2, d]}, "mean_iou": iou}}
        for i, (d, iou) in enumerate([(0.9, 0.6), (1.0, 0.7)])]}))
    out = tmp_path / "summary.json"
    assert watch_summary.main([*map(str, runs), "--dead", str(dead), "--out", str(out)]) == 0
    row = json.loads(out.read_text())["variants"]["harmonic_hiou"]
    assert row["dead_last_regression"] == pytest.approx(0.95) and row["dead_mean_iou"] == pytest.approx(0.65)
    assert "| 0.950 | 0.650 |" in capsys.readouterr().out
