"""The benchmark scripts bench_latents.py and bench_storage.py run end to end in --quick mode (smoke tests: no timing
is asserted). A file of their own, apart from run.py's (tests/test_benchmarks.py): pytest-xdist runs a file per
worker, and the three together were the suite's longest file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_script(name: str, out: Path, *args: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--quick", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_latents_benchmark_runs(tmp_path):
    results, stdout = _run_script("bench_latents.py", tmp_path / "latents.json", "--samples", "32",
                                  "--feature-samples", "48", "--repeats", "1")
    for sae in ("topk", "standard"):
        row = results["bytes"][sae]
        assert row["active"] > 0 and row["bytes_per_active"] > 0
        assert row["bytes_per_active_with_index"] > row["bytes_per_active"]  # the by-feature index costs bytes too
    assert results["bytes"]["topk"]["width"] == results["k"]
    assert 0 < results["flops"]["sae_share"] < 1 and results["flops"]["sae_encoder"] == 2 * 128 * 2048
    assert all(v > 0 for v in results["extraction"]["ratio"].values())
    features = results["feature"]["features"]
    assert {"densest", "rarest"} <= set(features) and features["densest"]["count"] >= features["rarest"]["count"] > 0
    assert "ext.feature vs scan" in stdout and "bytes per active latent" in stdout


@pytest.mark.slow
def test_storage_benchmark_runs(tmp_path):
    results, stdout = _run_script("bench_storage.py", tmp_path / "storage.json", "--only", "dtype,records,cli,kill",
                                  "--kills", "1")
    assert "extraction" not in results and "memory" not in results
    reads = results["dtype"]["read_mb_s"]
    assert set(reads) == {f"{d}_{way}" for d in ("float16", "bfloat16") for way in ("activations", "loader")}
    assert all(v > 0 for v in reads.values()) and results["dtype"]["write"]["bfloat16"]["writer_mb_s"] > 0
    cli = results["cli"]
    assert set(cli["median_s"]) == {"python -c pass", "mistudio --help", "mistudio jobs"}
    assert all(len(v) == 2 for v in cli["seconds"].values()) and cli["imported"]["mistudio --help"] is not None
    assert "CLI start: mistudio jobs" in stdout and "bfloat16 / float16" in stdout
    (round_,) = results["kill"]["rounds"]
    assert 0 < round_["rows_committed"] <= round_["rows_total"] and round_["rows_computed"] > 0
    assert round_["shard_rows"] and round_["shard_rows"] > round_["chunk_rows"]  # the job was sharded
    assert "rows lost on SIGKILL" in stdout
    records = results["records"]["layouts"]
    assert set(records) == {"chunks", "shards"} and all(r["ratio"] > 0 and len(r["ratios"]) == 1
                                                        for r in records.values())
    assert "writer MB/s with chunk records / without, shards" in stdout
    assert all(v > 0 for v in results["records"]["flush_us"].values()) and "record flush" in stdout
