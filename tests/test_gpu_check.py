"""bench/gpu_check.py's CPU-safe mode: every part runs on a tiny model and the table has no error."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_cpu_runs_every_part(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu", "--work",
                        str(tmp_path), "--steps", "3", "--prompts", "4", "--group", "4", "--max-new", "8",
                        "--budget", "900"], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    table = r.stdout.split("posttrain GPU check:")[1].splitlines()[1:]
    assert len(table) == 6, table
    for row in table:
        assert row.rstrip().endswith(("ok", "vLLM skipped: vllm is not installed")), row
    assert "x" in table[2] and "tokens/s" in table[2] and "completions/s" in table[3]
