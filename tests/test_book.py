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


# --- Numbers in the prose come from the code ---------------------------------------------------------------

#: A prose number worth checking: 4+ digits (thousands separated by commas or spaces) or a decimal point.
PROSE_NUMBER = re.compile(
    r"(?<![\w.])(?:\d{1,3}(?:[, \u2009\u202f]\d{3})+(?:\.\d+)?|\d+\.\d+|\d{4,})(?![\w])"
)
#: Any number in an output, with optional thousands separators, decimals and exponent.
OUTPUT_NUMBER = re.compile(r"(?<![\w])\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
#: Markup whose digits are not prose: glue roles, citations, cross-references, labels, targets, links.
NOT_PROSE = re.compile(
    r"\{glue(?::\w+)?\}`[^`]*`|\{(?:cite|numref|ref|eq|doc)(?::\w+)?\}`[^`]*`"
    r"|^\(.*\)=$|\]\([^)]*\)|<https?://[^>]*>"
    r"|:label: .*$|:name: .*$"
    # section, figure, equation and exercise numbers: "§5.2", "Figure 4.1", "Sections 6.2 and 6.3", "(9.4)"
    r"|^#+\s*\d+(?:\.\d+)*|\(\d{1,2}\.\d{1,2}\)|\\tag\{[^}]*\}"
    r"|(?:§|\b(?:[Ss]ections?|[Ff]igures?|Fig\.|[Tt]ables?|[Ee]qs?\.|[Ee]quations?|[Ee]xercises?|[Cc]hapters?"
    r"|[Aa]ppendix|[Ss]teps?))\s*\(?\d+(?:\.\d+)*\)?(?:\s*(?:[–,-]|and|or|to)\s*\(?\d+(?:\.\d+)*\)?)*",
    re.M,
)

#: Numbers the prose may state without an output: true constants and quotations, each with its reason.
#: Keys are notebook names ("*" for every notebook); values map the number (as written) to the reason.
PROSE_ALLOW: dict[str, dict[str, str]] = {
    "*": {
        "6.02": "20·log10(2) dB per bit, a mathematical constant",
        "754": "IEEE 754, a standard's name",
        "0.5": "half a quantization step: the rounding tie point",
        "80000": "IEC 80000-13, a standard's name",
    },
    "02_float_formats.ipynb": {
        "2.12": "the PyTorch release from which float8_e4m3fn casts saturate (cited with its pull request)",
        "178817": "the pytorch/pytorch pull request number that made the E4M3 cast saturate",
    },
    "05_outliers_calibration.ipynb": {
        "150,000": "a quotation: Dettmers et al. (2022) count 150,000 outliers per sequence",
        "1.56": "a quotation: SmoothQuant's reported speed-up (Xiao et al. 2023)",
    },
    "08_quantization_aware_training.ipynb": {
        "0.098": "a quotation: the accuracy Jamil's QAT notebook published (quantization-notes 31b4493)",
        "0.952": "a quotation: that notebook's accuracy after its fix (quantization-notes fd8e177)",
    },
}


def _prose_numbers(path: Path) -> list[tuple[int, str]]:
    found = []
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "markdown":
            continue
        text = NOT_PROSE.sub(" ", "".join(cell["source"]))
        found += [(i, m.group()) for m in PROSE_NUMBER.finditer(text)]
    return found


def _output_numbers(path: Path) -> list[str]:
    numbers = []
    for cell in _cells(path):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            # text outputs, and glued values (application/papermill.record/text/plain)
            texts = [out.get("text", "")] + [v for k, v in data.items() if "text/" in k]
            for text in texts:
                text = "".join(text) if isinstance(text, list) else text
                numbers += [m.group().replace(",", "") for m in OUTPUT_NUMBER.finditer(text)]
    return numbers


def _backed(number: str, outputs: list[str]) -> bool:
    """Whether an output shows ``number``: the same digits, or a longer decimal that rounds to it."""
    plain = re.sub(r"[, \u2009\u202f]", "", number)
    if plain in outputs:
        return True
    if "." not in plain:
        return False
    decimals = len(plain.split(".")[1])
    for out in outputs:
        try:
            if "." in out and len(out.split(".")[1].split("e")[0].split("E")[0]) > decimals:
                if f"{float(out):.{decimals}f}" == plain:
                    return True
        except ValueError:
            continue
    return False


def _is_year(number: str) -> bool:
    return re.fullmatch(r"(19[5-9]\d|20[0-3]\d)", number) is not None  # calendar years of cited work


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_prose_numbers_are_backed_by_outputs(path: Path) -> None:
    outputs = _output_numbers(path)
    allowed = {**PROSE_ALLOW["*"], **PROSE_ALLOW.get(path.name, {})}
    missing = [
        f"cell {i}: {number}"
        for i, number in _prose_numbers(path)
        if number not in allowed and not _is_year(number) and not _backed(number, outputs)
    ]
    assert not missing, (
        f"{path.name}: numbers in the prose that no output of the notebook shows (glue them with "
        f"myst_nb.glue and {{glue:text}}, print them, or add a true constant to PROSE_ALLOW): {missing}"
    )


def test_prose_number_check_catches_a_typed_number() -> None:
    outputs = ["467", "1152", "537984", "0.93761"]
    assert _backed("537,984", outputs) and _backed("0.9376", outputs)
    assert not _backed("540,288", outputs) and not _backed("0.9377", outputs)
    references = "## 4.2 Zero points\nsee §5.2, Figure 4.1, Sections 6.2 and 6.3, (9.4)"
    assert not PROSE_NUMBER.findall(NOT_PROSE.sub(" ", references))
    assert PROSE_NUMBER.findall("the 540,288 outputs, 8 bits, 2.5 times") == ["540,288", "2.5"]
    assert PROSE_NUMBER.findall("for 200 000 values") == ["200 000"] and _backed("200 000", ["200000"])


# --- Pages show the code that teaches --------------------------------------------------------------------

FOLDED = {"hide-input", "remove-input", "remove-cell", "hide-cell"}
PLOTTING = re.compile(r"\b(?:plt|ax|axs|axes|fig|ax\d)\.|\bplt\b|matplotlib|\bqplot\.|\bplot\.\w+\(")
MAX_VISIBLE_CODE, MAX_VISIBLE_ASSERTS, MAX_VISIBLE_PLOTTING = 150, 10, 5


def page_weight(path: Path) -> tuple[int, int, int]:
    """Visible (not folded) lines of code, of ``assert`` and of plotting on a notebook's page."""
    code = asserts = plotting = 0
    for cell in _cells(path):
        if cell["cell_type"] != "code" or FOLDED & set(cell.get("metadata", {}).get("tags", [])):
            continue
        for line in "".join(cell["source"]).splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            code += 1
            asserts += line.startswith("assert")
            plotting += PLOTTING.search(line) is not None
    return code, asserts, plotting


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_page_shows_little_code(path: Path) -> None:
    code, asserts, plotting = page_weight(path)
    assert code <= MAX_VISIBLE_CODE, f"{path.name} shows {code} lines of code (at most {MAX_VISIBLE_CODE})"
    limit = MAX_VISIBLE_ASSERTS
    assert asserts <= limit, f"{path.name} shows {asserts} assert lines (at most {limit})"
    assert plotting <= MAX_VISIBLE_PLOTTING, (
        f"{path.name} shows {plotting} lines of plotting code (at most {MAX_VISIBLE_PLOTTING}); "
        "fold them with the hide-input tag"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_shown_sources_are_math_cores(path: Path) -> None:
    """A chapter shows a qbook function's math core, not the argument checks of its public wrapper."""
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "code" or "getsource" not in "".join(cell["source"]):
            continue
        for out in cell.get("outputs", []):
            texts = [out.get("text", "")] + list(out.get("data", {}).values())
            shown = "".join("".join(t) if isinstance(t, list) else str(t) for t in texts)
            assert not re.search(r"raise (?:ValueError|TypeError)", shown), (
                f"{path.name} cell {i} shows argument checks; show the function's math core instead"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_tolerances_and_ignored_outputs_are_declared_properly(path: Path) -> None:
    from nbval_tolerance import cell_tolerance

    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "code":
            continue
        cell_tolerance(cell.get("metadata", {}))  # raises on a malformed declaration
        source = "".join(cell["source"])
        tags = cell.get("metadata", {}).get("tags", [])
        if "nbval-ignore-output" in tags or "# NBVAL_IGNORE_OUTPUT" in source:
            assert re.search(r"perf_counter|timeit|time\.time|benchmark|bench\.", source), (
                f"{path.name} cell {i} ignores its output but times nothing; only timings may be ignored"
            )
