"""The watch figures of notebook 04 (harmonic.experiments.figures): sizes of the PNGs, and
convergence_figures on a results folder with watch statistics and samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from harmonic.engine.watch import WATCH_SAMPLES_FILE, sample_iterations, snapshot, write_snapshot
from harmonic.experiments.figures import (
    convergence_figures,
    plot_watch_histograms,
    plot_watch_shares,
    reversal_region,
)
from harmonic.losses import WATCH_KEYS

DPI = 40


def _records(n=12, *, counterfactual=False, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(1, n + 1):
        record = {"iter": i, "loss": 2.0 - i / n, "loss/classification": 1.0, "loss/bbox_regression": 1.0 - i / (2 * n)}
        record.update({key: float(rng.uniform(0, 1)) for key in WATCH_KEYS})
        record["watch/counterfactual"] = 1.0 if counterfactual else 0.0
        out.append(record)
    return out


def _samples(definition, seed=0):
    rng = np.random.default_rng(seed)
    return {"definition": definition, "cap": 512, "snapshots": [
        {"iter": it, "num_positives": 300, "x": rng.uniform(0, 2, 50).tolist(), "y": rng.uniform(0, 4, 50).tolist(),
         "score": rng.uniform(0, 1, 50).tolist()} for it in (4, 8, 12)
    ]}


def _size(path):
    with Image.open(path) as image:
        return image.size


def test_shares_figure_size_and_counterfactual_label(tmp_path):
    fig = plot_watch_shares({"baseline": _records(counterfactual=True), "harmonic": _records(seed=1)}, smooth=3,
                            path=tmp_path / "s.png", dpi=DPI)
    assert _size(tmp_path / "s.png") == (round(4.4 * 2 * DPI), round((3.2 * 2 + 0.4) * DPI))
    labels = {t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()}
    assert labels == {"baseline (counterfactual)", "harmonic"}
    with pytest.raises(ValueError, match="no run logs watch statistics"):
        plot_watch_shares({"old": [{"iter": 1, "loss": 1.0}]})


def test_histogram_figure_size_and_boundaries(tmp_path):
    plot_watch_histograms({"a": _samples("focal"), "b": _samples("ce", 1), "none": None}, path=tmp_path / "h.png", dpi=DPI)
    assert _size(tmp_path / "h.png") == (round(3.6 * 3 * DPI), round((3.0 * 2 + 0.5) * DPI))
    with pytest.raises(ValueError, match="no run has watch samples"):
        plot_watch_histograms({"a": None})


def test_reversal_region_is_above_the_boundary_and_empty_with_detached_factors():
    grid_p = np.linspace(0.0, 1.0, 11)
    boundary = np.array([2.0, 0.5, 0.25])  # p*(y) at three y: none, scores > 0.5, scores > 0.25 reversed
    region = reversal_region(grid_p, boundary)
    assert region.shape == (11, 3)
    assert region[:, 0].sum() == 0 and region[:, 1].sum() == 5 and region[:, 2].sum() == 8
    assert not reversal_region(grid_p, boundary, detached=True).any()


def test_convergence_figures_draw_the_watch_figures(tmp_path):
    for name, records, samples, detach in (("base", _records(counterfactual=True), _samples("focal"), None),
                                           ("harm", _records(seed=1), None, None),
                                           ("det", _records(seed=2), _samples("focal", 2), True)):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if samples is not None:
            (run / WATCH_SAMPLES_FILE).write_text(json.dumps(samples))
        if detach is not None:
            detector = {"loss": "harmonic", "detach_factors": detach}
            (run / "config.json").write_text(json.dumps({"config": {"detector": detector}, "resolved": {"detector": detector}}))
    out = convergence_figures({"baseline": "base", "harmonic": "harm", "detached": "det"}, results_dir=tmp_path,
                              smooth=2, dpi=DPI)
    assert [p.name for p in out["figures"]] == ["fig3_training_loss.png", "watch_shares.png", "watch_histograms.png"]
    assert "baseline (counterfactual)" in out["watch_markdown"] and "| harmonic |" in out["watch_markdown"]
    assert out["samples"]["harmonic"] is None
    assert out["samples"]["detached"]["detached"] is True and "detached" not in out["samples"]["baseline"]
    # a second set of runs under the same results_dir keeps its figures apart
    other = convergence_figures({"baseline": "base"}, results_dir=tmp_path, smooth=2, dpi=DPI,
                                output_dir=tmp_path / "long")
    assert [p.parent for p in other["figures"]] == [tmp_path / "long" / "figures"] * len(other["figures"])
    assert all(p.is_file() for p in other["figures"]) and other["figures"][0].name == "fig3_training_loss.png"


def test_sample_iterations_and_snapshots(tmp_path):
    import torch

    assert sample_iterations(4) == [2, 3, 4] and sample_iterations(3000) == [1000, 2000, 3000]
    assert sample_iterations(1) == [1]
    samples = {k: torch.arange(10.0) + i for i, k in enumerate(("x", "y", "score"))}
    entry = snapshot(samples, iteration=3, seed=0, cap=4)
    assert entry["num_positives"] == 10 and len(entry["x"]) == 4
    assert [y - x for x, y in zip(entry["x"], entry["y"])] == [1.0] * 4  # pairs stay together
    assert entry == snapshot(samples, iteration=3, seed=0, cap=4)  # a function of (seed, iteration)
    assert snapshot({}, iteration=1, seed=0) is None
    write_snapshot(tmp_path, entry, definition="focal")
    write_snapshot(tmp_path, {**entry, "iter": 5}, definition="focal")
    write_snapshot(tmp_path, {**entry, "iter": 4}, definition="focal")  # a resumed run replaces iteration 5
    data = json.loads((tmp_path / WATCH_SAMPLES_FILE).read_text())
    assert [s["iter"] for s in data["snapshots"]] == [3, 4] and data["definition"] == "focal"
