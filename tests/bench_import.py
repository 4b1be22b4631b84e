"""Import scripts of `benchmarks/` in tests (it is a folder of scripts, not a package)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmarks(*names: str) -> tuple[ModuleType, ...]:
    """The modules `benchmarks/<name>.py`, in order; a script may import its siblings by name."""
    sys.path.insert(0, str(BENCH))
    try:
        return tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(BENCH))
