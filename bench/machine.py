"""Hardware facts the benchmarks report with every figure (kept in epgx.benchmark)."""

from __future__ import annotations

from epgx.benchmark import cpu_model

__all__ = ["cpu_model"]
