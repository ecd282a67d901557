"""Project-wide pytest set-up: nbval compares numbers within a cell's declared tolerance.

The plugin lives in tests/nbval_tolerance.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

pytest_plugins = ["nbval_tolerance"]


def pytest_collection_finish(session):
    """Importing a test module must not switch autograd off for every test that runs after it (a module-level
    ``torch.set_grad_enabled(False)`` once broke 112 unrelated tests): use a fixture that restores it."""
    import torch

    if not torch.is_grad_enabled():
        raise RuntimeError("a test module switched autograd off at import; use a torch.no_grad() fixture")
