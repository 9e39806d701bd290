"""The README's generated blocks: text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` is written
by the code that computed it (the results report, the benchmark, the reproduce summary), never by hand."""

from __future__ import annotations

from pathlib import Path

from harmonic.utils.files import atomic_write_text


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of the block ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_block(readme: str | Path, name: str, markdown: str, figures: list[Path] = (), *, root: Path | None = None) -> None:
    """Replace the README's block ``name`` with ``markdown``, then image links to ``figures`` (paths
    relative to ``root``, default the README's folder; figures outside it are left out). A README without
    the block is an error naming the file and the markers; the file is written atomically."""
    readme = Path(readme)
    begin, end_marker = markers(name)
    text = readme.read_text(encoding="utf-8")
    if begin not in text or end_marker not in text:
        raise ValueError(f"{readme} has no {begin} ... {end_marker} block to replace")
    root = readme.parent if root is None else Path(root)
    links = []
    for fig in figures:
        try:
            rel = Path(fig).resolve().relative_to(root.resolve())
        except ValueError:
            continue
        links.append(f"![{rel.stem}]({rel.as_posix()})")
    body = [markdown] if not links else ["", markdown, "", *links, ""]
    block = "\n".join([begin, *body, end_marker])
    start, end = text.index(begin), text.index(end_marker) + len(end_marker)
    atomic_write_text(readme, text[:start] + block + text[end:])
