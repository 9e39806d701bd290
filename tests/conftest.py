"""Shared test fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# the development tools (benchmark, environment-file generator) live outside the package, in tools/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

pytest.register_assert_rewrite("tiny_detectors")  # the model tests' shared helpers (tests/models/tiny_detectors.py)

_CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)


@pytest.fixture(params=["cpu", _CUDA], scope="session")
def device(request) -> torch.device:
    """Each test that takes ``device`` runs on the CPU and, where one is present, on a CUDA device."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests: thread oversubscription on a shared,
    loaded CPU slows them by orders of magnitude. The previous count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
