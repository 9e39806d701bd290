import pytest

from harmonic.experiments.readme import markers, replace_block

BEGIN, END = markers("results")


def test_replace_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold\n{END}\nafter\n")
    fig = tmp_path / "results" / "figures" / "x.png"
    fig.parent.mkdir(parents=True)
    fig.write_bytes(b"png")
    replace_block(readme, "results", "| new |", [fig])
    text = readme.read_text()
    assert "old" not in text and "| new |" in text and "![x](results/figures/x.png)" in text
    assert text.startswith("intro\n") and text.endswith("after\n")
    (tmp_path / "NO.md").write_text("no markers")
    with pytest.raises(ValueError, match="results:begin"):
        replace_block(tmp_path / "NO.md", "results", "x")


def test_replace_block_leaves_other_blocks_alone(tmp_path):
    readme = tmp_path / "README.md"
    bench_begin, bench_end = markers("bench")
    readme.write_text(f"{BEGIN}\nr\n{END}\n{bench_begin}\nb\n{bench_end}\n")
    replace_block(readme, "bench", "new bench")
    assert readme.read_text() == f"{BEGIN}\nr\n{END}\n{bench_begin}\nnew bench\n{bench_end}\n"
