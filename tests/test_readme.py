"""The measured numbers in README.md and docs/ are generated from benchmarks/results/ (never typed by hand):
every generated block must equal what benchmarks/results_tables.py renders from the committed JSON now."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "benchmarks" / "results_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TABLES = _tables()
DOCS = TABLES.documents()
BLOCK = re.compile(re.escape(TABLES.BEGIN).replace(r"\{\}", r"(\S+)") + r"(.*?)" + re.escape(TABLES.END), re.S)


def _blocks(path: Path) -> list[tuple[str, str]]:
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_blocks_are_current(path):
    for section, block in _blocks(path):
        assert section in TABLES.BLOCKS, f"{path.name}: unknown generated section {section!r}"
        assert block == TABLES.render(section), (
            f"{path.name}'s {section!r} block is stale: run python benchmarks/results_tables.py --write-all")


def test_every_section_is_shown_once():
    shown = [s for p in DOCS for s, _ in _blocks(p)]
    assert sorted(shown) == sorted(TABLES.BLOCKS)


def test_docs_links_resolve():
    for path in DOCS:
        for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", path.read_text()):
            assert (path.parent / target).is_file(), f"{path.name} links to a missing page {target}"


def test_sources_cite_our_own_pages():
    """What the code relies on from the original is stated in docs/original.md: no file cites a document that is
    not in the repository."""
    outside = "REFERENCE" + "_"  # (spelled so this file does not match itself)
    files = [p for d in ("dultra_jax", "tests", "benchmarks", "configs", "docs", "tools")
             for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".yaml")] + [ROOT / "README.md"]
    assert [str(p.relative_to(ROOT)) for p in files if outside in p.read_text(errors="ignore")] == []
