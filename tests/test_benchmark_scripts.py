"""The benchmark scripts run as `python benchmarks/NAME.py`, which puts benchmarks/ first on
sys.path: a script named like a standard-library module (tokenize.py did) shadows it for every
other script there, and they fail on import (inference.py's peers: "module 'tokenize' has no
attribute 'open'")."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_no_benchmark_script_shadows_a_standard_module():
    names = {path.stem for path in BENCHMARKS.glob("*.py")}
    assert names, "no benchmark scripts found"
    assert not names & set(sys.stdlib_module_names)
