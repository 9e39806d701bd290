"""The fused per-anchor focal loss equals the reference composition; the benchmark writes what it says.

Equivalence only (values and gradients, every dtype, extreme logits, any upstream gradient), plus the
memory contract (one [A, K] tensor saved for backward). No timing assertions.
"""

from __future__ import annotations

import json
import math
import warnings

import bench
import pytest
import torch

from harmonic.models.head_loss import HarmonicOptions, dense_harmonic_loss
from harmonic.ops import focal as fused
from harmonic.ops import native
from harmonic.ops.focal import focal_loss_per_anchor, focal_loss_per_anchor_reference, select_focal_loss


@pytest.fixture(autouse=True, params=["native", "eager"])
def backend(request, monkeypatch):
    """Every test of this module runs with the native C kernel and with the eager torch pass as the
    default backend ("auto" resolves to native on CPU; CUDA tensors take eager either way)."""
    if request.param == "native" and native.load() is None:
        pytest.skip(f"native kernel unavailable here: {native.failure()}")
    monkeypatch.setenv(fused.BACKEND_ENV, request.param)
    return request.param


def _inputs(anchors=300, classes=7, positives=40, *, seed=0, scale=3.0, shift=-2.0, device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    logits = shift + scale * torch.randn(anchors, classes, generator=generator, dtype=torch.float64)
    gt_classes = torch.full((anchors,), -1, dtype=torch.int64)
    rows = torch.randperm(anchors, generator=generator)[:positives]
    gt_classes[rows] = torch.randint(0, classes, (positives,), generator=generator)
    upstream = torch.rand(anchors, generator=generator, dtype=torch.float64) * 2 - 0.5
    return logits.to(device=device, dtype=dtype), gt_classes.to(device), upstream.to(device)


def _value_and_grad(fn, logits, gt_classes, upstream, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, gt_classes, **kwargs)
    loss.backward(upstream.to(loss.dtype))
    return loss.detach(), x.grad


def _truth(logits, gt_classes, upstream, **kwargs):
    """The reference composition evaluated in float64."""
    return _value_and_grad(focal_loss_per_anchor_reference, logits.double(), gt_classes, upstream, **kwargs)


# ----------------------------------------------------------------------------------------------------
# values and gradients
# ----------------------------------------------------------------------------------------------------
def test_float32_matches_reference_for_a_random_upstream_gradient(device):
    logits, gt_classes, upstream = _inputs(device=device)
    value, grad = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream)
    ref_value, ref_grad = _value_and_grad(focal_loss_per_anchor_reference, logits, gt_classes, upstream)
    true_value, true_grad = _truth(logits, gt_classes, upstream)
    assert value.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(value.double(), true_value, rtol=2e-6, atol=1e-12)
    torch.testing.assert_close(grad.double(), true_grad, rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.0, 1.0, -1.0])
@pytest.mark.parametrize("gamma", [2.0, 0.0, 1.0, 1.5, 3.0])
def test_every_alpha_and_gamma_matches_reference_in_float64(alpha, gamma):
    logits, gt_classes, upstream = _inputs(anchors=60, classes=5, positives=15, seed=1, dtype=torch.float64)
    value, grad = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream, alpha=alpha, gamma=gamma)
    ref_value, ref_grad = _truth(logits, gt_classes, upstream, alpha=alpha, gamma=gamma)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


def test_without_positives_every_anchor_is_a_negative():
    logits, _, upstream = _inputs(seed=2)
    gt_classes = torch.full((logits.shape[0],), -1, dtype=torch.int64)
    value, grad = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream)
    true_value, true_grad = _truth(logits, gt_classes, upstream)
    torch.testing.assert_close(value.double(), true_value, rtol=2e-6, atol=1e-12)
    torch.testing.assert_close(grad.double(), true_grad, rtol=2e-6, atol=1e-12)
    # closed form of one entry: (1 - alpha) p^2 softplus(x) with p = sigmoid(x)
    x = logits[0, 0].double()
    p = torch.sigmoid(x)
    assert math.isclose(
        float(focal_loss_per_anchor(logits[:1, :1], gt_classes[:1])),
        float(0.75 * p * p * torch.nn.functional.softplus(x)),
        rel_tol=1e-6,
    )


def test_every_anchor_positive_and_rows_redone_exactly():
    logits, gt_classes, upstream = _inputs(anchors=50, classes=4, positives=50, seed=3, scale=6.0, shift=0.0)
    assert bool((gt_classes >= 0).all())
    value, grad = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream)
    true_value, true_grad = _truth(logits, gt_classes, upstream)
    torch.testing.assert_close(value.double(), true_value, rtol=2e-6, atol=1e-12)
    torch.testing.assert_close(grad.double(), true_grad, rtol=2e-6, atol=1e-12)


def test_confident_positive_row_has_no_cancellation():
    # the target entry's negative-form value (0.75 * 20 = 15) dwarfs the row's true loss (~1e-10): a
    # "subtract and add back" correction would leave an error of ~1e-6; the row is recomputed instead
    logits = torch.tensor([[20.0, -12.0, -15.0]])
    gt_classes = torch.tensor([0])
    value = focal_loss_per_anchor(logits, gt_classes)
    truth = focal_loss_per_anchor_reference(logits.double(), gt_classes)
    assert float(truth) < 1e-9
    assert math.isclose(float(value), float(truth), rel_tol=1e-5)


def test_extreme_logits_are_finite_and_exact():
    values = torch.tensor([100.0, -100.0, 88.0, -88.0, 50.0, -50.0, 20.0, -20.0, 0.0, 1e-8])
    logits = values.repeat(10, 1)
    gt_classes = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6, 7, 9])
    upstream = torch.linspace(-1.0, 2.0, 10, dtype=torch.float64)
    value, grad = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    true_value, true_grad = _truth(logits, gt_classes, upstream)
    torch.testing.assert_close(value.double(), true_value, rtol=2e-6, atol=0.0)
    torch.testing.assert_close(grad.double(), true_grad, rtol=2e-6, atol=1e-30)
    # a negative entry at x = 100 costs (1 - alpha) * softplus(100) = 75 exactly, with derivative 0.75;
    # a positive entry at x = -100 costs alpha * softplus(100) = 25, derivative -0.25
    single = focal_loss_per_anchor(torch.tensor([[100.0], [-100.0]]), torch.tensor([-1, 0]))
    assert single.tolist() == [75.0, 25.0]


def test_softplus_of_very_negative_logits_keeps_float32_precision():
    # softplus(-20) = 2.06e-9: float32 "x - logsigmoid(x)" cancels to 0 here, our log1p stays exact
    logits = torch.full((4, 3), -20.0)
    gt_classes = torch.full((4,), -1)
    value, grad = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, torch.ones(4, dtype=torch.float64))
    x = torch.tensor(-20.0, dtype=torch.float64)
    p = torch.sigmoid(x)
    soft = torch.nn.functional.softplus(x)
    expected_value = 3 * 0.75 * p * p * soft
    expected_grad = 0.75 * p * p * (2 * (1 - p) * soft + p)
    torch.testing.assert_close(value.double(), expected_value.expand(4), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad.double(), expected_grad.expand(4, 3), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_loss_in_float32_gradient_in_their_dtype(dtype, device):
    logits, gt_classes, upstream = _inputs(device=device, dtype=dtype, scale=2.0)
    value, grad = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    # same values as the reference on the same (rounded) logits computed in float64
    true_value, true_grad = _truth(logits, gt_classes, upstream)
    torch.testing.assert_close(value.double(), true_value, rtol=2e-6, atol=1e-9)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad.double(), true_grad, rtol=2 * eps, atol=1e-3 * eps)


def test_gradcheck_in_float64_across_chunk_boundaries():
    logits, gt_classes, _ = _inputs(anchors=11, classes=3, positives=4, seed=4, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    # 7 entries per chunk = 2 rows: six chunks, the last one short
    assert torch.autograd.gradcheck(lambda t: focal_loss_per_anchor(t, gt_classes, chunk_elements=7), (x,))


def test_chunking_changes_results_only_in_the_last_bits():
    # chunk shapes change which elements take the vectorized or the scalar code path of exp / log, and
    # the accumulation order of a row sum: differences of a few ulp, nothing more
    logits, gt_classes, upstream = _inputs(anchors=257, classes=9, positives=30, seed=5)
    results = [
        _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream, chunk_elements=chunk)
        for chunk in (1, 9 * 16, 9 * 100 + 5, None)
    ]
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-6, atol=0.0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-30)


def test_no_grad_path_equals_the_autograd_path():
    logits, gt_classes, upstream = _inputs(seed=6)
    value, _ = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream)
    with torch.no_grad():
        no_grad_value = focal_loss_per_anchor(logits.clone().requires_grad_(), gt_classes)
    assert not no_grad_value.requires_grad
    assert torch.equal(no_grad_value, value)
    half_logits = logits.to(torch.bfloat16)
    assert torch.equal(focal_loss_per_anchor(half_logits, gt_classes), _value_and_grad(
        focal_loss_per_anchor, half_logits, gt_classes, upstream)[0])


def test_backward_reuses_the_saved_tensor_only_when_the_graph_is_freed():
    logits, gt_classes, upstream = _inputs(seed=13)
    pointers = []

    def pack(tensor):
        pointers.append(tensor.data_ptr())
        return tensor

    x = logits.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = focal_loss_per_anchor(x, gt_classes)
    loss.backward(upstream.float())
    assert x.grad.data_ptr() == pointers[0]  # multiplied in place: no new [A, K] tensor
    y = logits.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = focal_loss_per_anchor(y, gt_classes)
    (grad,) = torch.autograd.grad(loss, y, upstream.float(), retain_graph=True)
    assert grad.data_ptr() != pointers[1]
    torch.testing.assert_close(grad, x.grad, rtol=0, atol=0)


def test_retain_graph_backward_twice_accumulates_the_same_gradient():
    logits, gt_classes, upstream = _inputs(seed=7)
    x = logits.clone().requires_grad_()
    loss = focal_loss_per_anchor(x, gt_classes)
    loss.backward(upstream.float(), retain_graph=True)
    first = x.grad.clone()
    loss.backward(upstream.float())
    torch.testing.assert_close(x.grad, 2 * first)


def test_non_contiguous_logits_and_empty_input():
    logits, gt_classes, upstream = _inputs(anchors=40, classes=6, positives=5, seed=8)
    transposed = logits.t().contiguous().t()  # same values, column-major strides
    assert not transposed.is_contiguous()
    value, grad = _value_and_grad(focal_loss_per_anchor, transposed, gt_classes, upstream)
    true_value, true_grad = _truth(logits, gt_classes, upstream)
    torch.testing.assert_close(value.double(), true_value, rtol=2e-6, atol=1e-12)
    torch.testing.assert_close(grad.double(), true_grad, rtol=2e-6, atol=1e-12)
    empty = torch.zeros(0, 6, requires_grad=True)
    loss = focal_loss_per_anchor(empty, torch.zeros(0, dtype=torch.int64))
    assert loss.shape == (0,)
    loss.sum().backward()
    assert empty.grad.shape == (0, 6)


def test_autocast_does_not_change_the_result():
    logits, gt_classes, upstream = _inputs(seed=9)
    expected = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream)
    assert torch.equal(under_autocast[0], expected[0]) and torch.equal(under_autocast[1], expected[1])


# ----------------------------------------------------------------------------------------------------
# memory contract
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_exactly_one_logits_sized_tensor_for_backward(dtype):
    logits, gt_classes, _ = _inputs(anchors=500, classes=10, positives=50, dtype=dtype)
    x = logits.clone().requires_grad_()
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        focal_loss_per_anchor(x, gt_classes)
    assert saved == [((500, 10), dtype)]
    # the same measure through the benchmark's helper, for the reference: many more bytes
    _, fused_bytes = bench.saved_tensor_bytes(lambda: focal_loss_per_anchor(x, gt_classes))
    _, reference_bytes = bench.saved_tensor_bytes(lambda: focal_loss_per_anchor_reference(x.float(), gt_classes))
    assert fused_bytes == 500 * 10 * x.element_size()
    assert reference_bytes > 3 * 500 * 10 * 4


# ----------------------------------------------------------------------------------------------------
# argument errors, device policy, integration
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("logits", "gt_classes", "kwargs", "message"),
    [
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int32), {}, "gt_classes must be an int64"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64), {}, "gt_classes has 5 entries"),
        (torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), {}, "logits must be a floating"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.int64), {}, "shape \\[A, K\\]"),
        (torch.zeros(4, 3), torch.tensor([0, 1, 3, -1]), {}, "gt_classes values must be -1"),
        (torch.zeros(4, 3), torch.tensor([0, -2, 1, -1]), {}, "got min -2"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), {"alpha": 1.5}, "alpha must be <= 1"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), {"alpha": float("nan")}, "alpha must be a finite"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), {"gamma": -1.0}, "gamma must be >= 0"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), {"backend": "triton"}, "backend must be one of"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), {"chunk_elements": 0}, "chunk_elements must be"),
    ],
)
def test_bad_arguments_are_named(logits, gt_classes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        focal_loss_per_anchor(logits, gt_classes, **kwargs)


def test_backend_environment_variable(monkeypatch):
    monkeypatch.delenv(fused.BACKEND_ENV, raising=False)
    assert fused.default_backend() == "auto"
    assert fused.active_backend(None, "cpu", torch.float32) == ("native" if native.load() is not None else "eager")
    assert fused.active_backend(None, "cpu", torch.float64) == "eager"
    assert fused.active_backend(None, "cuda", torch.float32) == "eager"
    assert fused.active_backend("eager", "cpu") == "eager"
    monkeypatch.setenv(fused.BACKEND_ENV, "compile")
    assert fused.default_backend() == "compile"
    monkeypatch.setenv(fused.BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match=fused.BACKEND_ENV):
        focal_loss_per_anchor(torch.zeros(2, 2), torch.zeros(2, dtype=torch.int64))


def test_is_faster_only_where_measured():
    assert fused.is_faster("cpu") is True
    assert fused.is_faster(torch.device("cpu")) is True
    assert fused.is_faster("cuda") is False
    assert select_focal_loss(None, "cpu") is focal_loss_per_anchor
    assert select_focal_loss(None, "cuda") is focal_loss_per_anchor_reference
    assert select_focal_loss(True, "cuda") is focal_loss_per_anchor


def test_dense_harmonic_loss_is_the_same_with_the_fused_focal_loss():
    logits, gt_classes, _ = _inputs(anchors=120, classes=6, positives=12, seed=10)
    positives = int((gt_classes >= 0).sum())
    generator = torch.Generator().manual_seed(0)
    xy = 50 * torch.rand(positives, 2, generator=generator)
    target_boxes = torch.cat([xy, xy + 20], dim=1)
    pred = (target_boxes + torch.randn(positives, 4, generator=generator)).requires_grad_()
    box_loss = torch.rand(positives, generator=generator)
    results = []
    for use_fused in (False, True):
        x = logits.clone().requires_grad_()
        p = pred.detach().clone().requires_grad_()
        out = dense_harmonic_loss(x, gt_classes, box_loss, p, target_boxes, num_foreground=positives, options=HarmonicOptions(fused=use_fused))
        (out["classification"] + out["bbox_regression"]).backward()
        results.append((out["classification"].detach(), out["bbox_regression"].detach(), x.grad, p.grad))
    for reference, fast in zip(*results):
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# the compile backend
# ----------------------------------------------------------------------------------------------------
def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "_COMPILE_FAILURE", [])
    logits, gt_classes, upstream = _inputs(seed=11)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        value, grad = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream, backend="compile")
    eager = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream, backend="eager")
    assert torch.equal(value, eager[0]) and torch.equal(grad, eager[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then the eager pass without a word
        assert torch.equal(focal_loss_per_anchor(logits, gt_classes, backend="compile"), eager[0])


@pytest.mark.slow
def test_compile_backend_matches_reference():
    logits, gt_classes, upstream = _inputs(anchors=600, classes=8, positives=40, seed=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a machine without a compiler falls back (tested above)
        value, grad = _value_and_grad(focal_loss_per_anchor, logits, gt_classes, upstream, backend="compile")
    true_value, true_grad = _truth(logits, gt_classes, upstream)
    torch.testing.assert_close(value.double(), true_value, rtol=2e-6, atol=1e-12)
    torch.testing.assert_close(grad.double(), true_grad, rtol=2e-6, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------------
def test_bench_quick_writes_sections_timings_and_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--out", str(out), "--device", "cpu", "--sections", "dense_loss"]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["provenance"]["parameters"]["quick"] is True
    assert result["provenance"]["argv"] == ["python tools/bench.py", *argv]
    assert list(result["sections"]) == ["dense_loss"]
    assert result["provenance"]["git"].keys() >= {"commit", "dirty"}
    section = result["sections"]["dense_loss"]
    methods = {row["method"] for row in section["rows"]}
    assert methods >= {"sigmoid", "stock", "reference", "fused_eager", "harmonic_fused", "harmonic_reference"}
    assert len({row["scale"] for row in section["rows"]}) == 3
    groups = {row["group"] for row in section["rows"]}
    assert groups == {"vs_stock", "vs_sigmoid"}
    for row in section["rows"]:
        ratio = "over_stock" if row["group"] == "vs_stock" else "over_sigmoid"
        for key in ("median_ms", "q1_ms", "q3_ms", "min_ms", ratio):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], key)
        assert row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
        if row["method"] not in ("sigmoid", "stock", "harmonic_reference"):
            # each fused method computes the value of the method it stands for (stock, or the reference
            # composition of the Harmonic loss)
            assert row["saved_tensors"] >= 1 and row["rel_diff"] < 1e-4, row["method"]
    for entry in section["summary"]:
        for key in ("harmonic_fused_over_stock", "harmonic_fused_over_sigmoid", "reference_over_stock"):
            assert math.isfinite(entry[key]) and entry[key] > 0
        assert entry["meets_stock_target"] == (entry["harmonic_fused_over_stock"] <= 0.5)
        assert entry["meets_sigmoid_target"] == (entry["harmonic_fused_over_sigmoid"] <= 4.0)
        assert entry["fused_backend"] == fused.active_backend(None, "cpu")
    assert section["machine"]["torch_threads"] >= 1
    printed = capsys.readouterr().out
    assert "fused_eager" in printed and "harmonic_fused_over_sigmoid" in printed


def test_bench_table_printer_is_generic():
    text = bench.format_tables("anything", {
        "title": "t",
        "rows": [{"a": 1, "b": 2.5}, {"a": 3, "c": "x"}],
        "notes": ["n1"],
        "machine": {"threads": 2, "nested": {"x": 1}},
        "empty": [],
    })
    lines = text.splitlines()
    assert lines[0] == "== anything: t"
    assert lines[2].split() == ["a", "b", "c"]
    assert lines[3].split() == ["1", "2.5"] and lines[4].split() == ["3", "x"]
    assert lines[5] == "-- machine: threads=2"
    assert lines[-1] == "note: n1" and len(lines) == 7


def test_bench_rejects_unknown_sections(tmp_path):
    with pytest.raises(SystemExit, match="unknown section"):
        bench.main(["--quick", "--out", str(tmp_path / "x.json"), "--sections", "nope"])
    assert not (tmp_path / "x.json").exists()
