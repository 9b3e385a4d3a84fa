"""Test files have distinct names across tests/: pytest (rootdir-relative,
no __init__.py) refuses two modules of the same basename at collection,
which stops the whole suite."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def test_test_modules_have_distinct_basenames():
    tests = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in tests.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
