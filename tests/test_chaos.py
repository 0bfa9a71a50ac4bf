"""The short chaos run (scripts/chaos.py --short): two server shards, three workers and a
coordinator trained to 98% validation accuracy while a seeded schedule SIGKILLs and restarts
workers and servers and SIGSTOPs them. About a minute; the long run's figures are in the
README."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.long]


def test_a_short_chaos_run_reaches_its_target_survives_every_fault_and_leaks_nothing(data_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "chaos.py"), "--short", "--no-baseline", "--seed", "1",
                           "--keep", str(tmp_path / "chaos")],
                          capture_output=True, text=True, timeout=280, env=dict(os.environ, PSGD_DATA_DIR=str(data_dir)))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out + "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in (tmp_path / "chaos" / "chaos" / "logs").glob("*.log"))
    injected, survived = map(int, re.search(r"faults injected: (\d+) .*survived: (\d+)", out).groups())
    assert injected >= 3 and survived == injected, out
    assert "reached the target" in out and "left behind: nothing" in out, out
