"""Worker processes fail fast: a worker that cannot start or dies mid-round stops the run within
seconds, naming the worker and the fix, and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from shoal.errors import WorkerError
from shoal.message import Message
from shoal.sim import InProcessTransport
from shoal.sim.processes import ProcessesExecutor

SRC = str(Path(__file__).resolve().parents[1] / "src")

NO_GUARD = {
    "processes": """
        from shoal.message import Message
        from shoal.sim import InProcessTransport
        from shoal.sim.processes import ProcessesExecutor

        def answer(message, context):
            return message.reply()

        transport = InProcessTransport(["a", "b"], str, {"k": answer},
                                       executor=ProcessesExecutor(2))
        transport.request([Message("k", "coordinator", n, 1) for n in "ab"])
    """,
    "data_parallel": """
        from shoal.config import load_config
        from shoal.experiment import run_experiment
        config = load_config(None, ["paradigm=data_parallel", "data_parallel.workers=2",
                                    "baseline=false", "federated.rounds=1"])
        run_experiment(config, "RUN_DIR")
    """,
}


@pytest.mark.parametrize("what", sorted(NO_GUARD))
def test_a_script_without_a_main_guard_stops_within_seconds_naming_the_fix(tmp_path, what):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(NO_GUARD[what]).replace("RUN_DIR", str(tmp_path / "run")))
    env = {**os.environ, "PYTHONPATH": SRC}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=60, cwd=tmp_path)
    assert time.monotonic() - t0 < 30
    assert proc.returncode != 0
    assert (f"WorkerError: {what if what == 'data_parallel' else 'processes executor'}: worker "
            "process 1 exited with code 1 before it started (its error is printed above). The "
            "usual cause: the script that starts shoal has no `if __name__ == \"__main__\":` "
            "guard, so every worker process, which imports the script, runs it again and dies. "
            "Put the code that starts the run under that guard.") in proc.stderr


def _dies_on_rank_1(message: Message, context) -> Message:
    if dist.is_initialized() and dist.get_rank() == 1:
        os._exit(3)
    return message.reply()


def test_a_worker_dying_mid_round_stops_the_run_and_every_worker():
    executor = ProcessesExecutor(2)
    transport = InProcessTransport(["a", "b", "c", "d"], str, {"k": _dies_on_rank_1},
                                   executor=executor)
    executor.start(transport)
    pids = [p.pid for p in executor._procs.procs.values()]
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        transport.request([Message("k", "coordinator", n, 1) for n in "abcd"])
    assert time.monotonic() - t0 < 30
    assert str(info.value).startswith("processes executor: worker process 1 died (exit code 3) "
                                      "during a round; its output is above.")
    assert "continue with --resume once the cause is fixed" in str(info.value)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)
    transport.close()  # closing again is harmless
