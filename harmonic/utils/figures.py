"""Figures without pyplot: :class:`matplotlib.figure.Figure` objects with an Agg canvas attached
explicitly, so no global figure state is created and nothing needs closing. Every plotting function of the
package returns its figure and, given ``path``, writes a PNG of exactly ``figsize * dpi`` pixels
atomically."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harmonic.utils.files import atomic_write_bytes

# Size in inches of the single-panel figures (the PNG is FIGSIZE * dpi pixels).
FIGSIZE = (6.4, 4.8)


def new_figure(figsize: tuple[float, float] = FIGSIZE) -> Figure:
    """A pyplot-free figure with an Agg canvas and constrained layout."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG of ``figsize * dpi`` pixels, atomically (temporary file, then rename)."""
    if not (isinstance(dpi, int | float) and dpi > 0):
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figure path must end in .png, got {str(path)!r}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)  # no bbox_inches="tight": the pixel size stays figsize*dpi
    return atomic_write_bytes(path, buffer.getvalue())


def finish(fig: Figure, path: str | Path | None, dpi: int) -> Figure:
    """``fig``, written to ``path`` first when one is given."""
    if path is not None:
        save_figure(fig, path, dpi)
    return fig


def caption(fig: Figure, text: str) -> None:
    """A small caption under the axes (carries the figure's provenance)."""
    fig.supxlabel(text, fontsize=7, ha="center")


def check_range(name: str, value: Sequence[float], *, low: float | None = None, high: float | None = None):
    """``(min, max)`` of a finite pair with min < max, optionally within (low, high]."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a pair (min, max) of numbers, got {value!r}") from err
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise ValueError(f"{name} must be finite with min < max, got {value!r}")
    if low is not None and a <= low:
        raise ValueError(f"{name} must lie above {low}, got {value!r}")
    if high is not None and b > high:
        raise ValueError(f"{name} must not exceed {high}, got {value!r}")
    return a, b


def check_grid(grid: int) -> int:
    """The number of grid points per axis, an integer >= 2."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an integer >= 2, got {grid!r}")
    return grid


