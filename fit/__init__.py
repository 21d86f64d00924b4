"""Quantitative-MRI fitting (installed as ``epgx.fit``): MOLLI T1 mapping and its phantom.

``epgx.fit.molli_phantom`` makes synthetic MOLLI data (TI schemes, tissue T1s, the
3-parameter Look-Locker signal, Rician noise) to test T1 fitters on.
"""

from epgx.fit.phantom import (
    MOLLI_SCHEMES,
    TISSUE_T1_MS,
    MolliPhantom,
    add_rician_noise,
    molli_phantom,
    molli_signal,
    molli_ti_ms,
)

__all__ = [
    "MOLLI_SCHEMES",
    "TISSUE_T1_MS",
    "MolliPhantom",
    "add_rician_noise",
    "molli_phantom",
    "molli_signal",
    "molli_ti_ms",
]
