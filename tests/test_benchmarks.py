"""benchmarks/run.py runs end to end in --quick mode (a smoke test: no timing is asserted); bench_latents.py and
bench_storage.py: tests/test_bench_scripts.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)  # its subprocess's own limit: on two loaded cores the quick run took over 300 s
def test_quick_benchmark_runs(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for step in ("overhead", "batching", "early_stop", "memory", "cancel", "write", "token_budget", "writer",
                 "extraction", "ttfb"):
        assert step in results, step
    assert results["overhead"]["ratio"] > 0 and results["early_stop"]["ratio"] > 0
    assert results["batching"]["batch 8, bucketed"]["useful_fraction"] >= \
        results["batching"]["batch 8, dataset order"]["useful_fraction"]  # bucketing never pads more
    assert results["memory"]["peak_rss_mb"][1] > 0 and results["write"]["zarr_mb_s"] > 0
    budget = results["token_budget"]["budget 1024 tokens (= 8 x 128)"]
    assert budget["largest_batch_tokens"] <= 1024 and budget["tokens_per_s"] > 0
    assert "overhead: extract / bare forward" in proc.stdout and "writer MB/s / raw write" in proc.stdout
    assert all(row["writer_mb_s"] > 0 for row in results["writer"]["layouts"].values())
    assert results["extraction"]["ratio"] > 0 and all(row["ratio"] > 0 for row in results["ttfb"].values())
