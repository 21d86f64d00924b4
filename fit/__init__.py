"""Quantitative-MRI fitting (installed as ``epgx.fit``): MOLLI T1 mapping and its phantom.

``epgx.fit.molli`` fits the 3-parameter Look-Locker model to every voxel at once (grid +
batched Levenberg–Marquardt in torch; the Torch T1 paper's Adam and scipy Nelder–Mead for
comparison); ``epgx.fit.molli_phantom`` makes synthetic MOLLI data to test it on;
``epgx.fit.io`` reads MOLLI series from DICOM/NIfTI and writes the maps (the ``io`` extra);
``epgx.fit.match`` matches signals against an ``epgx.dictionary`` (``from epgx.fit.match
import match``; the module is not re-exported as a name here, so ``epgx.fit.match`` stays
the module).
"""

from epgx.fit.molli import CORRECTIONS, METHODS, MolliFit, molli
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
    "CORRECTIONS",
    "METHODS",
    "MOLLI_SCHEMES",
    "TISSUE_T1_MS",
    "MolliFit",
    "MolliPhantom",
    "add_rician_noise",
    "molli",
    "molli_phantom",
    "molli_signal",
    "molli_ti_ms",
]
