"""The per-anchor sigmoid focal loss of a one-stage detector's dense classification term::

    FL_a = sum_k  w_t * (1 - p_t)^gamma * BCE(x_ak, t_ak),     p = sigmoid(x),  t_ak = [k == gt_a]

with ``w_t = alpha`` for the target entry and ``1 - alpha`` for the others (torchvision's
``sigmoid_focal_loss``, summed over the K classes of each anchor). In the Harmonic loss (supplement Eq. 1)
this sum is the ``CE_i`` of a sigmoid head.

Two implementations of the same values: :func:`focal_loss_per_anchor_reference` (torchvision's
composition) and :func:`focal_loss_per_anchor`, one pass that writes each entry's value and derivative,
so backward is one multiplication and autograd keeps one logits-sized tensor. Its backends
(:data:`BACKENDS`: a native C kernel on CPU, chunked torch operations, ``torch.compile``) and their
numerics are described in ``docs/fused-focal-loss.md``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torchvision.ops import sigmoid_focal_loss

from harmonic.ops import native

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "active_backend",
    "class_range",
    "positive_rows",
    "CHUNK_ELEMENTS",
    "COMPILE_CHUNK_ELEMENTS",
    "default_backend",
    "focal_loss_per_anchor",
    "focal_loss_per_anchor_reference",
    "check_logits_and_classes",
    "select_focal_loss",
    "backend_record",
    "is_faster",
]

#: how the dense pass runs: "auto" ("native" for CPU tensors where it builds, else "eager"), "native" (the C
#: kernel, CPU), "eager" (chunked in-place torch operations, always available) or "compile" (a
#: ``torch.compile`` kernel). "native" and "compile" fall back to "eager" with a warning where they fail.
BACKENDS = ("auto", "native", "eager", "compile")
#: environment variable that sets the default backend of a whole run (unset: "auto")
BACKEND_ENV = "HARMONIC_FUSED_BACKEND"

#: eager backend on CPU: entries of the [A, K] logits per chunk (rows = CHUNK_ELEMENTS // K): just
#: below torch's parallel grain size (32768), so that every operation runs on the calling thread, and
#: the chunk's buffers stay in the per-core cache. [D] measured on a shared 2-core machine: chunks
#: above the grain size are faster while the machine is idle but stall, by orders of magnitude, while
#: other processes run (``make bench`` times such a chunk size beside the default).
CHUNK_ELEMENTS = 32767
#: compile backend on CPU: entries per compiled call (bounds the kernel's temporary buffers)
COMPILE_CHUNK_ELEMENTS = 1 << 21


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------
def class_range(gt_classes: Tensor) -> tuple[int, int]:
    """``(min, max)`` of a non-empty int64 tensor.

    On CPU through NumPy on the same memory [D]: torch's reductions on ``[A]`` start a parallel region
    each (A is above torch's grain size), which stalls on a shared machine; NumPy's run on the calling
    thread and take microseconds here.
    """
    if gt_classes.device.type == "cpu":
        values = gt_classes.detach().numpy()
        return int(values.min()), int(values.max())
    low, high = torch.aminmax(gt_classes)
    return int(low), int(high)


def positive_rows(gt_classes: Tensor) -> Tensor:
    """Indices of the positive anchors (``gt_classes >= 0``), ascending, on ``gt_classes``' device
    (through NumPy on CPU, see :func:`class_range`)."""
    if gt_classes.device.type == "cpu":
        import numpy as np

        values = gt_classes.detach().numpy()
        return torch.from_numpy(np.flatnonzero(values >= 0).astype(np.int64, copy=False))
    return torch.nonzero(gt_classes >= 0).squeeze(1)


def _check_inputs(logits: object, gt_classes: object, alpha: object, gamma: object) -> tuple[float, float]:
    """Validate every argument; returns ``(alpha, gamma)`` as floats."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, Tensor) else repr(type(logits))
        raise ValueError(f"logits must be a floating-point tensor of shape [A, K], got {got}")
    if not isinstance(gt_classes, Tensor) or gt_classes.dtype != torch.int64 or gt_classes.dim() != 1:
        got = f"{tuple(gt_classes.shape)} {gt_classes.dtype}" if isinstance(gt_classes, Tensor) else repr(type(gt_classes))
        raise ValueError(f"gt_classes must be an int64 tensor of shape [A], got {got}")
    if gt_classes.shape[0] != logits.shape[0]:
        raise ValueError(f"gt_classes has {gt_classes.shape[0]} entries but logits has {logits.shape[0]} rows")
    if gt_classes.device != logits.device:
        raise ValueError(f"gt_classes is on {gt_classes.device} but logits is on {logits.device}")
    num_classes = logits.shape[1]
    low, high = class_range(gt_classes) if gt_classes.numel() else (-1, -1)
    if low < -1 or high >= num_classes:
        raise ValueError(
            f"gt_classes values must be -1 (negative) or a class index in [0, {num_classes - 1}] "
            f"(K = {num_classes} columns), got min {low} and max {high}"
        )
    for name, value in (("alpha", alpha), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if alpha > 1:
        raise ValueError(f"alpha must be <= 1 (a negative alpha switches the class weighting off), got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return float(alpha), float(gamma)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32 [D]."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _class_weights(alpha: float) -> tuple[float, float]:
    """``(w+, w-)``: ``alpha`` and ``1 - alpha``, or no weighting for ``alpha < 0`` (torchvision's rule)."""
    return (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# eager backend
# ----------------------------------------------------------------------------------------------------
def _negative_terms(
    z: Tensor,
    buffers: tuple[Tensor, Tensor, Tensor],
    weight: float,
    gamma: float,
    *,
    grad_out: Tensor | None = None,
    row_sum_out: Tensor | None = None,
) -> None:
    """``l-`` and ``l-'`` of every element of ``z`` (module docstring), written into the given tensors.

    ``grad_out`` (shaped like ``z``) receives ``l-'(z) = weight * p^gamma * (gamma * (1 - p) *
    softplus(z) + p)``, ``p = sigmoid(z)``; ``row_sum_out`` (``[rows]``, 2-D ``z`` only) the row sums of
    ``l-(z) = weight * p^gamma * softplus(z)``. ``buffers`` are three scratch tensors shaped like ``z``
    (the first may be ``z`` itself: it is not read after it is overwritten). Nothing is allocated.
    """
    value, soft, power = buffers
    torch.ops.aten.softplus.out(z, 1, 20, out=soft)  # log1p(exp(z)), exact to fp precision everywhere
    p = torch.sigmoid(z, out=value if value is not z else power)
    if p is power:  # z's own buffer is reused below: move p there once z has been read
        p = value.copy_(power)
    # power = weight * p^gamma
    if gamma == 2.0:
        if weight != 1.0:
            torch.addcmul(p.new_zeros(()), p, p, value=weight, out=power)  # one pass instead of two
        else:
            torch.mul(p, p, out=power)
    elif gamma == 1.0:
        torch.mul(p, weight, out=power)
    elif gamma == 0.0:
        power.fill_(weight)
    else:
        torch.pow(p, gamma, out=power)
        if weight != 1.0:
            power.mul_(weight)
    if row_sum_out is not None:
        scratch = grad_out if grad_out is not None else torch.empty_like(soft)
        torch.mul(power, soft, out=scratch)
        torch.sum(scratch, 1, out=row_sum_out)
    if grad_out is not None:
        torch.addcmul(soft, p, soft, value=-1.0, out=soft)  # (1 - p) * softplus
        torch.add(p, soft, alpha=gamma, out=soft)  # p + gamma * (1 - p) * softplus
        torch.mul(power, soft, out=grad_out)


def _chunk_rows(logits: Tensor, chunk_elements: int | None) -> int:
    rows, num_classes = logits.shape
    if chunk_elements is None:
        # CUDA kernels take the whole tensor: chunking pays only where kernels run on the host [D]
        chunk_elements = CHUNK_ELEMENTS if logits.device.type == "cpu" else rows * num_classes
    return max(1, min(rows, chunk_elements // max(1, num_classes)))


def _dense_pass(
    logits: Tensor, weight: float, gamma: float, chunk_rows: int, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Row sums of ``l-`` over all of ``logits`` and (``need_grad``) ``l-'`` of every entry.

    Returns ``(loss [A] in the compute dtype, derivative [A, K] in the logits' dtype or None)``.
    """
    rows, num_classes = logits.shape
    compute = _compute_dtype(logits.dtype)
    loss = torch.empty(rows, dtype=compute, device=logits.device)
    grad = torch.empty_like(logits) if need_grad else None
    if rows == 0 or num_classes == 0:
        loss.zero_()
        return loss, grad
    same_dtype = logits.dtype == compute
    step = min(rows, chunk_rows)
    scratch = torch.empty((4, step, num_classes), dtype=compute, device=logits.device)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        value, soft, power, extra = (buffer[: stop - start] for buffer in scratch)
        if same_dtype:
            z = logits[start:stop]
            grad_chunk = grad[start:stop] if grad is not None else None
        else:
            z = value.copy_(logits[start:stop])  # upcast once; value's buffer is free after the sigmoid
            grad_chunk = extra if grad is not None else None
        if grad_chunk is None:
            grad_chunk = extra  # scratch for the row sums
        _negative_terms(z, (value, soft, power), weight, gamma, grad_out=grad_chunk, row_sum_out=loss[start:stop])
        if grad is not None and not same_dtype:
            grad[start:stop].copy_(grad_chunk)
    return loss, grad


# ----------------------------------------------------------------------------------------------------
# compile backend
# ----------------------------------------------------------------------------------------------------
def _negative_terms_functional(logits: Tensor, weight: float, gamma: float) -> tuple[Tensor, Tensor]:
    """``(l-(z), l-'(z))`` of every entry, written out of place for ``torch.compile`` (upcast included).

    ``softplus`` and ``p = sigmoid(z)`` share one ``u = exp(-|z|)``: ``softplus(z) = relu(z) + log(w) -
    ((w - 1) - u)`` with ``w = 1 + u`` (the bracket is ``w``'s rounding error, exact), ``p = 1 / w`` for
    ``z >= 0`` and ``u / w`` otherwise: one exp and one log per entry in the generated kernel [D].
    Returns both ``[A, K]`` in the compute dtype.
    """
    z = logits.to(_compute_dtype(logits.dtype))
    u = torch.exp(-z.abs())
    w = u + 1.0
    soft = (torch.log(w) - ((w - 1.0) - u)) + torch.clamp_min(z, 0.0)
    p = torch.where(z >= 0, 1.0, u) / w
    if gamma == 2.0:
        power = p * p
    elif gamma == 1.0:
        power = p
    elif gamma == 0.0:
        power = torch.ones_like(p)
    else:
        power = torch.pow(p, gamma)
    if weight != 1.0:
        power = power * weight
    return power * soft, power * (p + gamma * (soft - p * soft))


def _make_kernel(weight: float, gamma: float, need_grad: bool) -> Callable:
    """A compiled ``kernel(z, loss_out[, grad_out])``: row sums of ``l-(z)`` into ``loss_out`` and
    (``need_grad``) ``l-'(z)``, cast to ``grad_out``'s dtype, into ``grad_out``."""
    if need_grad:

        def kernel(z: Tensor, loss_out: Tensor, grad_out: Tensor) -> None:
            value, grad = _negative_terms_functional(z, weight, gamma)
            loss_out.copy_(value.sum(1))
            grad_out.copy_(grad)

    else:

        def kernel(z: Tensor, loss_out: Tensor) -> None:
            loss_out.copy_(_negative_terms_functional(z, weight, gamma)[0].sum(1))

    return torch.compile(kernel, dynamic=False)


_COMPILED: dict[tuple[float, float, bool], Callable] = {}
#: the first compile failure of this process (the eager pass then runs for every later call)
_COMPILE_FAILURE: list[str] = []


def _compiled_dense_pass(
    logits: Tensor, weight: float, gamma: float, need_grad: bool
) -> tuple[Tensor, Tensor | None] | None:
    """:func:`_dense_pass` through ``torch.compile``, or None where compiling or running it failed: the
    first failure is warned about and switches the compile backend off for the rest of the process (the
    caller then runs the eager pass, which computes the same values)."""
    if _COMPILE_FAILURE:
        return None
    rows, num_classes = logits.shape
    loss = torch.empty(rows, dtype=_compute_dtype(logits.dtype), device=logits.device)
    grad = torch.empty_like(logits) if need_grad else None
    step = rows if logits.device.type != "cpu" else max(1, min(rows, COMPILE_CHUNK_ELEMENTS // num_classes))
    key = (weight, gamma, need_grad)
    try:
        if key not in _COMPILED:
            _COMPILED[key] = _make_kernel(weight, gamma, need_grad)
        kernel = _COMPILED[key]
        for start in range(0, rows, step):
            pieces = [logits[start : start + step], loss[start : start + step]]
            if grad is not None:
                pieces.append(grad[start : start + step])
            for piece in pieces:
                # the number of rows changes every batch (and in the last chunk): one kernel for all
                torch._dynamo.maybe_mark_dynamic(piece, 0)
            kernel(*pieces)
    except Exception as err:  # any compiler / backend failure: the eager pass computes the same values
        _COMPILE_FAILURE.append(f"{type(err).__name__}: {err}")
        warnings.warn(
            f"harmonic.ops.focal: torch.compile of the dense focal pass failed ({type(err).__name__}: {err}); "
            "using the eager backend for the rest of this process",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return loss, grad


# ----------------------------------------------------------------------------------------------------
# native backend
# ----------------------------------------------------------------------------------------------------
#: whether the native backend's unavailability was already warned about in this process
_NATIVE_WARNED: list[str] = []


def _native_applies(device: torch.device | str, dtype: torch.dtype) -> bool:
    """The native kernel takes CPU logits of float32, float16 or bfloat16 (float64 stays exact in eager)."""
    return torch.device(device).type == "cpu" and dtype != torch.float64


def _native_pass(
    logits: Tensor, gt_classes: Tensor, alpha: float, gamma: float, need_grad: bool, library=None
) -> tuple[Tensor, Tensor | None] | None:
    """The whole per-anchor loss ``[A]`` (float32) and ``d loss_a / d x_ak`` (``[A, K]`` in the logits'
    dtype, or None) from the C kernel (``library``, default :func:`harmonic.ops.native.load`), target
    entries included; None where the kernel is unavailable (warned once per process)."""
    library = native.load() if library is None else library
    if library is None:
        if not _NATIVE_WARNED:
            _NATIVE_WARNED.append(native.failure() or "unknown reason")
            warnings.warn(
                f"harmonic.ops.focal: the native CPU kernel is unavailable ({native.failure()}); using the eager "
                f"backend, which computes the same values more slowly (set {BACKEND_ENV}=eager to choose it "
                "and silence this)",
                RuntimeWarning,
                stacklevel=4,
            )
        return None
    weight_pos, weight_neg = _class_weights(alpha)
    x = logits.to(torch.float32).contiguous()
    classes = gt_classes.contiguous()
    rows, num_classes = x.shape
    loss = torch.empty(rows, dtype=torch.float32)
    grad = torch.empty_like(x) if need_grad else None
    status = library.harmonic_focal_f32(
        x.data_ptr(),
        classes.data_ptr(),
        grad.data_ptr() if grad is not None else None,
        loss.data_ptr(),
        rows,
        num_classes,
        weight_pos,
        weight_neg,
        gamma,
    )
    if status != 0:
        raise MemoryError(f"harmonic.ops.focal: the native kernel could not allocate its scratch memory (status {status})")
    if grad is not None and grad.dtype != logits.dtype:
        grad = grad.to(logits.dtype)
    return loss, grad


def active_backend(
    backend: str | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> str:
    """The backend that actually computes logits of ``device`` and ``dtype`` when ``backend`` is asked
    for (None: :func:`default_backend`): "auto" and "native" resolve to "native" or "eager"."""
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend in ("auto", "native"):
        return "native" if _native_applies(device, dtype) and native.load() is not None else "eager"
    return backend


# ----------------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------------
def _focal_forward(
    logits: Tensor,
    gt_classes: Tensor,
    alpha: float,
    gamma: float,
    chunk_rows: int,
    need_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor | None]:
    """The per-anchor focal loss ``[A]`` (compute dtype) and ``d loss_a / d x_ak`` ``[A, K]`` (or None)."""
    logits = logits.contiguous()
    if backend in ("auto", "native") and _native_applies(logits.device, logits.dtype):
        result = _native_pass(logits, gt_classes, alpha, gamma, need_grad)
        if result is not None:
            return result
    weight_pos, weight_neg = _class_weights(alpha)
    dense = None
    if backend == "compile" and logits.shape[0] > 1 and logits.shape[1] > 0:
        dense = _compiled_dense_pass(logits, weight_neg, gamma, need_grad)
    loss, grad = dense if dense is not None else _dense_pass(logits, weight_neg, gamma, chunk_rows, need_grad)
    rows = positive_rows(gt_classes)
    if rows.numel() == 0:
        return loss, grad
    classes = gt_classes[rows]
    # target entries: l+(x) = l-(-x) with weight w+, so d l+ / d x = -l-'(-x)
    target = logits[rows, classes].to(loss.dtype).neg_()[:, None]  # [P, 1]: row sums = the values
    target_value, target_grad = torch.empty_like(target[:, 0]), torch.empty_like(target)
    buffers = (torch.empty_like(target), torch.empty_like(target), torch.empty_like(target))
    _negative_terms(target, buffers, weight_pos, gamma, grad_out=target_grad, row_sum_out=target_value)
    # positive rows: the other entries' sum, the target excluded exactly (l-(-inf) = 0, not subtracted)
    pos_logits = logits[rows]
    pos_logits[torch.arange(rows.numel(), device=rows.device), classes] = -math.inf
    others, _ = _dense_pass(pos_logits, weight_neg, gamma, _chunk_rows(pos_logits, None), need_grad=False)
    loss.index_copy_(0, rows, others.add_(target_value))
    if grad is not None:
        grad.index_put_((rows, classes), target_grad[:, 0].neg_().to(grad.dtype))
    return loss, grad


class _FocalLossPerAnchor(torch.autograd.Function):
    """Forward: the per-anchor focal loss; saves only ``d loss_a / d x_ak`` (one ``[A, K]`` tensor)."""

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        gt_classes: Tensor,
        alpha: float,
        gamma: float,
        chunk_rows: int,
        backend: str,
    ) -> Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            loss, grad = _focal_forward(logits, gt_classes, alpha, gamma, chunk_rows, True, backend)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        # one pass: grad_in[a, k] = grad_output[a] * d loss_a / d x_ak, computed in the upstream
        # gradient's precision and written in the logits' dtype. When autograd frees the graph after
        # this backward (no retain_graph / create_graph), the saved tensor is not read again and is
        # multiplied in place: no new [A, K] allocation. Otherwise a fresh tensor, so that the graph
        # can run backward again.
        if _graph_is_kept():
            return torch.mul(grad, grad_output[:, None], out=torch.empty_like(grad)), *([None] * 5)
        return grad.mul_(grad_output[:, None]), *([None] * 5)


def _graph_is_kept() -> bool:
    """Whether the running backward keeps its graph (True, the safe answer, where torch cannot tell)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def default_backend() -> str:
    """The backend used when none is given: ``$HARMONIC_FUSED_BACKEND`` if set, else ``"auto"``.

    "auto" takes the native kernel for CPU tensors (built once per machine in well under a second, then
    cached) and the eager torch operations elsewhere; ``make bench`` times every backend
    side by side. "compile" compiles for seconds on its first call in a process.
    """
    value = os.environ.get(BACKEND_ENV, "auto").strip() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"environment variable {BACKEND_ENV} must be one of {BACKENDS}, got {value!r}")
    return value


def focal_loss_per_anchor(
    logits: Tensor,
    gt_classes: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    *,
    backend: str | None = None,
    chunk_elements: int | None = None,
) -> Tensor:
    """Sigmoid focal loss of each anchor summed over the K classes, fused: ``[A, K], [A] -> [A]``.

    Same values and gradients (for any upstream gradient) as
    ``torchvision.ops.sigmoid_focal_loss(logits, one_hot(gt_classes), alpha, gamma, reduction="none").sum(1)``
    (:func:`focal_loss_per_anchor_reference`); ``docs/fused-focal-loss.md`` explains the numerics.

    Args:
        logits: ``[A, K]`` floating-point logits of the anchors that take part in classification.
        gt_classes: ``[A]`` int64, the class index 0..K-1 of a positive anchor, -1 of a negative one.
        alpha: weight of the target entry (``1 - alpha`` for the others); ``alpha < 0``: no weighting.
        gamma: focusing exponent, ``>= 0``.
        backend: "auto", "native", "eager", "compile" or None (:func:`default_backend`); see the docs
            page. :func:`active_backend` says which one computes a given device and dtype.
        chunk_elements: eager backend, logits entries per chunk (CPU default :data:`CHUNK_ELEMENTS`;
            CUDA: the whole tensor at once).

    Returns:
        ``[A]`` loss per anchor: float32 for float32 / float16 / bfloat16 logits, float64 for float64.
        The gradient reaching ``logits`` has the logits' dtype; autograd keeps one ``[A, K]`` tensor of
        that dtype for backward.
    """
    alpha, gamma = _check_inputs(logits, gt_classes, alpha, gamma)
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if chunk_elements is not None and (
        isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1
    ):
        raise ValueError(f"chunk_elements must be a positive int or None, got {chunk_elements!r}")
    chunk_rows = _chunk_rows(logits, chunk_elements)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _FocalLossPerAnchor.apply(logits, gt_classes, alpha, gamma, chunk_rows, backend)
    with torch.autocast(logits.device.type, enabled=False):
        loss, _ = _focal_forward(logits.detach(), gt_classes, alpha, gamma, chunk_rows, False, backend)
    return loss


def is_faster(device: torch.device | str) -> bool:
    """Whether :func:`focal_loss_per_anchor` beats the reference composition on ``device``.

    CPU: True, measured (``make bench``: forward + backward several times faster than the
    reference and torchvision's stock path, with a fraction of their memory). CUDA and other devices:
    False, because only CPU timings were taken when this was written (the fused path runs and is tested
    on CUDA, but its speed there is unmeasured); ``HarmonicOptions(fused=True)`` forces it.
    """
    return torch.device(device).type == "cpu"


def check_logits_and_classes(cls_logits: object, gt_classes: object, *, low: int) -> tuple[Tensor, Tensor]:
    """Check a head's ``[A, K]`` logits and ``[A]`` int64 classes in ``[low, K - 1]``."""
    if not isinstance(cls_logits, Tensor) or not cls_logits.is_floating_point() or cls_logits.dim() != 2:
        raise ValueError(
            "cls_logits must be a floating-point tensor of shape [A, K], got "
            + (f"{tuple(cls_logits.shape)} {cls_logits.dtype}" if isinstance(cls_logits, Tensor) else repr(type(cls_logits)))
        )
    if not isinstance(gt_classes, Tensor) or gt_classes.dtype != torch.int64 or gt_classes.dim() != 1:
        raise ValueError(
            "gt_classes must be an int64 tensor of shape [A], got "
            + (f"{tuple(gt_classes.shape)} {gt_classes.dtype}" if isinstance(gt_classes, Tensor) else repr(type(gt_classes)))
        )
    if gt_classes.shape[0] != cls_logits.shape[0]:
        raise ValueError(
            f"gt_classes has {gt_classes.shape[0]} entries but cls_logits has {cls_logits.shape[0]} rows"
        )
    if gt_classes.numel():
        smallest, largest = class_range(gt_classes)
        if smallest < low or largest >= cls_logits.shape[1]:
            raise ValueError(
                f"gt_classes values must lie in [{low}, {cls_logits.shape[1] - 1}] (K = {cls_logits.shape[1]} columns), "
                f"got min {smallest} and max {largest}"
            )
    return cls_logits, gt_classes


def focal_loss_per_anchor_reference(
    logits: Tensor, gt_classes: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Sigmoid focal loss of each anchor, summed over the K classes: ``[A, K], [A] -> [A]``.

    ``gt_classes[a]`` is the class index 0..K-1 of a positive anchor and -1 for a negative one (ignored
    anchors must already be removed). Exactly
    ``torchvision.ops.sigmoid_focal_loss(logits, one_hot, alpha, gamma, reduction="none").sum(1)``.
    """
    check_logits_and_classes(logits, gt_classes, low=-1)
    one_hot = torch.zeros_like(logits)
    positive = positive_rows(gt_classes)
    one_hot[positive, gt_classes[positive]] = 1.0
    return sigmoid_focal_loss(logits, one_hot, alpha=alpha, gamma=gamma, reduction="none").sum(1)


def select_focal_loss(fused: bool | None, device: torch.device | str) -> Callable[..., Tensor]:
    """The per-anchor focal function to use: the reference (False), :func:`focal_loss_per_anchor`
    (True), or, for None, the fused one where :func:`is_faster` says so."""
    if fused is True or (fused is None and is_faster(torch.device(device))):
        return focal_loss_per_anchor
    return focal_loss_per_anchor_reference


def backend_record(device: torch.device | str) -> dict[str, str]:
    """``{"fused_focal_backend": ...}`` for a result's provenance: which implementation computes the
    dense focal term on ``device``."""
    device_type = torch.device(device).type
    try:
        return {"fused_focal_backend": active_backend(None, device_type)}
    except (ValueError, RuntimeError) as err:
        return {"fused_focal_backend": f"unknown ({type(err).__name__}: {err})"}
