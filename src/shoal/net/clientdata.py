"""The data a deployed client holds: one ``.npz`` file per client (``shoal join --data``).

Format: a NumPy ``.npz`` archive with arrays ``x`` (features, first axis = examples) and ``y``
(targets, one per example), and optionally ``x_eval`` and ``y_eval``, the client's held-out
examples for federated evaluation. Arrays keep their dtypes (features usually float32, class
labels int64), exactly as the task's model expects them. ``shoal split CONFIG --out DIR`` writes
the files of a built-in task's simulated federation, one per client id, so a deployment can be
tried with the data a simulation used (and gives bit-identical results).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..data.arrays import ArrayData
from ..data.federated import ClientData, FederatedDataset
from ..errors import DataError

__all__ = ["load_client_data", "save_client_data", "split_federation"]


def save_client_data(data: ClientData, path: str | Path) -> Path:
    """Write a client's training (and evaluation) examples to ``path`` (``.npz``)."""
    x, y = data.train.tensors()
    arrays = {"x": x.numpy(), "y": y.numpy()}
    if data.eval is not None:
        xe, ye = data.eval.tensors()
        arrays |= {"x_eval": xe.numpy(), "y_eval": ye.numpy()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def load_client_data(path: str | Path) -> ClientData:
    """Read a client's data file written by :func:`save_client_data` (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"client data file {str(p)!r} does not exist; pass the .npz file of this "
                        "client's examples (arrays x, y; optional x_eval, y_eval).")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"client data file {str(p)!r} is not a readable .npz archive ({e}); "
                        "write it with numpy.savez(path, x=..., y=...).") from e
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"client data file {str(p)!r} has no array {', '.join(missing)}; "
                        f"expected x and y (and optionally x_eval, y_eval), got "
                        f"{', '.join(sorted(arrays)) or 'none'}.")
    train = ArrayData.of(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]))
    held = None
    if "x_eval" in arrays and "y_eval" in arrays:
        held = ArrayData.of(torch.from_numpy(arrays["x_eval"]),
                            torch.from_numpy(arrays["y_eval"]))
    return ClientData(train, held)


def split_federation(dataset: FederatedDataset, out: str | Path) -> list[Path]:
    """One ``CLIENT_ID.npz`` per client of ``dataset`` in directory ``out``."""
    return [save_client_data(dataset.client(cid), Path(out) / f"{cid}.npz")
            for cid in dataset.client_ids()]
