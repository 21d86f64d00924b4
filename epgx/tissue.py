"""Batched tissue parameters for single-pool, Bloch–McConnell and MT simulations.

Every field is a tensor of one common batch shape; the simulators vectorise over it.
Units follow the project convention: times in ms, exchange rates in s⁻¹, frequencies in
Hz, lineshape in µs, B1 as a unitless scale of the nominal field.

Pools: pool a is the free (large) pool with M0a = 1 − f; pool b is the small pool with
M0b = f. Exchange ``k_ab_per_s`` is the forward rate a → b; the reverse rate follows from
detailed balance, k_ba = k_ab (1 − f) / f (EPG-X's ``ka``/``kb``; Malik et al., MRM 2018).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from epgx.ops import primal

KINDS = ("single", "bm", "mt")

# Field name -> (lower bound, inclusive?, upper bound, inclusive?) and a human description.
_LIMITS: dict[str, tuple[float, bool, float, bool, str]] = {
    "t1_ms": (0.0, False, math.inf, False, "finite values > 0 ms"),
    "t2_ms": (0.0, False, math.inf, False, "finite values > 0 ms"),
    "t1b_ms": (0.0, False, math.inf, False, "finite values > 0 ms"),
    "t2b_ms": (0.0, False, math.inf, False, "finite values > 0 ms"),
    "f": (0.0, False, 1.0, False, "values in the open interval (0, 1)"),
    "k_ab_per_s": (0.0, True, math.inf, False, "finite values >= 0 s^-1"),
    "df_b_hz": (-math.inf, False, math.inf, False, "finite values in Hz"),
    "mt_lineshape_us": (0.0, True, math.inf, False, "finite values >= 0 us"),
    "b1": (0.0, True, math.inf, False, "finite values >= 0 (1 = nominal B1)"),
    "df_hz": (-math.inf, False, math.inf, False, "finite values in Hz"),
}

FIELDS = tuple(_LIMITS)


def _describe(x: torch.Tensor, bad: torch.Tensor) -> str:
    """Show the first offending value (and how many there are) for an error message."""
    vals = x.reshape(-1)[bad.reshape(-1)]
    first = vals[0].item()
    more = f" (and {vals.numel() - 1} more)" if vals.numel() > 1 else ""
    return f"{first!r}{more}"


def _check_range(name: str, x: torch.Tensor) -> None:
    lo, lo_inc, hi, hi_inc, accepted = _LIMITS[name]
    xd = primal(x)  # the values, also under torch.func transforms
    bad = ~torch.isfinite(xd)
    bad |= (xd < lo) if lo_inc else (xd <= lo)
    bad |= (xd > hi) if hi_inc else (xd >= hi)
    if bool(bad.any()):
        raise ValueError(f"Tissue field {name!r} got {_describe(xd, bad)}; accepted: {accepted}.")


def _as_tensor(name: str, value: Any) -> torch.Tensor | float:
    """Keep tensors (and their autograd history); convert numbers and sequences."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"Tissue field {name!r} must be real numbers, got a {value.dtype} tensor.")
        return value
    if isinstance(value, bool):
        raise TypeError(f"Tissue field {name!r} must be a number or tensor, got a bool.")
    if isinstance(value, int | float):
        return float(value)
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"Tissue field {name!r} must be a number, sequence of numbers or tensor; "
            f"got {type(value).__name__}."
        ) from exc
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"Tissue field {name!r} must be real numbers, got {t.dtype} values.")
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _common_dtype_device(
    values: dict[str, torch.Tensor | float], dtype: torch.dtype | None
) -> tuple[torch.dtype, torch.device]:
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        found = ", ".join(f"{k}: {t.device}" for k, t in tensors.items())
        raise ValueError(f"Tissue fields are on different devices ({found}); put them on one.")
    device = devices.pop() if devices else torch.device("cpu")
    if dtype is None:
        # Only user-made float tensors decide the dtype; numbers follow torch's default.
        floats = [t.dtype for t in tensors.values() if t.is_floating_point() and t.dtype != torch.float64]
        user64 = any(t.dtype == torch.float64 for t in tensors.values() if t.is_floating_point())
        if user64:
            dtype = torch.float64
        elif floats:
            dtype = floats[0]
        else:
            dtype = torch.get_default_dtype()
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"Tissue dtype must be torch.float32 or torch.float64, got {dtype}.")
    return dtype, device


class Tissue:
    """Tissue parameters for a batch of spins (one EPG simulation per batch element).

    Construct a single-pool tissue directly, or use :meth:`bm` (two exchanging pools)
    and :meth:`mt` (free pool + longitudinal-only bound pool). Every field broadcasts to
    one batch shape; dtype and device follow the tensor inputs (float32 by default,
    float64 when any tensor input is float64, or when ``dtype`` says so).

    Args:
        t1_ms: longitudinal relaxation time of the (free) pool, ms, > 0.
        t2_ms: transverse relaxation time of the (free) pool, ms, > 0.
        b1: transmit-field scale (1 = nominal); multiplies every flip angle and, squared,
            the MT saturation energy. >= 0.
        df_hz: off-resonance of the whole voxel, Hz; F+ states precess as
            exp(-i 2π df t) during free evolution.
        dtype: force float32 or float64 instead of inferring it.

    Raises:
        ValueError: a value is non-finite or out of range (the message names the field,
            the value seen and what is accepted), or the fields do not broadcast.
        TypeError: a field is not a real number, sequence or tensor.

    Example:
        >>> wm = Tissue(t1_ms=torch.tensor([800.0, 900.0]), t2_ms=80.0)
        >>> wm.shape
        torch.Size([2])
    """

    kind: str
    t1_ms: torch.Tensor
    t2_ms: torch.Tensor
    b1: torch.Tensor
    df_hz: torch.Tensor
    t1b_ms: torch.Tensor | None
    t2b_ms: torch.Tensor | None
    f: torch.Tensor | None
    k_ab_per_s: torch.Tensor | None
    df_b_hz: torch.Tensor | None
    mt_lineshape_us: torch.Tensor | None

    def __init__(
        self,
        t1_ms: Any,
        t2_ms: Any,
        *,
        b1: Any = 1.0,
        df_hz: Any = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._build("single", dict(t1_ms=t1_ms, t2_ms=t2_ms, b1=b1, df_hz=df_hz), dtype)

    @classmethod
    def bm(
        cls,
        t1_ms: Sequence[Any],
        t2_ms: Sequence[Any],
        f: Any,
        k_ab_per_s: Any,
        df_b_hz: Any = 0.0,
        *,
        b1: Any = 1.0,
        df_hz: Any = 0.0,
        dtype: torch.dtype | None = None,
    ) -> Tissue:
        """Two pools with Bloch–McConnell exchange of transverse and longitudinal states.

        Args:
            t1_ms: ``(t1_a, t1_b)`` in ms, each a number or tensor.
            t2_ms: ``(t2_a, t2_b)`` in ms.
            f: fraction of pool b (M0b = f, M0a = 1 − f), in (0, 1).
            k_ab_per_s: forward exchange rate a → b in s⁻¹ (EPG-X ``ka`` × 1000); 0 gives
                two independent pools.
            df_b_hz: chemical shift of pool b relative to pool a, Hz (EPG-X ``delta`` ×
                1000): pool-b F+ precesses as exp(−i 2π df_b t).
            b1, df_hz, dtype: as for :class:`Tissue`.
        """
        ta, tb = _pair("t1_ms", t1_ms)
        sa, sb = _pair("t2_ms", t2_ms)
        obj = cls.__new__(cls)
        obj._build(
            "bm",
            dict(
                t1_ms=ta,
                t2_ms=sa,
                t1b_ms=tb,
                t2b_ms=sb,
                f=f,
                k_ab_per_s=k_ab_per_s,
                df_b_hz=df_b_hz,
                b1=b1,
                df_hz=df_hz,
            ),
            dtype,
        )
        return obj

    @classmethod
    def mt(
        cls,
        t1_ms: Sequence[Any],
        t2_ms: Any,
        f: Any,
        k_ab_per_s: Any,
        mt_lineshape_us: Any,
        *,
        b1: Any = 1.0,
        df_hz: Any = 0.0,
        dtype: torch.dtype | None = None,
    ) -> Tissue:
        """Free pool a plus a bound pool b that has longitudinal magnetisation only.

        RF saturates pool b by exp(−W·T) per pulse with W·T = π γ² ∫B1² dt · G
        (Gloor et al., MRM 2008; Malik et al., MRM 2018).

        Args:
            t1_ms: ``(t1_a, t1_b)`` in ms.
            t2_ms: T2 of the free pool, ms.
            f: bound-pool fraction, in (0, 1).
            k_ab_per_s: forward exchange rate free → bound in s⁻¹.
            mt_lineshape_us: absorption lineshape G(Δ) of the bound pool at the pulse
                offset, µs (e.g. super-Lorentzian at 0 Hz, T2b = 12 µs: 14.9 µs).
            b1, df_hz, dtype: as for :class:`Tissue`.
        """
        ta, tb = _pair("t1_ms", t1_ms)
        obj = cls.__new__(cls)
        obj._build(
            "mt",
            dict(
                t1_ms=ta,
                t2_ms=t2_ms,
                t1b_ms=tb,
                f=f,
                k_ab_per_s=k_ab_per_s,
                mt_lineshape_us=mt_lineshape_us,
                b1=b1,
                df_hz=df_hz,
            ),
            dtype,
        )
        return obj

    def _build(self, kind: str, raw: dict[str, Any], dtype: torch.dtype | None) -> None:
        values = {k: _as_tensor(k, v) for k, v in raw.items()}
        dtype, device = _common_dtype_device(values, dtype)
        for name, v in values.items():
            _check_range(name, v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64))
        tensors = {
            k: (
                v.to(dtype=dtype, device=device)
                if isinstance(v, torch.Tensor)
                else torch.tensor(v, dtype=dtype, device=device)
            )
            for k, v in values.items()
        }
        try:
            shape = torch.broadcast_shapes(*(t.shape for t in tensors.values()))
        except RuntimeError:
            found = ", ".join(f"{k}: {tuple(t.shape)}" for k, t in tensors.items())
            raise ValueError(f"Tissue fields do not broadcast to one batch shape ({found}).") from None
        self.kind = kind
        for name in FIELDS:
            t = tensors.get(name)
            setattr(self, name, None if t is None else t.expand(shape))
        self._shape = shape

    @property
    def shape(self) -> torch.Size:
        """The batch shape every field is broadcast to."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self.t1_ms.dtype

    @property
    def device(self) -> torch.device:
        return self.t1_ms.device

    @property
    def n_pools(self) -> int:
        """1 for single-pool tissue, 2 for BM and MT."""
        return 1 if self.kind == "single" else 2

    def fields(self) -> dict[str, torch.Tensor]:
        """The fields that apply to this tissue kind, by name."""
        return {k: getattr(self, k) for k in FIELDS if getattr(self, k) is not None}

    def replace(self, **fields: Any) -> Tissue:
        """A tissue of the same kind with some fields replaced (validated and broadcast anew).

        The new values may be tensors that autograd or a ``torch.func`` transform tracks,
        e.g. ``tissue.replace(t2_ms=t2)`` inside a function given to ``torch.func.jvp``.
        Keeps this tissue's dtype; the batch shape is that of all fields broadcast.

        Raises:
            ValueError: a name that is not a field of this tissue kind, or a bad value.
        """
        own = self.fields()
        unknown = [k for k in fields if k not in own]
        if unknown:
            raise ValueError(
                f"Tissue.replace: {unknown} not field(s) of a {self.kind!r} tissue; "
                f"its fields are {tuple(own)}."
            )
        out = Tissue.__new__(Tissue)
        out._build(self.kind, {**own, **fields}, self.dtype)
        return out

    def to(self, *args: Any, **kwargs: Any) -> Tissue:
        """Return a copy with every field moved/cast like :meth:`torch.Tensor.to`."""
        out = Tissue.__new__(Tissue)
        out.kind = self.kind
        for name in FIELDS:
            t = getattr(self, name)
            setattr(out, name, None if t is None else t.to(*args, **kwargs))
        out._shape = self._shape
        return out

    def __repr__(self) -> str:
        parts = []
        for name, t in self.fields().items():
            flat = primal(t).reshape(-1)
            lo, hi = flat.min().item(), flat.max().item()
            parts.append(f"{name}={lo:g}" if lo == hi else f"{name}=[{lo:g}..{hi:g}]")
        return (
            f"Tissue(kind={self.kind!r}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            + ", ".join(parts)
            + ")"
        )


def _pair(name: str, value: Any) -> tuple[Any, Any]:
    """Split a per-pool ``(a, b)`` argument; a tensor may carry the pools on its last axis."""
    if isinstance(value, np.ndarray):
        value = torch.as_tensor(value)
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[-1] == 2:
        return value[..., 0], value[..., 1]
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return value[0], value[1]
    raise ValueError(f"Tissue field {name!r} needs one value per pool, (pool_a, pool_b); got {value!r}.")
