"""Live fixtures: one booted session per kernel per test module (TCG here)."""

from __future__ import annotations

import pytest

from lab.session import Session

KERNELS = ["before", "after"]


@pytest.fixture(scope="module", params=KERNELS)
def session(request):
    """A booted kernel with drgn attached; stopped after the module's tests."""
    with Session.boot(request.param, say=lambda *_: None) as s:
        yield s
