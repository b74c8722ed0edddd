"""The README's measured numbers are generated from benchmarks/results/ (never typed by hand): every generated
block must equal what benchmarks/results_tables.py renders from the committed JSON now."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "benchmarks" / "results_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("section", ["summary", "results", "humaneval", "demo", "evaluation"])
def test_generated_blocks_are_current(section):
    tables = _tables()
    text = (ROOT / "README.md").read_text()
    begin = tables.BEGIN.format(section)
    assert begin in text, f"README.md has no generated block for section {section!r}"
    start = text.index(begin) + len(begin)
    block = text[start:text.index(tables.END, start)]
    assert block == tables.render(section), (
        f"README.md's {section!r} block is stale: run python benchmarks/results_tables.py --write README.md")


@pytest.mark.parametrize("page,section", [("docs/serving.md", "serving")])
def test_generated_blocks_of_docs_pages_are_current(page, section):
    tables = _tables()
    text = (ROOT / page).read_text()
    begin = tables.BEGIN.format(section)
    assert begin in text, f"{page} has no generated block for section {section!r}"
    start = text.index(begin) + len(begin)
    assert text[start:text.index(tables.END, start)] == tables.render(section), (
        f"{page}'s {section!r} block is stale: run python benchmarks/results_tables.py --write {page}")


def test_engine_page_block_is_current():
    tables = _tables()
    text = (ROOT / "docs" / "engine.md").read_text()
    begin = tables.BEGIN.format("engine")
    assert begin in text, "docs/engine.md has no generated block for section 'engine'"
    start = text.index(begin) + len(begin)
    block = text[start:text.index(tables.END, start)]
    assert block == tables.render("engine"), (
        "docs/engine.md's engine block is stale: run python benchmarks/results_tables.py --write docs/engine.md")
