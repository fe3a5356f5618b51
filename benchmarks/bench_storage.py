"""Storage at GPU rates (issue 20) and CLI start time (issue 15), in one run:

    python benchmarks/bench_storage.py                  # every step (see --help for sizes)
    python benchmarks/bench_storage.py --quick          # small sizes, one repeat (a smoke run)
    python benchmarks/bench_storage.py --only kill,cli  # some steps: kill, memory, dtype, extraction, cli

- kill: a sharded extraction in a subprocess is SIGKILLed at random moments (each after this run of the job has
  committed something); the job is resumed in a new subprocess and killed again, a new job once one completes. A
  ``before_batch`` callback writes the batch index to a file (replaced atomically): before batch i every earlier
  batch is computed and handed to the writer. Loss = rows of the computed batches - ``progress.tokens_committed``,
  in inner chunks per hook point (goal <= 1).
- memory: run.py's ``bench_memory`` (peak RSS while EXTRACTING, 1k -> 10k samples, default shards; goal < 10%).
- dtype: bfloat16 against float16 on the same shapes: the writer alone (run.py's ``writer_once``: ``ChunkWriter``
  MB/s and a raw write of the same bytes), and reads of a COMPLETED store (``ext.activations(hp)[:]`` and one
  shuffled loader epoch with the loader's dtype = the storage dtype), interleaved, medians.
- records: the writer alone with chunk records (storage/positions.py) against without, one file per chunk and
  32 MB shards, interleaved, medians of the ratio; and the flush a record costs: 4 bytes written then
  ``fdatasync``, appended to a file (its size changes) against overwritten in a file made at full size (what
  the records file does), interleaved, median microseconds.
- extraction: run.py's ``bench_extraction`` at 512 and 2,048 samples; ``extract ÷ bare forward`` is the engine's
  tokens/s against the bare batched forward of the same batches (mean of the forwards before and after).
- cli: ``mistudio --help`` and ``mistudio jobs`` on an empty workspace against ``python -c pass``, fresh
  subprocesses, interleaved, median of 5; and which heavy modules each imported.

Prints a table and writes benchmarks/out/storage.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import mistudio as ms  # noqa: E402
import run  # noqa: E402
from mistudio.storage.layout import numpy_dtype  # noqa: E402

MEMORY_FS = run.MEMORY_FS
STEPS = ("kill", "memory", "dtype", "records", "extraction", "cli")

# -- rows lost on kill ---------------------------------------------------------------------------------------------

KILL_CHILD = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[5])
    import mistudio as ms
    workspace, model, counter, layout = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    from run import texts
    ws = ms.Workspace(workspace)

    def computed(index, _size):  # before batch i: every earlier batch of this run is computed and handed over
        with open(counter + ".tmp", "w") as f:
            f.write(str(index))
        os.replace(counter + ".tmp", counter)

    if len(sys.argv) > 7:
        job = ws.resume(sys.argv[7], before_batch=computed)
    else:
        job = ws.submit(model, texts(int(sys.argv[6])), before_batch=computed, **layout)
    print(job.id, flush=True)
    job.wait()
""")


def kill_layout(quick: bool) -> dict:
    """Sharded and small enough for a CPU: d=128 float32 rows (512 B), 4 hook points; full: 2 MB chunks
    (4,096 rows) in 32 MB shards (65,536 rows, the defaults), quick: 64 KB chunks in 1 MB shards."""
    storage = dict(chunk_mb=0.0625, shard_mb=1.0) if quick else dict(chunk_mb=2.0, shard_mb=32.0)
    return dict(layers=[0, 2], hooks=["residual", "mlp"], dtype="float32", batch_size=16, max_length=128,
                device="cpu", **storage)


def bench_kill(model_dir: str, tmp: Path, n_samples: int, kills: int, quick: bool, seed: int = 7) -> dict:
    layout = kill_layout(quick)
    rng = random.Random(seed)
    workspace = str(tmp / "kill-ws")
    ws = ms.Workspace(workspace)
    counter = tmp / "computed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    rounds, job_id, jobs = [], None, 0
    while len(rounds) < kills:
        counter.write_text("0")
        argv = [sys.executable, "-c", KILL_CHILD, workspace, model_dir, str(counter), json.dumps(layout), str(HERE),
                str(n_samples)]
        child = subprocess.Popen(argv + ([job_id] if job_id else []), stdout=subprocess.PIPE, text=True, env=env,
                                 cwd=str(ROOT))
        job_id = child.stdout.readline().strip()
        if not job_id:
            raise RuntimeError(f"the extraction child did not start (exit {child.wait()})")
        store = ws.store(job_id)
        meta = store.refresh()
        before = int(meta["progress"]["tokens_committed"])
        deadline = time.monotonic() + 300
        while child.poll() is None and int(store.refresh()["progress"]["tokens_committed"]) <= before:
            if time.monotonic() > deadline:
                child.kill()
                raise RuntimeError("the extraction child committed nothing in 300 s")
            time.sleep(0.05)  # this run has committed something
        if child.poll() is not None:  # finished before this round's kill: a new job
            job_id, jobs = None, jobs + 1
            continue
        time.sleep(rng.uniform(0.0, 2.0 if not quick else 0.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        meta = store.refresh()
        started = meta["resumes"][-1]["from_sample"] if meta.get("resumes") else 0
        index = int(counter.read_text() or 0)
        n_total = int(meta["progress"]["samples_total"])
        offsets = store.activation_offsets()
        computed = int(offsets[min(started + index * layout["batch_size"], n_total)])
        committed = int(meta["progress"]["tokens_committed"])
        ext = ms.open_extraction(job_id, workspace=workspace)
        chunk_rows = ext.activations(ext.hook_points[0]).chunks[0]
        shard_rows = (ext.activations(ext.hook_points[0]).shards or (None,))[0]
        handed_before = int(offsets[min(started + max(index - 1, 0) * layout["batch_size"], n_total)])
        batch_rows = computed - handed_before  # the last batch handed to the writer: possibly still in its queue
        rounds.append({"job": jobs, "from_sample": started, "batches_computed": index, "rows_computed": computed,
                       "rows_committed": committed, "rows_lost": computed - committed,
                       "chunks_lost": (computed - committed) / chunk_rows, "last_batch_rows": batch_rows,
                       "chunks_lost_before_last_batch": max(0, handed_before - committed) / chunk_rows,
                       "chunk_rows": int(chunk_rows), "shard_rows": shard_rows, "rows_total": int(offsets[-1])})
        if committed == int(offsets[-1]):
            job_id, jobs = None, jobs + 1
    losses = [r["chunks_lost"] for r in rounds]
    return {"rounds": rounds, "max_chunks_lost": max(losses), "median_chunks_lost": float(np.median(losses)),
            "max_chunks_lost_before_last_batch": max(r["chunks_lost_before_last_batch"] for r in rounds),
            "hook_points": 4, "layout": layout, "samples": n_samples, "jobs_started": jobs + 1,
            "target": "<= 1 inner chunk per hook point"}


# -- bfloat16 against float16 --------------------------------------------------------------------------------------

def bench_records(tmp: Path, write_mb: float, repeats: int) -> dict:
    """The writer's MB/s with chunk records ÷ without (4 hook points x d=1024, batches of 2,048 tokens, float16),
    per layout, the order alternating each repeat."""
    layouts = {"chunks": dict(chunk_mb=2.0, shard_mb=0), "shards": dict(chunk_mb=2.0, shard_mb=32)}
    mb_s = {(name, on): [] for name in layouts for on in (True, False)}
    for rep in range(repeats):
        for name, layout in layouts.items():
            for on in (True, False)[:: 1 if rep % 2 == 0 else -1]:
                done = run.writer_once(tmp, f"records-{name}-{on}-{rep}", write_mb, 4, 1024, 2048,
                                       chunk_records=on, **layout)
                mb_s[(name, on)].append(done["writer_mb_s"])
    ratios = {name: [a / b for a, b in zip(mb_s[(name, True)], mb_s[(name, False)])] for name in layouts}
    flush_us = {"append": [], "overwrite": []}
    for rep in range(repeats + 1):
        for kind in list(flush_us)[:: 1 if rep % 2 == 0 else -1]:
            flush_us[kind].append(record_flush_us(tmp / f"flush-{kind}-{rep}", kind == "overwrite"))
    return {"write_mb": write_mb, "flush_us": {k: float(np.median(v)) for k, v in flush_us.items()}, "layouts": {
        name: {"ratios": ratios[name], "ratio": float(np.median(ratios[name])), "with_mb_s": mb_s[(name, True)],
               "without_mb_s": mb_s[(name, False)]} for name in layouts}}


def record_flush_us(path: Path, full_size: bool, n: int = 300) -> float:
    """Microseconds per record flush: 4 bytes written at the next place, then ``fdatasync``, ``n`` times, in a
    file made empty (each write changes its size) or at its full size (each write overwrites)."""
    path.write_bytes(bytes(4 * n) if full_size else b"")
    fd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(fd)
        start = time.perf_counter()
        for i in range(n):
            os.pwrite(fd, b"abcd", 4 * i)
            os.fdatasync(fd)
        return (time.perf_counter() - start) / n * 1e6
    finally:
        os.close(fd)
        path.unlink()


def bench_dtype(tmp: Path, write_mb: float, read_mb: float, repeats: int) -> dict:
    """The writer alone (32 MB shards, 4 hook points x d=1024, batches of 2,048 tokens) and reads of a COMPLETED
    store of ``read_mb`` (d=1024, 32 MB shards) per storage dtype, interleaved, alternating the order."""
    dtypes = ("float16", "bfloat16")
    writes = {d: [] for d in dtypes}
    for rep in range(repeats):
        for dtype in dtypes[:: 1 if rep % 2 == 0 else -1]:
            writes[dtype].append(run.writer_once(tmp, f"{dtype}-{rep}", write_mb, 4, 1024, 2048, dtype=dtype,
                                                 chunk_mb=2.0, shard_mb=32))
    exts = {d: run.loader_store(tmp / f"read-{d}.zarr", read_mb, shard_mb=32, dtype=d) for d in dtypes}
    hp = "layers.0.residual"
    sides = {}
    for d, ext in exts.items():
        arr = ext.activations(hp)
        assert arr.dtype == numpy_dtype(d), (arr.dtype, d)
        loader = ms.loader(ext, hp, batch_size=4096, shuffle=True, dtype=d)
        sides[f"{d}_activations"] = lambda arr=arr: arr[:]
        sides[f"{d}_loader"] = lambda loader=loader: [None for _batch in loader]
    for fn in sides.values():  # page cache and code paths warm
        fn()
    secs = {k: [] for k in sides}
    for rep in range(repeats):
        for name in list(sides)[:: 1 if rep % 2 == 0 else -1]:
            start = time.perf_counter()
            sides[name]()
            secs[name].append(time.perf_counter() - start)
    nbytes = {d: exts[d].activations(hp).nbytes for d in dtypes}
    reads = {k: nbytes[k.split("_")[0]] / 1e6 / float(np.median(v)) for k, v in secs.items()}
    for d in dtypes:
        shutil.rmtree(exts[d].location, ignore_errors=True)
    med = lambda d, key: float(np.median([r[key] for r in writes[d]]))
    write = {d: {"writer_mb_s": med(d, "writer_mb_s"), "raw_mb_s": med(d, "raw_mb_s"), "ratio": med(d, "ratio"),
                 "mb": writes[d][0]["mb"]} for d in dtypes}
    pair = lambda key: float(np.median([b[key] / f[key] for b, f in zip(writes["bfloat16"], writes["float16"])]))
    return {"write": write, "write_bf16_vs_f16": pair("writer_mb_s"), "read_mb_s": reads,
            "read_seconds": secs, "read_mb": nbytes["float16"] / 1e6,
            "activations_bf16_vs_f16": reads["bfloat16_activations"] / reads["float16_activations"],
            "loader_bf16_vs_f16": reads["bfloat16_loader"] / reads["float16_loader"], "repeats": repeats}


# -- extraction ÷ bare forward -------------------------------------------------------------------------------------

def bench_extraction(model6: str, tmp: Path, sizes: list[int], repeats: int) -> dict:
    out = {}
    for n in sizes:
        r = run.bench_extraction(model6, tmp, n, repeats)
        for x in r["runs"]:
            x["ratio_vs_bare"] = x["extract_tokens_per_s"] / x["bare_tokens_per_s"]
        r["ratio_vs_bare"] = float(np.median([x["ratio_vs_bare"] for x in r["runs"]]))
        out[str(n)] = r
    return {"sizes": out, "target": ">= 0.95"}


# -- CLI start time ------------------------------------------------------------------------------------------------

CLI = ("import sys; from mistudio.cli import main\n"
       "try:\n    main()\nexcept SystemExit:\n    pass\n"
       "print('IMPORTED', ' '.join(m for m in ('torch', 'transformers', 'zarr', 'numpy', 'pydantic', 'ipywidgets')"
       " if m in sys.modules), file=sys.stderr)")


def bench_cli(tmp: Path, repeats: int) -> dict:
    """Wall seconds of fresh processes (this checkout's mistudio: the command runs ``mistudio.cli.main`` as the
    console script does), interleaved, median of ``repeats``."""
    empty = tmp / "empty-ws"
    empty.mkdir()
    env = {**os.environ, "MISTUDIO_WORKSPACE": str(empty), "PYTHONPATH": str(ROOT)}
    commands = {"python -c pass": [sys.executable, "-c", "pass"],
                "mistudio --help": [sys.executable, "-c", CLI, "--help"],
                "mistudio jobs": [sys.executable, "-c", CLI, "jobs", "--workspace", str(empty)]}
    secs = {k: [] for k in commands}
    imported = {}
    for argv in commands.values():  # warm the page cache
        subprocess.run(argv, capture_output=True, env=env, cwd=str(ROOT), check=True)
    for rep in range(repeats):
        for name in list(commands)[:: 1 if rep % 2 == 0 else -1]:
            start = time.perf_counter()
            proc = subprocess.run(commands[name], capture_output=True, text=True, env=env, cwd=str(ROOT))
            secs[name].append(time.perf_counter() - start)
            assert proc.returncode == 0, proc.stderr[-2000:]
            line = [x for x in proc.stderr.splitlines() if x.startswith("IMPORTED")]
            imported[name] = line[-1].split()[1:] if line else None
    med = {k: float(np.median(v)) for k, v in secs.items()}
    return {"seconds": secs, "median_s": med, "imported": imported, "target": "< 1 s",
            "over_python": {k: v - med["python -c pass"] for k, v in med.items()}}


# -- main ----------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    parser.add_argument("--only", default=None, help=f"comma-separated steps of {', '.join(STEPS)}")
    parser.add_argument("--kills", type=int, default=None, help="SIGKILLs (default 10, quick 2)")
    parser.add_argument("--kill-samples", type=int, default=None, help="texts per killed job (default 6000)")
    parser.add_argument("--extraction-sizes", default=None, help="samples, comma-separated (default 512,2048)")
    parser.add_argument("--extraction-repeats", type=int, default=None, help="default 3, quick 1")
    parser.add_argument("--out", default=str(HERE / "out" / "storage.json"))
    args = parser.parse_args()
    q = args.quick
    only = set(args.only.split(",")) if args.only else set(STEPS)
    unknown = only - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}: use {', '.join(STEPS)}")
    import torch
    results = {"quick": q, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench_storage_") as tmp, \
            tempfile.TemporaryDirectory(dir=MEMORY_FS) as mem:
        tmp, mem = Path(tmp), Path(mem)
        model = lambda: str(tmp / "model") if (tmp / "model").exists() else \
            run.tiny_gpt2(tmp / "model", n_layer=4, width=128)
        model12 = lambda: str(tmp / "model12") if (tmp / "model12").exists() else \
            run.tiny_gpt2(tmp / "model12", n_layer=12, width=128 if q else 256)
        model6 = lambda: str(tmp / "model6") if (tmp / "model6").exists() else \
            run.tiny_gpt2(tmp / "model6", n_layer=6, width=384)
        sizes = [int(x) for x in args.extraction_sizes.split(",")] if args.extraction_sizes else \
            ([128, 256] if q else [512, 2048])
        steps = {
            "kill": lambda: bench_kill(model(), tmp, args.kill_samples or (400 if q else 6000),
                                       args.kills or (2 if q else 10), q),
            "memory": lambda: run.bench_memory(model12(), str(tmp / "mem-ws"), *((50, 200) if q else (1000, 10000))),
            "dtype": lambda: bench_dtype(mem, 32 if q else 256, 32 if q else 256, 1 if q else 3),
            "records": lambda: bench_records(tmp, 32 if q else 256, 1 if q else 5),
            "extraction": lambda: bench_extraction(model6(), mem, sizes, args.extraction_repeats or (1 if q else 3)),
            "cli": lambda: bench_cli(tmp, 2 if q else 5),
        }
        for name in STEPS:
            if name not in only:
                continue
            started = time.perf_counter()
            results[name] = steps[name]()
            results[name]["seconds_taken"] = time.perf_counter() - started
            results[name]["load_average"] = os.getloadavg()
            print(f"[{name}] {time.perf_counter() - started:.1f} s, load average "
                  f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    print(f"\nwrote {args.out}")


def print_table(r: dict) -> None:
    print(f"{r['cpus']} CPUs, {r['torch_threads']} torch threads")
    if "kill" in r:
        k = r["kill"]
        lost = ", ".join(f"{x['chunks_lost']:.2f}" for x in k["rounds"])
        batch = int(np.median([x["last_batch_rows"] for x in k["rounds"]]))
        print(f"{'rows lost on SIGKILL, max (inner chunks/hook pt)':<50}{k['max_chunks_lost']:>8.2f}  <= 1     "
              f"({len(k['rounds'])} kills: {lost}; chunk {k['rounds'][0]['chunk_rows']} rows, shard "
              f"{k['rounds'][0]['shard_rows']} rows, batches of ~{batch}"
              f" rows)")
        print(f"{'  same, rows of the last batch handed over not counted':<50}"
              f"{k['max_chunks_lost_before_last_batch']:>8.2f}")
    if "memory" in r:
        m = r["memory"]
        print(f"{'peak RSS growth ' + str(m['samples'][0]) + ' -> ' + str(m['samples'][1]) + ' samples':<50}"
              f"{m['growth']:>8.3f}  < 0.10   ({m['peak_rss_mb'][0]:.0f} -> {m['peak_rss_mb'][1]:.0f} MB while "
              f"extracting, {m['tokens'][0]} -> {m['tokens'][1]} tokens)")
    if "dtype" in r:
        d = r["dtype"]
        w = d["write"]
        print(f"{'writer MB/s, bfloat16 / float16':<50}{d['write_bf16_vs_f16']:>8.3f}           "
              f"({w['bfloat16']['writer_mb_s']:.0f} vs {w['float16']['writer_mb_s']:.0f} MB/s; raw write "
              f"{w['bfloat16']['raw_mb_s']:.0f} / {w['float16']['raw_mb_s']:.0f})")
        rd = d["read_mb_s"]
        print(f"{'read ext.activations(hp)[:], bfloat16 / float16':<50}{d['activations_bf16_vs_f16']:>8.3f}           "
              f"({rd['bfloat16_activations']:.0f} vs {rd['float16_activations']:.0f} MB/s, {d['read_mb']:.0f} MB)")
        print(f"{'loader shuffled epoch, bfloat16 / float16':<50}{d['loader_bf16_vs_f16']:>8.3f}           "
              f"({rd['bfloat16_loader']:.0f} vs {rd['float16_loader']:.0f} MB/s)")
    if "records" in r:
        for name, x in r["records"]["layouts"].items():
            ratios = ", ".join(f"{v:.2f}" for v in x["ratios"])
            print(f"{'writer MB/s with chunk records / without, ' + name:<50}{x['ratio']:>8.3f}           "
                  f"(per repeat {ratios})")
        f = r["records"]["flush_us"]
        print(f"{'record flush, overwrite / append':<50}{f['overwrite'] / f['append']:>8.3f}           "
              f"({f['overwrite']:.0f} vs {f['append']:.0f} us median)")
    if "extraction" in r:
        for n, x in r["extraction"]["sizes"].items():
            ratios = ", ".join(f"{run_['ratio_vs_bare']:.3f}" for run_ in x["runs"])
            print(f"{'extraction / bare forward, ' + str(n) + ' samples':<50}{x['ratio_vs_bare']:>8.3f}  >= 0.95  "
                  f"(median of {len(x['runs'])}: {ratios}; / forward + raw write {x['ratio']:.3f}; "
                  f"{x['tokens']} tokens)")
    if "cli" in r:
        c = r["cli"]
        for name, s in c["median_s"].items():
            extra = "" if name == "python -c pass" else f"  (+{c['over_python'][name]:.2f} s over python; imported: " \
                f"{', '.join(c['imported'][name] or []) or 'none of torch/transformers/zarr/numpy'})"
            print(f"{'CLI start: ' + name:<50}{s:>7.2f}s  {'< 1 s' if name != 'python -c pass' else '':<8}{extra}")


if __name__ == "__main__":
    main()
