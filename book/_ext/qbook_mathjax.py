"""Serve MathJax from the build itself, so the book's math renders offline.

MathJax 2.7 comes from the PyPI package ``jupyter-server-mathjax``; after the HTML build its files are copied
to ``_static/mathjax`` and every page loads them from there instead of from a CDN.
"""

from __future__ import annotations

import shutil
from pathlib import Path

MATHJAX_PATH = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"


def _source() -> Path:
    import jupyter_server_mathjax

    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    if not (static / "MathJax.js").is_file():
        raise FileNotFoundError(f"MathJax.js not found under {static}; reinstall jupyter-server-mathjax")
    return static


def _config_inited(app, config) -> None:
    config.mathjax_path = MATHJAX_PATH
    config.mathjax3_config = None
    config.mathjax2_config = {
        "tex2jax": {
            "inlineMath": [["\\(", "\\)"]],
            "displayMath": [["\\[", "\\]"]],
            "processEscapes": True,
            # MyST marks whole pages with the ignore class and the math itself with these classes.
            "ignoreClass": "tex2jax_ignore|mathjax_ignore",
            "processClass": "tex2jax_process|mathjax_process|math|output_area",
        },
        # The package ships the STIX web fonts only.
        "HTML-CSS": {"availableFonts": [], "preferredFont": None, "webFont": "STIX-Web", "imageFont": None},
        "showMathMenu": False,
    }


def _copy(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        shutil.copytree(_source(), Path(app.outdir) / "_static" / "mathjax", dirs_exist_ok=True)


def setup(app):
    _source()  # fail early, with a clear message, if MathJax is not installed
    app.connect("config-inited", _config_inited, priority=900)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
