"""Killing a training run at a chosen point, for the SIGKILL-and-resume tests."""

import signal
import subprocess
import time
from pathlib import Path


def sigkill_when(proc: subprocess.Popen, marker: Path, timeout: float) -> None:
    """SIGKILL `proc` as soon as `marker` exists (e.g. a checkpoint's trainer_state.pt); fails if the
    run ends first or the marker does not appear within `timeout` seconds."""
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
