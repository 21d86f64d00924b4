"""Shared set-up of the epgx benchmarks: thread count, hardware/version info."""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest
import torch
from machine import cpu_model

import epgx

# Stable CPU timings: one thread unless the caller says otherwise.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

# The 21 log-spaced batch sizes of the Torch-EPG-X benchmark, 1 ... 100 000 spins.
BATCH_SIZES = [int(n) for n in np.unique(np.logspace(0, 5, 21).round().astype(int))]


@pytest.fixture(scope="session")
def machine_info() -> dict[str, str]:
    return {
        "cpu": cpu_model(),
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "epgx": epgx.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }
