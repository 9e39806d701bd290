"""The native C kernel of the fused focal loss: its approximations, its two code paths, and how it is
built, cached, checked and replaced when it cannot be built.

Values are compared with float64 evaluations of the closed form; nothing here times anything.
"""

from __future__ import annotations

import math
import re
import subprocess
import warnings

import numpy as np
import pytest
import torch

from harmonic.ops import focal as fused
from harmonic.ops import native
from harmonic.ops.focal import focal_loss_per_anchor

pytestmark = pytest.mark.skipif(native.load() is None, reason=f"native kernel unavailable: {native.failure()}")


def _coefficients(name: str) -> list[float]:
    text = native.SOURCE.read_text()
    body = re.search(name + r"\[\d+\] = \{([^}]*)\}", text).group(1)
    return [float(value.strip().rstrip("f")) for value in body.split(",")]


def _closed_form(logits: torch.Tensor, gt_classes: torch.Tensor, alpha: float, gamma: float):
    """Per-anchor loss and its gradient (upstream ones) of the focal sum, in float64."""
    x = logits.double().requires_grad_()
    target = torch.zeros_like(x)
    rows = torch.nonzero(gt_classes >= 0).squeeze(1)
    target[rows, gt_classes[rows]] = 1.0
    z = torch.where(target > 0, -x, x)
    w_pos, w_neg = (alpha, 1 - alpha) if alpha >= 0 else (1.0, 1.0)
    weight = torch.where(target > 0, w_pos, w_neg)
    loss = (weight * torch.sigmoid(z) ** gamma * torch.nn.functional.softplus(z)).sum(1)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _kernel(library, logits, gt_classes, alpha=0.25, gamma=2.0):
    loss, grad = fused._native_pass(logits, gt_classes, alpha, gamma, True, library=library)
    return loss, grad


@pytest.fixture(scope="module")
def portable():
    built, why = native.build(("-DHARMONIC_PORTABLE",))
    assert built is not None, why
    assert not built.avx512
    return built.library


# ----------------------------------------------------------------------------------------------------
# the approximations
# ----------------------------------------------------------------------------------------------------
def test_exp_polynomial_meets_its_stated_bound():
    coefficients = _coefficients("EXP_POLY")
    assert len(coefficients) == 7
    r = np.linspace(-math.log(2) / 2, math.log(2) / 2, 200001)
    approx = np.polynomial.polynomial.polyval(r, coefficients)
    assert np.abs(approx / np.exp(r) - 1).max() < 2e-9


def test_atanh_polynomial_meets_its_stated_bound():
    coefficients = _coefficients("ATANH_POLY")
    assert len(coefficients) == 5
    t = np.linspace(1e-12, 1 / 9, 200001)
    truth = np.arctanh(np.sqrt(t)) / np.sqrt(t)
    assert np.abs(np.polynomial.polynomial.polyval(t, coefficients) / truth - 1).max() < 4e-9
    # and log1p(u) = 2 atanh(u / (2 + u)) covers u in [0, 1] with (u / (2 + u))^2 <= 1/9
    u = np.linspace(0, 1, 1001)
    assert np.allclose(2 * np.arctanh(u / (2 + u)), np.log1p(u), rtol=1e-14, atol=0)
    assert ((u / (2 + u)) ** 2).max() <= 1 / 9


# ----------------------------------------------------------------------------------------------------
# values over the whole logit range, both code paths
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [2.0, 0.0, 1.0, 3.0, 1.5, 0.5])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("path", ["loaded", "portable"])
def test_every_logit_from_minus_100_to_100_within_a_few_ulp(gamma, alpha, path, portable):
    library = native.load() if path == "loaded" else portable
    grid = torch.linspace(-100.0, 100.0, 20009, dtype=torch.float32)  # 1819 rows of 11
    logits = grid[torch.randperm(grid.numel(), generator=torch.Generator().manual_seed(0))].reshape(-1, 11)
    gt_classes = (torch.arange(logits.shape[0]) % 13) - 2  # -2, -1 -> negative; 0..10 -> that class
    gt_classes = gt_classes.clamp_min(-1)
    loss, grad = _kernel(library, logits, gt_classes, alpha, gamma)
    true_loss, true_grad = _closed_form(logits, gt_classes, alpha, gamma)
    # relative 2e-6 (a few float32 ulp) wherever the true value is a normal float32; below that, flushed.
    # A non-integer gamma takes p^gamma = exp(gamma log p), whose relative error grows like
    # |gamma log p| * 2^-24: at most 87 * 6e-8 = 5.2e-6 while the result is a normal float32
    rtol = 2e-6 if gamma == int(gamma) else 6e-6
    torch.testing.assert_close(loss.double(), true_loss, rtol=rtol, atol=2e-38)
    torch.testing.assert_close(grad.double(), true_grad, rtol=rtol, atol=2e-38)


def test_avx512_and_portable_loops_agree_to_the_last_bits(portable):
    if not native.info()["avx512"]:
        pytest.skip("this CPU or compiler builds the portable loop only")
    generator = torch.Generator().manual_seed(1)
    logits = -4.6 + 3.0 * torch.randn(333, 80, generator=generator)
    gt_classes = torch.randint(-1, 80, (333,), generator=generator)
    loaded = _kernel(native.load(), logits, gt_classes)
    other = _kernel(portable, logits, gt_classes)
    torch.testing.assert_close(loaded[0], other[0], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(loaded[1], other[1], rtol=1e-6, atol=1e-38)


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (1000, 1), (700, 7), (3, 3000), (130, 17), (5, 16)])
def test_blocks_tails_and_targets_at_every_shape(rows, cols, portable):
    # blocks hold 2048 entries in whole rows: these shapes cover single-row blocks, rows wider than a
    # block, vector tails of every length, and target entries at the first and last column
    generator = torch.Generator().manual_seed(rows * 31 + cols)
    logits = -2.0 + 4.0 * torch.randn(rows, cols, generator=generator)
    gt_classes = torch.randint(-1, cols, (rows,), generator=generator)
    gt_classes[0] = cols - 1
    if rows > 1:
        gt_classes[1] = 0
    true_loss, true_grad = _closed_form(logits, gt_classes, 0.25, 2.0)
    for library in (native.load(), portable):
        loss, grad = _kernel(library, logits, gt_classes)
        torch.testing.assert_close(loss.double(), true_loss, rtol=2e-6, atol=1e-30)
        torch.testing.assert_close(grad.double(), true_grad, rtol=2e-6, atol=1e-30)


def test_gcc_vectorizes_the_portable_loop(tmp_path):
    # the loop every CPU without AVX-512 runs: gcc leaves it scalar unless the first flag sets let it
    # evaluate both sides of the formulas' selects (-fno-trapping-math), about 5x slower
    compiler = native._compilers()[0]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    if "Free Software Foundation" not in version:
        pytest.skip(f"{compiler} is not gcc: its vectorization report differs")
    source = native.SOURCE.read_text().splitlines()
    portable_start = source.index("#define HARMONIC_AVX512 0")
    pragma = next(k for k in range(portable_start, len(source)) if source[k].strip() == "#pragma omp simd")
    end = next(k for k in range(pragma, len(source)) if source[k] == "}")
    lines = range(pragma + 2, end + 1)  # 1-based numbers of the loop's lines, which gcc reports the loop at
    flags = native.FLAG_SETS[1]
    assert "-fno-trapping-math" in flags and "-fno-trapping-math" in native.FLAG_SETS[0]
    command = native.build_command(compiler, (*flags, "-DHARMONIC_PORTABLE", "-fopt-info-vec-optimized"), tmp_path / "k.so")
    report = subprocess.run(command, capture_output=True, text=True)  # the build's own command line
    assert report.returncode == 0, report.stderr
    vectorized = {int(m) for m in re.findall(r"focal_loss\.c:(\d+):\d+: optimized: loop vectorized", report.stderr)}
    assert vectorized & set(lines), report.stderr


def test_values_only_call_matches_values_with_gradient():
    logits = torch.randn(900, 9, generator=torch.Generator().manual_seed(2))
    gt_classes = torch.randint(-1, 9, (900,), generator=torch.Generator().manual_seed(3))
    with_grad, _ = fused._native_pass(logits, gt_classes, 0.25, 2.0, True)
    values_only, none = fused._native_pass(logits, gt_classes, 0.25, 2.0, False)
    assert none is None
    assert torch.equal(with_grad, values_only)


def test_a_nan_logit_gives_nan_in_its_row_only():
    logits = torch.zeros(3, 20)
    logits[1, 5] = float("nan")
    loss, grad = _kernel(native.load(), logits, torch.tensor([-1, 2, 19]))
    assert math.isnan(loss[1]) and math.isnan(grad[1, 5])
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()
    assert torch.isfinite(grad[1, :5]).all()


# ----------------------------------------------------------------------------------------------------
# building, caching, checking, falling back
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """An empty kernel cache and no remembered library (restored afterwards)."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setattr(fused, "_NATIVE_WARNED", [])
    return tmp_path / "cache"


def test_built_once_then_loaded_from_the_cache(fresh_native, monkeypatch):
    assert native.load() is not None
    built = list(fresh_native.glob("focal_loss-*"))
    assert len(built) == 1 and not list(fresh_native.glob("*.tmp"))
    info = native.info()
    assert info["available"] and info["file"] == built[0].name
    native.reset()
    calls = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        calls.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(native.subprocess, "run", counting_run)
    assert native.load() is not None
    assert all("--version" in command for command in calls)  # identified the compiler; compiled nothing


def test_cache_key_follows_the_source(fresh_native, tmp_path, monkeypatch):
    native.load()
    edited = tmp_path / "focal_loss.c"
    edited.write_text(native.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    native.reset()
    assert native.load() is not None
    assert len(list(fresh_native.glob("focal_loss-*"))) == 2


def test_a_wrong_kernel_is_refused_and_the_eager_pass_takes_over(fresh_native, tmp_path, monkeypatch):
    broken = tmp_path / "focal_loss.c"
    broken.write_text(native.SOURCE.read_text().replace("0.499999920785491f", "0.45f"))
    monkeypatch.setattr(native, "SOURCE", broken)
    assert native.load() is None
    assert "disagrees" in native.failure()
    assert not list(fresh_native.glob("focal_loss-*"))  # refused libraries are not cached
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(4))
    gt_classes = torch.randint(-1, 4, (50,), generator=torch.Generator().manual_seed(5))
    eager = focal_loss_per_anchor(logits, gt_classes, backend="eager")
    with pytest.warns(RuntimeWarning, match="native CPU kernel is unavailable .*disagrees"):
        auto = focal_loss_per_anchor(logits, gt_classes, backend="auto")
    assert torch.equal(auto, eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        assert torch.equal(focal_loss_per_anchor(logits, gt_classes, backend="native"), eager)
    assert fused.active_backend("auto", "cpu") == "eager"


def test_no_compiler_is_reported_by_name(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-anywhere")
    assert native.load() is None
    assert "no-such-compiler-anywhere" in native.failure()
    assert native.info() == {"available": False, "failure": native.failure()}


def test_an_unwritable_cache_folder_falls_back_to_a_temporary_one(fresh_native, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv(native.CACHE_ENV, str(blocker / "cache"))
    assert native.load() is not None
    assert native.info()["available"]


def test_first_build_inside_inference_mode_and_without_a_home_folder(fresh_native, monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(native, "cache_dir", no_home)
    with torch.inference_mode():  # the self-test needs no autograd
        loss = focal_loss_per_anchor(torch.zeros(3, 4), torch.tensor([-1, 0, 3]))
    assert native.failure() is None and native.info()["available"]
    assert torch.allclose(loss, focal_loss_per_anchor(torch.zeros(3, 4), torch.tensor([-1, 0, 3]), backend="eager"))
