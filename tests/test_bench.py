"""The speed benchmark's CPU smoke test: bench/speed.py runs end to end on the tiny model and writes its
table. Its GPU numbers come from a real GPU (docs/PERFORMANCE.md); here only that it runs and measures."""

import os
import re
import subprocess
import sys

import pytest

from tasks.easy_vqa import package_data
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # it trains


def test_speed_benchmark_runs_on_cpu_and_writes_its_table(tiny_model, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "speed.py"), "tiny", str(package_data()),
                             str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "speed.md").read_text()
    rates = {row.split("|")[1].strip(): float(row.split("|")[2]) for row in table.splitlines()
             if re.match(r"\| (reference|ours)", row)}
    assert len(rates) == 4, table  # reference + ours, training and generation
    assert all(rate > 0 for rate in rates.values()), table
