"""Serve MathJax 3 from the build itself, so the book's math renders offline.

MathJax 3 (its browser-ready ``es5`` files) comes from the PyPI package ``django-static-mathjax``, which
installs them as the import package ``mathjax`` and needs nothing else (no Django). After the HTML build
the files are copied to ``_static/mathjax`` and every page loads them from there instead of from a CDN, so
the book renders without a network, from ``file://`` and from a web server alike.

MyST's ``dollarmath`` and ``amsmath`` extensions find the math themselves; MathJax only typesets the elements
they mark (class ``math``) and skips the pages' ``mathjax_ignore`` sections. Equations are numbered by
``\\tag{}`` in the source or by Sphinx (labelled equations), so MathJax numbers nothing itself.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

from docutils import nodes

#: qbook_math.css: display math wider than the page scrolls instead of being cut off.
STATIC = Path(__file__).parent / "static"

#: The combined component Sphinx itself loads from a CDN by default: TeX and MathML input, CommonHTML output.
COMPONENT = "tex-mml-chtml.js"

MATHJAX3_CONFIG = {
    "loader": {"load": ["[tex]/textmacros"]},
    "tex": {
        "inlineMath": [["\\(", "\\)"]],
        "displayMath": [["\\[", "\\]"]],
        "processEscapes": True,
        "processEnvironments": True,
        "tags": "none",
        # \text{zero\_point} shows zero_point, as LaTeX would.
        "packages": {"[+]": ["textmacros"]},
    },
    "options": {
        # MyST marks whole pages with the ignore class and the math itself with these classes.
        "ignoreHtmlClass": "tex2jax_ignore|mathjax_ignore",
        "processHtmlClass": "tex2jax_process|mathjax_process|math|output_area",
    },
}


def _source() -> Path:
    try:
        import mathjax
    except ImportError as error:
        raise ImportError(
            "MathJax 3 is missing: install the book's dependencies (pip install -e '.[book]'), "
            "which include django-static-mathjax"
        ) from error
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (es5 / COMPONENT).is_file():
        raise FileNotFoundError(f"{COMPONENT} not found under {es5}; reinstall django-static-mathjax")
    return es5


def _config_inited(app, config) -> None:
    config.mathjax_path = f"mathjax/{COMPONENT}"
    config.mathjax2_config = None
    config.mathjax_config = None
    # MathJax finds its fonts and on-demand extensions next to the script it was loaded from.
    config.mathjax3_config = copy.deepcopy(MATHJAX3_CONFIG)
    if str(STATIC) not in config.html_static_path:
        config.html_static_path = [*config.html_static_path, str(STATIC)]


#: A display equation that lays itself out: its own environment (aligned, cases, ...) or a \tag.
OWN_LAYOUT = re.compile(r"\\begin\{|\\tag\b")


def _display_math_as_written(renderer):
    """Wrap a display-math renderer: an equation that lays itself out is passed to MathJax as written.

    Sphinx wraps a display equation that contains ``\\\\`` in ``\\begin{split}``. That breaks equations like
    ``\\begin{aligned} a &= b \\\\ c &= d \\end{aligned} \\tag{3.3}``: MathJax 3 refuses a ``\\tag`` inside
    ``split`` and renders an error instead of the equation.
    """

    def visit(self, node) -> None:
        numbered_or_raw = node.get("nowrap") or node.get("number") or "amsmath" in node.get("classes", [])
        if numbered_or_raw or not OWN_LAYOUT.search(node.astext()):
            return renderer(self, node)
        self.body.append(self.starttag(node, "div", CLASS="math notranslate nohighlight"))
        prefix, suffix = self.builder.config.mathjax_display
        self.body.append(prefix + self.encode(node.astext()) + suffix + "</div>\n")
        raise nodes.SkipNode

    return visit


def _builder_inited(app) -> None:
    # After MyST's own override of the same renderer (builder-inited, priority 500).
    renderers = app.registry.html_block_math_renderers
    if "mathjax" in renderers:
        visit, depart = renderers["mathjax"]
        renderers["mathjax"] = (_display_math_as_written(visit), depart)


def _ignore(directory: str, names: list[str]) -> list[str]:
    """Copy one combined component and what it loads on demand; skip the other combined builds."""
    if Path(directory).name != "es5":
        return []
    return [name for name in names if name.endswith(".js") and name != COMPONENT]


def _copy(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        target = Path(app.outdir) / "_static" / "mathjax"
        shutil.rmtree(target, ignore_errors=True)  # no files left over from an older MathJax
        shutil.copytree(_source(), target, ignore=_ignore)


def setup(app):
    _source()  # fail early, with a clear message, if MathJax is not installed
    app.connect("config-inited", _config_inited, priority=900)
    app.connect("builder-inited", _builder_inited, priority=900)
    app.connect("build-finished", _copy)
    app.add_css_file("qbook_math.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
