"""Keep environment.yml (conda users) in step with requirements.lock (the exact pins).

``python tools/envfiles.py requirements.lock environment.yml`` rewrites environment.yml from the lock;
tests/test_environment.py fails when the two disagree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)")


def read_lock(path: str | Path) -> dict[str, str]:
    """Return ``{normalized name: version}`` for every ``name==version`` line of a lock file."""
    pins = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        if not m:
            raise ValueError(f"{path}:{lineno}: expected 'name==version', got {line!r}")
        pins[normalize(m.group(1))] = m.group(2)
    return pins


def read_environment_pins(path: str | Path) -> dict[str, str]:
    """Pins of the ``pip:`` section of a conda environment file."""
    pins = {}
    in_pip = False
    for line in Path(path).read_text().splitlines():
        stripped = line.strip()
        if stripped == "- pip:":
            in_pip = True
            continue
        if in_pip and stripped.startswith("- "):
            m = PIN.match(stripped[2:])
            if m:
                pins[normalize(m.group(1))] = m.group(2)
        elif in_pip and stripped and not stripped.startswith("#"):
            in_pip = False
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def render_environment(pins: dict[str, str], python: str = "3.11") -> str:
    lines = [
        "# Conda environment for harmonic. Generated from requirements.lock by `make lock`;",
        "# tests/test_environment.py keeps the two in step. Pins are for linux-64 (CUDA builds of torch",
        "# that also run on the CPU).",
        "name: harmonic",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        f"  - python={python}",
        "  - pip",
        "  - pip:",
    ]
    lines += [f"      - {name}=={version}" for name, version in sorted(pins.items())]
    lines.append("      - -e .")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python tools/envfiles.py LOCK_FILE ENVIRONMENT_YML", file=sys.stderr)
        return 2
    lock, env = argv
    Path(env).write_text(render_environment(read_lock(lock)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
