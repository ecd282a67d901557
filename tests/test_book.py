"""Checks of the book itself: every notebook executed top to bottom, clean, listed, and structured."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
NOTEBOOKS = sorted(p for p in BOOK.glob("*.ipynb"))
CHAPTERS = [p for p in NOTEBOOKS if re.match(r"\d\d_", p.name)]


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [chapter["file"] for chapter in part.get("chapters", [])]
    return files


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def test_there_are_chapters() -> None:
    assert len(CHAPTERS) >= 2, f"expected executed chapters in {BOOK}, found {[p.name for p in NOTEBOOKS]}"


def test_toc_lists_exactly_the_pages_that_exist() -> None:
    listed = _toc_files()
    for entry in listed:
        matches = [ROOT / f"{entry}{ext}" for ext in (".md", ".ipynb") if (ROOT / f"{entry}{ext}").exists()]
        assert matches, f"_toc.yml lists {entry!r}, which does not exist"
    for nb in NOTEBOOKS:
        stem = nb.relative_to(ROOT).with_suffix("").as_posix()
        assert stem in listed, f"{nb.name} is not listed in _toc.yml"
    assert len(listed) == len(set(listed)), f"_toc.yml lists a page twice: {listed}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executed_top_to_bottom_and_clean(path: Path) -> None:
    cells = _cells(path)
    counts = [c["execution_count"] for c in cells if c["cell_type"] == "code"]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name} was not executed top to bottom in one kernel (execution counts {counts}); "
        "run `make notebooks`"
    )
    for i, cell in enumerate(cells):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"{path.name} cell {i} holds an error output"
            if out["output_type"] == "stream" and out["name"] == "stderr":
                text = "".join(out["text"])
                assert "Warning" not in text, f"{path.name} cell {i} prints a warning: {text[:200]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_writes_no_files_outside_the_book(path: Path) -> None:
    for i, cell in enumerate(_cells(path)):
        source = "".join(cell["source"])
        if cell["cell_type"] == "code":
            assert "savefig(" not in source, f"{path.name} cell {i} saves a figure file; show it inline"
            assert "/tmp" not in source, f"{path.name} cell {i} uses a machine-specific path"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_structure(path: Path) -> None:
    cells = _cells(path)
    first = "".join(cells[0]["source"])
    number = int(path.name[:2])
    assert re.match(rf"# {number}\. ", first), f"{path.name} must open with '# {number}. Title'"
    assert re.search(r"[\u4e00-\u9fff]", first.splitlines()[0]), f"{path.name}: title lacks the Chinese term"
    markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    for heading in ("Summary", "Exercises", "References"):
        assert re.search(rf"^##+ .*{heading}", markdown, re.M), f"{path.name} has no '{heading}' section"
    assert ":class: dropdown" in markdown, f"{path.name}: exercises need worked solutions in a dropdown"
    assert "{bibliography}" in markdown, f"{path.name}: its References section needs a bibliography"


def test_every_citation_has_a_bibtex_entry() -> None:
    bib = (BOOK / "references.bib").read_text(encoding="utf-8")
    keys = set(re.findall(r"@\w+\{([^,\s]+),", bib))
    assert len(keys) == len(re.findall(r"@\w+\{", bib)), "references.bib has an entry without a key"
    for nb in NOTEBOOKS:
        text = "\n".join("".join(c["source"]) for c in _cells(nb) if c["cell_type"] == "markdown")
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text):
            for key in (k.strip() for k in group.split(",")):
                assert key in keys, f"{nb.name} cites {key!r}, which is not in book/references.bib"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("path", [ROOT / "README.md", BOOK / "intro.md"], ids=lambda p: p.name)
def test_documented_examples_run(path: Path) -> None:
    blocks = _python_blocks(path)
    assert blocks, f"{path.name} has no python example"
    for block in blocks:
        exec(compile(block, str(path), "exec"), {})


def test_config_points_nowhere_invented() -> None:
    config = (ROOT / "_config.yml").read_text(encoding="utf-8")
    assert "github.com" not in config and "http" not in config, "_config.yml must point at no invented place"
    assert yaml.safe_load(config)["execute"]["execute_notebooks"] == "off"
