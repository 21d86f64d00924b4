"""Signal derivatives w.r.t. tissue parameters, and Cramér–Rao lower bounds (CRLB).

:func:`jacobian` differentiates any spin-wise model (``tissue -> complex [*batch, n]``,
e.g. a call of :func:`epgx.fse` or :func:`epgx.gre`) by forward mode. Each spin's signal
depends on its own parameters only, so an all-ones tangent over the whole batch gives
every spin's derivative w.r.t. one parameter, whatever the batch size. Two routes:

- dual states (:mod:`epgx._dual`): a model that returns, unchanged, its one call of
  :func:`epgx.fse` / :func:`epgx.gre` on the pure-torch engine (``backend="torch"``, or
  ``"auto"`` off CUDA) of the tissue it was given, with no field already tracked by
  autograd or a ``torch.func`` transform: the engine carries the ``len(wrt)`` tangent
  states beside the state in one pass, without ``torch.func`` in the train;
- otherwise one ``vmap`` of ``torch.func.jvp`` over one-hot tangents (block models, any
  post-processing of the signal, the Triton backend, which carries the tangents in its
  fused kernel, and derivatives of derivatives).

:func:`crlb` turns a Jacobian into the Cramér–Rao lower bound of each parameter's
variance for Gaussian noise, with the signal scale M0 and (for complex data) the phase
as nuisance parameters. It is differentiable, so a CRLB objective can be
back-propagated to sequence parameters such as flip angles (Zhao et al., IEEE TMI 2019;
Torch-EPG-X, ISMRM 2024 #4341).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import jvp, vmap

from epgx import _dual
from epgx.ops import primal
from epgx.tissue import FIELDS, Tissue

NUISANCE = ("m0", "phase")


def jacobian(
    model_fn: Callable[[Tissue], torch.Tensor],
    tissue: Tissue,
    wrt: str | Sequence[str],
    *,
    return_signal: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Derivatives of a spin-wise signal model w.r.t. tissue fields, by forward mode.

    ``model_fn`` must be spin-wise: output ``[..., i, :]`` depends on spin i's
    parameters only (true of :func:`epgx.fse` and :func:`epgx.gre`; false of anything
    that mixes spins, such as a normalisation over the batch). Column k is the
    derivative along an all-ones tangent on field ``wrt[k]`` of every spin. The route is
    chosen automatically (module docstring): the dual-state engine when ``model_fn``
    returns one pure-torch :func:`epgx.fse`/:func:`epgx.gre` call on ``tissue`` itself,
    unchanged, else one ``vmap`` of ``torch.func.jvp`` (``model_fn`` then runs a second
    time if the first attempt got as far as the engine). The sequence may carry autograd
    history (e.g. flip angles that require grad): the result is differentiable w.r.t. it.

    Args:
        model_fn: ``tissue -> [*tissue.shape, n]`` signal (complex or real). It receives
            a copy of ``tissue`` whose field ``wrt[k]`` is tracked by the transform.
        tissue: the :class:`~epgx.Tissue` batch to differentiate at.
        wrt: field names (:attr:`Tissue.fields`), e.g. ``("t1_ms", "t2_ms", "b1")``;
            derivatives are per unit of each field (per ms for ``t1_ms``, per s⁻¹ for
            ``k_ab_per_s``, per Hz for ``df_hz``).
        return_signal: also return the signal (computed on the way at no extra cost).

    Returns:
        ``[*tissue.shape, n, len(wrt)]`` with the dtype of the signal; with
        ``return_signal`` the tuple ``(signal, jacobian)``.

    Raises:
        TypeError: ``tissue`` is not a :class:`~epgx.Tissue`.
        ValueError: an unknown or repeated name in ``wrt``, a field this tissue kind
            lacks, or a model output that is not ``[*tissue.shape, n]``.

    Example:
        >>> tissue = epgx.Tissue(t1_ms=torch.tensor([800.0, 1200.0]), t2_ms=80.0)
        >>> fse = lambda t: epgx.fse(t, [90.0] + [150.0] * 16, esp_ms=10.0)
        >>> epgx.jacobian(fse, tissue, wrt=("t1_ms", "t2_ms")).shape
        torch.Size([2, 16, 2])
    """
    if not isinstance(tissue, Tissue):
        raise TypeError(f"tissue must be an epgx.Tissue, got {type(tissue).__name__}.")
    names = _parameter_names(wrt, tissue)
    fast = _dual.jacobian(model_fn, tissue, names)
    if fast is not None:
        return fast if return_signal else fast[1]
    fields = tissue.fields()
    # fields are broadcast views; a dual needs its own memory
    primals = tuple(fields[name].contiguous() for name in names)

    def model(*values: torch.Tensor) -> torch.Tensor:
        return model_fn(tissue.replace(**dict(zip(names, values, strict=True))))

    # column k: all-ones tangent on field k, zero on the others; vmap runs the columns as
    # one batch of tangents (the fused kernel carries them in one pass); a model that
    # draws random numbers (a seeded MRF schedule) draws them once for all columns
    basis = tuple(
        torch.zeros(len(names), *x.shape, dtype=x.dtype, device=x.device).index_fill_(
            0, torch.tensor([k], device=x.device), 1.0
        )
        for k, x in enumerate(primals)
    )
    columns = vmap(lambda *t: jvp(model, primals, t), out_dims=(0, -1), randomness="same")(*basis)
    signal, jac = columns[0][0], columns[1]  # the signal, identical in every column
    if not isinstance(signal, torch.Tensor) or signal.shape[:-1] != tissue.shape or signal.ndim < 1:
        got = tuple(signal.shape) if isinstance(signal, torch.Tensor) else type(signal).__name__
        raise ValueError(
            f"jacobian: model_fn must return one signal per spin, [*tissue.shape, n] = "
            f"[{', '.join(map(str, tissue.shape))}{', ' if tissue.shape else ''}n]; got {got}."
        )
    return (signal, jac) if return_signal else jac


def crlb(
    jacobian: torch.Tensor,
    noise_sd: float | torch.Tensor,
    signal: torch.Tensor | None = None,
    *,
    magnitude: bool = False,
    nuisance: Sequence[str] = NUISANCE,
    return_covariance: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cramér–Rao lower bound of each parameter's variance, Gaussian noise.

    The data model is s(θ, M0, φ) = M0·e^{iφ}·s₀(θ) at M0 = 1, φ = 0, so the nuisance
    columns appended to the Jacobian are ∂s/∂M0 = s and ∂s/∂φ = i·s (M0 is thus the
    scale relative to the model's own, and its bound that of M0/M0_true). With white
    Gaussian noise of standard deviation σ on every real number measured (on the real
    and on the imaginary part of complex data) the Fisher information is

        FIM = Re(Jᴴ J) / σ²

    and the bounds are the diagonal of FIM⁻¹, computed by a Cholesky factorisation of
    the Jacobi-scaled FIM (no explicit inverse). Magnitude data (``magnitude=True``)
    use the magnitude model's Jacobian ∂|s|/∂θ = Re(s̄·∂s/∂θ)/|s| and the high-SNR
    Gaussian approximation of Rician noise; they carry no phase. Real Jacobians are
    real data (no phase either). A parameter the data cannot determine (singular FIM)
    gets an infinite bound; one that does not change the signal at all (e.g. T1 under
    ideal 180° refocusing) gets inf and leaves the others' bounds as if it were known.

    Everything is differentiable: a scalar objective of the bounds back-propagates to
    whatever the Jacobian depends on (flip angles, timings).

    Args:
        jacobian: ``[..., n, p]`` from :func:`jacobian` (complex for complex data).
        noise_sd: σ, in the signal's units (M0 = 1), > 0; a number or a tensor that
            broadcasts to the batch shape ``jacobian.shape[:-2]``.
        signal: ``[..., n]``, the model signal; needed for the nuisance columns and for
            ``magnitude=True`` with a complex Jacobian.
        magnitude: the data are |s| (give the complex Jacobian and signal).
        nuisance: any of ``"m0"`` (signal scale), ``"phase"`` (global phase; complex
            data only, ignored for real or magnitude data); ``()`` for none.
        return_covariance: also return the full bound matrix FIM⁻¹ over the
            parameters then the nuisance parameters (in the order of ``nuisance``).

    Returns:
        ``[..., p]`` variance bounds, in the squared unit of each parameter (ms² for
        ``t2_ms``); with ``return_covariance`` the tuple ``(bounds, covariance)``,
        covariance ``[..., p + q, p + q]``.

    Raises:
        ValueError: a Jacobian that is not ``[..., n, p]``, a signal of another shape, a
            missing signal, an unknown nuisance name, or a noise_sd that is not > 0.

    Example:
        >>> s, jac = epgx.jacobian(fse, tissue, wrt=("t2_ms",), return_signal=True)
        >>> var = epgx.crlb(jac, noise_sd=0.01, signal=s)  # [..., 1], ms²
        >>> nrel = var[..., 0].sqrt() / tissue.t2_ms  # coefficient of variation of T2
    """
    if not isinstance(jacobian, torch.Tensor) or jacobian.ndim < 2:
        got = tuple(jacobian.shape) if isinstance(jacobian, torch.Tensor) else type(jacobian).__name__
        raise ValueError(f"crlb: jacobian must be a tensor [..., n_readouts, n_params]; got {got}.")
    n, p = jacobian.shape[-2:]
    if p < 1 or n < 1:
        raise ValueError(f"crlb: jacobian needs >= 1 readout and >= 1 parameter; got shape {(n, p)}.")
    nuis = _nuisance_names(nuisance)
    complex_data = jacobian.is_complex() and not magnitude
    if not complex_data:
        nuis = tuple(k for k in nuis if k != "phase")
    need_signal = bool(nuis) or (magnitude and jacobian.is_complex())
    if signal is not None:
        if not isinstance(signal, torch.Tensor) or signal.shape != jacobian.shape[:-1]:
            got = tuple(signal.shape) if isinstance(signal, torch.Tensor) else type(signal).__name__
            raise ValueError(
                f"crlb: signal must have the jacobian's shape without its last axis, "
                f"{tuple(jacobian.shape[:-1])}; got {got}."
            )
    elif need_signal:
        raise ValueError(
            f"crlb: the signal is needed for the nuisance parameters {nuis} (and for magnitude "
            "data); pass signal= (jacobian(..., return_signal=True) returns it), or nuisance=()."
        )
    batch = jacobian.shape[:-2]
    sigma = _noise_sd(noise_sd, batch, jacobian)

    cols = jacobian
    s = signal
    if magnitude and jacobian.is_complex():
        assert signal is not None
        amp = signal.abs()
        safe = torch.where(amp > 0, amp, torch.ones_like(amp))
        # d|s|/dθ = Re(conj(s) ds/dθ) / |s|; a zero signal carries no information
        cols = torch.where((amp > 0).unsqueeze(-1), (signal.conj().unsqueeze(-1) * jacobian).real, 0.0)
        cols = cols / safe.unsqueeze(-1)
        s = amp
    if nuis:
        assert s is not None
        extra = [s if k == "m0" else 1j * s for k in nuis]  # ds/dM0 = s, ds/dφ = i·s
        cols = torch.cat([cols, torch.stack(extra, dim=-1).to(cols.dtype)], dim=-1)
    a = cols / sigma.reshape(*batch, 1, 1)
    fim = (a.mH @ a).real if a.is_complex() else a.mT @ a  # [..., p + q, p + q]
    if return_covariance:
        cov = _inverse_spd(fim, full=True)
        return torch.diagonal(cov, dim1=-2, dim2=-1)[..., :p], cov
    return _inverse_spd(fim, full=False)[..., :p]


def _inverse_spd(fim: torch.Tensor, *, full: bool) -> torch.Tensor:
    """Diagonal (or all) of FIM⁻¹ by Cholesky of the Jacobi-scaled FIM; inf where singular.

    Scaling by diag(FIM)^{-1/2} makes the unit diagonal independent of the parameters'
    units (ms against unitless M0), which keeps the factorisation well conditioned. A
    parameter with no information at all (zero column of the Jacobian) decouples: its
    bound is inf and the others are those without it. Any other singular FIM gives inf.
    """
    m = fim.shape[-1]
    diag = torch.diagonal(fim, dim1=-2, dim2=-1)
    info = diag > 0  # [..., m]
    d = torch.where(info, diag, torch.ones_like(diag)).rsqrt()
    eye = torch.eye(m, dtype=fim.dtype, device=fim.device)
    scaled = fim * d.unsqueeze(-1) * d.unsqueeze(-2) + torch.diag_embed((~info).to(fim.dtype))
    # singular matrices are swapped for I before the factorisation that is differentiated,
    # so no NaN reaches the gradient through the discarded branch
    ok = torch.linalg.cholesky_ex(scaled.detach()).info == 0
    chol = torch.linalg.cholesky(torch.where(ok[..., None, None], scaled, eye))
    inf = torch.tensor(torch.inf, dtype=fim.dtype, device=fim.device)
    valid = info & ok.unsqueeze(-1)
    if full:
        inv = torch.cholesky_solve(eye.expand_as(scaled), chol) * d.unsqueeze(-1) * d.unsqueeze(-2)
        return torch.where(valid.unsqueeze(-1) & valid.unsqueeze(-2), inv, inf)
    linv = torch.linalg.solve_triangular(chol, eye.expand_as(scaled), upper=False)
    var = (linv * linv).sum(-2) * d * d  # diag(L⁻ᵀ L⁻¹), unscaled
    return torch.where(valid, var, inf)


def _parameter_names(wrt: str | Sequence[str], tissue: Tissue) -> tuple[str, ...]:
    names = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    if not names:
        raise ValueError(f"jacobian: wrt names no parameter; give field names of {tuple(tissue.fields())}.")
    own = tissue.fields()
    for name in names:
        if not isinstance(name, str) or name not in FIELDS:
            raise ValueError(f"jacobian: unknown tissue field {name!r} in wrt; known fields: {FIELDS}.")
        if name not in own:
            raise ValueError(
                f"jacobian: a {tissue.kind!r} tissue has no field {name!r}; its fields are {tuple(own)}."
            )
    if len(set(names)) != len(names):
        raise ValueError(f"jacobian: wrt names a field more than once: {names}.")
    return names


def _nuisance_names(nuisance: Sequence[str]) -> tuple[str, ...]:
    names = (nuisance,) if isinstance(nuisance, str) else tuple(nuisance)
    for k in names:
        if k not in NUISANCE:
            raise ValueError(f"crlb: unknown nuisance parameter {k!r}; accepted: {NUISANCE} (or ()).")
    if len(set(names)) != len(names):
        raise ValueError(f"crlb: nuisance names a parameter more than once: {names}.")
    return names


def _noise_sd(noise_sd: Any, batch: torch.Size, like: torch.Tensor) -> torch.Tensor:
    real = like.real.dtype if like.is_complex() else like.dtype
    if isinstance(noise_sd, bool) or not isinstance(noise_sd, int | float | torch.Tensor):
        raise ValueError(f"crlb: noise_sd must be a number or a real tensor; got {type(noise_sd).__name__}.")
    if isinstance(noise_sd, torch.Tensor) and noise_sd.is_complex():
        raise ValueError("crlb: noise_sd must be real; got a complex tensor.")
    # a number goes straight to the Jacobian's precision (not through float32)
    sigma = torch.as_tensor(noise_sd, dtype=real, device=like.device)
    values = primal(sigma)
    bad = ~(torch.isfinite(values) & (values > 0))
    if bool(bad.any()):
        raise ValueError(
            f"crlb: noise_sd must be finite and > 0; got {values.reshape(-1)[bad.reshape(-1)][0].item()!r}."
        )
    try:
        return sigma.expand(batch)
    except RuntimeError:
        raise ValueError(
            f"crlb: noise_sd of shape {tuple(sigma.shape)} does not broadcast to the batch "
            f"shape {tuple(batch)} of the jacobian."
        ) from None
