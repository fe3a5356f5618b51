"""SAE latents during the extraction (issue 17): bytes per active latent, the cost of the SAE next to its share of
the FLOPs, ``ext.feature`` against a scan of the store, and the cost of the latents' feature statistics.

    python benchmarks/bench_latents.py            # 4-layer GPT-2 d=128, SAE d_sae=2048 (16 x d), 1,024 texts
    python benchmarks/bench_latents.py --quick    # 96 texts, one repeat (a smoke run)

The model is built from a GPT-2 config (4 layers, d=128, 4 heads, the MiniLM's WordPiece vocabulary) and saved
with ``save_pretrained``; the SAEs are random ``mistudio.saes.SAE`` saved in SAELens's format (``SAE.save``) on
``layers.2.residual`` (``blocks.2.hook_resid_post``). Extractions capture that hook point only, float16 storage,
batch 16, ``max_length=128``; tokens/s is the engine's own steady-state figure (``timings.tokens_per_s``: fixed
costs excluded). Runs are interleaved (no SAE, SAE with ``feature_statistics="auto"``, SAE with ``"off"``) and each
ratio is the median of the per-repeat ratios. Prints a table and writes benchmarks/out/latents.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import mistudio as ms  # noqa: E402
from mistudio.saes import SAE  # noqa: E402
from run import texts, tiny_gpt2  # noqa: E402

LAYER, WIDTH, N_LAYER, EXPANSION, K = 2, 128, 4, 16, 32
HP = f"layers.{LAYER}.residual"
EXTRACT = dict(layers=[LAYER], hooks=["residual"], dtype="float16", batch_size=16, max_length=128, device="cpu",
               progress=False)


def random_sae(folder: Path, architecture: str, d_in: int, d_sae: int, k: int | None, sample: np.ndarray,
               seed: int = 0) -> str:
    """A random SAE on ``blocks.LAYER.hook_resid_post`` saved in SAELens's format; returns its folder.

    Random encoder columns, then ``b_enc`` calibrated on ``sample`` (real rows of the hook point) so that latent j
    fires on a fraction ``density_j`` of tokens, log-uniform from 1e-4 to 0.1 (mean L0 about 30 of 2,048 for the
    ReLU SAE): trained SAEs have a spread of densities like this, a purely random one fires half its latents."""
    sae = SAE(architecture, d_in, d_sae, k=k, hook_name=f"blocks.{LAYER}.hook_resid_post")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (d_in ** -0.5 if name.startswith("W") else 0.1))
        pre = (torch.from_numpy(sample.astype(np.float32)) - sae.b_dec) @ sae.W_enc
        density = torch.logspace(-4, -1, d_sae)[torch.randperm(d_sae, generator=g)]
        at = ((1 - density) * (len(pre) - 1)).long()  # the quantile's row, in ascending order
        rank = len(pre) - 1 - at  # the same row counted from the top: within the top tenth
        top = pre.topk(int(rank.max()) + 1, dim=0).values  # (sorting all of every column took 5x as long)
        sae.b_enc.copy_(-top[rank, torch.arange(d_sae)])
    return str(sae.save(folder))


def hook_sample(model_dir: str, tmp: Path) -> np.ndarray:
    """Rows of the hook point from 256 texts (calibrates the random SAEs' biases)."""
    ext = ms.extract(model_dir, texts(256), workspace=str(tmp / "calibrate"), **EXTRACT)
    return ext.activations(HP)[:]


def files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def flops_per_token(model_dir: str, last_layer: int, mean_len: float) -> dict:
    """Forward FLOPs per token up to block ``last_layer`` (the forward stops there): 2 x the blocks' weight
    parameters plus attention's scores and weighted sum (4 x d x context, causal: half the mean length)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir)
    blocks = model.h[: last_layer + 1]
    params = sum(p.numel() for b in blocks for p in b.parameters())
    d = model.config.n_embd
    attention = 4 * d * (mean_len / 2) * (last_layer + 1)
    total_params = sum(p.numel() for p in model.parameters())
    return {"block_params": params, "all_params": total_params, "forward": 2 * params + attention,
            "forward_2x_all_params": 2 * total_params}


def bench_extraction(model_dir: str, sae_dir: str, tmp: Path, n: int, repeats: int) -> dict:
    """Interleaved: no SAE, the SAE with feature statistics (auto), the SAE without (off); tokens/s each."""
    configs = {"none": {}, "sae_auto": {"saes": {HP: sae_dir}, "feature_statistics": "auto"},
               "sae_off": {"saes": {HP: sae_dir}, "feature_statistics": "off"}}
    ms.extract(model_dir, texts(min(n, 32)), workspace=str(tmp / "warm"), **EXTRACT)  # imports, page cache
    runs = {name: [] for name in configs}
    for rep in range(repeats):
        order = list(configs) if rep % 2 == 0 else list(configs)[::-1]
        for name in order:
            ws = tmp / f"x-{name}-{rep}"
            ext = ms.extract(model_dir, texts(n), workspace=str(ws), **EXTRACT, **configs[name])
            runs[name].append({"tokens_per_s": ext.metadata["timings"]["tokens_per_s"], "tokens": ext.n_tokens})
            shutil.rmtree(ws)
    per = lambda a, b: [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[a], runs[b])]
    ratios = {"sae_auto_vs_none": per("sae_auto", "none"), "sae_off_vs_none": per("sae_off", "none"),
              "auto_vs_off": per("sae_auto", "sae_off")}
    return {"runs": runs, "ratios": ratios, "ratio": {k: float(np.median(v)) for k, v in ratios.items()},
            "tokens": runs["none"][0]["tokens"]}


def bytes_per_latent(model_dir: str, sae_dir: str, tmp: Path, n: int, name: str, **options) -> dict:
    """One extraction with the SAE: bytes on disk of indices + values (and of the by-feature index) per active
    latent stored, against the dense float16 latents (2 x d_sae bytes a token); ``dropped``: latents that did not
    fit the width."""
    ext = ms.extract(model_dir, texts(n), workspace=str(tmp / f"bytes-{name}"), saes={HP: sae_dir}, **EXTRACT,
                     **options)
    base = Path(ext.location) / "latents" / HP
    stats, info = ext.record.latent_statistics[HP], ext.latent_info(HP)
    stored = {part: files_bytes(base / part) for part in ("indices", "values", "feature_offsets", "feature_rows",
                                                          "feature_values")}
    row_major = stored["indices"] + stored["values"]
    return {"ext": ext, "active": stats.active, "dropped": stats.dropped, "tokens": ext.n_tokens, "width": info.width,
            "d_sae": info.d_sae, "architecture": info.architecture, "bytes": stored,
            "bytes_per_active": row_major / stats.active,
            "bytes_per_active_with_index": sum(stored.values()) / stats.active,
            "dense_float16_bytes_per_active": 2 * info.d_sae * ext.n_tokens / stats.active,
            "mean_l0": stats.active / ext.n_tokens,
            "activations_bytes": files_bytes(Path(ext.location) / "activations")}


def scan_feature(ext, latent: int) -> tuple[np.ndarray, np.ndarray]:
    """One latent's (rows, values) by reading every chunk of the row-major indices/values and selecting it."""
    index, values = ext.latent_arrays(HP)
    step, n = index.zarr.chunks[0], ext.committed_tokens()
    rows, vals = [], []
    for a in range(0, n, step):
        idx, val = index[a:a + step], values[a:a + step]
        hit = (idx == latent) & (val != 0)
        r, _ = np.nonzero(hit)
        rows.append(a + r.astype(np.int64))
        vals.append(val[hit].astype(np.float32))
    return np.concatenate(rows), np.concatenate(vals)


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_feature(ext, repeats: int) -> dict:
    """``ext.feature(hp, i)`` against ``scan_feature`` for latents of different densities (the densest, the
    90th, 50th and 10th percentile of the latents that fired, and the rarest), page cache warm; each result
    checked equal to the scan's."""
    index, values = ext.latent_arrays(HP)
    idx, val = index[:], values[:]
    counts = np.bincount(idx[val != 0].astype(np.int64), minlength=ext.latent_info(HP).d_sae)
    fired = np.nonzero(counts)[0]
    by_count = fired[np.argsort(counts[fired], kind="stable")]
    picks = {"densest": by_count[-1], "p90": by_count[int(0.9 * (len(by_count) - 1))],
             "p50": by_count[len(by_count) // 2], "p10": by_count[int(0.1 * (len(by_count) - 1))],
             "rarest": by_count[0]}
    out = {}
    for name, latent in picks.items():
        latent = int(latent)
        got, want = ext.feature(HP, latent), scan_feature(ext, latent)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), latent
        feature_s = _median_time(lambda: ext.feature(HP, latent), repeats)
        scan_s = _median_time(lambda: scan_feature(ext, latent), repeats)
        out[name] = {"latent": latent, "count": int(counts[latent]), "density": float(counts[latent] / len(idx)),
                     "feature_s": feature_s, "scan_s": scan_s, "speedup": scan_s / feature_s}
    return {"features": out, "median_speedup": float(np.median([r["speedup"] for r in out.values()])),
            "rows": int(len(idx)), "chunks_scanned": -(-len(idx) // index.zarr.chunks[0]),
            "latent_bytes_scanned": int(idx.nbytes + val.nbytes)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    parser.add_argument("--samples", type=int, default=None, help="texts per extraction (default 1024, quick 96)")
    parser.add_argument("--feature-samples", type=int, default=None,
                        help="texts in the store ext.feature is timed on (default 4096, quick 192)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved extraction repeats (default 3)")
    parser.add_argument("--out", default=str(HERE / "out" / "latents.json"))
    args = parser.parse_args()
    n = args.samples or (96 if args.quick else 1024)
    repeats = args.repeats or (1 if args.quick else 3)
    feature_n = args.feature_samples or (192 if args.quick else 4096)
    d_sae = EXPANSION * WIDTH
    results = {"quick": args.quick, "samples": n, "repeats": repeats, "torch_threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "model": f"GPT-2 config, {N_LAYER} layers, d={WIDTH}", "hook_point": HP,
               "d_sae": d_sae, "k": K, "feature_samples": feature_n}
    with tempfile.TemporaryDirectory(prefix="bench_latents_") as tmp:
        tmp = Path(tmp)
        model_dir = tiny_gpt2(tmp / "model", n_layer=N_LAYER, width=WIDTH)
        sample = hook_sample(model_dir, tmp)
        topk = random_sae(tmp / "sae-topk", "topk", WIDTH, d_sae, K, sample)
        relu = random_sae(tmp / "sae-relu", "standard", WIDTH, d_sae, None, sample)
        started = time.perf_counter()
        layout = {"topk": bytes_per_latent(model_dir, topk, tmp, n, "topk"),
                  "standard": bytes_per_latent(model_dir, relu, tmp, n, "standard"),
                  "standard, latent_coverage=0.99": bytes_per_latent(model_dir, relu, tmp, n, "coverage",
                                                                     latent_coverage=0.99)}
        ext = layout["topk"].pop("ext")
        for name in layout:
            layout[name].pop("ext", None)
        results["bytes"] = layout
        big = ms.extract(model_dir, texts(feature_n), workspace=str(tmp / "feature"), saes={HP: topk},
                         feature_statistics="off", **EXTRACT)  # the statistics are not what is timed here
        results["feature"] = bench_feature(big, 3 if args.quick else 7)
        mean_len = ext.n_tokens / ext.n_samples
        flops = flops_per_token(model_dir, LAYER, mean_len)
        sae_flops = 2 * WIDTH * d_sae  # the encoder's matmul per token (the top-k selection not counted)
        flops.update({"sae_encoder": sae_flops, "sae_share": sae_flops / (flops["forward"] + sae_flops),
                      "flops_only_ratio": flops["forward"] / (flops["forward"] + sae_flops),
                      "flops_only_ratio_2x_all_params": flops["forward_2x_all_params"] /
                      (flops["forward_2x_all_params"] + sae_flops), "mean_sample_tokens": mean_len})
        results["flops"] = flops
        print(f"[bytes, feature] {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        started = time.perf_counter()
        results["extraction"] = bench_extraction(model_dir, topk, tmp, n, repeats)
        print(f"[extraction] {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"\nwrote {args.out}")


def print_table(r: dict) -> None:
    print(f"{r['model']}, SAE d_sae={r['d_sae']} on {r['hook_point']}, {r['samples']} texts, "
          f"{r['torch_threads']} torch threads, {r['cpus']} CPUs")
    for name, b in r["bytes"].items():
        print(f"bytes per active latent, {name:<31} (indices+values){b['bytes_per_active']:>8.2f}  "
              f"with by-feature index "
              f"{b['bytes_per_active_with_index']:.2f}  dense float16 {b['dense_float16_bytes_per_active']:.0f}  "
              f"(width {b['width']}, mean L0 {b['mean_l0']:.1f}, {b['active']:,} active, {b['dropped']:,} dropped)")
    x, f = r["extraction"], r["flops"]
    fmt = lambda v: ", ".join(f"{a:.3f}" for a in v)
    print(f"{'extract tokens/s, SAE (stats auto) / no SAE':<48}{x['ratio']['sae_auto_vs_none']:>8.3f}  "
          f"(per repeat {fmt(x['ratios']['sae_auto_vs_none'])})")
    print(f"{'extract tokens/s, SAE (stats off) / no SAE':<48}{x['ratio']['sae_off_vs_none']:>8.3f}  "
          f"(per repeat {fmt(x['ratios']['sae_off_vs_none'])})")
    print(f"{'  if only FLOPs counted: forward/(forward+SAE)':<48}{f['flops_only_ratio']:>8.3f}  (encoder "
          f"{f['sae_encoder'] / 1e6:.2f} MFLOP/token = {f['sae_share']:.1%} of forward+encoder "
          f"{(f['forward'] + f['sae_encoder']) / 1e6:.2f}; with 2 x all params incl. embeddings "
          f"{f['flops_only_ratio_2x_all_params']:.3f})")
    print(f"{'extract tokens/s, feature_statistics auto / off':<48}{x['ratio']['auto_vs_off']:>8.3f}  "
          f"(per repeat {fmt(x['ratios']['auto_vs_off'])})")
    rates = {k: np.median([v['tokens_per_s'] for v in runs]) for k, runs in x["runs"].items()}
    print(f"  tokens/s medians: " + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items()) + f" ({x['tokens']:,} tokens)")
    fe = r["feature"]
    print(f"{'ext.feature vs scan of the store, median speedup':<48}{fe['median_speedup']:>7.1f}x  "
          f"({fe['rows']:,} rows, {fe['chunks_scanned']} chunks, {fe['latent_bytes_scanned'] / 1e6:.1f} MB scanned)")
    for name, row in fe["features"].items():
        print(f"  {name:<8} latent {row['latent']:>5}  density {row['density']:.5f}  feature "
              f"{row['feature_s'] * 1e3:8.2f} ms  scan {row['scan_s'] * 1e3:8.2f} ms  {row['speedup']:7.1f}x")


if __name__ == "__main__":
    main()
