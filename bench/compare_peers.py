"""The Torch-EPG-X seed benchmark, FSE on the CPU (and GPU): epgx backends vs peers.

The benchmark itself lives in :mod:`epgx.benchmark` (also behind ``epgx bench``); this
script runs it with every case (two-pool BM and single pool, 180° and 120°) and the 21
log-spaced batch sizes 1 … 100 000 by default::

    OMP_NUM_THREADS=1 python bench/compare_peers.py --plot bench/fse_cpu_vs_torchsim.png

Every code is validated against an epgx float64 run before it is timed. See
``epgx.benchmark`` for the conventions (torchsim's exchange rate is k = k_ab / f).
"""

from __future__ import annotations

import sys

from epgx.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
