import json
from pathlib import Path

import numpy as np
import pytest

from harmonic.experiments.ranking import markdown_oracle_split, oracle_split
from harmonic.experiments.readme import markers
from harmonic.experiments.report import (
    HEADLINE,
    Run,
    attribution,
    conclusion,
    describe_runs,
    load_runs,
    load_sweep_runs,
    markdown_ablation,
    markdown_assumptions,
    markdown_attribution,
    markdown_claims,
    markdown_differences,
    markdown_paired,
    markdown_paper,
    markdown_runs,
    markdown_setting,
    markdown_summary,
    markdown_verdict,
    paired_differences,
    param_points,
    report_markdown,
    results_report,
    setting_label,
    setting_note,
    summarize,
    verdict,
)
from harmonic.theory.reported import ABLATION, ABLATION_VARIANTS, MAIN_TABLE


def _write_run(root, name, variant, seed, ap, spearman=0.5, sweep="t"):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"variant": variant, "seed": seed, "sweep": sweep}))
    metrics = {"coco": {"AP": ap, "AP50": ap + 0.1, "AP75": None}, "consistency": {"spearman": spearman}}
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def runs_dir(tmp_path):
    for seed, (b, h) in enumerate([(0.30, 0.33), (0.32, 0.34), (0.31, 0.35)]):
        _write_run(tmp_path, f"baseline-s{seed}", "baseline", seed, b)
        _write_run(tmp_path, f"harmonic-s{seed}", "harmonic", seed, h)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "run.json").write_text("{}")
    return tmp_path


def test_summary_means_and_std(runs_dir):
    runs = load_runs(runs_dir)
    assert len(runs) == 6  # the unfinished folder is skipped
    s = summarize(runs)
    assert list(s) == ["baseline", "harmonic"]
    assert s["baseline"]["AP"]["mean"] == pytest.approx(0.31)
    assert s["baseline"]["AP"]["std"] == pytest.approx(0.01)
    assert s["harmonic"]["AP"]["n"] == 3
    assert s["harmonic"]["AP75"] == {"mean": None, "std": None, "n": 0}


def test_paired_differences_and_interval(runs_dir):
    d = paired_differences(load_runs(runs_dir))
    e = d["harmonic"]["AP"]
    # differences 0.03, 0.02, 0.04 -> mean 0.03, sd 0.01, t(0.975, 2) = 4.3027
    assert e["mean"] == pytest.approx(0.03)
    half = 4.302652729911275 * 0.01 / 3**0.5
    assert e["low"] == pytest.approx(0.03 - half)
    assert e["high"] == pytest.approx(0.03 + half)
    assert "excludes zero" in verdict(d, "AP", "harmonic")
    assert "improves" in verdict(d, "AP", "harmonic")
    # spearman identical in all runs -> difference 0, interval degenerate but includes zero
    assert "does not show" in verdict(d, "spearman", "harmonic")


def test_markdown_tables_contain_the_numbers(runs_dir):
    runs = load_runs(runs_dir)
    text = markdown_summary(summarize(runs))
    assert "| baseline | 3 | 31.0 ± 1.0 |" in text
    assert "n/a" in text  # AP75 missing
    assert "+3.0 [" in markdown_differences(paired_differences(runs))


def test_bad_metrics_file_is_named(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"variant": "x", "seed": 0}))
    (folder / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken"):
        load_runs(tmp_path)


def test_paper_tables_are_tagged_and_consistent():
    assert all(r.tag == "[R]" for r in MAIN_TABLE)
    assert {r.detector for r in MAIN_TABLE} >= {"Faster R-CNN R50-FPN", "RetinaNet R50"}
    assert MAIN_TABLE[0].gain == pytest.approx(1.8)
    assert [row for row, _ in ABLATION] == list(ABLATION_VARIANTS)


BEGIN, END = markers("results")


def _fake_run(root, name, variant, seed, ap, sweep="s"):
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"variant": variant, "seed": seed, "sweep": sweep}))
    metrics = {"coco": {"AP": ap, "AP50": ap, "AP75": ap}, "consistency": {"spearman": 0.1 * seed}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    rng = np.random.default_rng(seed)
    (folder / "score_iou.json").write_text(json.dumps({"scores": rng.random(20).tolist(), "ious": rng.random(20).tolist()}))


def test_results_report_numbers_come_from_runs(tmp_path):
    for seed, (b, h) in enumerate([(0.20, 0.25), (0.22, 0.26)]):
        _fake_run(tmp_path, f"b{seed}", "baseline", seed, b)
        _fake_run(tmp_path, f"h{seed}", "harmonic_hiou", seed, h)
    _fake_run(tmp_path, "other", "baseline", 5, 0.9, sweep="other")
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    out = results_report(sweeps=["s"], results_dir=tmp_path, dpi=30, update_readme=readme)
    md = out["markdown"]
    assert "| baseline | 2 | 21.0 ± 1.4 |" in md  # mean 0.21, sd 0.01414 in percent; the other sweep is excluded
    assert "+4.5" in md  # paired mean difference (0.05 + 0.04) / 2
    assert "[R]" in md and "[D]" in md
    assert (tmp_path / "report.md").read_text().strip() == md.strip()
    assert len(out["figures"]) == 1 and out["figures"][0].is_file()
    assert "+4.5" in readme.read_text()
    assert out["written"] == [tmp_path / "report.md", tmp_path / "report.json", readme, *out["figures"]]
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        results_report(sweeps=["missing"], results_dir=tmp_path)


def test_results_report_writes_to_output_dir_and_leaves_results_dir_alone(tmp_path):
    for seed, (b, h) in enumerate([(0.20, 0.25), (0.22, 0.26)]):
        _fake_run(tmp_path, f"b{seed}", "baseline", seed, b)
        _fake_run(tmp_path, f"h{seed}", "harmonic_hiou", seed, h)
    (tmp_path / "report.md").write_text("the default report\n")
    out = results_report(sweeps=["s"], results_dir=tmp_path, dpi=30, output_dir=tmp_path / "long")
    assert out["written"] == [tmp_path / "long" / "report.md", tmp_path / "long" / "report.json", *out["figures"]]
    assert all(p.parent == tmp_path / "long" / "figures" for p in out["figures"]) and out["figures"]
    assert "+4.5" in (tmp_path / "long" / "report.md").read_text()
    assert json.loads((tmp_path / "long" / "report.json").read_text())["runs"] == ["b0", "b1", "h0", "h1"]
    assert (tmp_path / "report.md").read_text() == "the default report\n" and not (tmp_path / "figures").exists()


def test_results_report_draws_metric_vs_gamma_when_the_gamma_sweep_is_there(tmp_path):
    for seed in (0, 1):
        for gamma, ap in ((0.2, 0.20), (0.8, 0.24)):
            _fake_run(tmp_path, f"g{gamma}-{seed}", f"hiou_gamma_{gamma}", seed, ap + 0.01 * seed, sweep="gamma")
    out = results_report(sweeps=["gamma"], baseline="hiou_gamma_0.2", main_variant="hiou_gamma_0.8",
                         results_dir=tmp_path, dpi=30)
    assert any(p.name == "ap_vs_gamma.png" and p.is_file() for p in out["figures"])


# ----------------------------------------------------------------------------------------------------
# the steps notebook 05 shows one by one (results_report runs the same ones)
# ----------------------------------------------------------------------------------------------------
def test_load_sweep_runs_keeps_the_sweeps_and_refuses_none(tmp_path):
    _fake_run(tmp_path, "b0", "baseline", 0, 0.2, sweep="s")
    _fake_run(tmp_path, "h0", "harmonic_hiou", 0, 0.3, sweep="t")
    _fake_run(tmp_path, "x0", "baseline", 1, 0.4, sweep="other")
    assert [r.name for r in load_sweep_runs(tmp_path, ["s", "t"])] == ["b0", "h0"]
    assert [r.name for r in load_sweep_runs(tmp_path, ("other",))] == ["x0"]
    with pytest.raises(FileNotFoundError, match=r"no finished runs of sweeps \['nope'\]"):
        load_sweep_runs(tmp_path, ["nope"])
    # two sweeps that each ran the baseline with seed 1 cannot be reported together: pairs by seed would mix them
    _fake_run(tmp_path, "y1", "baseline", 1, 0.5, sweep="t")
    with pytest.raises(ValueError, match=r"variant 'baseline' seed 1 twice \(x0 and y1\)"):
        load_sweep_runs(tmp_path, ["other", "t"])


def test_markdown_runs_shows_each_run_as_recorded(runs_dir):
    runs = load_runs(runs_dir)
    assert describe_runs(runs) == "6 runs, 2 variants, seeds [0, 1, 2]"
    text = markdown_runs(runs, metrics=("AP", "AP50", "AP75", "spearman"))
    lines = text.splitlines()
    assert lines[0] == "6 runs, 2 variants, seeds [0, 1, 2]:"
    assert lines[2] == "| run | variant | seed | AP | AP50 | AP75 | score-IoU Spearman |"
    rows = lines[4:]
    # baseline first, then by seed; AP in percent, the missing AP75 as n/a
    assert rows[0] == "| baseline-s0 | baseline | 0 | 30.0 | 40.0 | n/a | 0.500 |"
    assert rows[3] == "| harmonic-s0 | harmonic | 0 | 33.0 | 43.0 | n/a | 0.500 |"
    assert [r.split(" | ")[0] for r in rows] == [
        "| baseline-s0", "| baseline-s1", "| baseline-s2", "| harmonic-s0", "| harmonic-s1", "| harmonic-s2"]


def _diffs(ap_diffs, variant="harmonic_hiou"):
    runs = []
    for seed, d in enumerate(ap_diffs):
        runs += [Run(f"b{seed}", Path("."), "baseline", seed, "s", {"AP": 0.3}),
                 Run(f"h{seed}", Path("."), variant, seed, "s", {"AP": 0.3 + d})]
    return paired_differences(runs, metrics=("AP",))


def test_conclusion_reads_the_ap_interval():
    assert "supports the paper's claim" in conclusion(_diffs([0.03, 0.02, 0.04]), "harmonic_hiou")
    lowered = conclusion(_diffs([-0.03, -0.02, -0.04]), "harmonic_hiou")
    assert lowered.startswith("**Conclusion [D]:** on these runs, `harmonic_hiou` against `baseline`")
    assert "lowers AP, and the interval excludes zero" in lowered
    assert "does not show an AP difference" in conclusion(_diffs([0.03, -0.02, 0.01]), "harmonic_hiou")
    assert "does not show an AP difference" in conclusion(_diffs([0.03]), "harmonic_hiou")  # one seed: no interval
    assert conclusion(_diffs([0.03]), "other", "base") == "The variant `other` has no runs paired with `base` in these sweeps."


def test_markdown_verdict_is_the_conclusion_then_one_verdict_per_metric(runs_dir):
    diffs = paired_differences(load_runs(runs_dir))
    lines = markdown_verdict(diffs, "harmonic").splitlines()
    assert lines[0] == conclusion(diffs, "harmonic") and "supports" in lines[0]
    assert lines[1] == ""
    assert lines[2:] == [f"- {verdict(diffs, m, 'harmonic')}" for m in HEADLINE]
    assert lines[2].startswith("- harmonic raises AP by 3.0, which improves it")
    assert markdown_verdict(diffs, "missing") == "- The variant `missing` has no runs paired with `baseline` in these sweeps."


def test_markdown_paper_puts_our_paired_gain_beside_the_paper(runs_dir):
    runs = load_runs(runs_dir)
    summary, diffs = summarize(runs), paired_differences(runs)
    lines = markdown_paper(summary, diffs, "baseline", "harmonic").splitlines()
    assert len(lines) == 2 + len(MAIN_TABLE) + 1
    assert lines[2] == "| Faster R-CNN R50-FPN | COCO test-dev | 37.5 | 39.3 | +1.8 | [R] |"
    # ours: baseline mean 31.0, with the method 31.0 + 3.0, paired difference +3.0 with its interval
    half = 100 * 4.302652729911275 * 0.01 / 3**0.5
    assert lines[-1] == (f"| our detector (ours) | our data, val | 31.0 | 34.0 | "
                         f"+3.0 [{3.0 - half:+.1f}, {3.0 + half:+.1f}] | [D] |")
    # the setting is read from the runs' config
    (runs[0].folder / "config.json").write_text(json.dumps({"config": {"dataset": "shapes-study", "detector": {
        "arch": "retinanet", "backbone": "resnet18_fpn", "pretrained_backbone": "shapes"}}}))
    assert markdown_paper(summary, diffs, "baseline", "harmonic", runs).splitlines()[-1].startswith(
        "| RetinaNet R18-FPN, shapes-pretrained backbone (ours) | shapes-study, val | 31.0 | 34.0 |")
    assert len(markdown_paper(summary, diffs, "baseline", "missing").splitlines()) == 2 + len(MAIN_TABLE)


def test_markdown_setting_sums_the_logged_times(tmp_path):
    for seed in (0, 1):
        _fake_run(tmp_path, f"b{seed}", "baseline", seed, 0.2)
    runs = load_sweep_runs(tmp_path, ["s"])
    assert markdown_setting(runs) == setting_note(runs)  # no logs: no training time
    for r, times in zip(runs, ([30.0, 30.0], [45.0, 15.0, 0.0])):
        (r.folder / "log.jsonl").write_text("".join(json.dumps({"time": t}) + "\n" for t in times))
    (runs[0].folder / "config.json").write_text(json.dumps(
        {"provenance": {"device": {"device": "cpu", "cpu_count": 2, "torch_threads": 1}}}))
    first, blank, note = markdown_setting(runs).split("\n")
    assert first == ("Training time of these 2 runs: 2.0 minutes in all (sum of the logged iteration times; "
                     "cpu, 2 CPU cores, 1 torch thread(s) per run) [D].")
    assert blank == "" and note == setting_note(runs)


def test_results_report_writes_the_steps_in_order(tmp_path):
    for seed, (b, h) in enumerate([(0.20, 0.25), (0.22, 0.26), (0.21, 0.24)]):
        _fake_run(tmp_path, f"b{seed}", "baseline", seed, b)
        _fake_run(tmp_path, f"h{seed}", "harmonic_hiou", seed, h)
    out = results_report(sweeps=["s"], results_dir=tmp_path, dpi=30)
    # the steps of the notebook, computed separately, are the report's sections, in order
    runs = load_sweep_runs(tmp_path, ["s"])
    summary, diffs = summarize(runs), paired_differences(runs)
    steps = [markdown_summary(summary), markdown_paired(diffs, "harmonic_hiou"), markdown_verdict(diffs, "harmonic_hiou"),
             markdown_attribution(runs), markdown_assumptions(runs), markdown_claims(runs),
             markdown_paper(summary, diffs, "baseline", "harmonic_hiou", runs),
             markdown_setting(runs)]
    md = out["markdown"]
    assert md == report_markdown(runs, summary, diffs)
    assert "Boxes or scores" not in md  # no oracle split given: no section
    positions = [md.index(step) for step in steps]
    assert positions == sorted(positions)
    assert md.startswith("### Our runs [D]: 6 runs, 2 variants, seeds [0, 1, 2]\n")
    assert out["summary"] == summary and out["differences"] == diffs
    assert out["written"] == [tmp_path / "report.md", tmp_path / "report.json", *out["figures"]]
    assert (tmp_path / "report.md").read_text() == md + "\n"
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["runs"] == ["b0", "b1", "b2", "h0", "h1", "h2"]
    assert data["differences"]["harmonic_hiou"]["AP"]["mean"] == pytest.approx(0.04)
    assert [row["contrast"] for row in data["attribution"]] == ["the whole method (Harmonic + HIoU)"]
    assert data["oracle_split"] is None
    # with the oracle split (notebook 05 passes it): its section after the attribution, its data in report.json
    split = oracle_split(runs)
    assert split == {"reason": "no seed has both a `baseline` and a `harmonic_hiou` run with its detections "
                               "(detections.json.gz) in these sweeps"}
    section = markdown_oracle_split(split)
    out = results_report(sweeps=["s"], results_dir=tmp_path, dpi=30, oracle_split=split, oracle_section=section)
    assert out["markdown"] == report_markdown(runs, summary, diffs, oracle_section=section)
    md = out["markdown"]
    assert md.index(markdown_attribution(runs)) < md.index("Not split [D]: no seed has both") < md.index(
        markdown_assumptions(runs))
    assert json.loads((tmp_path / "report.json").read_text())["oracle_split"] == split


# ----------------------------------------------------------------------------------------------------
# notebook 05: the steps, each after a sentence, and one writer at the end
# ----------------------------------------------------------------------------------------------------
NOTEBOOK_05 = Path(__file__).resolve().parents[2] / "notebooks" / "05_results.ipynb"
STEPS = ("load_sweep_runs", "summarize", "paired_differences", "markdown_verdict", "markdown_attribution",
         "hk.oracle_split", "markdown_assumptions", "markdown_claims", "markdown_paper", "markdown_ablation", "results_report")


def test_results_notebook_shows_each_step_after_a_sentence():
    from harmonic.experiments.notebooks import declared_parameters

    assert declared_parameters(NOTEBOOK_05) == {"sweeps", "baseline", "main_variant", "results_dir", "output_dir", "update_readme",
                                                "dpi"}
    cells = json.loads(NOTEBOOK_05.read_text())["cells"]
    first = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
    steps = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and i > first]
    assert len(steps) == len(STEPS)
    for i, step in zip(steps, STEPS):
        assert cells[i - 1]["cell_type"] == "markdown", f"cell {i} is not preceded by a sentence"
        code = "".join(cells[i]["source"])
        assert (step if "." in step else f"hr.{step}") + "(" in code
        calls = [line for line in code.splitlines() if line and not line.startswith(("import", "from", " "))]
        assert 1 <= len(calls) <= 2, code
        assert not any(w in code for w in ("open(", "write", "savefig")), code  # writing stays in the package
    assert sum("results_report(" in "".join(c["source"]) for c in cells) == 1


@pytest.mark.slow
def test_results_notebook_displays_the_steps_and_writes_the_report(tmp_path):
    import nbformat

    from harmonic.experiments.notebooks import run_notebook

    for seed, (b, h) in enumerate([(0.20, 0.25), (0.22, 0.26), (0.21, 0.24)]):
        _fake_run(tmp_path, f"b{seed}", "baseline", seed, b)
        _fake_run(tmp_path, f"h{seed}", "harmonic_hiou", seed, h)
    out = run_notebook("05_results", {"sweeps": ["s"], "results_dir": str(tmp_path), "dpi": 30},
                       tmp_path / "executed" / "05_results.ipynb", progress_bar=False)
    executed = nbformat.read(out, as_version=4)
    shown = [o["data"]["text/markdown"] for c in executed.cells if c.cell_type == "code" for o in c.outputs
             if "text/markdown" in o.get("data", {})]
    runs = load_sweep_runs(tmp_path, ["s"])
    summary, diffs = summarize(runs), paired_differences(runs)
    split = oracle_split(runs)
    assert shown == [markdown_runs(runs), markdown_summary(summary), markdown_paired(diffs, "harmonic_hiou"),
                     markdown_verdict(diffs, "harmonic_hiou"), markdown_attribution(runs), markdown_oracle_split(split),
                     markdown_assumptions(runs),
                     markdown_claims(runs),
                     markdown_paper(summary, diffs, "baseline", "harmonic_hiou", runs), markdown_setting(runs),
                     markdown_ablation(runs)]
    assert "no ablation to set beside" in shown[-1]  # baseline and Harmonic + HIoU only: not an ablation row
    assert "+4.0 [" in shown[2] and "raises AP by 4.0" in shown[3]
    images = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # score vs IoU, baseline and main variant side by side
    assert (tmp_path / "report.md").read_text() == report_markdown(
        runs, summary, diffs, oracle_section=markdown_oracle_split(split)) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["executed", "figures", "report.json", "report.md", "runs"]


def test_minimum_detectable_effect_matches_the_t_formula():
    from scipy import stats as st

    from harmonic.experiments.report import markdown_power, minimum_detectable_effect

    # n = 3 pairs, sd 0.9: (t_.975,2 + t_.8,2) * 0.9 / sqrt(3) = (4.3027 + 1.0607) * 0.5196 = 2.787
    assert minimum_detectable_effect(0.9, 3) == pytest.approx((4.302653 + 1.060660) * 0.9 / 3 ** 0.5, rel=1e-5)
    assert minimum_detectable_effect(0.9, 3) == pytest.approx(2.787, abs=1e-3)
    # more pairs, smaller effect; n = 4, sd 0.5 gives about 1.0
    assert minimum_detectable_effect(0.5, 4) == pytest.approx(
        (st.t.ppf(0.975, 3) + st.t.ppf(0.8, 3)) * 0.25, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        minimum_detectable_effect(1.0, 1)
    diffs = {"h": {"AP": {"mean": 0.01, "low": -0.01, "high": 0.03, "n": 3, "sd": 0.009,
                          "mde": minimum_detectable_effect(0.009, 3)}}}
    text = markdown_power(diffs, "h")
    assert "3 paired seeds" in text and "0.9" in text and "2.8 AP" in text
    assert "Too few pairs" in markdown_power({"h": {"AP": {"n": 1, "mde": None}}}, "h")


def test_assumption_records_read_the_watch_statistics_of_the_logs(tmp_path):
    from harmonic.experiments.report import Run, assumption_record, markdown_assumptions

    def run(name, variant, shares, counterfactual=False):
        folder = tmp_path / name
        folder.mkdir()
        lines = [json.dumps({"iter": i + 1, "watch/reversed_share": v, "watch/counterfactual": int(counterfactual)})
                 for i, v in enumerate(shares)]
        (folder / "log.jsonl").write_text("\n".join(lines) + "\n")
        return Run(name, folder, variant, 0, "s")

    harmonic = run("h", "harmonic_hiou", [0.5, 0.5, 0.25, 0.0, 0.0])
    record = assumption_record(harmonic)
    assert record["mean"] == pytest.approx(0.25) and record["mean_last"] == pytest.approx(0.0)  # last 20%: 1 of 5
    assert record["max"] == 0.5 and record["iterations_with_reversal"] == pytest.approx(0.6)
    base = run("b", "baseline", [1.0, 1.0], counterfactual=True)
    old = Run("o", tmp_path / "o", "old", 0, "s")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "log.jsonl").write_text(json.dumps({"iter": 1, "loss": 1.0}) + "\n")
    assert assumption_record(old) is None
    text = markdown_assumptions([base, harmonic, old])
    assert "| harmonic_hiou | 1 | 0.250 | 0.000 | 0.500 | 0.600 | trained |" in text
    assert "| baseline | 1 | 1.000 | 1.000 | 1.000 | 1.000 | counterfactual" in text
    assert "Not logged (runs that predate the watch statistics): old." in text
    assert "cannot be read" in markdown_assumptions([old])


# ----------------------------------------------------------------------------------------------------
# the attribution: paired contrasts between variants, ranked
# ----------------------------------------------------------------------------------------------------
def test_attribution_pairs_each_contrast_by_seed_and_ranks_by_size(tmp_path):
    aps = {"baseline": (0.30, 0.32, 0.31), "harmonic": (0.29, 0.31, 0.30), "harmonic_hiou": (0.25, 0.26, 0.24),
           "baseline_hiou": (0.26, 0.27, 0.27), "baseline_giou": (0.30, 0.33, 0.31)}
    for variant, values in aps.items():
        for seed, ap in enumerate(values):
            _fake_run(tmp_path, f"{variant}-s{seed}", variant, seed, ap)
    _fake_run(tmp_path, "harmonic-s7", "harmonic", 7, 0.9)  # no baseline of seed 7: never paired
    runs = load_sweep_runs(tmp_path, ["s"])
    rows = attribution(runs)
    by_contrast = {(r["variant"], r["reference"]): r for r in rows}
    # hand-computed paired means: harmonic_hiou - baseline = (-.05, -.06, -.07) -> -0.06
    assert by_contrast[("harmonic_hiou", "baseline")]["mean"] == pytest.approx(-0.06)
    assert by_contrast[("harmonic", "baseline")]["mean"] == pytest.approx(-0.01) and by_contrast[("harmonic", "baseline")]["n"] == 3
    assert by_contrast[("harmonic_hiou", "harmonic")]["mean"] == pytest.approx(-0.05)
    assert by_contrast[("baseline_hiou", "baseline_giou")]["mean"] == pytest.approx((-0.04 - 0.06 - 0.04) / 3)
    # differences (-0.05, -0.06, -0.07) have sd 0.01: the 95% interval, -0.06 +- 0.025, excludes zero
    assert by_contrast[("harmonic_hiou", "baseline")]["excludes_zero"] is True
    assert [abs(r["mean"]) for r in rows] == sorted((abs(r["mean"]) for r in rows), reverse=True)
    assert ("harmonic_hiou", "harmonic_hiou_detached") not in by_contrast  # no detached runs
    table = markdown_attribution(runs)
    assert table.splitlines()[2].startswith("| 1 | the whole method (Harmonic + HIoU) | `harmonic_hiou` − `baseline` | -6.0 |")
    assert "Intervals that exclude zero: the whole method" in table
    assert "no pair" in markdown_attribution([r for r in runs if r.variant == "baseline"])


def test_param_points_take_harmonic_as_alpha_zero_and_the_method_at_its_defaults():
    summary = {"harmonic": {}, "harmonic_hiou": {}, "hiou_alpha_0.5": {}, "hiou_alpha_1.0": {}, "baseline": {},
               "hiou_gamma_0.2": {}}
    assert param_points(summary, "alpha") == {0.0: "harmonic", 0.5: "hiou_alpha_0.5", 1.0: "hiou_alpha_1.0", 1.5: "harmonic_hiou"}
    assert param_points(summary, "gamma") == {0.2: "hiou_gamma_0.2", 0.8: "harmonic_hiou"}
    assert param_points({"hiou_alpha_1.5": {}, "harmonic_hiou": {}}, "alpha") == {1.5: "hiou_alpha_1.5"}  # swept wins


def test_setting_label_reads_the_first_runs_config(tmp_path):
    _fake_run(tmp_path, "b0", "baseline", 0, 0.2)
    runs = load_sweep_runs(tmp_path, ["s"])
    assert setting_label(runs) == ("our detector", "our data, val")
    (runs[0].folder / "config.json").write_text(json.dumps({"config": {"dataset": "data/instances_train2017.json",
                                                                       "detector": {"arch": "faster_rcnn", "backbone": "resnet50_fpn", "pretrained_backbone": "imagenet"}}}))
    assert setting_label(runs) == ("Faster R-CNN R50-FPN, ImageNet backbone", "instances_train2017, val")


def test_every_ranked_contrast_names_variants_that_a_sweep_runs():
    from harmonic.experiments.report import CONTRASTS
    from harmonic.experiments.sweeps import SWEEPS

    swept = {variant for sweep in SWEEPS.values() for variant in sweep.variants}
    for label, variant, reference in CONTRASTS:
        assert variant in swept and reference in swept, label


def test_claims_read_each_interval_in_the_claimed_direction(tmp_path):
    """harmonic_hiou below the baseline on every seed (AP contradicted); the harmonic loss alone mixed
    (cannot decide); alpha 0 and 0.5 above harmonic_hiou on every seed (alpha = 1.5 best contradicted); the
    logs of harmonic_hiou reversed 5% / 0% of positives over the last fifth (Eq. 9: cannot decide, one
    run above the tolerance and one below), then both above (contradicted)."""
    from harmonic.experiments.report import ASSUMPTION_TOLERANCE, claims, markdown_claims

    aps = {"baseline": (0.30, 0.32, 0.31), "harmonic_hiou": (0.25, 0.26, 0.24), "harmonic": (0.32, 0.30, 0.31),
           "hiou_alpha_0.5": (0.27, 0.29, 0.26)}
    for variant, values in aps.items():
        for seed, ap in enumerate(values):
            _fake_run(tmp_path, f"{variant}-s{seed}", variant, seed, ap)
    runs = load_sweep_runs(tmp_path, ["s"])

    def logs(last_shares):
        for seed, share in enumerate(last_shares):
            lines = [json.dumps({"iter": i + 1, "watch/reversed_share": 0.5 if i < 8 else share}) for i in range(10)]
            (tmp_path / "runs" / f"harmonic_hiou-s{seed}" / "log.jsonl").write_text("\n".join(lines) + "\n")

    logs([0.05, 0.0, 0.0])
    rows = {(row["claim"].split(" (")[0], row["metric"]): row for row in claims(runs)}
    assert rows[("Harmonic + HIoU raises AP", "AP")]["verdict"] == "contradicts"
    assert rows[("Harmonic + HIoU raises AP", "AP")]["mean"] == pytest.approx(-0.06)
    assert rows[("the harmonic loss alone raises AP", "AP")]["verdict"] == "cannot decide"
    # spearman is 0.1 * seed in every variant: no difference, no interval width -> cannot decide
    assert rows[("the loss makes scores rank boxes by their IoU", "spearman")]["verdict"] == "cannot decide"
    eq9 = rows[('Eq. 9: dF/dx > 0 is "basically always true during training"', "reversed share")]
    assert eq9["verdict"] == "cannot decide" and eq9["high"] == pytest.approx(0.05) and eq9["low"] == 0.0
    best = rows[("alpha = 1.5 is the best HIoU weight", "AP")]
    # harmonic (alpha 0) - harmonic_hiou = (0.07, 0.04, 0.07): the best, its interval above zero
    assert best["variant"] == "harmonic" and best["verdict"] == "contradicts"
    assert best["mean"] == pytest.approx(0.06)
    assert best["detail"] == "alpha 0: +6.0; alpha 0.5: +2.3"  # alpha 0.5: (0.02, 0.03, 0.02)
    logs([0.05, 2 * ASSUMPTION_TOLERANCE, 0.03])
    eq9 = [row for row in claims(runs) if row["metric"] == "reversed share"][0]
    assert eq9["verdict"] == "contradicts"
    table = markdown_claims(runs)
    assert "| Harmonic + HIoU raises AP (RetinaNet R50, COCO test-dev: +1.5) | [R] | `harmonic_hiou` − `baseline`, AP | -6.0 |" in table
    assert "**contradicts**" in table and "**cannot decide**" in table
    assert "no runs that test" in markdown_claims([r for r in runs if r.variant == "baseline"])


def test_the_alpha_claim_shows_the_deciding_contrast_and_needs_the_sweep_to_support(tmp_path):
    from harmonic.experiments.report import claims

    aps = {"baseline": (0.30, 0.32, 0.31), "harmonic_hiou": (0.25, 0.26, 0.24), "hiou_alpha_0.5": (0.27, 0.29, 0.26)}
    for variant, values in aps.items():
        for seed, ap in enumerate(values):
            _fake_run(tmp_path, f"{variant}-s{seed}", variant, seed, ap)
    _fake_run(tmp_path, "harmonic-s0", "harmonic", 0, 0.90)  # one pair, no interval: a larger mean decides nothing
    row = [r for r in claims(load_sweep_runs(tmp_path, ["s"])) if r["claim"].startswith("alpha")][0]
    assert row["verdict"] == "contradicts" and row["variant"] == "hiou_alpha_0.5"
    # harmonic (alpha 0) below harmonic_hiou on every seed, but no swept alpha: cannot decide
    other = tmp_path / "other"
    for variant, values in {"harmonic_hiou": (0.25, 0.26, 0.24), "harmonic": (0.20, 0.22, 0.21)}.items():
        for seed, ap in enumerate(values):
            _fake_run(other, f"{variant}-s{seed}", variant, seed, ap)
    row = [r for r in claims(load_sweep_runs(other, ["s"])) if r["claim"].startswith("alpha")][0]
    assert row["verdict"] == "cannot decide" and row["high"] < 0


def test_the_gamma_claim_pairs_each_swept_gamma_with_the_reported_one(tmp_path):
    from harmonic.experiments.report import claims, markdown_claims

    # every swept gamma below gamma 0.8 (harmonic_hiou) on every seed: the reported value is supported
    aps = {"harmonic_hiou": (0.25, 0.26, 0.24), "hiou_gamma_0.4": (0.22, 0.24, 0.20), "hiou_gamma_1.0": (0.23, 0.25, 0.22)}
    for variant, values in aps.items():
        for seed, ap in enumerate(values):
            _fake_run(tmp_path, f"{variant}-s{seed}", variant, seed, ap)
    runs = load_sweep_runs(tmp_path, ["s"])
    row = [r for r in claims(runs) if r["claim"].startswith("gamma")][0]
    assert row["claim"] == "gamma = 0.8 is the best HIoU focusing parameter" and row["verdict"] == "supports"
    assert row["variant"] == "hiou_gamma_1.0" and row["mean"] == pytest.approx(-1 / 60)  # the larger mean shown
    assert row["detail"] == "gamma 0.4: -3.0; gamma 1: -1.7"
    assert not [r for r in claims(runs) if r["claim"].startswith("alpha")]  # no alpha besides 1.5: no row
    assert "each swept gamma − `harmonic_hiou` (0.8), AP; best: `hiou_gamma_1.0`" in markdown_claims(runs)
    # one swept gamma above it on every seed: contradicted
    for seed, ap in enumerate((0.27, 0.29, 0.26)):
        _fake_run(tmp_path, f"hiou_gamma_0.6-s{seed}", "hiou_gamma_0.6", seed, ap)
    row = [r for r in claims(load_sweep_runs(tmp_path, ["s"])) if r["claim"].startswith("gamma")][0]
    assert row["verdict"] == "contradicts" and row["variant"] == "hiou_gamma_0.6"


def test_the_ablation_report_sets_the_papers_rows_beside_ours_and_judges_its_own_method(tmp_path):
    """A Faster R-CNN ablation sweep: baseline, + Harmonic, + TC, + IoU, HIoU (the paper's rows [R]) on three
    seeds; the report's main variant is the ablation's whole method, so the consistency claims and Eq. 9
    read harmonic_tc_hiou, and the paper's ablation table gets our mean, our paired steps and the gain over
    the baseline beside its own numbers."""
    from harmonic.experiments.report import claims, report_markdown
    from harmonic.theory.reported import ABLATION

    aps = {"baseline": (0.30, 0.32, 0.31), "harmonic": (0.31, 0.33, 0.33), "harmonic_tc": (0.31, 0.33, 0.33),
           "harmonic_tc_iou": (0.29, 0.31, 0.30), "harmonic_tc_hiou": (0.33, 0.35, 0.34)}
    for variant, values in aps.items():
        for seed, ap in enumerate(values):
            _fake_run(tmp_path, f"{variant}-s{seed}", variant, seed, ap)
            config = {"config": {"dataset": "data/shapes-study", "detector": {"arch": "faster_rcnn",
                                 "backbone": "resnet18_fpn", "pretrained_backbone": "shapes"}}}
            (tmp_path / "runs" / f"{variant}-s{seed}" / "config.json").write_text(json.dumps(config))
    for seed in range(3):  # the whole method's logs: 2% of the positives reversed over the end of training
        lines = [json.dumps({"iter": i + 1, "watch/reversed_share": 0.02}) for i in range(10)]
        (tmp_path / "runs" / f"harmonic_tc_hiou-s{seed}" / "log.jsonl").write_text("\n".join(lines) + "\n")
    runs = load_sweep_runs(tmp_path, ["s"])

    table = markdown_ablation(runs)
    paper = dict(ABLATION)
    # baseline 31.0 ± 1.0; + Harmonic +1.3 [..] over the baseline (0.01, 0.01, 0.02); TC: +0.0 on every seed
    assert f"| baseline | `baseline` | {paper['baseline']:.1f} |  | 31.0 ± 1.0 |  |  |" in table
    assert f"| + Harmonic | `harmonic` | {paper['+ Harmonic']:.1f} | +1.0 | 32.3 ± 1.2 | +1.3 [" in table
    assert "| + task-contrasting | `harmonic_tc` | 38.5 | +0.2 | 32.3 ± 1.2 | +0.0 [+0.0, +0.0], MDE 0.0 (3 pairs) |" in table
    # HIoU instead of IoU: +4.0 on every seed over the plain IoU row; +3.0 over the baseline on every seed
    hiou = [line for line in table.splitlines() if line.startswith("| HIoU instead of IoU")][0]
    assert "| 34.0 ± 1.0 | +4.0 [+4.0, +4.0], MDE 0.0 (3 pairs) | +3.0 [+3.0, +3.0], MDE 0.0 (3 pairs) |" in hiou
    assert "Faster R-CNN R18-FPN, shapes-pretrained backbone" in table
    # one row of the paper short: the table says so; one variant alone: no table
    without_iou = [r for r in runs if r.variant != "harmonic_tc_iou"]
    assert "| + plain IoU loss | `harmonic_tc_iou` | 38.7 | +0.2 | not run | n/a | n/a |" in markdown_ablation(without_iou)
    assert "| HIoU instead of IoU | `harmonic_tc_hiou` | 39.2 | +0.5 | 34.0 ± 1.0 | n/a |" in markdown_ablation(without_iou)
    assert markdown_ablation([r for r in runs if r.variant in ("harmonic", "harmonic_tc")]).startswith(
        "These sweeps hold fewer than two of the paper's ablation rows")  # no baseline

    rows = {row["claim"].split(" (")[0]: row for row in claims(runs, main_variant="harmonic_tc_hiou")}
    whole = rows["the ablation's whole method"]
    assert (whole["variant"], whole["reference"], whole["verdict"]) == ("harmonic_tc_hiou", "baseline", "supports")
    assert rows["a plain IoU loss raises AP, given the factors and task-contrasting"]["verdict"] == "contradicts"
    assert rows["the loss makes scores rank boxes by their IoU"]["variant"] == "harmonic_tc_hiou"
    ap75 = rows["the method raises AP75"]  # the paper's AP75 is the ablation's: read from the main variant
    assert (ap75["variant"], ap75["metric"], ap75["verdict"]) == ("harmonic_tc_hiou", "AP75", "supports")
    assert "harmonic_hiou" not in {row["variant"] for row in claims(runs, main_variant="harmonic_tc_hiou")}
    eq9 = rows['Eq. 9: dF/dx > 0 is "basically always true during training"']
    assert eq9["variant"] == "harmonic_tc_hiou" and eq9["verdict"] == "contradicts" and eq9["mean"] == pytest.approx(0.02)
    assert not [row for row in claims(runs) if row["metric"] == "reversed share"]  # harmonic_hiou has no runs here

    summary = summarize(runs)
    md = report_markdown(runs, summary, paired_differences(runs), main_variant="harmonic_tc_hiou")
    assert "### The paper's ablation [R], row by row beside ours [D]" in md and table in md
    assert "these runs train a small detector (Faster R-CNN R18-FPN, shapes-pretrained backbone)" in md
