"""Author-year citations that read the same in the text and in the reference lists.

sphinxcontrib-bibtex cites author-year in the text ("Nagel et al., 2021") but labels its lists with pybtex's
alpha labels ("[NFA+21]"). This extension registers

* the pybtex formatting style ``qbook`` (``bibtex_default_style``): pybtex's ``unsrt`` entries, sorted by
  the cited authors, year and title, labelled ``[Nagel et al., 2021]``;
* the reference style ``qbook_author_year`` (``bibtex_reference_style``): sphinxcontrib-bibtex's author-year
  citations with the same year suffix as the label.

Works by the same authors in the same year get a, b, ... in both places ("NVIDIA Corporation, 2022a"),
in the order of their titles. The letters are assigned once over every entry of the bib files, so a work keeps
its label in every chapter's list, whichever other works that chapter cites.
"""

from __future__ import annotations

import string
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pybtex.plugin
from pybtex.richtext import Text
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting import BaseSortingStyle
from sphinxcontrib.bibtex.plugin import register_plugin
from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle
from sphinxcontrib.bibtex.style.referencing.basic_author_year import (
    BasicAuthorYearParentheticalReferenceStyle,
    BasicAuthorYearTextualReferenceStyle,
)
from sphinxcontrib.bibtex.style.referencing.extra_author import ExtraAuthorReferenceStyle
from sphinxcontrib.bibtex.style.referencing.extra_empty import ExtraEmptyReferenceStyle
from sphinxcontrib.bibtex.style.referencing.extra_label import ExtraLabelReferenceStyle
from sphinxcontrib.bibtex.style.referencing.extra_year import ExtraYearReferenceStyle
from sphinxcontrib.bibtex.style.template import join, join2, node, post_text, pre_text, reference

if TYPE_CHECKING:
    from pybtex.database import Entry

#: qbook_bib.css: a label on a line of its own above its entry (author-year labels are long).
STATIC = Path(__file__).parent / "static"

#: Year suffix ("a", "b", ...) of each bib key whose authors and year collide with another entry's.
YEAR_SUFFIX: dict[str, str] = {}


def _last_names(entry: Entry) -> str:
    """Authors as the text cites them: "Horowitz", "Reimers and Gurevych", "Nagel et al."."""
    persons = entry.persons.get("author") or entry.persons.get("editor")
    if not persons:
        return Text.from_latex(entry.fields.get("title", entry.key)).render_as("text")
    name_style = pybtex.plugin.find_plugin("pybtex.style.names", "last")()
    names = [name_style.format(person, True).format().render_as("text") for person in persons]
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        return f"{names[0]} and {names[1]}"
    return f"{names[0]} et al."


def _year(entry: Entry) -> str:
    return entry.fields.get("year", "n.d.")


def _title(entry: Entry) -> str:
    return Text.from_latex(entry.fields.get("title", "")).render_as("text").lower()


def assign_year_suffixes(entries: dict[str, Entry]) -> dict[str, str]:
    """a, b, ... for the entries that share authors and year, in the order of their titles."""
    groups: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for entry in entries.values():
        groups[_last_names(entry), _year(entry)].append(entry)
    suffix = {}
    for group in groups.values():
        if len(group) > 1:
            group.sort(key=_title)
            suffix.update({entry.key: string.ascii_lowercase[i] for i, entry in enumerate(group)})
    return suffix


class AuthorYearLabelStyle(BaseLabelStyle):
    """List labels such as ``Nagel et al., 2021`` and ``NVIDIA Corporation, 2022a``."""

    def format_labels(self, sorted_entries):
        for entry in sorted_entries:
            yield f"{_last_names(entry)}, {_year(entry)}{YEAR_SUFFIX.get(entry.key, '')}"


class AuthorYearTitleSortingStyle(BaseSortingStyle):
    """Sort by the authors as cited (organisations by name, not last), then year and title."""

    def sorting_key(self, entry):
        return _last_names(entry).lower(), _year(entry), _title(entry)


class QbookStyle(UnsrtStyle):
    """pybtex's unsrt entries with author-year labels, sorted by the cited authors, year and title."""

    default_label_style = "qbook_author_year"
    default_sorting_style = "qbook_author_year"


@node
def year_with_suffix(children, data) -> Text:
    """The year as the list label shows it: 2022a where two works collide."""
    assert not children
    entry = data["entry"]
    return Text(_year(entry) + YEAR_SUFFIX.get(entry.key, ""))


class _Parenthetical(BasicAuthorYearParentheticalReferenceStyle):
    def inner(self, role_name):
        author = self.person.author_or_editor_or_title(full="s" in role_name)
        return join2(sep1=self.pre_text_sep, sep2=self.post_text_sep)[
            pre_text,
            reference[join(sep=self.author_year_sep)[author, year_with_suffix]],
            post_text,
        ]


class _Textual(BasicAuthorYearTextualReferenceStyle):
    def inner(self, role_name):
        author = self.person.author_or_editor_or_title(full="s" in role_name)
        return join(sep=self.text_reference_sep)[
            author,
            join[
                self.bracket.left,
                join2(sep1=self.pre_text_sep, sep2=self.post_text_sep)[
                    pre_text, reference[year_with_suffix], post_text
                ],
                self.bracket.right,
            ],
        ]


class _Year(ExtraYearReferenceStyle):
    def inner(self, role_name):
        return reference[year_with_suffix]


@dataclass
class QbookAuthorYearReferenceStyle(AuthorYearReferenceStyle):
    """sphinxcontrib-bibtex's author-year citations, with the list label's a/b year suffix."""

    def __post_init__(self):
        self.styles.extend(
            [
                _Parenthetical(
                    bracket=self.bracket_parenthetical,
                    person=self.person,
                    author_year_sep=self.author_year_sep,
                    pre_text_sep=self.pre_text_sep,
                    post_text_sep=self.post_text_sep,
                ),
                _Textual(
                    bracket=self.bracket_textual,
                    person=self.person,
                    text_reference_sep=self.text_reference_sep,
                    pre_text_sep=self.pre_text_sep,
                    post_text_sep=self.post_text_sep,
                ),
                ExtraAuthorReferenceStyle(bracket=self.bracket_author, person=self.person),
                ExtraLabelReferenceStyle(bracket=self.bracket_label),
                _Year(bracket=self.bracket_year),
                ExtraEmptyReferenceStyle(),
            ]
        )
        # GroupReferenceStyle.__post_init__ maps role names to these styles; skip AuthorYearReferenceStyle's,
        # which would add sphinxcontrib-bibtex's own styles first.
        super(AuthorYearReferenceStyle, self).__post_init__()


def _config_inited(app, config) -> None:
    if str(STATIC) not in config.html_static_path:
        config.html_static_path = [*config.html_static_path, str(STATIC)]


def _builder_inited(app) -> None:
    """Assign the year suffixes over all entries once sphinxcontrib-bibtex has read the bib files."""
    entries = app.env.get_domain("cite").bibdata.data.entries
    YEAR_SUFFIX.clear()
    YEAR_SUFFIX.update(assign_year_suffixes(entries))


def setup(app):
    name = "qbook_author_year"
    pybtex.plugin.register_plugin("pybtex.style.labels", name, AuthorYearLabelStyle, force=True)
    pybtex.plugin.register_plugin("pybtex.style.sorting", name, AuthorYearTitleSortingStyle, force=True)
    pybtex.plugin.register_plugin("pybtex.style.formatting", "qbook", QbookStyle, force=True)
    register_plugin("sphinxcontrib.bibtex.style.referencing", name, QbookAuthorYearReferenceStyle, force=True)
    app.connect("config-inited", _config_inited)
    app.connect("builder-inited", _builder_inited, priority=800)  # after sphinxcontrib-bibtex's (500)
    app.add_css_file("qbook_bib.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
