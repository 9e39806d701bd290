import json
import os
import time
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from harmonic.cli import main as cli_main
from harmonic.experiments import notebooks as reproduce
from harmonic.experiments.notebooks import PROFILES, NotebookError, declared_parameters, run_notebook
from harmonic.experiments.sweeps import SWEEPS
from harmonic.utils.figures import FIGSIZE

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
LANDSCAPE_FIGURES = ("fig1a_grad_t", "fig1b_grad_t_standard", "fig1a_signed", "fig2_grad_p", "fig4_hiou")


def _has_error_output(notebook) -> bool:
    return any(o.get("output_type") == "error" for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


# ----------------------------------------------------------------------------------------------------
# notebook sources: output-free, parameterized, the python3 kernel
# ----------------------------------------------------------------------------------------------------
def test_there_are_notebooks():
    assert "02_loss_landscapes" in [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_source_is_output_free_and_parameterized(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code, "no code cells"
    for cell in code:
        assert cell.outputs == [], f"{path.name}: a code cell has outputs"
        assert cell.execution_count is None, f"{path.name}: a code cell has an execution count"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    assert declared_parameters(path), f"{path.name}: the parameters cell assigns nothing"


# ----------------------------------------------------------------------------------------------------
# the profile table
# ----------------------------------------------------------------------------------------------------
def test_profiles_cover_the_same_notebooks_and_use_declared_parameters():
    assert set(PROFILES) >= {"default", "quick", "smoke"}
    assert list(PROFILES["default"]) == list(PROFILES["smoke"]) == list(PROFILES["quick"])
    quick_runs = PROFILES["quick"]["03_train_eval"]
    assert [params["preset"] for _, params in quick_runs] == ["shapes-quick", "shapes-quick"]
    present = {p.stem: p for p in NOTEBOOKS}
    for profile, table in PROFILES.items():
        names = [name for entries in table.values() for name, _ in entries]
        assert len(names) == len(set(names)), f"{profile}: duplicate output names"
        for stem, entries in table.items():
            if stem in present:
                declared = declared_parameters(present[stem])
                for _, params in entries:
                    assert set(params) <= declared, f"{profile}/{stem}: {set(params) - declared}"


def test_select_filters_by_stem_and_rejects_unknown_names():
    runs = reproduce.select("smoke", ["02_loss_landscapes"])
    assert [(stem, name) for stem, name, _ in runs] == [("02_loss_landscapes", "02_loss_landscapes")]
    assert len(reproduce.select("smoke", ["01_derivations,02_loss_landscapes"])) == 2
    with pytest.raises(ValueError, match="not in profile"):
        reproduce.select("smoke", ["nope"])
    with pytest.raises(ValueError, match="unknown profile"):
        reproduce.select("everything")


def test_cli_lists_profiles_and_rejects_bad_input(tmp_path, capsys):
    assert cli_main(["reproduce", "--list"]) == 0
    assert "02_loss_landscapes" in capsys.readouterr().out
    assert cli_main(["reproduce", "--profile", "smoke", "--only", "nope", "--results-dir", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["reproduce", "--profile", "everything"])
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_to_start_when_a_notebook_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PROFILES, "test", {"99_missing": [("99_missing", {})]})
    assert cli_main(["reproduce", "--profile", "test", "--results-dir", str(tmp_path)]) == 2
    assert "99_missing" in capsys.readouterr().err


def test_run_notebook_rejects_unknown_parameters_and_missing_notebooks(tmp_path):
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['gird'\]"):
        run_notebook("02_loss_landscapes", {"gird": 5}, tmp_path / "out.ipynb")
    with pytest.raises(FileNotFoundError, match="99_missing"):
        run_notebook("99_missing", {}, tmp_path / "out.ipynb")
    assert list(tmp_path.iterdir()) == []


def test_reproduce_runs_the_profile_in_order_and_passes_results_dir(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(reproduce, "run_notebook", lambda stem, params, out, **kw: calls.append((stem, params, out)))
    assert cli_main(["reproduce", "--profile", "smoke", "--results-dir", str(tmp_path), "--no-progress", "--jobs", "1"]) == 0
    expected = [(stem, name) for stem, entries in PROFILES["smoke"].items() for name, _ in entries]
    assert [c[0] for c in calls] == [stem for stem, _ in expected]
    for (_, params, out), (_, name) in zip(calls, expected):
        assert params["results_dir"] == str(tmp_path.resolve())
        assert out == tmp_path / f"{name}.ipynb"
    assert "train_overrides" not in calls[2][1]  # one job: the training runs keep the default threads
    assert calls[1][1]["grid"] == PROFILES["smoke"]["02_loss_landscapes"][0][1]["grid"]
    assert reproduce._parameter_path(reproduce.ROOT / "results" / "smoke") == str(Path("results", "smoke"))
    timing = json.loads((tmp_path / "reproduce_timing.json").read_text())
    assert timing["notebooks"] == len(expected) and "total_wall_minutes" not in timing
    # make passes the moment it started: the timing then counts from there (environment setup included)
    assert cli_main(["reproduce", "--profile", "smoke", "--results-dir", str(tmp_path), "--no-progress", "--jobs", "1",
                     "--started-at", str(time.time() - 600)]) == 0
    timing = json.loads((tmp_path / "reproduce_timing.json").read_text())
    assert 10.0 <= timing["total_wall_minutes"] < 11.0 and timing["wall_minutes"] < 1.0


@pytest.mark.parametrize("profile, sweep", [("long", "long"), ("faster_rcnn", "faster_rcnn_ablation"),
                                            ("faster_rcnn_long", "faster_rcnn_long"),
                                            ("faster_rcnn_data", "faster_rcnn_data"),
                                            ("faster_rcnn_data_long", "faster_rcnn_data_long")])
def test_a_side_profile_trains_beside_the_default_and_reports_into_its_own_folder(tmp_path, monkeypatch, profile, sweep):
    calls = []
    monkeypatch.setattr(reproduce, "run_notebook", lambda stem, params, out, **kw: calls.append((stem, params, out)))
    assert cli_main(["reproduce", "--profile", profile, "--results-dir", str(tmp_path), "--no-progress", "--jobs", "1"]) == 0
    training = [c for c in calls if c[0] == "03_train_eval"]
    assert [c[2] for c in training] == [tmp_path / "runs" / name / "03_train_eval.ipynb" for name, _ in SWEEPS[sweep].runs()]
    assert all(c[1]["results_dir"] == str(tmp_path.resolve()) and "output_dir" not in c[1] for c in training)
    rest = {c[0]: c for c in calls if c[0] != "03_train_eval"}
    assert sorted(rest) == ["04_convergence", "05_results"]
    for stem, params, out in rest.values():
        assert out == tmp_path / profile / f"{stem}.ipynb"
        assert params["output_dir"] == str((tmp_path / profile).resolve())
        assert params["results_dir"] == str(tmp_path.resolve())  # the runs are read where they were trained
    assert rest["05_results"][1]["sweeps"] == [sweep]
    # notebook 04 draws seed 0 of runs the sweep trains, the baseline among them
    drawn = set(rest["04_convergence"][1]["runs"].values())
    assert drawn <= {name for name, params in SWEEPS[sweep].runs() if params["seed"] == 0}
    assert any(name.endswith("-baseline-s0") for name in drawn) and len(drawn) == min(3, len(SWEEPS[sweep].variants))
    if profile == "long":
        assert drawn == {f"long-{v}-s0" for v in SWEEPS["long"].variants}
    else:  # the ablation's full method is the variant its verdict is about
        assert rest["05_results"][1]["main_variant"] == "harmonic_tc_hiou" in SWEEPS[sweep].variants
    assert (tmp_path / profile / "reproduce_timing.json").is_file() and not (tmp_path / "reproduce_timing.json").exists()
    assert reproduce.DEFAULT_RESULTS_DIRS[profile] == "results"


def test_reproduce_stops_at_a_failure_unless_keep_going(tmp_path, monkeypatch, capsys):
    calls = []

    def failing(stem, params, out, **kw):
        calls.append(stem)
        raise NotebookError(f"notebook {stem} failed (boom); partial output kept at x.failed.ipynb", None)

    monkeypatch.setattr(reproduce, "run_notebook", failing)
    assert cli_main(["reproduce", "--profile", "smoke", "--results-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert calls == ["01_derivations"] and "x.failed.ipynb" in err and "not run: ['02_loss_landscapes'" in err
    calls.clear()
    assert cli_main(["reproduce", "--profile", "smoke", "--results-dir", str(tmp_path), "--keep-going"]) == 1
    assert calls == [stem for stem, entries in PROFILES["smoke"].items() for _ in entries]


def test_parallel_jobs_group_training_runs_and_give_each_one_thread(tmp_path, monkeypatch):
    import threading

    seen = []
    barrier = threading.Barrier(2, timeout=10)

    def fake(stem, params, out, **kw):
        seen.append((stem, dict(params)))
        if stem == "03_train_eval":
            barrier.wait()  # both training runs must be in flight at once, or this times out

    monkeypatch.setattr(reproduce, "run_notebook", fake)
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 2)
    assert cli_main(["reproduce", "--profile", "smoke", "--results-dir", str(tmp_path), "--jobs", "2"]) == 0
    training = [p for stem, p in seen if stem == "03_train_eval"]
    assert len(training) == 2 and all(p["train_overrides"] == {"num_threads": 1} for p in training)
    assert [stem for stem, _ in seen][-2:] == ["04_convergence", "05_results"]
    assert list(reproduce._groups([("a", 1, {}), ("03_train_eval", 2, {}), ("03_train_eval", 3, {}), ("b", 4, {})], 2)) == [
        [("a", 1, {})], [("03_train_eval", 2, {}), ("03_train_eval", 3, {})], [("b", 4, {})]]
    with pytest.raises(ValueError, match="jobs"):
        reproduce.resolve_jobs(0)


def test_sweep_option_runs_the_named_sweep(tmp_path, monkeypatch, capsys):
    seen = []

    def fake_run_sweep(sweep, results_dir, run_notebook, *, jobs, threads):
        seen.append((sweep.name, results_dir))
        assert (jobs, threads) == (2, max(1, (os.cpu_count() or 1) // 2))
        assert run_notebook is reproduce.run_notebook
        return {"sweep": sweep.name, "runs": {"a": {"status": "done"}, "b": {"status": "failed"}}}

    monkeypatch.setattr(reproduce, "run_sweep", fake_run_sweep)
    assert cli_main(["reproduce", "--sweep", "attribution", "--results-dir", str(tmp_path), "--jobs", "2"]) == 1
    assert seen == [("attribution", str(tmp_path.resolve()))] and "['b']" in capsys.readouterr().err
    assert cli_main(["reproduce", "--sweep", "nope"]) == 2


# ----------------------------------------------------------------------------------------------------
# executing the notebooks (a kernel each: a few seconds)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_loss_landscapes_notebook_writes_every_figure(tmp_path, capfd):
    dpi = 30
    out = run_notebook(
        "02_loss_landscapes",
        {"grid": 15, "gammas": [0.5, 1.0], "dpi": dpi, "results_dir": str(tmp_path)},
        tmp_path / "02_loss_landscapes.ipynb",
        progress_bar=False,
    )
    assert out == tmp_path / "02_loss_landscapes.ipynb"
    executed = nbformat.read(out, as_version=4)
    assert not _has_error_output(executed)
    assert executed.metadata.papermill.input_path == "notebooks/02_loss_landscapes.ipynb"
    expected_size = (round(FIGSIZE[0] * dpi), round(FIGSIZE[1] * dpi))
    for name in LANDSCAPE_FIGURES:
        with Image.open(tmp_path / "figures" / f"{name}.png") as image:
            image.load()
            assert image.format == "PNG"
            assert image.size == expected_size, name
    shown = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(shown) == len(LANDSCAPE_FIGURES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["02_loss_landscapes.ipynb", "figures"]  # no kernel log
    err = capfd.readouterr().err
    assert "IPKernelApp" not in err and "KeyboardInterrupt" not in err  # the kernel's chatter went to its log


@pytest.mark.slow
@pytest.mark.skipif(not any(p.stem == "01_derivations" for p in NOTEBOOKS), reason="no 01_derivations notebook")
def test_derivations_notebook_runs_and_writes_its_checks(tmp_path):
    params = {"results_dir": str(tmp_path), **PROFILES["smoke"]["01_derivations"][0][1]}
    out = run_notebook("01_derivations", params, tmp_path / "01_derivations.ipynb", progress_bar=False)
    assert not _has_error_output(nbformat.read(out, as_version=4))
    checks = json.loads((tmp_path / "derivations.json").read_text())
    assert checks  # the notebook asserts that every check passed


@pytest.mark.slow
def test_a_failing_notebook_leaves_no_output_but_keeps_its_partial_copy(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("raise RuntimeError(f'boom {x}')"),
    ])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, notebooks / "bad.ipynb")
    output = tmp_path / "results" / "bad.ipynb"
    output.parent.mkdir()
    output.write_text("previous good copy")
    with pytest.raises(NotebookError, match="boom 2") as info:
        run_notebook("bad", {"x": 2}, output, notebooks_dir=notebooks, progress_bar=False)
    assert output.read_text() == "previous good copy"
    partial = info.value.partial_path
    assert partial == output.with_name("bad.failed.ipynb") and str(partial) in str(info.value)
    assert _has_error_output(nbformat.read(partial, as_version=4))
    assert sorted(p.name for p in output.parent.iterdir()) == ["bad.failed.ipynb", "bad.ipynb", "bad.kernel.log"]
    assert "bad.kernel.log" in str(info.value)  # the kernel's own log is kept and named when a notebook fails


def test_executed_notebooks_name_no_folder_of_this_machine(tmp_path):
    # a warning printed by a cell names a file under the repository root (for example in .venv): the
    # executed copy, a shared result, writes it relative to the root
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("import warnings")
    root_file = reproduce.ROOT / ".venv" / "lib" / "tqdm" / "auto.py"
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text=f"{root_file}:21: SomeWarning: x\n")]
    notebook.cells.append(cell)
    notebook.metadata["papermill"] = {"input_path": "/abs/in.ipynb", "output_path": "/abs/out.ipynb"}
    tmp = tmp_path / "run.ipynb"
    nbformat.write(notebook, tmp)
    reproduce._finalize(tmp, reproduce.ROOT / "notebooks" / "03_train_eval.ipynb", tmp_path / "out.ipynb")
    written = nbformat.read(tmp, as_version=4)
    assert written.cells[0].outputs[0]["text"] == ".venv/lib/tqdm/auto.py:21: SomeWarning: x\n"
    assert written.metadata.papermill.input_path == "notebooks/03_train_eval.ipynb"
