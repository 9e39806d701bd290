"""Argument checks shared by the package: one helper for each job, each with an error that names the
argument."""

from __future__ import annotations

import argparse
import math
from typing import Any

from torch import Tensor


def is_int(value: Any) -> bool:
    """True for a Python ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a finite Python ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1, or an error that quotes the text given."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def check_float_tensor(name: str, value: object) -> Tensor:
    """``value`` itself when it is a floating-point tensor; a ``TypeError`` naming ``name`` otherwise."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_boxes(name: str, boxes: object) -> Tensor:
    """A floating-point ``[N, 4]`` box tensor (x1, y1, x2, y2)."""
    boxes = check_float_tensor(name, boxes)
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    return boxes


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_positive_number(name: str, value: object) -> float:
    """``float(value)`` when it is finite and > 0."""
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real number, got {value!r}") from err
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number
