"""Training loader before / after, in one run: loader MB/s ÷ a raw read of the same unit files, cold and warm,
for both layouts (format 1: one 2 MB chunk per file; format 2: 32 MB shard files of 2 MB inner chunks).

    python benchmarks/bench_loader.py            # 512 MB per layout, 3 interleaved passes (a few minutes)
    python benchmarks/bench_loader.py --quick    # 128 MB, 1 pass
    python benchmarks/bench_loader.py --before 72be1fd   # the "before" loader: this commit's loader.py

"Before" is ``mistudio/analysis/loader.py`` at ``--before`` (default: the commit the new loader replaced),
checked out of git into a temporary file and imported beside the new one, so both run in this process on the
same stores. Cold: every unit file is fsync'ed and its pages dropped (POSIX_FADV_DONTNEED) before each pass
of each side. Each pass is one epoch of batches of 4096 rows as torch tensors (the shuffled loader) or one
read of every unit file (raw); sides are interleaved, medians reported. Also printed: process CPU seconds per
GB (all threads) and the load average, since on a shared machine the wall-clock ratios move with the load.
Prints a table and writes benchmarks/out/loader.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import mistudio as ms  # noqa: E402

BEFORE = "72be1fd"  # main when the loader was rewritten (issue 20 parts 3-4)
HP = "layers.0.residual"
LAYOUTS = {"chunks 2 MB (format 1)": 0, "shards 32 MB (format 2)": 32}


def _bench_run():
    """benchmarks/run.py as a module (its store builder and cache dropper)."""
    spec = importlib.util.spec_from_file_location("mistudio_bench_run", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def before_module(ref: str):
    """The loader module at git ``ref``, imported as mistudio.analysis._loader_before (its relative imports
    resolve against this checkout's package)."""
    source = subprocess.run(["git", "show", f"{ref}:mistudio/analysis/loader.py"], cwd=HERE.parent, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "_loader_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("mistudio.analysis._loader_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measure(folder: Path, mb: float, repeats: int, old, prefetch: int) -> dict:
    run = _bench_run()
    out = {}
    for layout, shard_mb in LAYOUTS.items():
        root = folder / f"loader-{shard_mb}.zarr"
        ext = run.loader_store(root, mb, shard_mb=shard_mb)
        arr = ext.activations(HP)
        files = sorted((root / "activations" / HP / "c").glob("*/0"), key=lambda p: int(p.parent.name))
        nbytes = arr.nbytes

        def raw_files():  # the baseline: np.fromfile of every unit file, stored order
            for f in files:
                np.fromfile(f, dtype=np.uint8)

        buf = np.empty(max(f.stat().st_size for f in files), np.uint8)

        def raw_readinto(buf=buf):  # the memcpy bound: every unit file into one reused buffer
            for f in files:
                with open(f, "rb", buffering=0) as fh:
                    fh.readinto(buf)

        def epochs(made):
            def one_epoch():
                for _batch in made:
                    pass
            return one_epoch

        runs = {"raw_files": raw_files, "raw_readinto": raw_readinto,
                "before": epochs(old.ActivationLoader(ext, HP, batch_size=4096, shuffle=True)),
                "after": epochs(ms.loader(ext, HP, batch_size=4096, shuffle=True, prefetch=prefetch))}
        for side in runs.values():  # warm the page cache and the code paths
            side()
        secs: dict[str, list[float]] = {f"{name}_{cache}": [] for cache in ("warm", "cold") for name in runs}
        cpu: dict[str, list[float]] = {key: [] for key in secs}  # process CPU seconds (all threads) per pass
        for _ in range(repeats):  # interleaved, so drift of this shared machine hits all alike
            for cache in ("warm", "cold"):
                for name, side in runs.items():
                    if cache == "cold":
                        run.drop_cache(files)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    side()
                    secs[f"{name}_{cache}"].append(time.perf_counter() - start)
                    cpu[f"{name}_{cache}"].append(time.process_time() - cpu_start)
        mb_s = {name: nbytes / 1e6 / float(np.median(s)) for name, s in secs.items()}
        cpu_s_per_gb = {name: float(np.median(s)) / (nbytes / 1e9) for name, s in cpu.items()}
        row = {"mb": nbytes / 1e6, "files": len(files), "mb_s": mb_s, "seconds": secs, "cpu_seconds": cpu,
               "cpu_s_per_gb": cpu_s_per_gb, "load_average": os.getloadavg(),
               "cold_drop_effective": mb_s["raw_readinto_cold"] < 0.5 * mb_s["raw_readinto_warm"]}
        for cache in ("warm", "cold"):
            for name in ("before", "after"):
                row[f"{name}_{cache}_ratio"] = mb_s[f"{name}_{cache}"] / mb_s[f"raw_files_{cache}"]
                row[f"{name}_{cache}_vs_readinto"] = mb_s[f"{name}_{cache}"] / mb_s[f"raw_readinto_{cache}"]
        out[layout] = row
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="128 MB per layout, one pass")
    parser.add_argument("--before", default=BEFORE, help="git commit of the 'before' loader")
    parser.add_argument("--mb", type=float, default=None, help="store size per layout (default 512, quick 128)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved passes (default 3, quick 1)")
    parser.add_argument("--prefetch", type=int, default=2, help="the new loader's prefetch (runs read ahead)")
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder)")
    parser.add_argument("--out", default=str(HERE / "out" / "loader.json"))
    args = parser.parse_args()
    old = before_module(args.before)
    mb = args.mb or (128 if args.quick else 512)
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = measure(Path(tmp), mb, repeats, old, args.prefetch)
    print(f"loader MB/s ÷ raw np.fromfile MB/s ({mb:.0f} MB per layout, median of {repeats}; before = {args.before})")
    print(f"{'layout':<26}{'cache':<7}{'before':>8}{'after':>8}  target   MB/s before / after / raw fromfile / "
          "raw readinto;  CPU s per GB before / after / raw fromfile")
    for layout, row in result.items():
        m, c = row["mb_s"], row["cpu_s_per_gb"]
        for cache, target in (("cold", ">= 0.8"), ("warm", ">= 0.45")):
            print(f"{layout:<26}{cache:<7}{row[f'before_{cache}_ratio']:>8.3f}{row[f'after_{cache}_ratio']:>8.3f}  "
                  f"{target:<8} {m[f'before_{cache}']:.0f} / {m[f'after_{cache}']:.0f} / "
                  f"{m[f'raw_files_{cache}']:.0f} / {m[f'raw_readinto_{cache}']:.0f};  "
                  f"{c[f'before_{cache}']:.2f} / {c[f'after_{cache}']:.2f} / {c[f'raw_files_{cache}']:.2f}"
                  + (f"   (drop took effect: {row['cold_drop_effective']})" if cache == "cold" else ""))
        print(f"{'':<26}load average during the passes: {', '.join(f'{x:.1f}' for x in row['load_average'])}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"before": args.before, "mb": mb, "repeats": repeats,
                                          "prefetch": args.prefetch, "layouts": result}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
