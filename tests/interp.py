"""The Triton interpreter lane's switch, shared by the kernel tests.

``TRITON_INTERPRET=1`` must be in the environment before pytest starts (CONTRIBUTING.md),
so a test module reads it once at import: ``pytestmark = interp`` (or ``@interp`` on a
test) skips outside the lane, and ``if INTERPRETED:`` guards the kernel imports.
"""

from __future__ import annotations

import os

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(
    not INTERPRETED, reason="Triton interpreter lane: run with TRITON_INTERPRET=1 set before pytest starts"
)
