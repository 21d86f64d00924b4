"""``epgx match``: match measured signals against a dictionary and write parameter maps."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from epgx import dictionary as D

SIGNAL_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5", ".nii", ".nii.gz")
MAP_SUFFIXES = (".npz", ".h5", ".hdf5")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_signals(path: str | Path, dataset: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Signals ``[..., n_readouts]`` from .npy, .npz, HDF5 or NIfTI, and what to keep about them.

    For .npz and HDF5, ``dataset`` names the array (default: ``signals``, or the only one).
    A NIfTI image (needs nibabel) has the readouts on its last axis; its affine is kept.

    Raises:
        ValueError: an unknown suffix, or no/ambiguous dataset.
        OSError: the file cannot be read.
        ImportError: nibabel (NIfTI) or h5py (HDF5) is missing.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in SIGNAL_SUFFIXES:
        raise ValueError(f"signals file {str(path)!r}: suffix must be one of {', '.join(SIGNAL_SUFFIXES)}.")
    if not path.exists():
        raise FileNotFoundError(f"no signals file {str(path)!r}.")
    if suffix == ".npy":
        return np.load(path), {}
    if suffix in (".nii", ".nii.gz"):
        try:
            import nibabel
        except ImportError:
            raise ImportError("reading NIfTI needs nibabel: pip install nibabel") from None
        img: Any = nibabel.load(str(path))  # a spatial image: dataobj and affine
        return np.asanyarray(img.dataobj), {"affine": np.asarray(img.affine)}
    if suffix == ".npz":
        with np.load(path) as z:
            return z[_pick(list(z.keys()), dataset, path)], {}
    try:
        import h5py
    except ImportError:
        raise ImportError("reading HDF5 needs h5py: pip install 'epgx[dict]'") from None
    with h5py.File(path, "r") as fh:
        names: list[str] = []
        fh.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
        return np.asarray(fh[_pick(names, dataset, path)][...]), {}


def _pick(names: list[str], dataset: str | None, path: Path) -> str:
    if dataset is not None:
        if dataset not in names:
            raise ValueError(f"{str(path)!r} has no dataset {dataset!r}; it has {names}.")
        return dataset
    if "signals" in names:
        return "signals"
    if len(names) == 1:
        return names[0]
    raise ValueError(f"{str(path)!r} holds {names}: name the signals with --dataset.")


def write_maps(path: str | Path, maps: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write maps by name to .npz or HDF5, with ``meta`` (JSON) beside them."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix == ".npz":
        savez: Any = np.savez  # numpy's stub has no **arrays
        savez(path, **maps, metadata=np.array(json.dumps(meta)))
        return path
    import h5py

    with h5py.File(path, "w") as fh:
        for k, v in maps.items():
            fh.create_dataset(k, data=v)
        fh.attrs["metadata"] = json.dumps(meta)
    return path


def _run(args: argparse.Namespace) -> int:
    from epgx.fit.match import match

    dictionary = D.load(args.dictionary)
    raw, extra = read_signals(args.signals, args.dataset)
    signals = torch.from_numpy(np.ascontiguousarray(raw)).to(args.device or "cpu")
    magnitude = {"auto": None, "magnitude": True, "complex": False}[args.mode]
    t0 = time.perf_counter()
    res = match(signals, dictionary, magnitude=magnitude, memory_budget_mb=args.memory_mb)
    dt = time.perf_counter() - t0
    maps = res.maps()
    if "affine" in extra:
        maps["affine"] = extra["affine"]
    meta = {
        "units": {**res.units, "pd": "relative to the dictionary's M0 = 1", "score": "1"},
        "dictionary": str(args.dictionary),
        "model": dictionary.model,
        "signals": str(args.signals),
        "versions": D.software_versions(),
    }
    path = write_maps(args.out, maps, meta)
    n = int(np.prod(res.score.shape))
    print(
        f"wrote {path}: maps {', '.join(maps)} for {n} signals of shape {tuple(res.score.shape)}; "
        f"mean score {float(res.score.mean()):.4f}; matched against {dictionary.n_atoms} atoms in "
        f"{dt:.2f} s ({n / dt:.3g} signals/s)"
    )
    return 0


def add_parser(sub: Any) -> None:
    """Register ``epgx match`` on the subparsers of the ``epgx`` command."""
    p = sub.add_parser(
        "match",
        help="match signals against a dictionary, write parameter/PD/score maps",
        description="Normalised inner-product matching of every signal against a dictionary file "
        "(from epgx dict); the readouts are the last axis of the signals.",
        epilog="example: epgx match signals.npy fisp.h5 --out maps.npz",
    )
    p.add_argument("signals", help=f"signals file ({', '.join(SIGNAL_SUFFIXES)}; NIfTI needs nibabel)")
    p.add_argument("dictionary", help="dictionary file from epgx dict (.h5, .hdf5, .zarr)")
    p.add_argument("--out", required=True, help=f"maps file ({', '.join(MAP_SUFFIXES)})")
    p.add_argument("--dataset", default=None, help="array name inside .npz/.h5 signals (default: 'signals')")
    p.add_argument(
        "--mode",
        choices=("auto", "magnitude", "complex"),
        default="auto",
        help="auto: magnitude for real signals or a magnitude dictionary, complex otherwise",
    )
    p.add_argument("--memory-mb", type=float, default=256.0, help="memory budget per chunk, MB")
    p.add_argument("--device", default=None, help="torch device to match on (e.g. cuda); default cpu")
    p.set_defaults(func=_run, check=_check)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.memory_mb > 0:
        parser.error(f"--memory-mb must be > 0 (MB), got {args.memory_mb}")
    if _suffix(Path(args.out)) not in MAP_SUFFIXES:
        parser.error(f"--out {args.out!r}: the suffix must be one of {', '.join(MAP_SUFFIXES)}")
