"""epgx.jacobian through the fused Triton kernels against central differences (interpreter lane).

Issue 6 asks for the derivative tests on both lanes: this is the Triton one. The
Jacobian comes from the kernels' tangent pass (``epg_train`` for FSE/GRE trains,
``epg_program`` for the block model fisp_mrf); the oracle is central differences of
the same kernels' forward pass, every perturbed tissue in ONE batched launch (column by
column would cost two launches per field in the interpreter). Float64, every tissue
field of single, BM and MT tissue.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from interp import interp
from test_derivatives import (
    FD_REL_STEP,
    FD_RTOL,
    _assert_close_columns,
    _model,
    _params,
    _tissue,
)

import epgx

pytestmark = interp

# The kernel's forward-mode Jacobian vs its own forward pass differenced: both in
# float64; the central difference's truncation and rounding stay below 1e-8 of each column.
TRITON_FD_RTOL = FD_RTOL


def _triton_model(kind: str, seq: str) -> Callable[[epgx.Tissue], torch.Tensor]:
    if seq == "fisp_mrf":
        return lambda t: epgx.models.fisp_mrf(t, n_pulses=10, backend="triton")
    return _model(kind, seq, backend="triton")


def _batched_central_differences(model, tissue: epgx.Tissue, names: tuple[str, ...]) -> torch.Tensor:
    """``[B, n, len(names)]`` central differences from one call on a ``[2·len(names), B]`` batch."""
    n_b = tissue.shape[0]
    fields = {k: v.expand(n_b) for k, v in tissue.fields().items()}
    steps = {}
    batch = {k: v.repeat(2 * len(names), 1) for k, v in fields.items()}  # [2N, B]
    for i, name in enumerate(names):
        h = FD_REL_STEP * fields[name].abs().clamp_min(1.0)
        steps[name] = h
        batch[name][2 * i] += h
        batch[name][2 * i + 1] -= h
    out = model(tissue.replace(**batch))  # [2N, B, n]
    cols = [(out[2 * i] - out[2 * i + 1]) / (2 * steps[name].unsqueeze(-1)) for i, name in enumerate(names)]
    return torch.stack(cols, dim=-1)


@pytest.mark.parametrize("kind", ["single", "bm", "mt"])
@pytest.mark.parametrize("seq", ["fse", "gre", "fisp_mrf"])
def test_triton_jacobian_matches_central_differences(kind: str, seq: str) -> None:
    tissue = _tissue(kind, generic=True)
    model = _triton_model(kind, seq)
    names = tuple(tissue.fields())
    signal, jac = epgx.jacobian(model, tissue, wrt=names, return_signal=True)
    fd = _batched_central_differences(model, tissue, names)
    assert signal.shape == jac.shape[:-1] and jac.shape[-1] == len(names)
    _assert_close_columns(jac, fd, signal, _params(tissue, names), TRITON_FD_RTOL)
