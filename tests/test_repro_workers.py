"""Worker processes of the reproduction and the sweep die with the process that owns them
(a killed sweep left its trainings running, orphaned, for 20 minutes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OWNER = """
import os, signal, sys, time
from experiments.repro import workers
pool = workers.Pool(1)
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 120)
time.sleep(1)
os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs: only the kernel can tell the worker
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_workers_die_when_their_owner_is_killed():
    proc = subprocess.run([sys.executable, "-c", OWNER], cwd=ROOT, capture_output=True, check=False,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    worker = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(worker), f"worker {worker} outlived its owner"
