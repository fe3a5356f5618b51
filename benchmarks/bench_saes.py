"""SAE benchmarks: encode throughput (mistudio vs sae_lens on the same weights) and training speed and quality.

    python benchmarks/bench_saes.py            # d_in 256 -> d_sae 4096 encodes; train on a 12-layer d=256 store
    python benchmarks/bench_saes.py --quick    # smoke run
    python benchmarks/bench_saes.py --device cuda --d-in 2048 --expansion 16

Every speed is measured in this run, on this machine; ratios compare two measurements taken side by side.
Prints a table and writes benchmarks/out/saes.json.
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

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import mistudio as ms  # noqa: E402
from mistudio.analysis.sae_training import TrainConfig, evaluate_sae, train_sae  # noqa: E402
from mistudio.saes import SAE  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def random_sae(architecture: str, d_in: int, d_sae: int, k: int, device: torch.device) -> SAE:
    sae = SAE(architecture, d_in, d_sae, k=k if architecture == "topk" else None, device=device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            value = torch.randn(p.shape, generator=g) * (0.05 if name.startswith("W") else 0.1)
            p.copy_(value.abs() + 0.5 if name == "threshold" else value)
    return sae


def bench_encode(d_in: int, d_sae: int, k: int, batch: int, device: torch.device, repeats: int) -> dict:
    """Tokens/s of encode, encode_sparse and forward per architecture; sae_lens's encode on the same folder."""
    try:
        import sae_lens
    except ImportError:
        sae_lens = None
    x = torch.randn(batch, d_in, device=device)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for architecture in ("standard", "topk", "jumprelu", "gated"):
            sae = random_sae(architecture, d_in, d_sae, k, device)
            row = {name: batch / _timed(fn, device, repeats) for name, fn in
                   (("encode", lambda: sae.encode(x)), ("encode_sparse", lambda: sae.encode_sparse(x)),
                    ("forward", lambda: sae(x)))}
            if sae_lens is not None:
                sae.save(Path(tmp) / architecture)
                theirs = sae_lens.SAE.load_from_disk(str(Path(tmp) / architecture), device=str(device))
                with torch.no_grad():
                    row["sae_lens_encode"] = batch / _timed(lambda: theirs.encode(x), device, repeats)
                    row["max_abs_diff"] = float((theirs.encode(x) - sae.encode(x)).abs().max())
                row["ratio_vs_sae_lens"] = row["encode"] / row["sae_lens_encode"]
            out[architecture] = row
    return out


def bench_training(folder: Path, device: torch.device, steps: int, batch: int, expansion: int, k: int,
                   n_samples: int, width: int) -> dict:
    from run import tiny_gpt2

    model = tiny_gpt2(folder / "model", n_layer=4, width=width)
    start = time.perf_counter()
    ext = ms.extract(model, "sample", layers=[2], hooks=["residual"], max_samples=n_samples, batch_size=32,
                     dtype="float32", workspace=str(folder / "ws"), device=device.type)
    out = {"extract_s": time.perf_counter() - start, "stored_tokens": ext.n_tokens}
    hp = "layers.2.residual"
    for architecture, extra in (("topk", {"k": k}), ("standard", {"l1_coefficient": 2.0}),
                                ("jumprelu", {"l0_coefficient": 1.0})):
        config = TrainConfig(architecture=architecture, expansion_factor=expansion, batch_size=batch,
                             n_tokens=batch * steps, lr=1e-3, device=str(device), progress_every_steps=max(1, steps // 10),
                             checkpoint_every_steps=max(1, steps // 2), **extra)
        start = time.perf_counter()
        result = train_sae(ext, hp, config, folder / architecture)
        seconds = time.perf_counter() - start
        state = folder / architecture / "checkpoint" / "state.pt"
        figures = evaluate_sae(result.sae, ext, hp, max_tokens=20_000)
        out[architecture] = {"steps_per_s": steps / seconds, "tokens_per_s": steps * batch / seconds,
                             "seconds": seconds, "checkpoint_mb": state.stat().st_size / 2**20,
                             "explained_variance_first": result.history[0]["explained_variance"],
                             "explained_variance_last": result.history[-1]["explained_variance"],
                             "eval_explained_variance": figures["explained_variance"], "eval_l0": figures["l0"],
                             "eval_dead_fraction": figures["dead_fraction"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", default=str(HERE / "out" / "saes.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats, steps, n_samples = (3, 30, 100) if args.quick else (7, args.steps, 1000)
    d_sae = args.d_in * args.expansion
    results = {"device": str(device), "threads": torch.get_num_threads(), "d_in": args.d_in, "d_sae": d_sae,
               "k": args.k, "batch": args.batch,
               "encode": bench_encode(args.d_in, d_sae, args.k, args.batch, device, repeats)}
    folder = Path(tempfile.mkdtemp(prefix="bench_saes_"))
    try:
        results["training"] = bench_training(folder, device, steps, min(args.batch, 1024), args.expansion // 2,
                                             args.k // 2, n_samples, args.d_in)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"device {results['device']}, {results['threads']} threads; encode d_in {args.d_in} -> d_sae {d_sae}, "
          f"batch {args.batch} (tokens/s)")
    for architecture, row in results["encode"].items():
        theirs = f"  sae_lens {row['sae_lens_encode']:>10,.0f}  ratio {row['ratio_vs_sae_lens']:.2f}" \
            if "sae_lens_encode" in row else ""
        print(f"  {architecture:9s} encode {row['encode']:>10,.0f}  sparse {row['encode_sparse']:>10,.0f}  "
              f"forward {row['forward']:>10,.0f}{theirs}")
    train = results["training"]
    print(f"training on {train['stored_tokens']:,} stored tokens (d={args.d_in}), {steps} steps")
    for architecture in ("topk", "standard", "jumprelu"):
        row = train[architecture]
        print(f"  {architecture:9s} {row['steps_per_s']:7.1f} steps/s {row['tokens_per_s']:>10,.0f} tok/s  "
              f"EV {row['explained_variance_first']:.3f} -> {row['explained_variance_last']:.3f} "
              f"(eval {row['eval_explained_variance']:.3f}, L0 {row['eval_l0']:.1f}, dead "
              f"{row['eval_dead_fraction']:.2f})  checkpoint {row['checkpoint_mb']:.1f} MB")


if __name__ == "__main__":
    main()
