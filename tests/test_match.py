"""epgx.fit.match: exact recovery from noiseless signals (complex, magnitude, compressed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from epgx.fit.match import MatchResult, match

import epgx
from epgx import dictionary as D

# A noiseless signal equal to a scaled atom scores 1 up to float64 rounding.
SCORE_ATOL = 1e-9
# PD of a noiseless float64 signal: the least-squares scale, exact to rounding.
PD_RTOL = 1e-9
# Through an SVD basis keeping 1 - 1e-9 of the energy, an atom is reproduced to ~3e-5 of
# its norm; PD and score move by about that much.
COMPRESSED_TOL = 1e-4

N_PULSES = 60
FLIPS_DEG = (5.0 + 55.0 * np.abs(np.sin(np.pi * np.arange(N_PULSES) / 30.0))).tolist()


def fisp(tissue: epgx.Tissue, backend: str = "auto") -> torch.Tensor:
    """Inversion-prepared FISP with varying flips (kmax 10): T1 and T2 are both encoded."""
    return epgx.gre(tissue, FLIPS_DEG, 10.0, prep=epgx.Prep(180.0, 15.0), kmax=10, backend=backend)


@pytest.fixture(scope="module")
def dictionary() -> D.Dictionary:
    g = D.grid(t1_ms="200:2500:12:log", t2_ms="20:400:10:log", b1=[0.8, 1.0], constraints=["t2_ms < t1_ms"])
    return D.generate(fisp, g, dtype=torch.float64, progress=False)


def _truth(d: D.Dictionary, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.n_atoms, (n,), generator=gen)
    pd = (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)) * torch.exp(
        1j * torch.pi * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    )
    return idx, pd, d.signals()[idx] * pd[:, None]


def _assert_recovers(res: MatchResult, d: D.Dictionary, idx: torch.Tensor) -> None:
    assert torch.equal(res.index.reshape(-1), idx)
    for name, vals in d.grid.values.items():
        np.testing.assert_array_equal(res.params[name].reshape(-1).numpy(), vals[idx.numpy()])


def test_complex_signals_recover_parameters_pd_and_score(dictionary: D.Dictionary) -> None:
    idx, pd, y = _truth(dictionary, 40, seed=0)
    res = match(y.reshape(5, 8, N_PULSES), dictionary)
    assert res.index.shape == res.score.shape == res.pd.shape == (5, 8)
    _assert_recovers(res, dictionary, idx)
    torch.testing.assert_close(res.pd.reshape(-1), pd, rtol=PD_RTOL, atol=0)
    torch.testing.assert_close(res.score, torch.ones_like(res.score), atol=SCORE_ATOL, rtol=0)
    assert res.units == {"t1_ms": "ms", "t2_ms": "ms", "b1": "1"}


def test_magnitude_signals(dictionary: D.Dictionary) -> None:
    idx, pd, y = _truth(dictionary, 40, seed=1)
    res = match(y.abs(), dictionary)  # real data: matched against |atoms|
    _assert_recovers(res, dictionary, idx)
    assert not res.pd.is_complex()
    torch.testing.assert_close(res.pd, pd.abs(), rtol=PD_RTOL, atol=0)
    forced = match(y, dictionary, magnitude=True)  # complex data, magnitude on request
    _assert_recovers(forced, dictionary, idx)
    mag = match(y.abs().numpy(), dictionary.magnitude())  # numpy input, magnitude dictionary
    _assert_recovers(mag, dictionary, idx)


def test_compressed_dictionary_matches_in_the_compressed_domain(dictionary: D.Dictionary) -> None:
    comp = dictionary.compress(1 - 1e-9)
    assert comp.rank < N_PULSES
    idx, pd, y = _truth(dictionary, 40, seed=2)
    res = match(y, comp)
    _assert_recovers(res, dictionary, idx)
    torch.testing.assert_close(res.pd, pd, rtol=COMPRESSED_TOL, atol=0)
    assert float(res.score.min()) > 1 - COMPRESSED_TOL
    mag = dictionary.magnitude().compress(1 - 1e-9)
    _assert_recovers(match(y.abs(), mag), dictionary, idx)


def test_chunking_does_not_change_the_match(dictionary: D.Dictionary) -> None:
    _, _, y = _truth(dictionary, 64, seed=3)
    y = y + 0.02 * torch.randn(y.shape, dtype=torch.complex128, generator=torch.Generator().manual_seed(4))
    big = match(y, dictionary, memory_budget_mb=256)
    tiny = match(y, dictionary, memory_budget_mb=0.01)  # a few atoms x a few signals per GEMM
    assert torch.equal(big.index, tiny.index)
    torch.testing.assert_close(big.score, tiny.score, atol=1e-12, rtol=0)
    assert float(big.score.max()) < 1.0  # noisy: no perfect match


def test_float32_dictionary_and_zero_signals(dictionary: D.Dictionary) -> None:
    d32 = D.Dictionary(dictionary.atoms.to(torch.complex64), dictionary.grid, dictionary.model, {})
    idx, _, y = _truth(dictionary, 10, seed=5)
    y = torch.cat([y, torch.zeros(2, N_PULSES, dtype=y.dtype)]).to(torch.complex64)
    res = match(y, d32)
    assert torch.equal(res.index[:10], idx)
    assert res.index[10:].tolist() == [-1, -1] and res.score[10:].tolist() == [0.0, 0.0]
    assert torch.isnan(res.params["t1_ms"][10:]).all() and (res.pd[10:] == 0).all()
    maps = res.maps()
    assert set(maps) == {"t1_ms", "t2_ms", "b1", "pd", "score", "index"} and maps["pd"].shape == (12,)


def test_match_errors(dictionary: D.Dictionary) -> None:
    with pytest.raises(ValueError, match=r"signals have 59 readouts .* the dictionary .* has 60"):
        match(torch.ones(3, 59), dictionary)
    with pytest.raises(ValueError, match="memory_budget_mb must be a finite number > 0"):
        match(torch.ones(3, N_PULSES), dictionary, memory_budget_mb=0)
    with pytest.raises(ValueError, match="compressed complex dictionary"):
        match(torch.ones(3, N_PULSES), dictionary.compress(0.999))
    with pytest.raises(ValueError, match="complex matching needs a complex dictionary"):
        match(torch.ones(3, N_PULSES, dtype=torch.complex128), dictionary.magnitude(), magnitude=False)
    with pytest.raises(TypeError, match="must be an epgx.dictionary.Dictionary"):
        match(torch.ones(3, N_PULSES), dictionary.atoms)  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_match_on_cuda(dictionary: D.Dictionary) -> None:
    idx, pd, y = _truth(dictionary, 40, seed=6)
    res = match(y.cuda(), dictionary)
    assert res.index.device.type == "cuda"
    assert torch.equal(res.index.cpu(), idx)
    torch.testing.assert_close(res.pd.cpu(), pd, rtol=PD_RTOL, atol=0)
