"""epgx: GPU-first, differentiable Extended Phase Graph (EPG-X) simulation.

Public API::

    epgx.Tissue        batched tissue parameters (single pool, Tissue.bm, Tissue.mt)
    epgx.fse, epgx.gre the two general engines (EPG-X semantics)
    epgx.Prep          inversion/saturation preparation for gre
    epgx.Diffusion     gradient waveform + diffusion coefficient
    epgx.ops           the pure-torch operators (RF, relaxation/exchange, shift, ...)
    epgx.blocks        sequence blocks (inversion, T2 prep, GRE/FSE readouts, ...) + simulate
    epgx.models        ready sequences: MPRAGE, MP2RAGE, MEMPRAGE, FSE, MESE, T1-T2 shuffling,
                       FISP-MRF, bSSFP-MRF, SPGR/VFA, bSSFP, IR, MOLLI (``epgx.models.MODELS``)
    epgx.jacobian      d(signal)/d(tissue fields) by forward-mode AD, batched over spins
    epgx.crlb          Cramér–Rao lower bounds from a Jacobian (M0, phase as nuisance)
    epgx.dictionary    parameter grids, chunked/distributed dictionary generation, SVD, HDF5

Units: times in ms, rates in s⁻¹, frequencies in Hz, angles in degrees at the API.
"""

from epgx import blocks, dictionary, models, ops
from epgx.derivatives import crlb, jacobian
from epgx.engine import (
    Diffusion,
    Prep,
    States,
    balanced_phases_deg,
    fse,
    gre,
    rf_spoiling_phases_deg,
)
from epgx.tissue import Tissue

__version__ = "0.1.0"

__all__ = [
    "Diffusion",
    "Prep",
    "States",
    "Tissue",
    "balanced_phases_deg",
    "blocks",
    "crlb",
    "dictionary",
    "fse",
    "gre",
    "jacobian",
    "models",
    "ops",
    "rf_spoiling_phases_deg",
    "__version__",
]
