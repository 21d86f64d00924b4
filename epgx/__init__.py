"""epgx: GPU-first, differentiable Extended Phase Graph (EPG-X) simulation.

Public API::

    epgx.Tissue        batched tissue parameters (single pool, Tissue.bm, Tissue.mt)
    epgx.fse, epgx.gre the two general engines (EPG-X semantics)
    epgx.Prep          inversion/saturation preparation for gre
    epgx.Diffusion     gradient waveform + diffusion coefficient
    epgx.ops           the pure-torch operators (RF, relaxation/exchange, shift, ...)

Units: times in ms, rates in s⁻¹, frequencies in Hz, angles in degrees at the API.
"""

from epgx import ops
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
    "fse",
    "gre",
    "ops",
    "rf_spoiling_phases_deg",
    "__version__",
]
