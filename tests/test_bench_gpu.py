"""benchmarks/bench_gpu.py runs end to end on the CPU in --quick mode (a smoke test: no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_benchmark_script_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--quick", "--device", "cpu",
                           "--only", "smoke,engine,extraction", "--out", str(out)], capture_output=True, text=True,
                          timeout=580, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    smoke = results["smoke"]["result"]
    assert results["smoke"]["rc"] == 0, smoke
    for batch in ("batch 1", "batch 8"):
        assert smoke[batch]["status"] == "COMPLETED" and smoke[batch]["verify_ok"]
    assert smoke["batch 1"]["bit_equal_fraction"] == 1.0  # batch 1: the same shapes as the reference forward
    row = results["extraction"]["result"]["6x64"]["32"]  # --quick: a narrow model, 32 samples
    assert results["extraction"]["rc"] == 0 and row["ratio_vs_bare"] > 0 and row["tokens"] > 0
    engine = results["engine"]["result"]["models"]["6x16"]
    assert results["engine"]["rc"] == 0 and engine["after"]["ratio_vs_bare"] > 0
    assert engine["after"]["torch_calls_per_extra_hook_point"] < engine["before"]["torch_calls_per_extra_hook_point"]
