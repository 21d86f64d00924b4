"""epgx.dictionary: grids, chunked generation, SVD compression, HDF5/Zarr storage, Dask."""

from __future__ import annotations

import json
import math
from pathlib import Path

import distributed
import h5py
import numpy as np
import pytest
import torch
import zarr

import epgx
from epgx import dictionary as D

# Chunks of different sizes may take different SIMD paths in torch's kernels: float32
# echoes (|S| <= 1) then differ in the last bits, far below this.
CHUNK_ATOL_F32 = 1e-6
# the same in float64 (the first atom is evaluated alone, the rest in one chunk)
CHUNK_ATOL_F64 = 1e-14
# float64 arithmetic identities (energy bookkeeping of the SVD) hold to rounding.
F64_RTOL = 1e-9

N_PULSES = 40
FLIPS_DEG = (10.0 + 50.0 * np.abs(np.sin(np.pi * np.arange(N_PULSES) / 20.0))).tolist()
PROTOCOL = {"flip_deg": FLIPS_DEG, "tr_ms": 12.0}


def fisp(tissue: epgx.Tissue, flip_deg: list[float], tr_ms: float, backend: str = "auto") -> torch.Tensor:
    """A small inversion-prepared FISP train (kmax 10): a stand-in MRF model."""
    return epgx.gre(tissue, flip_deg, tr_ms, prep=epgx.Prep(180.0, 20.0), kmax=10, backend=backend)


def small_grid() -> D.Grid:
    return D.grid(t1_ms="300:2000:6:log", t2_ms="30:200:5:log", constraints=["t2_ms < t1_ms"])


# --------------------------------------------------------------------------- axes and grids


def test_span_linear_and_log() -> None:
    np.testing.assert_allclose(D.span(1.0, 5.0, 5), [1, 2, 3, 4, 5])
    np.testing.assert_allclose(D.span(10.0, 1000.0, 3, "log"), [10, 100, 1000])
    assert D.span(7.0, 9.0, 1).tolist() == [7.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000", [1000.0]),
        ("0.8, 1,1.2", [0.8, 1.0, 1.2]),
        ("10:30:3", [10, 20, 30]),
        ("1:100:3:log", [1, 10, 100]),
    ],
)
def test_parse_span_forms(text: str, expected: list[float]) -> None:
    np.testing.assert_allclose(D.parse_span(text), expected)


@pytest.mark.parametrize("text", ["1:2", "1:2:x", "1:2:3:cubic", "a,b", "0:10:5:log", "1:2:0"])
def test_parse_span_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match="cannot read grid axis") as exc:
        D.parse_span(text)
    assert repr(text) in str(exc.value)


def test_grid_cartesian_product_order_and_units() -> None:
    g = D.grid(t1_ms=[100.0, 200.0, 300.0], t2_ms=[10.0, 20.0], b1=0.9)
    assert g.n_atoms == len(g) == 6
    assert g.values["t1_ms"].tolist() == [100, 100, 200, 200, 300, 300]  # last parameter fastest
    assert g.values["t2_ms"].tolist() == [10, 20, 10, 20, 10, 20]
    assert g.values["b1"].tolist() == [0.9] * 6
    assert g.units == {"t1_ms": "ms", "t2_ms": "ms", "b1": "1"}
    t = g.tissue(1, 4, dtype=torch.float64)
    assert t.kind == "single" and t.shape == (3,)
    assert t.t1_ms.tolist() == [100, 200, 200] and t.b1.tolist() == [0.9] * 3


def test_grid_explicit_atoms_zip_and_broadcast() -> None:
    g = D.grid(t1_ms=[800.0, 1200.0, 1500.0], t2_ms=[60.0, 80.0, 100.0], df_hz=5.0, product=False)
    assert g.n_atoms == 3
    assert g.values["t2_ms"].tolist() == [60, 80, 100] and g.values["df_hz"].tolist() == [5.0] * 3
    with pytest.raises(ValueError, match="one length"):
        D.grid(t1_ms=[800.0, 1200.0], t2_ms=[60.0, 80.0, 100.0], product=False)


def test_grid_constraints_drop_atoms() -> None:
    g = D.grid(t1_ms=[50.0, 100.0, 1000.0], t2_ms=[80.0, 150.0], constraints=["t2_ms < t1_ms"])
    assert sorted(zip(g.values["t1_ms"], g.values["t2_ms"], strict=True)) == [
        (100, 80),
        (1000, 80),
        (1000, 150),
    ]
    assert g.n_dropped == 3 and g.constraints == ("t2_ms < t1_ms",)
    scaled = D.grid(
        t1_ms=[100.0, 1000.0], t2_ms=[40.0, 80.0], constraints=["t2_ms <= 0.5*t1_ms", "t1_ms > 150"]
    )
    assert scaled.n_atoms == 2 and (scaled.values["t1_ms"] == 1000).all()
    called = D.grid(t1_ms=[100.0, 1000.0], t2_ms=50.0, constraints=[lambda v: v["t1_ms"] > 500])
    assert called.values["t1_ms"].tolist() == [1000.0] and called.constraints[0].startswith("<callable")


def test_two_pool_grids_build_tissue() -> None:
    bm = D.grid(
        "bm", t1_ms=1000.0, t2_ms=[80.0, 100.0], t1b_ms=500.0, t2b_ms=20.0, f=[0.1, 0.2], k_ab_per_s=10.0
    )
    t = bm.tissue(dtype=torch.float64)
    assert t.kind == "bm" and t.shape == (4,)
    assert t.f.tolist() == [0.1, 0.2, 0.1, 0.2] and t.t2b_ms.tolist() == [20.0] * 4
    mt = D.grid(
        "mt", t1_ms=1000.0, t2_ms=70.0, t1b_ms=1000.0, f=[0.1, 0.15], k_ab_per_s=4.3, mt_lineshape_us=14.9
    )
    assert mt.tissue().kind == "mt" and mt.n_atoms == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="cubic", t1_ms=1.0, t2_ms=1.0), "grid kind must be one of"),
        (dict(t1_ms=1000.0, t2_ms=80.0, f=0.1), r"\['f'\] do not apply to kind 'single'"),
        (dict(kind="bm", t1_ms=1000.0, t2_ms=80.0), r"needs \['t1b_ms', 't2b_ms', 'f', 'k_ab_per_s'\]"),
        (dict(t1_ms=[], t2_ms=80.0), "'t1_ms' has no values"),
        (dict(t1_ms=[1000.0, math.nan], t2_ms=80.0), "non-finite"),
        (dict(t1_ms=1000.0, t2_ms=[80.0, -1.0]), "'t2_ms' got -1.0"),
        (dict(t1_ms=[10.0, 20.0], t2_ms=80.0, constraints=["t2_ms < t1_ms"]), "the grid is empty"),
        (dict(t1_ms=10.0, t2_ms=8.0, constraints=["t2 < t1_ms"]), "names 't2'"),
        (dict(t1_ms=10.0, t2_ms=8.0, constraints=["t2_ms << t1_ms"]), "cannot read constraint"),
    ],
)
def test_grid_errors_name_the_problem(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        D.grid(**kwargs)


# --------------------------------------------------------------------------- generation


def test_chunked_generation_equals_one_shot_and_the_engine() -> None:
    g = small_grid()
    # 0.01 MB holds 32 atoms x 40 readouts x 8 bytes x WORKSPACE_FACTOR: several chunks
    chunked = D.generate(fisp, g, PROTOCOL, memory_budget_mb=0.01, progress=False)
    whole = D.generate(fisp, g, PROTOCOL, memory_budget_mb=512, progress=False)
    direct = fisp(g.tissue(), **PROTOCOL)
    assert chunked.atoms.shape == (g.n_atoms, N_PULSES) and chunked.atoms.dtype == torch.complex64
    torch.testing.assert_close(chunked.atoms, whole.atoms, atol=CHUNK_ATOL_F32, rtol=0)
    torch.testing.assert_close(whole.atoms, direct, atol=CHUNK_ATOL_F32, rtol=0)
    assert chunked.model.endswith(":fisp") and chunked.protocol == PROTOCOL
    assert chunked.versions["epgx"] == epgx.__version__ and chunked.versions["torch"] == torch.__version__


def test_generation_by_import_path_float64_and_two_pool() -> None:
    g = D.grid("bm", t1_ms=1000.0, t2_ms=[80.0, 100.0], t1b_ms=500.0, t2b_ms=20.0, f=0.2, k_ab_per_s=10.0)
    protocol = {"flip_deg": [90.0] + [150.0] * 6, "esp_ms": 10.0}
    d = D.generate("epgx:fse", g, protocol, dtype=torch.float64, progress=False)
    assert d.model == "epgx:fse" and d.atoms.dtype == torch.complex128
    torch.testing.assert_close(
        d.atoms, epgx.fse(g.tissue(dtype=torch.float64), **protocol), atol=CHUNK_ATOL_F64, rtol=0
    )


def test_generate_errors() -> None:
    g = small_grid()
    with pytest.raises(ValueError, match="unknown model 'no_such_model'; available: "):
        D.generate("no_such_model", g, progress=False)
    with pytest.raises(ValueError, match="cannot load model 'epgx:no_such'"):
        D.generate("epgx:no_such", g, progress=False)
    for bad in (0, -5.0, math.inf):
        with pytest.raises(ValueError, match=f"memory_budget_mb must be a finite number > 0.*{bad!r}"):
            D.generate(fisp, g, PROTOCOL, memory_budget_mb=bad, progress=False)
    with pytest.raises(ValueError, match="dtype must be"):
        D.generate(fisp, g, PROTOCOL, dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match="takes no backend argument"):
        D.generate(lambda t: fisp(t, **PROTOCOL), g, backend="torch", progress=False)
    with pytest.raises(ValueError, match=r"returned \(1, 2, 40\)"):
        D.generate(lambda t: fisp(t, **PROTOCOL)[:, None].expand(-1, 2, -1), g, progress=False)
    with pytest.raises(ValueError, match="protocol value 'tr_ms' is a object"):
        D.generate(fisp, g, {"flip_deg": FLIPS_DEG, "tr_ms": object()}, progress=False)
    with pytest.raises(TypeError, match="grid must be"):
        D.generate(fisp, {"t1_ms": 1.0}, PROTOCOL, progress=False)  # type: ignore[arg-type]


def test_unknown_model_error_lists_the_registry() -> None:
    names = D.available_models()
    assert {"fisp_mrf", "bssfp_mrf", "fse", "mese", "spgr", "mprage"} <= set(names)
    with pytest.raises(ValueError, match="available: " + ", ".join(sorted(names))):
        D.resolve_model("no_such_model")


# --------------------------------------------------------------------------- compression


def test_svd_compression_keeps_the_requested_energy() -> None:
    g = small_grid()
    d = D.generate(fisp, g, PROTOCOL, dtype=torch.float64, progress=False)
    c = d.compress(0.9999)
    assert c.compressed and 1 <= c.rank < N_PULSES and c.n_readouts == N_PULSES
    assert c.svd_energy is not None and c.svd_energy >= 0.9999
    basis = c.basis
    assert basis is not None
    torch.testing.assert_close(basis.mH @ basis, torch.eye(c.rank, dtype=basis.dtype), atol=1e-12, rtol=0)
    total = d.atoms.abs().pow(2).sum()
    lost = (d.atoms - c.signals()).abs().pow(2).sum()
    # for an orthonormal basis, energy lost by the projection = 1 - energy kept
    assert abs(float(lost / total) - (1 - c.svd_energy)) < F64_RTOL
    # one rank less keeps less than asked for: the rank is the smallest that suffices
    assert d.compress(rank=c.rank - 1).svd_energy < 0.9999
    with pytest.raises(ValueError, match="already compressed"):
        c.compress()
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
        d.compress(1.5)
    with pytest.raises(ValueError, match="rank must be an int in 1..40"):
        d.compress(rank=41)


def test_generate_with_a_basis_projects_chunks_and_svd_energy_compresses() -> None:
    g = small_grid()
    ref = D.generate(fisp, g, PROTOCOL, dtype=torch.float64, progress=False).compress(0.9999)
    assert ref.basis is not None
    sub = g.select(slice(0, g.n_atoms, 2))
    projected = D.generate(fisp, sub, PROTOCOL, dtype=torch.float64, basis=ref.basis, progress=False)
    torch.testing.assert_close(projected.atoms, ref.atoms[::2], atol=1e-12, rtol=0)
    direct = D.generate(fisp, g, PROTOCOL, dtype=torch.float64, svd_energy=0.9999, progress=False)
    assert direct.rank == ref.rank
    with pytest.raises(ValueError, match=r"basis must be \[n_readouts=40, rank\]"):
        D.generate(fisp, sub, PROTOCOL, basis=ref.basis[:10], progress=False)


def test_magnitude_dictionary() -> None:
    d = D.generate(fisp, small_grid(), PROTOCOL, progress=False)
    m = d.magnitude()
    assert not m.atoms.is_complex() and torch.equal(m.atoms, d.atoms.abs())
    assert not m.compress(0.999).atoms.is_complex()
    with pytest.raises(ValueError, match=r"call .magnitude\(\) before .compress\(\)"):
        d.compress(0.999).magnitude()


# --------------------------------------------------------------------------- storage


def _assert_same(a: D.Dictionary, b: D.Dictionary) -> None:
    assert torch.equal(a.atoms, b.atoms) and a.atoms.dtype == b.atoms.dtype
    assert a.grid.kind == b.grid.kind and a.grid.names == b.grid.names
    for k in a.grid.names:
        np.testing.assert_array_equal(a.grid.values[k], b.grid.values[k])
    assert a.grid.constraints == b.grid.constraints and a.grid.n_dropped == b.grid.n_dropped
    assert a.model == b.model and a.protocol == b.protocol and a.versions == b.versions
    assert a.units == b.units and a.svd_energy == b.svd_energy
    assert (a.basis is None) == (b.basis is None)
    if a.basis is not None and b.basis is not None:
        assert torch.equal(a.basis, b.basis)


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
@pytest.mark.parametrize("compressed", [False, True])
def test_save_load_round_trip(tmp_path: Path, suffix: str, compressed: bool) -> None:
    d = D.generate(fisp, small_grid(), PROTOCOL, progress=False)
    if compressed:
        d = d.compress(0.999)
    path = d.save(tmp_path / f"dict{suffix}")
    back = D.load(path)
    _assert_same(d, back)
    assert back.units["t1_ms"] == "ms" and back.units["atoms"] == "signal / M0"


def test_hdf5_layout_is_self_describing(tmp_path: Path) -> None:
    d = D.generate(fisp, small_grid(), PROTOCOL, progress=False).compress(0.999)
    path = d.save(tmp_path / "dict.h5")
    with h5py.File(path, "r") as fh:
        assert set(fh) == {"atoms", "basis", "grid"} and set(fh["grid"]) == {"t1_ms", "t2_ms"}
        assert json.loads(fh.attrs["format"]) == "epgx-dictionary"
        assert json.loads(fh.attrs["protocol"])["tr_ms"] == 12.0
        assert json.loads(fh.attrs["units"])["t2_ms"] == "ms"
        assert json.loads(fh.attrs["versions"])["torch"] == torch.__version__


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"suffix must be one of \('.h5', '.hdf5', '.zarr'\)"):
        D.load(tmp_path / "dict.npz")
    with pytest.raises(FileNotFoundError, match="no dictionary at"):
        D.load(tmp_path / "missing.h5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as fh:
        fh["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="is not an epgx dictionary"):
        D.load(other)


# --------------------------------------------------------------------------- Dask


def test_dask_generation_equals_local(tmp_path: Path) -> None:
    g = small_grid()
    local = D.generate(fisp, g, PROTOCOL, progress=False)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as lc,
        distributed.Client(lc) as client,
    ):
        far = D.generate_distributed(fisp, g, tmp_path / "dict.zarr", PROTOCOL, client=client, progress=False)
        by_name = D.generate_distributed(
            "epgx:gre",
            g,
            tmp_path / "gre.zarr",
            {"flip_deg": FLIPS_DEG, "tr_ms": 12.0, "kmax": 10},
            atoms_per_task=7,
        )  # the current client; a task per 7 atoms, the last one partial
    torch.testing.assert_close(far.atoms, local.atoms, atol=CHUNK_ATOL_F32, rtol=0)
    assert far.model == local.model and far.protocol == local.protocol
    np.testing.assert_array_equal(far.grid.values["t1_ms"], g.values["t1_ms"])
    torch.testing.assert_close(
        by_name.atoms, epgx.gre(g.tissue(), FLIPS_DEG, 12.0, kmax=10), atol=CHUNK_ATOL_F32, rtol=0
    )
    _assert_same(far, D.load(tmp_path / "dict.zarr"))


def test_incomplete_zarr_store_is_refused(tmp_path: Path) -> None:
    path = D.generate(fisp, small_grid(), PROTOCOL, progress=False).save(tmp_path / "dict.zarr")
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False
    with pytest.raises(ValueError, match="is incomplete"):
        D.load(path)


def test_dask_needs_a_client_and_a_zarr_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be a '.zarr' directory"):
        D.generate_distributed(fisp, small_grid(), tmp_path / "dict.h5", PROTOCOL)
    with pytest.raises(ValueError, match="no Dask client"):
        D.generate_distributed(fisp, small_grid(), tmp_path / "dict.zarr", PROTOCOL)


def test_registry_model_fisp_mrf() -> None:
    g = small_grid()
    d = D.generate("fisp_mrf", g, {"n_pulses": 30}, dtype=torch.float64, progress=False)
    assert d.model == "fisp_mrf" and d.n_readouts == 30
    direct = epgx.models.fisp_mrf(g.tissue(dtype=torch.float64), n_pulses=30)
    torch.testing.assert_close(d.atoms, direct, atol=CHUNK_ATOL_F64, rtol=0)
    assert "fisp_mrf" in D.available_models()
