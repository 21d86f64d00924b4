"""Signal dictionaries at scale: parameter grids, chunked generation, SVD compression, storage.

A dictionary holds the simulated signal of every atom of a tissue-parameter grid, the
thing MR fingerprinting and other dictionary-based qMRI match measured signals against
(Ma et al., Nature 2013). This module builds the grid (:func:`grid`), evaluates any model
over it in chunks that fit a memory budget (:func:`generate`), compresses the atoms onto
their leading temporal singular vectors (:meth:`Dictionary.compress`; McGivney et al.,
IEEE TMI 2014), stores everything with its metadata in HDF5 or Zarr (:meth:`Dictionary.save`,
:func:`load`), and spreads generation over a Dask cluster that writes one Zarr store
(:func:`generate_distributed`). Matching lives in :mod:`epgx.fit.match`.

A *model* is a callable ``model(tissue, **protocol) -> Tensor [*tissue.shape, n_readouts]``
(``epgx.fse`` and ``epgx.gre`` are models), the name of one in ``epgx.models.MODELS``, or
an import path ``"package.module:function"``.

Parameters are named as :class:`epgx.Tissue` fields, with their units in the name:
``t1_ms``, ``t2_ms``, ``b1``, ``df_hz`` for every kind; ``t1b_ms``, ``t2b_ms``, ``f``,
``k_ab_per_s``, ``df_b_hz`` for ``bm``; ``t1b_ms``, ``f``, ``k_ab_per_s``,
``mt_lineshape_us`` for ``mt`` (see :data:`KIND_PARAMETERS`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import operator
import platform
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from epgx.tissue import Tissue

# kind -> (required parameters, optional parameters with the Tissue default)
KIND_PARAMETERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "single": (("t1_ms", "t2_ms"), ("b1", "df_hz")),
    "bm": (("t1_ms", "t2_ms", "t1b_ms", "t2b_ms", "f", "k_ab_per_s"), ("df_b_hz", "b1", "df_hz")),
    "mt": (("t1_ms", "t2_ms", "t1b_ms", "f", "k_ab_per_s", "mt_lineshape_us"), ("b1", "df_hz")),
}

UNITS: dict[str, str] = {
    "t1_ms": "ms",
    "t2_ms": "ms",
    "t1b_ms": "ms",
    "t2b_ms": "ms",
    "f": "1",
    "k_ab_per_s": "1/s",
    "df_b_hz": "Hz",
    "mt_lineshape_us": "us",
    "b1": "1",
    "df_hz": "Hz",
}

SPACINGS = ("lin", "log")

# Working memory of one generated atom, as a multiple of its output row: the model's own
# output, the readouts it stacks before returning, the host copy and the projection.
WORKSPACE_FACTOR = 4
DEFAULT_MEMORY_BUDGET_MB = 512.0

FORMAT = "epgx-dictionary"
FORMAT_VERSION = 1
STORE_SUFFIXES = (".h5", ".hdf5", ".zarr")

_SPAN_HELP = "a number, a comma list 'a,b,c', or 'start:stop:n[:lin|log]' (n points, both ends included)"


# --------------------------------------------------------------------------- grid axes


def span(start: float, stop: float, n: int, spacing: str = "lin") -> np.ndarray:
    """``n`` values from ``start`` to ``stop`` (both included), linearly or log-spaced.

    Args:
        start, stop: the ends, in the parameter's unit (> 0 for ``spacing="log"``).
        n: number of values, >= 1 (1 gives ``[start]``).
        spacing: ``"lin"`` (equal steps) or ``"log"`` (equal ratios).

    Returns:
        float64 ``[n]``.

    Raises:
        ValueError: non-finite ends, ``n < 1``, an unknown spacing, or log spacing of
            ends that are not both > 0.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}.")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"span needs n >= 1 points (an int), got {n!r}.")
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise ValueError(f"span ends must be finite, got {start!r} and {stop!r}.")
    if spacing == "log":
        if start <= 0 or stop <= 0:
            raise ValueError(f"log spacing needs ends > 0, got {start!r} and {stop!r}.")
        return np.geomspace(start, stop, int(n))
    return np.linspace(start, stop, int(n))


def parse_span(text: str) -> np.ndarray:
    """Parse a grid axis written as text, as the command line takes it.

    ``"1000"`` is one value, ``"0.8,1,1.2"`` a list, ``"100:5000:50:log"`` 50 log-spaced
    values from 100 to 5000 and ``"10:300:30"`` (or ``...:lin``) 30 linear ones.

    Raises:
        ValueError: text that is none of these (the message shows it).
    """
    s = text.strip()
    try:
        if ":" in s:
            parts = s.split(":")
            if len(parts) not in (3, 4):
                raise ValueError
            spacing = parts[3].strip() if len(parts) == 4 else "lin"
            n_text = parts[2].strip()
            if not n_text.isdigit():
                raise ValueError
            return span(float(parts[0]), float(parts[1]), int(n_text), spacing)
        return np.array([float(p) for p in s.split(",")], dtype=np.float64)
    except ValueError as exc:
        detail = f" ({exc})" if str(exc) else ""
        raise ValueError(f"cannot read grid axis {text!r}{detail}; accepted: {_SPAN_HELP}.") from None


def _axis(name: str, value: Any) -> np.ndarray:
    """One parameter's values as float64 ``[n]`` from a number, sequence, tensor or text."""
    if isinstance(value, str):
        arr = parse_span(value)
    elif isinstance(value, torch.Tensor):
        arr = value.detach().to("cpu", torch.float64).numpy().reshape(-1)
    else:
        try:
            arr = np.asarray(value, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(
                f"grid parameter {name!r} got {value!r}; accepted: numbers, a sequence or tensor of "
                f"numbers, or text ({_SPAN_HELP})."
            ) from None
    if arr.size == 0:
        raise ValueError(f"grid parameter {name!r} has no values; give at least one.")
    if not np.isfinite(arr).all():
        bad = arr[~np.isfinite(arr)][0]
        raise ValueError(f"grid parameter {name!r} has a non-finite value ({bad!r}); all must be finite.")
    return arr


# --------------------------------------------------------------------------- constraints

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_OPERAND = rf"(?:(?P<{{g}}f>{_NUMBER})\s*\*\s*)?(?P<{{g}}x>[a-z_][a-z0-9_]*|{_NUMBER})"
_CONSTRAINT_RE = re.compile(
    r"^\s*" + _OPERAND.format(g="l") + r"\s*(?P<op><=|>=|<|>)\s*" + _OPERAND.format(g="r") + r"\s*$"
)
Constraint = str | Callable[[Mapping[str, np.ndarray]], Any]


def _operand(factor: str | None, x: str, values: Mapping[str, np.ndarray], text: str) -> Any:
    if re.fullmatch(_NUMBER, x):
        base: Any = float(x)
    elif x in values:
        base = values[x]
    else:
        raise ValueError(
            f"constraint {text!r} names {x!r}, which is not a parameter of this grid {tuple(values)}."
        )
    return base if factor is None else float(factor) * base


def _keep_mask(constraint: Constraint, values: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """Which atoms satisfy one constraint, as a bool ``[n]``."""
    if callable(constraint):
        keep = np.asarray(constraint(values), dtype=bool)
        if keep.shape != (n,):
            raise ValueError(
                f"a constraint callable must return one bool per atom, shape ({n},); got shape {keep.shape}."
            )
        return keep
    if not isinstance(constraint, str):
        raise TypeError(
            f"a constraint is a string like 't2_ms < t1_ms' or a callable; got {type(constraint).__name__}."
        )
    m = _CONSTRAINT_RE.match(constraint)
    if m is None:
        raise ValueError(
            f"cannot read constraint {constraint!r}; accepted: 'A op B' with op one of <, <=, >, >= and "
            "A, B a parameter name, a number, or number*name (e.g. 't2_ms < t1_ms', 't2_ms <= 0.5*t1_ms')."
        )
    lhs = _operand(m["lf"], m["lx"], values, constraint)
    rhs = _operand(m["rf"], m["rx"], values, constraint)
    return np.broadcast_to(np.asarray(_OPS[m["op"]](lhs, rhs), dtype=bool), (n,))


def _describe_constraint(c: Constraint) -> str:
    return c if isinstance(c, str) else f"<callable {getattr(c, '__qualname__', repr(c))}>"


# --------------------------------------------------------------------------- Grid


def _tissue_from(kind: str, cols: Mapping[str, Any], dtype: torch.dtype | None) -> Tissue:
    """A :class:`Tissue` of ``kind`` from per-parameter columns (tensors or numbers)."""
    opt = {k: cols[k] for k in ("b1", "df_hz") if k in cols}
    if kind == "single":
        return Tissue(cols["t1_ms"], cols["t2_ms"], **opt, dtype=dtype)
    if kind == "bm":
        extra = {"df_b_hz": cols["df_b_hz"]} if "df_b_hz" in cols else {}
        return Tissue.bm(
            t1_ms=(cols["t1_ms"], cols["t1b_ms"]),
            t2_ms=(cols["t2_ms"], cols["t2b_ms"]),
            f=cols["f"],
            k_ab_per_s=cols["k_ab_per_s"],
            **extra,
            **opt,
            dtype=dtype,
        )
    return Tissue.mt(
        t1_ms=(cols["t1_ms"], cols["t1b_ms"]),
        t2_ms=cols["t2_ms"],
        f=cols["f"],
        k_ab_per_s=cols["k_ab_per_s"],
        mt_lineshape_us=cols["mt_lineshape_us"],
        **opt,
        dtype=dtype,
    )


@dataclass(frozen=True, eq=False)
class Grid:
    """The atoms of a dictionary: one value of every parameter per atom.

    Build it with :func:`grid`. ``values[name]`` is float64 ``[n_atoms]`` in the unit of
    ``name`` (:data:`UNITS`); a parameter held fixed repeats its value.

    Attributes:
        kind: tissue kind, ``"single"``, ``"bm"`` or ``"mt"``.
        values: parameter name -> float64 ``[n_atoms]``, in the order the grid was given.
        constraints: the constraints applied, as text.
        n_dropped: atoms the constraints removed.
    """

    kind: str
    values: dict[str, np.ndarray]
    constraints: tuple[str, ...] = ()
    n_dropped: int = 0

    @property
    def n_atoms(self) -> int:
        return int(next(iter(self.values.values())).shape[0])

    def __len__(self) -> int:
        return self.n_atoms

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    @property
    def units(self) -> dict[str, str]:
        """Unit of every parameter, by name (``"1"``: unitless)."""
        return {k: UNITS[k] for k in self.values}

    def tissue(
        self,
        start: int = 0,
        stop: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tissue:
        """The :class:`Tissue` batch ``[stop - start]`` of atoms ``start:stop``."""
        cols = {k: torch.as_tensor(v[start:stop], dtype=dtype, device=device) for k, v in self.values.items()}
        return _tissue_from(self.kind, cols, dtype)

    def select(self, index: Any) -> Grid:
        """The grid of the atoms ``index`` picks (a slice, ints or a bool mask)."""
        return Grid(self.kind, {k: v[index] for k, v in self.values.items()}, self.constraints, 0)

    def __repr__(self) -> str:
        parts = []
        for k, v in self.values.items():
            lo, hi = v.min(), v.max()
            parts.append(f"{k}={lo:g}" if lo == hi else f"{k}=[{lo:g}..{hi:g}, {np.unique(v).size} values]")
        return f"Grid(kind={self.kind!r}, n_atoms={self.n_atoms}, " + ", ".join(parts) + ")"


def grid(
    kind: str = "single",
    *,
    product: bool = True,
    constraints: Iterable[Constraint] = (),
    **parameters: Any,
) -> Grid:
    """A parameter grid: the Cartesian product of per-parameter values, or a list of atoms.

    Args:
        kind: tissue kind of every atom: ``"single"``, ``"bm"`` or ``"mt"``.
        product: True (default) takes every combination of the values, the last
            parameter varying fastest; False zips them into an explicit atom list (all of
            one length; a single value is repeated).
        constraints: atoms to keep, each a string ``"A op B"`` (op ``<``, ``<=``, ``>``,
            ``>=``; A and B parameter names, numbers or ``number*name``, e.g.
            ``"t2_ms < t1_ms"``) or a callable taking the dict of per-atom arrays and
            returning a bool per atom. Atoms failing any are dropped.
        **parameters: one entry per parameter, named as the Tissue field with its unit
            (:data:`KIND_PARAMETERS`): a number (held fixed), a sequence, array or tensor
            of values, :func:`span`'s output, or text (``"100:5000:50:log"``, ``"1,2"``).

    Returns:
        The :class:`Grid`. Every value is checked as :class:`epgx.Tissue` checks it.

    Raises:
        ValueError: an unknown kind, a parameter that does not apply to the kind, a
            missing required one, unreadable or out-of-range values, unequal lengths with
            ``product=False``, or a grid the constraints leave empty.

    Example:
        >>> g = grid(t1_ms="100:5000:50:log", t2_ms=span(10, 500, 40, "log"), constraints=["t2_ms < t1_ms"])
    """
    if kind not in KIND_PARAMETERS:
        raise ValueError(f"grid kind must be one of {tuple(KIND_PARAMETERS)}, got {kind!r}.")
    required, optional = KIND_PARAMETERS[kind]
    allowed = required + optional
    unknown = [k for k in parameters if k not in allowed]
    if unknown:
        raise ValueError(
            f"grid parameter(s) {unknown} do not apply to kind {kind!r}; its parameters are {allowed}."
        )
    missing = [k for k in required if k not in parameters]
    if missing:
        raise ValueError(f"a {kind!r} grid needs {missing} too (required: {required}).")
    axes = {k: _axis(k, v) for k, v in parameters.items()}
    if product:
        mesh = np.meshgrid(*axes.values(), indexing="ij")
        values = {k: m.reshape(-1).copy() for k, m in zip(axes, mesh, strict=True)}
    else:
        lengths = {k: a.size for k, a in axes.items() if a.size != 1}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"product=False zips the parameters into atoms, so they need one length (or a single "
                f"value); got lengths {lengths}."
            )
        n = max(lengths.values(), default=1)
        values = {k: np.broadcast_to(a, (n,)).copy() for k, a in axes.items()}
    n_total = next(iter(values.values())).size
    keep = np.ones(n_total, dtype=bool)
    described = []
    for c in constraints:
        keep &= _keep_mask(c, values, n_total)
        described.append(_describe_constraint(c))
    if not keep.any():
        raise ValueError(
            f"the grid is empty: the constraints {described} drop all {n_total} atoms; relax them or "
            "widen the parameter ranges."
        )
    values = {k: v[keep] for k, v in values.items()}
    try:
        _tissue_from(kind, {k: torch.from_numpy(v) for k, v in values.items()}, torch.float64)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"grid: {exc}") from None
    return Grid(kind, values, tuple(described), int(n_total - keep.sum()))


# --------------------------------------------------------------------------- models


def resolve_model(model: Any) -> tuple[str, Callable[..., torch.Tensor]]:
    """The name and function of a model: a callable, a registry name, or ``"module:function"``.

    Registry names are looked up in ``epgx.models.MODELS`` when the call is made.

    Raises:
        ValueError: an unknown name (the message lists the available ones), or an import
            path that does not import or does not name a callable.
        TypeError: ``model`` is neither a string nor callable.
    """
    if callable(model):
        qual = getattr(model, "__qualname__", type(model).__qualname__)
        return f"{getattr(model, '__module__', '?')}:{qual}", model
    if not isinstance(model, str):
        raise TypeError(
            f"model must be a callable, a name in epgx.models.MODELS or 'module:function'; "
            f"got {type(model).__name__}."
        )
    if ":" in model:
        mod_name, _, attr = model.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load model {model!r} ('module:function'): {exc}") from None
        if not callable(fn):
            raise ValueError(f"model {model!r} names a {type(fn).__name__}, not a callable.")
        return model, fn
    available = available_models()
    if model not in available:
        names = ", ".join(sorted(available)) or "none (epgx.models has no MODELS registry yet)"
        raise ValueError(
            f"unknown model {model!r}; available: {names}; or give a callable or 'module:function' "
            "(e.g. 'epgx:fse')."
        )
    return model, available[model]


def available_models() -> dict[str, Callable[..., torch.Tensor]]:
    """``epgx.models.MODELS`` (name -> function), or an empty dict where it does not exist."""
    try:
        models = importlib.import_module("epgx.models")
    except ModuleNotFoundError as exc:
        if exc.name != "epgx.models":
            raise
        return {}
    return dict(getattr(models, "MODELS", {}))


def _takes(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _model_kwargs(name: str, fn: Callable[..., Any], protocol: Mapping[str, Any], backend: str) -> dict:
    if "backend" in protocol:
        raise ValueError("give the backend as generate(backend=...), not in the protocol.")
    kwargs = dict(protocol)
    if _takes(fn, "backend"):
        kwargs["backend"] = backend
    elif backend != "auto":
        raise ValueError(f"model {name!r} takes no backend argument; use backend='auto' for it.")
    return kwargs


def _evaluate(
    name: str, fn: Callable[..., Any], tissue: Tissue, kwargs: Mapping[str, Any], n_readouts: int | None
) -> torch.Tensor:
    with torch.no_grad():
        out = fn(tissue, **kwargs)
    if isinstance(out, tuple):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != tissue.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model {name!r} returned {shape} for a batch of {tissue.shape[0]} atoms; a model returns a "
            "tensor [*tissue.shape, n_readouts]."
        )
    if n_readouts is not None and out.shape[1] != n_readouts:
        raise ValueError(f"model {name!r} returned {out.shape[1]} readouts, then {n_readouts}.")
    return out


# --------------------------------------------------------------------------- metadata


def _jsonable(value: Any, where: str) -> Any:
    """Protocol values as JSON: numbers, strings, bools, None, lists, dicts, arrays, tensors."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if np.iscomplexobj(value):
            raise ValueError(f"protocol value {where} is complex; store real and imaginary parts apart.")
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(
        f"protocol value {where} is a {type(value).__name__}; accepted: numbers, strings, bools, None, "
        "lists, dicts, numpy arrays and tensors (a dictionary stores its protocol as JSON)."
    )


def software_versions() -> dict[str, str]:
    """epgx, torch, numpy and Python versions, as recorded with a dictionary."""
    import epgx

    return {
        "epgx": epgx.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _check_budget(memory_budget_mb: Any) -> float:
    ok = isinstance(memory_budget_mb, int | float) and not isinstance(memory_budget_mb, bool)
    if not ok or not math.isfinite(memory_budget_mb) or memory_budget_mb <= 0:
        raise ValueError(f"memory_budget_mb must be a finite number > 0 (MB), got {memory_budget_mb!r}.")
    return float(memory_budget_mb)


def _check_dtype(dtype: Any) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}.")
    return dtype


def _chunk_atoms(memory_budget_mb: float, n_cols: int, itemsize: int, n_atoms: int) -> int:
    per_atom = max(1, n_cols * itemsize * WORKSPACE_FACTOR)
    return int(max(1, min(n_atoms, memory_budget_mb * 2**20 // per_atom)))


# --------------------------------------------------------------------------- Dictionary


@dataclass(eq=False)
class Dictionary:
    """Simulated signals of every atom of a :class:`Grid`, with what made them.

    Attributes:
        atoms: ``[n_atoms, n_readouts]`` signals (complex, or real for a magnitude or
            real-valued model), M0 = 1; when compressed, ``[n_atoms, rank]`` coefficients
            in ``basis`` (atom ≈ ``atoms @ basis.mH``).
        grid: the parameter value of every atom.
        model: the model's name (registry name, ``module:function``, or a callable's
            module and qualified name).
        protocol: the keyword arguments the model was called with, as JSON values.
        basis: ``[n_readouts, rank]`` orthonormal temporal basis, or None.
        svd_energy: fraction of the atoms' energy (Σ|atom|²) the basis keeps, or None.
        versions: epgx, torch, numpy and Python versions that generated it.
    """

    atoms: torch.Tensor
    grid: Grid
    model: str
    protocol: dict[str, Any]
    basis: torch.Tensor | None = None
    svd_energy: float | None = None
    versions: dict[str, str] = field(default_factory=software_versions)

    def __post_init__(self) -> None:
        if self.atoms.ndim != 2 or self.atoms.shape[0] != self.grid.n_atoms:
            raise ValueError(
                f"atoms must be [n_atoms={self.grid.n_atoms}, n_readouts]; got {tuple(self.atoms.shape)}."
            )
        if self.basis is not None and (self.basis.ndim != 2 or self.basis.shape[1] != self.atoms.shape[1]):
            raise ValueError(
                f"basis must be [n_readouts, rank={self.atoms.shape[1]}]; got {tuple(self.basis.shape)}."
            )

    @property
    def n_atoms(self) -> int:
        return int(self.atoms.shape[0])

    @property
    def n_readouts(self) -> int:
        """Length of a signal in time (before compression)."""
        return int(self.atoms.shape[1] if self.basis is None else self.basis.shape[0])

    @property
    def compressed(self) -> bool:
        return self.basis is not None

    @property
    def rank(self) -> int:
        """Columns of ``atoms``: the SVD rank when compressed, else ``n_readouts``."""
        return int(self.atoms.shape[1])

    @property
    def units(self) -> dict[str, str]:
        """Units of the grid parameters, and of the atoms (signal per unit M0)."""
        return {**self.grid.units, "atoms": "signal / M0"}

    def signals(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Atoms ``start:stop`` in time, ``[n, n_readouts]`` (decompressed if compressed)."""
        a = self.atoms[start:stop]
        return a if self.basis is None else a @ self.basis.mH

    def compress(
        self, energy: float = 0.9999, *, rank: int | None = None, chunk_atoms: int = 65536
    ) -> Dictionary:
        """Project the atoms onto their leading right singular vectors.

        The basis comes from the eigenvectors of the Gram matrix Σ atomᴴ·atom (float64,
        accumulated over chunks, so memory stays at ``n_readouts²``); the rank is the
        smallest that keeps ``energy`` of Σ|atom|², or ``rank`` when given.

        Args:
            energy: fraction of the energy to keep, in (0, 1] (e.g. 0.9999).
            rank: a fixed rank instead, 1..n_readouts.
            chunk_atoms: atoms per Gram/projection step.

        Returns:
            A new compressed :class:`Dictionary` (``basis`` ``[n_readouts, rank]``).

        Raises:
            ValueError: an energy outside (0, 1], a bad rank, or an already compressed
                dictionary.
        """
        if self.compressed:
            raise ValueError(f"this dictionary is already compressed (rank {self.rank}).")
        if rank is None and not (isinstance(energy, int | float) and 0 < energy <= 1):
            raise ValueError(f"energy must be in (0, 1] (fraction of Σ|atom|² kept), got {energy!r}.")
        n = self.n_readouts
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n):
            raise ValueError(f"rank must be an int in 1..{n} (n_readouts), got {rank!r}.")
        wide = torch.complex128 if self.atoms.is_complex() else torch.float64
        gram = torch.zeros(n, n, dtype=wide)
        for s in range(0, self.n_atoms, chunk_atoms):
            a = self.atoms[s : s + chunk_atoms].to("cpu", wide)
            gram += a.mH @ a
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        evals = evals.flip(0).clamp_min(0.0)
        evecs = evecs.flip(1)
        total = float(evals.sum())
        if rank is None:
            kept = (evals.cumsum(0) / total) if total > 0 else torch.ones_like(evals)
            rank = int(min(n, int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype))) + 1))
        kept_energy = float(evals[:rank].sum() / total) if total > 0 else 1.0
        basis = evecs[:, :rank].to(self.atoms.dtype)
        coeffs = torch.cat(
            [
                (self.atoms[s : s + chunk_atoms] @ basis.to(self.atoms.device))
                for s in range(0, self.n_atoms, chunk_atoms)
            ]
        )
        return Dictionary(
            coeffs, self.grid, self.model, self.protocol, basis, kept_energy, dict(self.versions)
        )

    def magnitude(self) -> Dictionary:
        """The same dictionary with ``|atoms|``, for matching magnitude images.

        Raises:
            ValueError: the dictionary is compressed (|·| does not commute with the
                projection: take the magnitude first, then compress).
        """
        if self.compressed:
            raise ValueError(
                "a compressed dictionary has no magnitude: call .magnitude() before .compress()."
            )
        return Dictionary(
            self.atoms.abs(), self.grid, self.model, self.protocol, None, None, dict(self.versions)
        )

    def save(self, path: str | Path) -> Path:
        """Write atoms, grid, basis and metadata to ``path`` (``.h5``/``.hdf5`` or ``.zarr``).

        HDF5 needs h5py (``pip install 'epgx[dict]'``); Zarr needs zarr (``'epgx[dask]'``).

        Raises:
            ValueError: another suffix.
            ImportError: the storage package is missing.
        """
        path = Path(path)
        suffix = _store_suffix(path)
        meta = self._metadata()
        arrays = {"atoms": self.atoms.detach().cpu().numpy()}
        arrays.update({f"grid/{k}": v for k, v in self.grid.values.items()})
        if self.basis is not None:
            arrays["basis"] = self.basis.detach().cpu().numpy()
        if suffix == ".zarr":
            group = _zarr().open_group(str(path), mode="w")
            for name, arr in arrays.items():
                _zarr_create(group, name, arr.shape, _zarr_chunks(arr.shape, arr.itemsize), arr.dtype)[
                    ...
                ] = arr
            group.attrs.update(meta)
            return path
        h5py = _h5py()
        with h5py.File(path, "w") as fh:
            for name, arr in arrays.items():
                fh.create_dataset(name, data=arr)
            for k, v in meta.items():
                fh.attrs[k] = json.dumps(v)  # every attribute is JSON text
        return path

    def _metadata(self) -> dict[str, Any]:
        return _metadata(self.grid, self.model, self.protocol, self.versions, self.svd_energy)

    def __repr__(self) -> str:
        comp = f", rank {self.rank} keeping {self.svd_energy:.6g} of the energy" if self.compressed else ""
        return (
            f"Dictionary(model={self.model!r}, {self.n_atoms} atoms x {self.n_readouts} readouts, "
            f"{self.atoms.dtype}{comp}; {self.grid!r})"
        )


def _metadata(
    grid: Grid, model: str, protocol: dict[str, Any], versions: dict[str, str], svd_energy: float | None
) -> dict[str, Any]:
    """What a store keeps beside the arrays (JSON values)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": grid.kind,
        "parameters": list(grid.names),
        "constraints": list(grid.constraints),
        "n_dropped": grid.n_dropped,
        "model": model,
        "protocol": protocol,
        "units": {**grid.units, "atoms": "signal / M0"},
        "versions": versions,
        "svd_energy": svd_energy,
        "complete": True,
    }


def _store_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in STORE_SUFFIXES:
        raise ValueError(f"dictionary file {str(path)!r}: suffix must be one of {STORE_SUFFIXES}.")
    return suffix


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise ImportError("HDF5 dictionaries need h5py: pip install 'epgx[dict]'.") from None
    return h5py


def _zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise ImportError("Zarr dictionaries need zarr: pip install 'epgx[dask]'.") from None
    return zarr


def _zarr_create(group: Any, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any) -> Any:
    create = getattr(group, "create_array", None) or group.create_dataset  # zarr 3 | zarr 2
    return create(name, shape=shape, chunks=chunks, dtype=dtype)


# Zarr chunk size, bytes: large enough for fast I/O, small enough to compress and write
# one at a time.
ZARR_CHUNK_BYTES = 16 * 2**20


def _zarr_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Whole rows per chunk, about :data:`ZARR_CHUNK_BYTES` each."""
    row = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    return (max(1, min(shape[0], ZARR_CHUNK_BYTES // max(1, row))), *shape[1:])


def load(path: str | Path) -> Dictionary:
    """Read a dictionary written by :meth:`Dictionary.save` or :func:`generate_distributed`.

    Raises:
        ValueError: an unknown suffix, a file that is not an epgx dictionary, or a Zarr
            store whose distributed generation did not finish.
        OSError: the file cannot be read.
        ImportError: h5py or zarr is missing.
    """
    path = Path(path)
    suffix = _store_suffix(path)
    if not path.exists():
        raise FileNotFoundError(f"no dictionary at {str(path)!r}.")
    if suffix == ".zarr":
        group = _zarr().open_group(str(path), mode="r")
        meta = dict(group.attrs)
        read = lambda name: np.asarray(group[name][...])  # noqa: E731
        has = lambda name: name in group  # noqa: E731
        return _from_store(path, meta, read, has)
    h5py = _h5py()
    with h5py.File(path, "r") as fh:
        meta = {k: json.loads(v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}
        return _from_store(path, meta, lambda name: np.asarray(fh[name][...]), lambda name: name in fh)


def _from_store(
    path: Path, meta: dict[str, Any], read: Callable[[str], np.ndarray], has: Callable[[str], bool]
) -> Dictionary:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an epgx dictionary (no format={FORMAT!r} attribute).")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has dictionary format {meta['format_version']}; this epgx reads up to "
            f"{FORMAT_VERSION}: upgrade epgx."
        )
    if not meta.get("complete", False):
        raise ValueError(f"{str(path)!r} is incomplete: its distributed generation did not finish.")
    values = {k: read(f"grid/{k}").astype(np.float64) for k in meta["parameters"]}
    g = Grid(meta["kind"], values, tuple(meta.get("constraints", ())), int(meta.get("n_dropped", 0)))
    basis = torch.from_numpy(read("basis")) if has("basis") else None
    return Dictionary(
        torch.from_numpy(read("atoms")),
        g,
        meta["model"],
        meta.get("protocol") or {},
        basis,
        meta.get("svd_energy"),
        dict(meta.get("versions") or {}),
    )


# --------------------------------------------------------------------------- generation


def generate(
    model: Any,
    grid: Grid,
    protocol: Mapping[str, Any] | None = None,
    *,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    backend: str = "auto",
    basis: torch.Tensor | None = None,
    svd_energy: float | None = None,
    progress: bool = True,
) -> Dictionary:
    """Evaluate ``model`` at every atom of ``grid``, in chunks that fit a memory budget.

    One atom is evaluated first to learn the signal length; the chunk size is then the
    number of atoms whose output rows, times :data:`WORKSPACE_FACTOR`, fit
    ``memory_budget_mb`` (the epgx engines bound their state memory separately by their
    own ``chunk_size``). Atoms are collected on the CPU.

    Args:
        model: a callable ``(tissue, **protocol) -> [*tissue.shape, n_readouts]``, a name
            in ``epgx.models.MODELS``, or ``"module:function"``.
        grid: the atoms (:func:`grid`).
        protocol: keyword arguments of the model (flip angles, TR, ...), stored as JSON.
        memory_budget_mb: working memory of one chunk, MB (> 0).
        dtype: float32 or float64 tissue (complex64/complex128 signals).
        device: where the model runs (e.g. ``"cuda"``); CPU by default.
        backend: passed to the model as ``backend=`` when it takes one.
        basis: ``[n_readouts, rank]`` orthonormal basis (e.g. of a smaller dictionary's
            :meth:`Dictionary.compress`) to project every chunk onto as it is made, so the
            full-length atoms are never held.
        svd_energy: compress the result keeping this fraction of the energy.
        progress: show a tqdm progress bar (on stderr).

    Returns:
        A :class:`Dictionary`.

    Raises:
        ValueError: an unknown model, a bad budget or dtype, a protocol value that is not
            JSON-able, a model output of the wrong shape, a basis of the wrong length.
    """
    from tqdm.auto import tqdm

    name, fn = resolve_model(model)
    if not isinstance(grid, Grid):
        raise TypeError(f"grid must be an epgx.dictionary.Grid (from grid(...)), got {type(grid).__name__}.")
    budget = _check_budget(memory_budget_mb)
    dtype = _check_dtype(dtype)
    if basis is not None and svd_energy is not None:
        raise ValueError("give basis (project while generating) or svd_energy (compress after), not both.")
    stored = {k: _jsonable(v, repr(k)) for k, v in (protocol or {}).items()}
    kwargs = _model_kwargs(name, fn, protocol or {}, backend)
    n_atoms = grid.n_atoms
    first = _evaluate(name, fn, grid.tissue(0, 1, dtype=dtype, device=device), kwargs, None)
    n_readouts = first.shape[1]
    proj = None
    if basis is not None:
        if basis.ndim != 2 or basis.shape[0] != n_readouts:
            raise ValueError(f"basis must be [n_readouts={n_readouts}, rank]; got {tuple(basis.shape)}.")
        proj = basis.to(first.device, first.dtype if first.is_complex() else basis.dtype)
        first = first.to(proj.dtype) @ proj
    out = torch.empty((n_atoms, first.shape[1]), dtype=first.dtype)
    out[:1] = first.cpu()
    chunk = _chunk_atoms(budget, n_readouts, first.element_size(), n_atoms)
    with tqdm(total=n_atoms, unit="atom", disable=not progress, desc=f"dictionary {name}") as bar:
        bar.update(1)
        for s in range(1, n_atoms, chunk):
            e = min(s + chunk, n_atoms)
            sig = _evaluate(name, fn, grid.tissue(s, e, dtype=dtype, device=device), kwargs, n_readouts)
            if proj is not None:
                sig = sig.to(proj.dtype) @ proj
            out[s:e] = sig.cpu()
            bar.update(e - s)
    result = Dictionary(out, grid, name, stored)
    if basis is not None:
        result = Dictionary(out, grid, name, stored, basis.detach().cpu().to(out.dtype), None)
    if svd_energy is not None:
        result = result.compress(svd_energy)
    return result


def generate_distributed(
    model: Any,
    grid: Grid,
    store: str | Path,
    protocol: Mapping[str, Any] | None = None,
    *,
    client: Any = None,
    atoms_per_task: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    progress: bool = True,
) -> Dictionary:
    """Generate a dictionary on a Dask cluster, every task writing its rows of one Zarr store.

    The client creates the store (metadata, grid, an empty atoms array chunked by
    ``atoms_per_task`` rows) and submits one task per chunk; each worker evaluates the
    model on its atoms and writes them straight into the store (chunks never overlap, so
    the writes are independent). The store is marked complete when every task is done;
    :func:`load` refuses an incomplete one. The workers must see ``store`` (a shared
    file system) and be able to import the model (a registry name or ``module:function``
    always can; a callable is pickled).

    Args:
        model, grid, protocol, dtype, backend, memory_budget_mb: as :func:`generate`.
        store: path of the ``.zarr`` store to write (replaced if it exists).
        client: a ``distributed.Client``; the current one by default.
        atoms_per_task: atoms per task and per Zarr chunk (default: what the memory
            budget allows, split so every worker gets at least two tasks).
        progress: tqdm bar over completed atoms.

    Returns:
        The :class:`Dictionary` read back from the store.

    Raises:
        ValueError: as :func:`generate`, a store without the ``.zarr`` suffix, no client.
        ImportError: dask.distributed or zarr is missing (``pip install 'epgx[dask]'``).
    """
    from tqdm.auto import tqdm

    try:
        import distributed
    except ImportError:
        raise ImportError(
            "distributed generation needs dask.distributed: pip install 'epgx[dask]'."
        ) from None
    zarr = _zarr()
    store = Path(store)
    if store.suffix.lower() != ".zarr":
        raise ValueError(f"store {str(store)!r} must be a '.zarr' directory.")
    name, fn = resolve_model(model)
    budget = _check_budget(memory_budget_mb)
    dtype = _check_dtype(dtype)
    stored = {k: _jsonable(v, repr(k)) for k, v in (protocol or {}).items()}
    kwargs = _model_kwargs(name, fn, protocol or {}, backend)
    if client is None:
        try:
            client = distributed.get_client()
        except ValueError:
            raise ValueError("no Dask client: start one (distributed.Client(...)) or pass client=.") from None
    first = _evaluate(name, fn, grid.tissue(0, 1, dtype=dtype), kwargs, None)
    n_readouts, n_atoms = first.shape[1], grid.n_atoms
    if atoms_per_task is None:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        atoms_per_task = min(
            _chunk_atoms(budget, n_readouts, first.element_size(), n_atoms),
            max(1, math.ceil(n_atoms / (2 * workers))),
        )
    if isinstance(atoms_per_task, bool) or not isinstance(atoms_per_task, int) or atoms_per_task < 1:
        raise ValueError(f"atoms_per_task must be an int >= 1, got {atoms_per_task!r}.")
    meta = {**_metadata(grid, name, stored, software_versions(), None), "complete": False}
    group = zarr.open_group(str(store), mode="w")
    for k, v in grid.values.items():
        _zarr_create(group, f"grid/{k}", v.shape, _zarr_chunks(v.shape, v.itemsize), v.dtype)[...] = v
    dt = np.dtype(str(first.dtype).removeprefix("torch."))
    _zarr_create(group, "atoms", (n_atoms, n_readouts), (atoms_per_task, n_readouts), dt)
    group.attrs.update(meta)
    model_ref = model if isinstance(model, str) else fn
    futures = [
        client.submit(
            _write_rows,
            model_ref,
            grid.kind,
            {k: v[s : s + atoms_per_task] for k, v in grid.values.items()},
            dict(protocol or {}),
            backend,
            str(store),
            s,
            str(dtype).removeprefix("torch."),
            pure=False,
        )
        for s in range(0, n_atoms, atoms_per_task)
    ]
    with tqdm(total=n_atoms, unit="atom", disable=not progress, desc=f"dictionary {name} (dask)") as bar:
        for fut in distributed.as_completed(futures):
            bar.update(fut.result())
    group.attrs["complete"] = True
    return load(store)


def _write_rows(
    model: Any,
    kind: str,
    cols: dict[str, np.ndarray],
    protocol: dict[str, Any],
    backend: str,
    store: str,
    start: int,
    dtype_name: str,
) -> int:
    """A Dask task: the signals of one chunk of atoms, written into rows of the store."""
    import zarr

    name, fn = resolve_model(model)
    dtype = getattr(torch, dtype_name)
    tissue = _tissue_from(kind, {k: torch.as_tensor(v, dtype=dtype) for k, v in cols.items()}, dtype)
    sig = _evaluate(name, fn, tissue, _model_kwargs(name, fn, protocol, backend), None)
    atoms = zarr.open_array(f"{store}/atoms", mode="r+")
    atoms[start : start + sig.shape[0]] = sig.cpu().numpy()
    return int(sig.shape[0])
