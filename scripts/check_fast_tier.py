#!/usr/bin/env python
"""Run the fast test tier (`pytest -m "not slow"`) in this process, then name every module of couplet/ that none of
its tests imported (directly or through another module).

    .venv/bin/python scripts/check_fast_tier.py                  # the tier, then the module check
    .venv/bin/python scripts/check_fast_tier.py --durations=15   # extra arguments go to pytest

Exit status: pytest's when it failed, else 1 when a module was never imported, else 0. The `__main__` modules are
entry points (`python -m couplet`), run only in subprocesses, so they are left out of the check.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def couplet_modules() -> list[str]:
    """Every module under couplet/, by its import name (a package by its own name, not `__init__`)."""
    names = []
    for path in sorted((ROOT / "couplet").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def main() -> int:
    started = time.monotonic()
    status = pytest.main(["-q", "-m", "not slow", "--rootdir", str(ROOT), str(ROOT / "tests"), *sys.argv[1:]])
    elapsed = time.monotonic() - started
    modules = couplet_modules()
    missing = [name for name in modules if name not in sys.modules]
    print(f"fast tier: {elapsed:.0f} s; {len(modules) - len(missing)} of {len(modules)} couplet modules imported by its tests")
    for name in missing:
        print(f"  not imported: {name}")
    return int(status) or (1 if missing else 0)


if __name__ == "__main__":
    sys.exit(main())
