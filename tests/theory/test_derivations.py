import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import harmonic.losses as losses
import harmonic.theory.derivations as hd
from harmonic.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
W_INV_E = 0.27846454276107379510685  # Lambert W(1/e), the root of 1 + p + log p


@pytest.fixture(scope="module")
def results():
    return hd.checks(n_points=16, seed=0)


# ----------------------------------------------------------------------------------------------------
# the checks themselves
# ----------------------------------------------------------------------------------------------------
def test_every_check_passes(results):
    failed = [(c.equation, c.statement, c.detail) for c in results if not c.passed]
    assert failed == []


def test_checks_cover_every_equation_with_both_kinds(results):
    sympy_eqs = {c.equation for c in results if c.kind == "sympy"}
    autograd_eqs = {c.equation for c in results if c.kind == "autograd"}
    assert {"Eq. 3", "Eq. 4", "Eq. 5", "Eq. 7", "Eq. 8", "Eq. 9", "Eq. 10", "Eq. 12", "Eq. 13"} <= sympy_eqs
    assert {"Eq. 5", "Eq. 8", "Eq. 9", "Eq. 10", "Eq. 12"} <= autograd_eqs
    assert {c.tag for c in results} == {"[S]", "[D]"}
    assert all(c.statement and c.detail for c in results)
    assert all(c.latex for c in results if c.kind == "sympy")


def test_erratum_rows(results):
    erratum = [c for c in results if c.erratum]
    assert {(c.equation, c.kind, c.tag) for c in erratum} == {("Eq. 12", "sympy", "[D]"), ("Eq. 12", "autograd", "[D]")}
    assert all(c.passed for c in erratum)
    assert "NOT the derivative" in next(c for c in erratum if c.kind == "sympy").statement


def test_printed_eq12_is_not_the_derivative():
    u, g = sp.symbols("u gamma", positive=True)
    derivative = sp.diff((1 + u) ** g * (1 - u), u)
    assert sp.simplify(derivative - hd.corrected_eq12(u, g)) == 0
    point = {u: sp.Rational(1, 2), g: sp.Rational(4, 5)}
    printed, true = hd.printed_eq12(u, g).subs(point), derivative.subs(point)
    assert abs(float(printed - true)) > 0.5  # -1.5215 vs -1.0143
    assert float(printed / true) == pytest.approx(1.5)  # the factor 1 + IoU
    # same sign on [0, 1] for gamma on both sides of 1
    grid = np.linspace(0.0, 1.0, 101)
    for gamma in (0.5, 0.8, 1.0, 1.5, 3.0):
        assert np.array_equal(np.sign(hd.printed_eq12(grid, gamma)), np.sign(hd.corrected_eq12(grid, gamma)))


def test_eq13_threshold_values():
    assert hd.printed_eq13_threshold(0.8) < 0
    assert hd.printed_eq13_threshold(1.0) == 0
    assert hd.printed_eq13_threshold(3.0) == pytest.approx(0.5)
    # gamma = 3: the derivative is positive below IoU = 0.5, negative above
    assert hd.corrected_eq12(0.4, 3.0) > 0 > hd.corrected_eq12(0.6, 3.0)


def test_numeric_closed_forms_known_values():
    # Eq. 8 at x = 0, y = 1: 1 + e^-1 - 1 = e^-1; Eq. 10 at p = 1/2, L = 0: 0 - 2 / 0.5 = -4
    assert hd.printed_eq8(0.0, 1.0) == pytest.approx(math.exp(-1))
    assert hd.printed_eq10(0.5, 0.0) == pytest.approx(-4.0)
    assert hd.printed_eq9_threshold(1.0) == pytest.approx(-math.log(1 + math.exp(-1)))
    assert hd.printed_eq5(0.5, 0.0, 2.0) == pytest.approx(2 * (1.5 + math.log(0.5)))


# ----------------------------------------------------------------------------------------------------
# bracket_root
# ----------------------------------------------------------------------------------------------------
def test_bracket_root_at_zero_and_sign_on_both_sides():
    root = hd.bracket_root(0.0)
    assert isinstance(root, float)
    assert root == pytest.approx(W_INV_E, rel=1e-13)
    assert round(root, 4) == 0.2785
    assert hd.bracket(root - 1e-3, 0.0) < 0 < hd.bracket(root + 1e-3, 0.0)
    for L in (0.3, 1.0, 2.0):
        r = hd.bracket_root(L)
        assert hd.bracket(0.9 * r, L) < 0 < hd.bracket(1.1 * r, L)


def test_bracket_root_is_decreasing_in_L_with_limits():
    L = np.linspace(-5.0, 5.0, 201)
    roots = hd.bracket_root(L)
    assert roots.shape == L.shape
    assert np.all(np.diff(roots) < 0)  # strictly decreasing: a larger regression loss lowers p*
    assert np.all((roots > 0) & (roots < 1))
    assert hd.bracket_root(-800.0) == 1.0
    assert hd.bracket_root(1000.0) == 0.0
    assert hd.bracket_root(math.inf) == 0.0
    assert hd.bracket_root(2.0) < 0.001  # p* collapses quickly: exp(-e^L) behaviour


def test_bracket_root_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        hd.bracket_root([0.0, float("nan")])


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=-20.0, max_value=5.0, allow_nan=False))
def test_bracket_root_solves_bracket(L):
    root = hd.bracket_root(L)
    assert 0.0 < root < 1.0
    # B is increasing in p with slope 1 + e^-L / p, so a small residual means an accurate root
    assert abs(hd.bracket(root, L)) < 1e-9 * (1 + math.exp(-L) / root)


# ----------------------------------------------------------------------------------------------------
# the checks detect what they claim to detect
# ----------------------------------------------------------------------------------------------------
def test_wrong_eq5_closed_form_fails(monkeypatch):
    monkeypatch.setattr(hd, "printed_eq5", lambda p, L, dL: (1 + p) * dL)  # drops the e^-L log p term
    results = hd.checks(n_points=8, seed=0)
    failed = {(c.equation, c.kind) for c in results if not c.passed}
    assert ("Eq. 5", "sympy") in failed and ("Eq. 5", "autograd") in failed
    assert all(c.passed for c in results if c.equation != "Eq. 5")


def test_detached_loss_implementation_fails_the_autograd_check(monkeypatch):
    original = losses.harmonic_loss
    monkeypatch.setattr(hd, "harmonic_loss",
                        lambda c, r, *, detach_factors=False, reduction="none": original(
                            c, r, detach_factors=True, reduction=reduction))
    results = hd.autograd_checks(n_points=8, seed=0)
    failed = {c.statement for c in results if not c.passed}
    assert any("Eq. 5 matches autograd" in s for s in failed)
    assert any("Eq. 10 matches autograd" in s for s in failed)


def test_check_validates_fields():
    with pytest.raises(ValueError, match="tag"):
        hd.Check("Eq. 5", "x", "[X]", True, "sympy")
    with pytest.raises(ValueError, match="kind"):
        hd.Check("Eq. 5", "x", "[S]", True, "numeric")


@pytest.mark.parametrize("n_points", [0, -3, 2.5, True])
def test_checks_reject_bad_n_points(n_points):
    with pytest.raises(ValueError, match="n_points"):
        hd.checks(n_points=n_points)


def test_an_exception_becomes_a_failed_row(monkeypatch):
    def boom(u, g):
        raise RuntimeError("broken")

    monkeypatch.setattr(hd, "corrected_eq12", boom)
    results = hd.sympy_checks()
    bad = [c for c in results if not c.passed]
    assert len(bad) == 1 and "RuntimeError: broken" in bad[0].detail and bad[0].equation == "Eq. 11-13"


# ----------------------------------------------------------------------------------------------------
# the verify command
# ----------------------------------------------------------------------------------------------------
def test_verify_subprocess_passes_and_prints_the_erratum(tmp_path):
    out = tmp_path / "nested" / "checks.json"
    proc = subprocess.run(
        [sys.executable, "-m", "harmonic", "verify", "--n-points", "8", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hd.ERRATUM_LINE in proc.stdout
    assert "FAIL" not in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("PASS")]
    data = json.loads(out.read_text())
    assert len(rows) == data["n_checks"] == len(data["checks"]) >= 25
    assert data["all_passed"] is True and data["n_failed"] == 0
    assert data["provenance"]["parameters"]["n_points"] == 8
    assert [p.name for p in out.parent.iterdir()] == ["checks.json"]  # no temporary file left behind


def test_verify_exits_nonzero_on_a_corrupted_check(monkeypatch, capsys):
    monkeypatch.setattr(hd, "corrected_eq12", hd.printed_eq12)  # "correct" the erratum away
    assert cli_main(["verify", "--n-points", "4"]) == 1
    captured = capsys.readouterr()
    assert "FAIL  Eq. 12" in captured.out
    assert hd.ERRATUM_LINE not in captured.out  # the erratum row itself fails: printed / "corrected" != 1 + IoU
    assert "FAILED Eq. 12" in captured.err


def test_verify_rejects_bad_n_points(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["verify", "--n-points", "0"])
    assert exc.value.code == 2
    assert "--n-points" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_verify_rejects_unavailable_device(capsys):
    assert cli_main(["verify", "--n-points", "2", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_checks_json_round_trips(tmp_path):
    results = [hd.Check("Eq. 8", "s", "[S]", True, "sympy"), hd.Check("Eq. 12", "e", "[D]", False, "autograd", True)]
    path = hd.write_checks_json(tmp_path / "c.json", results, {"n_points": 1}, seed=3)
    data = json.loads(path.read_text())
    assert data["all_passed"] is False and data["n_failed"] == 1 and data["n_checks"] == 2
    assert [hd.Check(**c) for c in data["checks"]] == results
    assert data["provenance"]["seed"] == 3


# ----------------------------------------------------------------------------------------------------
# presentation helpers (notebook 01)
# ----------------------------------------------------------------------------------------------------
def test_select_filters_by_equation_kind_and_tag(results):
    eq5 = hd.select(results, "Eq. 5")
    assert eq5 and all(c.equation == "Eq. 5" for c in eq5)
    derived = hd.select(results, "Eq. 5", tag="[D]")
    stated = hd.select(results, "Eq. 5", tag="[S]")
    assert derived and stated and len(derived) + len(stated) == len(eq5)
    assert all(c.tag == "[D]" for c in derived) and all(c.tag == "[S]" for c in stated)
    assert hd.select(results, "Eq. 5", kind="autograd", tag="[D]") == [
        c for c in eq5 if c.kind == "autograd" and c.tag == "[D]"]
    assert hd.select(results, "Eq. 3", "Eq. 4") == [c for c in results if c.equation in ("Eq. 3", "Eq. 4")]
    assert hd.select(results) == list(results)


def test_equations_markdown_shows_each_selected_check_with_its_formula(results):
    text = hd.equations_markdown(results, "Eq. 12")
    chosen = hd.select(results, "Eq. 12")
    assert text == "\n\n".join(hd.check_markdown(c) for c in chosen)
    for c in chosen:
        assert c.statement in text and c.detail in text
        if c.latex:
            assert f"$${c.latex}$$" in text
    assert text.count("**ERRATUM in the supplement**") == sum(c.erratum for c in chosen) == 2
    assert hd.equations_markdown(results, "Eq. 99") == ""


def test_bracket_root_table_values():
    lines = hd.bracket_root_table([0.0, 1.0, 4.0]).splitlines()
    assert lines[0] == r"| $\mathcal{L}$ | $p^*(\mathcal{L})$ |" and lines[1] == "|---|---|"
    assert lines[2:] == ["| 0 | 0.2785 |", f"| 1 | {hd.bracket_root(1.0):.4g} |", "| 4 | 1.942e-24 |"]
    assert lines[3] == "| 1 | 0.05658 |"
    assert len(hd.bracket_root_table().splitlines()) == 2 + 7  # the default grid of L


def test_assert_passed_counts_or_names_the_failures():
    ok = hd.Check("Eq. 8", "dF/dx", "[S]", True, "sympy")
    bad = hd.Check("Eq. 12", "printed Eq. 12", "[D]", False, "autograd")
    assert hd.assert_passed([ok, ok]) == "2/2 checks passed"
    with pytest.raises(AssertionError, match=r"1 of 2 checks failed: Eq. 12 \(autograd\): printed Eq. 12"):
        hd.assert_passed([ok, bad])


# ----------------------------------------------------------------------------------------------------
# notebook 01
# ----------------------------------------------------------------------------------------------------
NOTEBOOK = REPO / "notebooks" / "01_derivations.ipynb"


def _cells(kind):
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == kind]


def test_notebook_writes_each_formula_once(results):
    # the text cells display only the two definitions the checks start from (Eq. 1 and Eq. 11) ...
    text = "\n".join(_cells("markdown"))
    displayed = [" ".join(f.split()) for f in re.findall(r"\$\$(.+?)\$\$", text, flags=re.S)]
    assert len(displayed) == 2
    assert displayed[0].startswith(r"\mathcal{L}_{Har} =") and displayed[1].startswith(r"\mathcal{L}_{HIoU} =")
    # inline math names symbols; the one relation is the regression offset, part of the Eq. 1 definition
    inline = re.findall(r"\$(.+?)\$", re.sub(r"\$\$.+?\$\$", "", text, flags=re.S))
    relations = [f for f in inline if re.search(r"[=<>]|\\(le|ge|iff|neq|approx)\b", f)]
    assert inline and relations == [r"t = d_i - \hat d_i"]
    # ... which no check states, and no check's formula is typed into a text cell
    for c in results:
        assert not c.latex or c.latex not in text
        assert all(d not in c.latex for d in displayed)
    # the code cells display every check exactly once, from the package
    code = "\n".join(_cells("code"))
    calls = re.findall(r"hd\.equations_markdown\(results, (.*?)\)\)\)", code)
    assert len(calls) == 5
    namespace = {"hd": hd, "results": results}
    shown = [c for args in calls for c in eval(f"hd.select(results, {args})", namespace)]  # the repository's notebook
    assert len(shown) == len(results) and all(shown.count(c) == 1 for c in results)
    # the provenance tags stay in the prose
    assert text.count("[S]") >= 8 and text.count("[D]") >= 4


@pytest.mark.slow
def test_notebook_runs_and_writes_passing_checks(tmp_path):
    papermill = pytest.importorskip("papermill")
    results_dir = tmp_path / "res"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "01_derivations.ipynb"), str(tmp_path / "01_derivations.ipynb"),
        parameters={"n_points": 8, "seed": 1, "results_dir": str(results_dir)},
        kernel_name="python3", cwd=str(REPO), progress_bar=False,
    )
    data = json.loads((results_dir / "derivations.json").read_text())
    assert data["all_passed"] is True
    assert data["checks"] and all(c["passed"] for c in data["checks"])
    assert any(c["erratum"] and c["equation"] == "Eq. 12" and c["kind"] == "sympy" for c in data["checks"])
    assert data["provenance"]["parameters"] == {"n_points": 8, "seed": 1}


def test_notebook_is_saved_clean():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(REPO / "notebooks" / "01_derivations.ipynb", as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "n_points = 64" in params[0].source and 'results_dir = "results"' in params[0].source


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autograd_checks_on_cuda():
    results = hd.autograd_checks(n_points=16, seed=0, device="cuda")
    assert results and all(c.passed for c in results)
