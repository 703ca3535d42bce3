"""The benchmark harness runs anywhere: argument checks happen before the (long) run."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_out_that_is_a_file_fails_before_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(blocker / "sub")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "--out" in r.stderr and "not a writable directory" in r.stderr
    assert "steps/s" not in r.stdout  # nothing was measured
