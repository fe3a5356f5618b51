"""Feature statistics (mistudio.storage.featstats): memory flat in the number of tokens, and the cost of ``update``.

    python benchmarks/bench_featstats.py             # 10k, 30k and 100k tokens (about 2 minutes on 2 CPU cores)
    python benchmarks/bench_featstats.py --quick     # 4k and 8k tokens (a smoke run)
    python benchmarks/bench_featstats.py --device cuda

Two inputs: SAE latents, d = 16 x 384 = 6144, sparse top-k rows (32 active latents a token, drawn with a skew so
that densities differ, exponential values) and raw neurons, d = 384, dense float16 (a stored residual stream).
Every (input, tokens) runs in a fresh subprocess that makes its batches on the fly (2048 tokens each, a new
random batch every time, so the data held never grows) and feeds them to the accumulator (default parameters);
its peak RSS (``resource.getrusage``) is compared with the same process run without the accumulator ("bare") and
across token counts: ``RSS 100k / 10k`` is the flatness figure (1.00 = flat). In the same process every batch also
goes through a bare pass (promote to float32 and sum per feature: the least any per-feature statistic does), timed
on the same values as ``update``: ``slowdown`` = bare tokens/s / update tokens/s. Torch runs on one thread
(``--threads``): on a few shared cores, OpenMP's spinning threads distort both sides.
Prints a table and writes benchmarks/out/featstats.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH = 2048
INPUTS = {"sparse d=6144": {"d": 16 * 384, "sparse": True, "active": 32},
          "dense d=384": {"d": 384, "sparse": False}}


def make_batch(rng, spec: dict):
    """One batch: CSR SAE latents or dense float16 values."""
    import numpy as np

    from mistudio.storage.featstats import CSR

    d = spec["d"]
    if not spec["sparse"]:
        return rng.standard_normal((BATCH, d)).astype(np.float16)
    idx = np.sort((d * rng.random((BATCH, spec["active"])) ** 2).astype(np.int64), axis=1)  # low features commoner
    keep = np.ones_like(idx, bool)
    keep[:, 1:] = idx[:, 1:] != idx[:, :-1]
    offsets = np.concatenate([[0], np.cumsum(keep.sum(1))])
    return CSR(offsets, idx[keep], rng.exponential(1.0, int(keep.sum())).astype(np.float32))


def bare_pass(batch, d: int, device: str):
    """Promote to float32 and sum per feature."""
    import torch

    from mistudio.storage.featstats import CSR

    if isinstance(batch, CSR):
        idx = torch.as_tensor(batch.indices, device=device)
        vals = torch.as_tensor(batch.values, device=device).float()
        return torch.zeros(d, dtype=torch.float64, device=device).index_add_(0, idx, vals.double())
    return torch.as_tensor(batch, device=device).float().sum(0, dtype=torch.float64)


def child(name: str, tokens: int, with_stats: bool, device: str, threads: int) -> dict:
    import resource
    import time

    import numpy as np
    import torch

    from mistudio.storage.featstats import FeatureStatsAccumulator

    torch.set_num_threads(threads)
    spec = INPUTS[name]
    rng = np.random.default_rng(0)
    acc = FeatureStatsAccumulator(spec["d"], device=device) if with_stats else None
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    bare_s = update_s = 0.0
    for first in range(0, tokens, BATCH):
        batch = make_batch(rng, spec)
        documents = first // 64 + np.arange(BATCH) // 64  # 64-token documents
        start = time.perf_counter()
        bare_pass(batch, spec["d"], device)
        sync()
        bare_s += time.perf_counter() - start
        if acc is not None:
            start = time.perf_counter()
            acc.update(first, batch, documents)
            sync()
            update_s += time.perf_counter() - start
    if acc is not None:
        acc.result()
    n = -(-tokens // BATCH) * BATCH
    return {"tokens": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "bare_tokens_per_s": n / bare_s, "update_tokens_per_s": n / update_s if acc is not None else None,
            "state_mb": acc.nbytes / 2**20 if acc is not None else None}


def run_child(name: str, tokens: int, with_stats: bool, device: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--child", name, str(tokens), str(int(with_stats)), device,
                           str(threads)], capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode:
        raise RuntimeError(f"child {name} {tokens} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4k and 8k tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run")
    parser.add_argument("--out", default=str(HERE / "out" / "featstats.json"))
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, tokens, with_stats, device, threads = args.child
        print(json.dumps(child(name, int(tokens), bool(int(with_stats)), device, int(threads))))
        return
    sizes = [4096, 8192] if args.quick else [10_000, 30_000, 100_000]
    results: dict = {"device": args.device, "threads": args.threads, "batch_tokens": BATCH, "inputs": {}}
    header = (f"{'input':<15}{'tokens':>8}{'RSS MB':>9}{'bare RSS':>10}{'state MB':>10}{'update tok/s':>14}"
              f"{'bare tok/s':>13}{'slowdown':>10}")
    print(header)
    print("-" * len(header))
    for name in INPUTS:
        rows = []
        for tokens in sizes:
            stats = run_child(name, tokens, True, args.device, args.threads)
            bare = run_child(name, tokens, False, args.device, args.threads)
            row = {**stats, "bare_peak_rss_mb": bare["peak_rss_mb"],
                   "slowdown": stats["bare_tokens_per_s"] / stats["update_tokens_per_s"]}
            rows.append(row)
            print(f"{name:<15}{row['tokens']:>8}{row['peak_rss_mb']:>9.0f}{row['bare_peak_rss_mb']:>10.0f}"
                  f"{row['state_mb']:>10.1f}{row['update_tokens_per_s']:>14,.0f}{row['bare_tokens_per_s']:>13,.0f}"
                  f"{row['slowdown']:>9.0f}x")
        flat = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        added = [(r["peak_rss_mb"] - r["bare_peak_rss_mb"]) for r in rows]
        results["inputs"][name] = {"runs": rows, "rss_ratio_last_first": flat, "added_rss_mb": added}
        print(f"{name}: peak RSS {rows[-1]['tokens']:,} / {rows[0]['tokens']:,} tokens = {flat:.3f}; "
              f"over bare: {', '.join(f'{a:.0f}' for a in added)} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
