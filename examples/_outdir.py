"""The examples' output directory: never overwrite a run unless asked."""

from __future__ import annotations

import shutil
from pathlib import Path


def prepare_out(out: str | Path, marker: str, example: str, overwrite: bool) -> Path:
    """``out``, empty: a directory that holds files is refused, unless ``overwrite`` is set
    and it holds an earlier run of this example (``marker``, a file every run writes there)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise SystemExit(f"{example} example: {out} holds files that are not an earlier "
                             "run of this example; pass another --out.")
        if not overwrite:
            raise SystemExit(f"{example} example: {out} holds an earlier run of this example; "
                             "pass --overwrite to replace it, or another --out.")
        shutil.rmtree(out)
    return out
