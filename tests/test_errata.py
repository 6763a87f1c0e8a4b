"""docs/errata.md: every entry names a notebook section that demonstrates it, and every named section exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("nbformat", reason="the dev extra is not installed (pip install -e '.[dev]')")

import nbformat  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ERRATA = ROOT / "docs" / "errata.md"
NOTEBOOK = re.compile(r"`(notebooks/[\w.-]+\.ipynb)`")  # then: section "HEADING" ... (subsection "HEADING")
SECTION = re.compile(r'(?:sub)?section "([^"]+)"')


def references(text: str) -> list[tuple[str, str]]:
    """(notebook path, section name) pairs: each `notebooks/X.ipynb` with the sections named before the next one."""
    flat = " ".join(text.split())  # references may wrap over lines
    parts = NOTEBOOK.split(flat)  # [before, path, after, path, after, ...]
    return [(path, name) for path, after in zip(parts[1::2], parts[2::2]) for name in SECTION.findall(after)]


def headings(path: Path) -> list[str]:
    """The markdown headings of a notebook, without their '#' marks."""
    nb = nbformat.read(path, as_version=4)
    return [line.lstrip("#").strip() for cell in nb.cells if cell.cell_type == "markdown"
            for line in cell.source.splitlines() if line.startswith("#")]


def dangling(text: str, root: Path) -> list[str]:
    """Each reference whose notebook or section does not exist, as 'notebook: section'."""
    missing = []
    for path, name in references(text):
        notebook = root / path
        if not notebook.exists() or not any(name.lower() in h.lower() for h in headings(notebook)):
            missing.append(f"{path}: {name}")
    return missing


def test_every_entry_names_where_it_is_demonstrated():
    entries = re.split(r"^### ", ERRATA.read_text(), flags=re.M)[1:]
    assert len(entries) >= 10
    for entry in entries:
        title = entry.splitlines()[0]
        assert "**Correct:**" in entry, f"errata entry {title!r} has no correct statement"
        assert references(entry), f"errata entry {title!r} names no notebook section"


def test_every_named_notebook_section_exists():
    assert dangling(ERRATA.read_text(), ROOT) == []


def test_a_dangling_reference_is_caught():
    text = ('`notebooks/02_quantization.ipynb`, section "The formula" and section "No such section"; '
            '`notebooks/99_missing.ipynb`, section "The formula"')
    assert references(text) == [("notebooks/02_quantization.ipynb", "The formula"),
                                ("notebooks/02_quantization.ipynb", "No such section"),
                                ("notebooks/99_missing.ipynb", "The formula")]
    assert dangling(text, ROOT) == ["notebooks/02_quantization.ipynb: No such section",
                                    "notebooks/99_missing.ipynb: The formula"]
