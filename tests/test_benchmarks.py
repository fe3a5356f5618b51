"""The benchmark scripts run end to end in --quick mode (smoke tests: no timing is asserted)."""
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
    results, stdout = _run_script("bench_storage.py", tmp_path / "storage.json", "--only", "dtype,cli,kill",
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
