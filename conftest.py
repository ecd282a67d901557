"""Project-wide pytest set-up: nbval compares numbers within a cell's declared tolerance.

The plugin lives in tests/nbval_tolerance.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

pytest_plugins = ["nbval_tolerance"]
