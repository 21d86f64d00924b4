"""Dictionary matching: the atom of largest normalised inner product with each signal.

For a measured signal y and dictionary atoms dⱼ (Ma et al., Nature 2013) the match is
ĵ = argmaxⱼ |⟨dⱼ, y⟩| / ‖dⱼ‖ with ⟨d, y⟩ = Σₜ conj(dₜ)·yₜ, the parameter maps are the
grid values of atom ĵ, the proton density is the least-squares scale
PD = ⟨d_ĵ, y⟩ / ‖d_ĵ‖² (complex: it carries the receive phase) and the score is the
cosine |⟨d_ĵ, y⟩| / (‖d_ĵ‖·‖y‖) in [0, 1].

The scores are one matrix product per chunk (``[signals, T] @ [T, atoms]``, a GEMM on
whatever device the signals are on) followed by a running argmax, so memory stays
within a budget for any dictionary size. A compressed dictionary (SVD basis V) is matched
in the compressed domain: yV against the coefficients, which gives the same inner
products for signals in the span of V (McGivney et al., IEEE TMI 2014).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from epgx.dictionary import Dictionary

DEFAULT_MEMORY_BUDGET_MB = 256.0


@dataclass(frozen=True)
class MatchResult:
    """Maps from matching signals ``[..., n_readouts]`` against a dictionary.

    Attributes:
        params: parameter name -> float64 map ``[...]`` in that parameter's unit
            (``units``); NaN where the signal is all zero.
        pd: proton density, the least-squares scale of the matched atom ``[...]``:
            complex for complex data (magnitude and receive phase), real for magnitude
            data; relative to the dictionary's M0 = 1.
        score: normalised inner product of the signal and its atom, ``[...]`` in [0, 1].
        index: matched atom ``[...]`` (int64), −1 where the signal is all zero.
        units: unit of every map.
    """

    params: dict[str, torch.Tensor]
    pd: torch.Tensor
    score: torch.Tensor
    index: torch.Tensor
    units: dict[str, str]

    def maps(self) -> dict[str, np.ndarray]:
        """Every map as a numpy array by name: the parameters, ``pd``, ``score``, ``index``."""
        out = {k: v.detach().cpu().numpy() for k, v in self.params.items()}
        out.update(pd=self.pd.detach().cpu().numpy(), score=self.score.detach().cpu().numpy())
        out["index"] = self.index.detach().cpu().numpy()
        return out


def match(
    signals: Any,
    dictionary: Dictionary,
    *,
    magnitude: bool | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> MatchResult:
    """Match every signal to its best dictionary atom (normalised inner product, argmax).

    Args:
        signals: ``[..., n_readouts]`` tensor or array, complex or real, on any device
            (the matching runs there; the dictionary is moved over chunk by chunk).
        dictionary: a :class:`~epgx.dictionary.Dictionary`, compressed or not.
        magnitude: match |signal| against |atom|. Default: True for real signals or a
            real (magnitude) dictionary, False for complex signals and atoms.
        memory_budget_mb: bound on the working memory of one chunk (score matrix and
            atom chunk), MB (> 0).

    Returns:
        A :class:`MatchResult` of maps of shape ``signals.shape[:-1]``.

    Raises:
        ValueError: a signal length that is not the dictionary's, a bad budget, or
            magnitude matching against a compressed complex dictionary (make the
            dictionary with ``.magnitude()`` before ``.compress()``).
        TypeError: ``dictionary`` is not a Dictionary.
    """
    if not isinstance(dictionary, Dictionary):
        raise TypeError(f"dictionary must be an epgx.dictionary.Dictionary, got {type(dictionary).__name__}.")
    ok = isinstance(memory_budget_mb, int | float) and not isinstance(memory_budget_mb, bool)
    if not ok or not math.isfinite(memory_budget_mb) or memory_budget_mb <= 0:
        raise ValueError(f"memory_budget_mb must be a finite number > 0 (MB), got {memory_budget_mb!r}.")
    y = signals if isinstance(signals, torch.Tensor) else torch.as_tensor(np.asarray(signals))
    if y.ndim < 1 or y.shape[-1] != dictionary.n_readouts:
        raise ValueError(
            f"signals have {y.shape[-1] if y.ndim else 0} readouts on their last axis (shape "
            f"{tuple(y.shape)}); the dictionary ({dictionary.model!r}) has {dictionary.n_readouts}."
        )
    if not (y.is_floating_point() or y.is_complex()):
        y = y.to(torch.float64)
    atoms_complex = dictionary.atoms.is_complex()
    if magnitude is None:
        magnitude = not (y.is_complex() and atoms_complex)
    if magnitude and atoms_complex and dictionary.compressed:
        raise ValueError(
            "magnitude matching needs |atoms|, which a compressed complex dictionary does not have: "
            "build it with dictionary.magnitude().compress(...), or match complex signals."
        )
    if not magnitude and not atoms_complex:
        raise ValueError("complex matching needs a complex dictionary; this one is real (magnitude).")

    device = y.device
    batch_shape = y.shape[:-1]
    real_dtype = (
        torch.float64 if dictionary.atoms.dtype in (torch.float64, torch.complex128) else torch.float32
    )
    work = real_dtype if magnitude else (torch.complex128 if real_dtype == torch.float64 else torch.complex64)
    y = y.reshape(-1, y.shape[-1])
    y = (y.abs() if magnitude else y).to(work)
    y_norm = torch.linalg.vector_norm(y, dim=-1)  # [S], full-length norm for the score
    if dictionary.basis is not None:
        y = y @ dictionary.basis.to(device, work)  # [S, rank]

    n_sig, n_atoms, width = y.shape[0], dictionary.n_atoms, y.shape[1]
    budget = memory_budget_mb * 2**20
    itemsize = torch.empty((), dtype=work).element_size()
    a_chunk = int(max(1, min(n_atoms, budget // 4 // (width * itemsize))))
    q_chunk = int(max(1, min(n_sig, budget // 2 // (a_chunk * (itemsize + 4)))))

    best = torch.full((n_sig,), -1.0, dtype=real_dtype, device=device)
    index = torch.zeros(n_sig, dtype=torch.int64, device=device)
    norms = torch.empty(n_atoms, dtype=real_dtype, device=device)
    for a0 in range(0, n_atoms, a_chunk):
        a1 = min(a0 + a_chunk, n_atoms)
        atoms = _atoms(dictionary, a0, a1, magnitude, device, work)  # [a, width]
        norm = torch.linalg.vector_norm(atoms, dim=-1)
        norms[a0:a1] = norm
        inv = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))  # a zero atom never wins
        at = atoms.mH if atoms.is_complex() else atoms.T  # [width, a]
        for q0 in range(0, n_sig, q_chunk):
            q1 = min(q0 + q_chunk, n_sig)
            score = (y[q0:q1] @ at).abs() * inv  # [q, a]: |<d, y>| / ||d||
            top, arg = score.max(dim=-1)
            better = top > best[q0:q1]
            best[q0:q1] = torch.where(better, top, best[q0:q1])
            index[q0:q1] = torch.where(better, arg + a0, index[q0:q1])

    matched = torch.cat(
        [
            _atoms(dictionary, 0, 0, magnitude, device, work, rows=index[s : s + q_chunk])
            for s in range(0, n_sig, q_chunk)
        ]
    )  # [S, width]
    inner = (matched.conj() * y).sum(-1) if matched.is_complex() else (matched * y).sum(-1)
    d_norm = norms[index]
    zero = (y_norm == 0) | (d_norm == 0)
    safe = torch.where(zero, torch.ones_like(d_norm), d_norm)
    pd = torch.where(zero, torch.zeros_like(inner), inner / safe**2)
    score = torch.where(zero, torch.zeros_like(d_norm), inner.abs() / (safe * torch.where(zero, 1.0, y_norm)))
    index = torch.where(zero, torch.full_like(index, -1), index)
    params = {}
    for name, vals in dictionary.grid.values.items():
        v = torch.as_tensor(vals, dtype=torch.float64, device=device)[index.clamp_min(0)]
        params[name] = torch.where(zero, torch.full_like(v, math.nan), v).reshape(batch_shape)
    return MatchResult(
        params=params,
        pd=pd.reshape(batch_shape),
        score=score.clamp(0.0, 1.0).reshape(batch_shape),
        index=index.reshape(batch_shape),
        units=dictionary.grid.units,
    )


def _atoms(
    dictionary: Dictionary,
    start: int,
    stop: int,
    magnitude: bool,
    device: torch.device,
    dtype: torch.dtype,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Atoms ``start:stop`` (or ``rows``) as matched: on ``device``, |·| for magnitude matching."""
    src = dictionary.atoms
    a = src[rows.to(src.device)] if rows is not None else src[start:stop]
    a = a.to(device)
    if magnitude and a.is_complex():
        a = a.abs()
    return a.to(dtype)
