"""``shoal data-parallel CONFIG --out DIR``: one rank of a data-parallel job under ``torchrun``.

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m shoal data-parallel job.toml --out run
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app

__all__ = ["data_parallel_command"]


@app.command("data-parallel")
def data_parallel_command(
    config: Annotated[Path, typer.Argument(help="TOML config of the job.")],
    out: Annotated[Path, typer.Option(help="Run directory (written by rank 0).")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config field: section.field=value (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Delete the run already in --out and start again (rank 0 refuses a directory "
             "that holds files without it).")] = False,
) -> None:
    """Run one rank of a data-parallel job started by torchrun (rank 0 runs the experiment)."""
    from ..data_parallel import main

    args = [str(config), "--out", str(out), *(a for s in set_ or [] for a in ("--set", s))]
    main(args + ["--resume"] * resume + ["--overwrite"] * overwrite)
