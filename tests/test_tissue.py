"""epgx.Tissue: construction, broadcasting, dtype rules and every validation path."""

from __future__ import annotations

import math
import re

import pytest
import torch

import epgx

GOOD_SINGLE = dict(t1_ms=1000.0, t2_ms=80.0)
GOOD_BM = dict(t1_ms=(1000.0, 500.0), t2_ms=(100.0, 20.0), f=0.2, k_ab_per_s=10.0)
GOOD_MT = dict(t1_ms=(1000.0, 1000.0), t2_ms=80.0, f=0.1, k_ab_per_s=4.3, mt_lineshape_us=14.9)

# The offending value must appear in the message; float32 storage may print -0.1 as
# -0.10000000149011612, so values are matched on their leading digits.
BAD_VALUES = [
    ("single", "t1_ms", -1.0),
    ("single", "t1_ms", 0.0),
    ("single", "t1_ms", math.nan),
    ("single", "t1_ms", math.inf),
    ("single", "t2_ms", 0.0),
    ("single", "t2_ms", -5.0),
    ("single", "t2_ms", -math.inf),
    ("single", "b1", -0.1),
    ("single", "b1", math.nan),
    ("single", "df_hz", math.inf),
    ("single", "df_hz", math.nan),
    ("bm", "f", 0.0),
    ("bm", "f", 1.0),
    ("bm", "f", -0.1),
    ("bm", "f", 1.5),
    ("bm", "f", math.nan),
    ("bm", "k_ab_per_s", -1.0),
    ("bm", "k_ab_per_s", math.inf),
    ("bm", "df_b_hz", math.nan),
    ("mt", "mt_lineshape_us", -1.0),
    ("mt", "mt_lineshape_us", math.inf),
    ("mt", "f", 0.0),
    ("mt", "k_ab_per_s", -0.5),
    ("mt", "t2_ms", 0.0),
]


def _make(kind: str, **over):
    if kind == "single":
        return epgx.Tissue(**{**GOOD_SINGLE, **over})
    if kind == "bm":
        return epgx.Tissue.bm(**{**GOOD_BM, **over})
    return epgx.Tissue.mt(**{**GOOD_MT, **over})


def _value_pattern(v: float) -> str:
    return re.escape(repr(v)) if not math.isfinite(v) else re.escape(f"{v:.6g}")


@pytest.mark.parametrize(("kind", "field", "value"), BAD_VALUES)
def test_out_of_range_values_name_field_and_value(kind, field, value):
    with pytest.raises(ValueError, match=rf"'{field}'.*got {_value_pattern(value)}"):
        _make(kind, **{field: value})


@pytest.mark.parametrize("field", ["t1_ms", "t2_ms"])
@pytest.mark.parametrize("pool", [0, 1])
def test_bm_per_pool_values_are_checked(field, pool):
    pair = list(GOOD_BM[field])
    pair[pool] = -3.0
    name = field if pool == 0 else field.replace("_ms", "b_ms")
    with pytest.raises(ValueError, match=rf"'{name}'.*-3"):
        _make("bm", **{field: tuple(pair)})


def test_bad_value_inside_a_tensor_reports_first_and_count():
    t1 = torch.tensor([1000.0, -1.0, 800.0, -2.0])
    with pytest.raises(ValueError, match=r"'t1_ms' got -1\.0 \(and 1 more\)"):
        epgx.Tissue(t1_ms=t1, t2_ms=80.0)


@pytest.mark.parametrize("value", [1000.0, (1000.0,), (1000.0, 500.0, 300.0), torch.ones(3)])
def test_per_pool_pair_must_have_two_values(value):
    with pytest.raises(ValueError, match=r"'t1_ms' needs one value per pool"):
        _make("bm", t1_ms=value)
    with pytest.raises(ValueError, match=r"'t1_ms' needs one value per pool"):
        _make("mt", t1_ms=value)


def test_per_pool_pair_from_last_tensor_axis():
    t1 = torch.tensor([[1000.0, 500.0], [900.0, 400.0], [800.0, 300.0]], dtype=torch.float64)
    tis = epgx.Tissue.bm(t1, (80.0, 20.0), 0.2, 10.0)
    assert tis.shape == (3,)
    assert torch.equal(tis.t1_ms, t1[:, 0]) and torch.equal(tis.t1b_ms, t1[:, 1])


def test_fields_that_do_not_broadcast():
    with pytest.raises(ValueError, match=r"do not broadcast.*t1_ms: \(3,\).*t2_ms: \(4,\)"):
        epgx.Tissue(t1_ms=torch.ones(3) * 1000, t2_ms=torch.ones(4) * 80)


@pytest.mark.parametrize("value", [1 + 2j, [1000 + 1j], torch.tensor([1000.0 + 0j])])
def test_complex_input_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"'t1_ms' must be real"):
        epgx.Tissue(t1_ms=value, t2_ms=80.0)


@pytest.mark.parametrize("value", ["1000", None, object()])
def test_non_numeric_input_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"'t2_ms' must be a number"):
        epgx.Tissue(t1_ms=1000.0, t2_ms=value)


def test_python_bool_is_a_type_error():
    with pytest.raises(TypeError, match=r"'b1'.*bool"):
        epgx.Tissue(1000.0, 80.0, b1=True)


@pytest.mark.parametrize("value", [torch.tensor([True]), [True, True]])
def test_bool_tensor_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"'b1'.*bool"):
        epgx.Tissue(1000.0, 80.0, b1=value)


def test_unsupported_dtype_override():
    with pytest.raises(ValueError, match=r"float32 or torch.float64, got torch.float16"):
        epgx.Tissue(1000.0, 80.0, dtype=torch.float16)


# ---------------------------------------------------------------- dtype, shape, autograd


def test_python_numbers_follow_default_dtype():
    assert torch.get_default_dtype() == torch.float32
    tis = epgx.Tissue(1000.0, 80)
    assert tis.dtype == torch.float32 and tis.shape == ()
    assert all(t.dtype == torch.float32 for t in tis.fields().values())


def test_float64_tensor_makes_everything_float64():
    tis = epgx.Tissue.bm((torch.tensor(1000.0, dtype=torch.float64), 500.0), (100.0, 20.0), 0.2, 10.0)
    assert tis.dtype == torch.float64
    assert all(t.dtype == torch.float64 for t in tis.fields().values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_override(dtype):
    t1 = torch.tensor([1000.0, 900.0], dtype=torch.float64)
    tis = epgx.Tissue(t1, 80.0, dtype=dtype)
    assert all(t.dtype == dtype for t in tis.fields().values())


def test_integer_tensor_becomes_float():
    tis = epgx.Tissue(torch.tensor([1000, 900]), 80)
    assert tis.dtype == torch.float32
    assert torch.equal(tis.t1_ms, torch.tensor([1000.0, 900.0]))


def test_fields_broadcast_to_one_shape():
    tis = epgx.Tissue.bm(
        (torch.full((2, 1), 1000.0), 500.0),
        (100.0, torch.full((3,), 20.0)),
        0.2,
        torch.tensor([[1.0, 2.0, 3.0]]),
        df_b_hz=5.0,
        b1=torch.ones(2, 3),
    )
    assert tis.shape == (2, 3)
    assert tis.kind == "bm" and tis.n_pools == 2
    for name, t in tis.fields().items():
        assert t.shape == (2, 3), name
    assert set(tis.fields()) == {
        "t1_ms",
        "t2_ms",
        "t1b_ms",
        "t2b_ms",
        "f",
        "k_ab_per_s",
        "df_b_hz",
        "b1",
        "df_hz",
    }


def test_kinds_and_fields():
    assert _make("single").kind == "single" and _make("single").n_pools == 1
    assert set(_make("single").fields()) == {"t1_ms", "t2_ms", "b1", "df_hz"}
    mt = _make("mt")
    assert mt.kind == "mt" and mt.n_pools == 2
    assert mt.t2b_ms is None and mt.df_b_hz is None
    assert float(mt.mt_lineshape_us) == pytest.approx(14.9)


def test_to_casts_every_field():
    tis = _make("bm").to(torch.float64)
    assert tis.dtype == torch.float64 and tis.kind == "bm"
    assert all(t.dtype == torch.float64 for t in tis.fields().values())


def test_repr_mentions_kind_and_ranges():
    r = repr(epgx.Tissue(torch.tensor([800.0, 900.0]), 80.0))
    assert "kind='single'" in r and "t1_ms=[800..900]" in r and "t2_ms=80" in r


def test_requires_grad_is_preserved_and_gradient_reaches_t2():
    t2 = torch.tensor([60.0, 90.0], dtype=torch.float64, requires_grad=True)
    tis = epgx.Tissue(1000.0, t2)
    assert tis.t2_ms.requires_grad
    echoes = epgx.fse(tis, [90.0] + [180.0] * 4, 10.0)
    (grad,) = torch.autograd.grad(echoes.abs().sum(), t2)
    # CPMG 180°: Σₙ exp(−n·ESP/T2), so d/dT2 = Σₙ n·ESP/T2² · exp(−n·ESP/T2)
    n = torch.arange(1, 5, dtype=torch.float64)
    expected = torch.stack([(n * 10 / v**2 * torch.exp(-n * 10 / v)).sum() for v in t2.detach()])
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=0)
