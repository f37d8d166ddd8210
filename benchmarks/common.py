"""Shared by the benchmarks: run variants in fresh processes, take medians, print the figures.

Each measured variant runs in its own child process (``python BENCH --variant NAME``), so its
peak resident memory is its own, and variants alternate (A B A B ...) so a slow spell on this
shared machine hits all of them alike. The child prints one JSON object as its last line.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def emit(result: dict[str, Any]) -> None:
    """Child side: print the result as the last line."""
    print(json.dumps(result), flush=True)


def run_child(script: str, variant: str, args: Sequence[str] = (),
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script --variant variant *args`` in a fresh interpreter; return its JSON result."""
    proc = subprocess.run([sys.executable, script, "--variant", variant, *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{script} --variant {variant} failed with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(script: str, variants: Sequence[str], reps: int, args: Sequence[str] = (),
              ) -> dict[str, list[dict[str, Any]]]:
    """``reps`` runs of each variant, interleaved; prints a line per run."""
    out: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i in range(reps):
        for v in variants:
            r = run_child(script, v, args)
            out[v].append(r)
            shown = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()
                     if not isinstance(x, list | dict)}
            print(f"  rep {i + 1}/{reps} {v:<10} {shown}", flush=True)
    return out


def median(runs: Sequence[dict[str, Any]], key: str) -> float:
    """The median of ``key`` over runs."""
    return statistics.median(r[key] for r in runs)


def machine() -> str:
    """A one-line description of this machine."""
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def final_line(**figures: float | int | str) -> None:
    """The benchmark's last line: ``name=value`` pairs."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in figures.items()), flush=True)
