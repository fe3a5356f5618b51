"""mistudio benchmarks: every figure is a ratio of two measurements taken in this one run.

    python benchmarks/run.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/run.py --quick    # smoke run, under a minute
    python benchmarks/run.py --model PATH   # any local model folder instead of the tiny GPT-2

Prints a table and writes benchmarks/out/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

import mistudio as ms
from mistudio.data import plan_order, tokenize
from mistudio.engine import pad_batch, position_ids
from mistudio.models import load_model
from mistudio.plan import plan_for_ids
from mistudio.request import Request
from mistudio.specs import ModelSpec
from warm import ForkServer

HERE = Path(__file__).resolve().parent
WRITER_LAYOUTS = {"chunks 2 MB (v1)": {"chunk_mb": 2.0, "shard_mb": 0}, "shards 16 MB": {"chunk_mb": 2.0, "shard_mb": 16},
                  "shards 64 MB": {"chunk_mb": 2.0, "shard_mb": 64}, "shards 32 MB": {"chunk_mb": 2.0, "shard_mb": 32}}
# what a child's first extraction imports lazily (transformers' model and tokenizer modules), imported before forking
WARM_MODULES = ("transformers.models.gpt2.modeling_gpt2", "transformers.models.bert.tokenization_bert",
                "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
                "mistudio.runner", "mistudio.engine", "zarr")
MEMORY_FS = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
QUICK_LAYOUTS = {"chunks 2 MB (v1)": {"chunk_mb": 2.0, "shard_mb": 0}, "shards 4 MB": {"chunk_mb": 1.0, "shard_mb": 4}}


def tiny_gpt2(folder: Path, n_layer: int = 12, width: int = 256) -> str:
    """A GPT-2-shaped model from a config, with the MiniLM's real WordPiece tokenizer (no download)."""
    import shutil

    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    tok_src = ms.packaged_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=width, n_head=8, vocab_size=len(tokenizer), n_positions=512,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    GPT2Model(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tok_src / name).exists():
            shutil.copy(tok_src / name, folder / name)
    return str(folder)


def texts(n: int) -> list[str]:
    base = ms.sample_texts()
    return [base[i % len(base)] for i in range(n)]


def bare_forward(loaded, ids_list, order, batch_size, last_layer=None) -> tuple[float, int, int]:
    """Seconds, real tokens and computed positions of plain batched forwards (no hooks, no writes)."""
    ordered = [ids_list[i] for i in order]
    flat = np.concatenate(ordered)
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in ordered])])
    handle = None
    if last_layer is not None:
        def stop(*_):
            raise StopIteration
        handle = loaded.blocks[last_layer].register_forward_hook(stop)
    real = computed = 0
    device = next(loaded.model.parameters()).device
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(ordered), batch_size):
            e = min(b + batch_size, len(ordered))
            batch, mask = pad_batch(flat, offsets, b, e, loaded.pad_id, "right")
            ids_t, mask_t = torch.from_numpy(batch).to(device), torch.from_numpy(mask).to(device)
            try:
                loaded.model(input_ids=ids_t, attention_mask=mask_t, position_ids=position_ids(mask_t),
                             use_cache=False)
            except StopIteration:
                pass
            real += int(mask.sum())
            computed += mask.size
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the forwards queued on the GPU are part of the time
    if handle is not None:
        handle.remove()
    return time.perf_counter() - start, real, computed


def bench_overhead(model_dir, ws, n, batch_size, layers, repeats) -> dict:
    """Bare forwards and ms.extract, interleaved ``repeats`` times: the median of the paired ratios."""
    loaded = load_model(ModelSpec(name_or_path=model_dir, device="cpu"))
    data = tokenize(Request.build(model="bench", dataset=texts(n), max_length=128), loaded.tokenizer, loaded.vocab_size)
    order = plan_order(data.lengths)
    bare_forward(loaded, data.ids, order[: batch_size * 2], batch_size)  # warm-up
    pairs = []
    for _ in range(repeats):
        secs, real, _ = bare_forward(loaded, data.ids, order, batch_size, last_layer=max(layers))
        ext = ms.extract(model_dir, texts(n), layers=layers, hooks=["residual", "mlp", "attention"],
                         batch_size=batch_size, max_length=128, workspace=ws, progress=False, device="cpu")
        pairs.append((real / secs, ext.metadata["timings"]["tokens_per_s"]))
    ratios = [e / b for b, e in pairs]
    return {"bare_tokens_per_s": [b for b, _ in pairs], "extract_tokens_per_s": [e for _, e in pairs],
            "ratios": ratios, "ratio": float(np.median(ratios)), "target": ">= 0.95", "hook_points": len(ext.hook_points),
            "tokens": ext.n_tokens, "bytes_written": sum(ext.activations(hp).nbytes for hp in ext.hook_points)}


def bench_batching(model_dir, n) -> dict:
    loaded = load_model(ModelSpec(name_or_path=model_dir, device="cpu"))
    data = tokenize(Request.build(model="bench", dataset=texts(n), max_length=128), loaded.tokenizer, loaded.vocab_size)
    dataset_order = np.arange(len(data.ids))
    bucketed = plan_order(data.lengths)
    rows = {}
    secs, real, computed = bare_forward(loaded, data.ids, dataset_order, 1)
    base = real / secs
    rows["seed loop (batch 1)"] = {"tokens_per_s": base, "speedup": 1.0, "useful_fraction": real / computed}
    for batch_size in (8, 32, 64):
        for name, order in (("dataset order", dataset_order), ("bucketed", bucketed)):
            secs, real, computed = bare_forward(loaded, data.ids, order, batch_size)
            rows[f"batch {batch_size}, {name}"] = {"tokens_per_s": real / secs, "speedup": real / secs / base,
                                                   "useful_fraction": real / computed}
    return rows


def bench_early_stop(model_dir, n) -> dict:
    loaded = load_model(ModelSpec(name_or_path=model_dir, device="cpu"))
    data = tokenize(Request.build(model="bench", dataset=texts(n), max_length=128), loaded.tokenizer, loaded.vocab_size)
    order = plan_order(data.lengths)
    bare_forward(loaded, data.ids, order[:16], 8)
    full, _, _ = bare_forward(loaded, data.ids, order, 8)
    early, _, _ = bare_forward(loaded, data.ids, order, 8, last_layer=1)
    return {"full_s": full, "layer1_s": early, "ratio": early / full, "target": "<= 0.25",
            "n_layers": loaded.n_layers}


MEMORY_CHILD = """
import json, os, resource, sys, threading
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, sys.argv[4])
import mistudio as ms
from run import texts

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

peak, extracting, finished = [0.0], threading.Event(), threading.Event()

def sample():
    extracting.wait()
    while not finished.wait(0.02):
        peak[0] = max(peak[0], rss_mb())

def on_event(event):
    if event["event"] == "state" and event["status"] == "EXTRACTING":
        extracting.set()

threading.Thread(target=sample, daemon=True).start()
ws = ms.Workspace(sys.argv[3])
job = ws.submit(sys.argv[1], texts(int(sys.argv[2])), layers=[0, 5], hooks=["residual", "mlp"], batch_size=16,
                max_length=64, device="cpu")
job.subscribe(on_event)
job.wait()
finished.set()
print(json.dumps({"extracting_peak_rss_mb": peak[0], "process_peak_rss_mb":
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tokens": job.meta["progress"]["tokens_total"], "status": job.status}))
"""


def child_stdout(code: str, argv: list[str], server=None) -> str:
    """The stdout of ``python -c code *argv`` in a fresh interpreter, or, given a ``warm.ForkServer`` (--quick),
    in a fork of its warm process (the same code; the imports already done)."""
    if server is not None:
        return server.check_output(code, argv)
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout


def bench_memory(model_dir, ws, small, large, server=None) -> dict:
    """Peak RSS sampled while EXTRACTING (every 20 ms), in a fresh process per dataset size (--quick: a fork of
    a warm one, ``server``)."""
    out = {}
    for n in (small, large):
        stdout = child_stdout(MEMORY_CHILD, [model_dir, str(n), ws, str(HERE)], server)
        out[n] = json.loads(stdout.strip().splitlines()[-1])
    peaks = [out[n]["extracting_peak_rss_mb"] for n in (small, large)]
    return {"samples": [small, large], "peak_rss_mb": peaks, "tokens": [out[n]["tokens"] for n in (small, large)],
            "process_peak_rss_mb": [out[n]["process_peak_rss_mb"] for n in (small, large)],
            "growth": peaks[1] / peaks[0] - 1, "target": "< 0.10"}


def bench_cancel(model_dir, ws, n) -> dict:
    batch_times, latencies = [], []
    for _ in range(3):
        stamps = []
        job = ms.Workspace(ws).submit(model_dir, texts(n), layers=[11], hooks=["residual"], batch_size=8,
                                      device="cpu", before_batch=lambda i, b: stamps.append(time.perf_counter()))
        while len(stamps) < 6 and not job.done:
            time.sleep(0.005)
        asked = time.perf_counter()
        job.cancel()
        while job.status != "CANCELLED":
            time.sleep(0.001)
        latencies.append(time.perf_counter() - asked)
        batch_times.append(float(np.median(np.diff(stamps))))
    latency, batch = float(np.median(latencies)), float(np.median(batch_times))
    return {"latency_s": latency, "batch_s": batch, "latency_in_batches": latency / batch, "target": "<= 1 batch"}


def bench_write(ws, mb) -> dict:
    import zarr

    width, rows = 1024, int(mb * 2**20 / (1024 * 2))
    data = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float16)
    raw = Path(ws) / "raw.bin"
    start = time.perf_counter()
    with open(raw, "wb") as f:
        for b in range(0, rows, 1024):
            f.write(data[b:b + 1024].tobytes())
    raw_s = time.perf_counter() - start
    group = zarr.open_group(str(Path(ws) / "w.zarr"), mode="w")
    arr = group.create_array("a", shape=data.shape, chunks=(1024, width), dtype="float16", compressors=None)
    start = time.perf_counter()
    for b in range(0, rows, 1024 * 4):
        arr[b:b + 1024 * 4] = data[b:b + 1024 * 4]
    zarr_s = time.perf_counter() - start
    size = data.nbytes / 1e6
    return {"mb": size, "raw_mb_s": size / raw_s, "zarr_mb_s": size / zarr_s, "ratio": raw_s / zarr_s}


def _raw_write(folder: Path, blocks: list[np.ndarray]) -> float:
    """Seconds to write each block to its own new file with ``os.write`` (no fsync, like Zarr's store)."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, block in enumerate(blocks):
        fd = os.open(folder / f"{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, memoryview(block).cast("B"))
        finally:
            os.close(fd)
    return time.perf_counter() - start


def _units_bytes(store, hook_points: list[str]) -> list[int]:
    """The byte size of every storage unit (shard, else chunk) of the activation arrays, in write order."""
    from mistudio.storage.layout import storage_unit

    sizes = []
    for hp in hook_points:
        arr = store.activations(hp)
        unit = storage_unit(arr)[0]
        row_bytes = arr.shape[1] * arr.dtype.itemsize
        sizes += [(min(b + unit, arr.shape[0]) - b) * row_bytes for b in range(0, arr.shape[0], unit)]
    return sizes


def _allocated_store(location: str, n_samples: int, length: int, hook_dims: dict, dtype: str,
                     chunk_records: bool = True, **layout):
    """A real, allocated store of ``n_samples`` samples of ``length`` tokens (no model; ``chunk_records``: as
    ``ExtractionStore.allocate`` takes it)."""
    from mistudio.storage.metadata import ExtractionMeta, new_nonce
    from mistudio.storage.store import ExtractionStore

    meta = ExtractionMeta(id=Path(location).stem, nonce=new_nonce(), status="EXTRACTING", params={"dtype": dtype})
    store = ExtractionStore.create(location, meta)
    tokens, plan = plan_for_ids([np.full(length, 5, dtype=np.int32)] * n_samples, hook_dims, dtype, **layout)
    store.allocate(tokens, plan, {"exclude_special": False}, chunk_records=chunk_records)
    return store


def writer_once(tmp: Path, tag: str, mb: float, hooks: int, width: int, batch_tokens: int,
                dtype: str = "float16", chunk_records: bool = True, **layout) -> dict:
    """Feed ChunkWriter pre-made rows as fast as it takes them, between two raw writes of the same bytes to
    files of the same sizes as the store's storage units (their mean is the baseline). Returns both MB/s.
    ``dtype``: the storage dtype, float16 or bfloat16 (2-byte types: the same bytes either way)."""
    from mistudio.storage.layout import numpy_dtype
    from mistudio.storage.stats import HookStats
    from mistudio.storage.writer import ChunkWriter

    length = 128
    n_samples = max(1, int(mb * 2**20 / (hooks * width * 2)) // length)
    per_batch = max(1, batch_tokens // length)
    hook_dims = {f"layers.{i}.residual": width for i in range(hooks)}
    store = _allocated_store(str(tmp / f"w-{tag}.zarr"), n_samples, length, hook_dims, dtype, chunk_records,
                             **layout)
    rng = np.random.default_rng(0)
    rows = {hp: rng.standard_normal((per_batch * length, width)).astype(numpy_dtype(dtype)) for hp in hook_dims}
    stats = {hp: HookStats.empty() for hp in hook_dims}
    sizes = _units_bytes(store, list(hook_dims))
    pool = rng.standard_normal(max(sizes) // 2).astype(np.float16)
    raw_s = _raw_write(tmp / f"raw-{tag}", [pool[: s // 2] for s in sizes])
    shutil.rmtree(tmp / f"raw-{tag}")
    start = time.perf_counter()
    writer = ChunkWriter(store, 0)
    for first in range(0, n_samples, per_batch):
        n = min(per_batch, n_samples - first)
        writer.put(n, {f"activations/{hp}": r[: n * length] for hp, r in rows.items()}, stats)
    writer.close(flush=True)
    zarr_s = time.perf_counter() - start
    assert store.record.progress.tokens_committed == n_samples * length
    shutil.rmtree(tmp / f"w-{tag}.zarr")
    raw_s = (raw_s + _raw_write(tmp / f"raw-{tag}", [pool[: s // 2] for s in sizes])) / 2
    shutil.rmtree(tmp / f"raw-{tag}")
    total = sum(sizes) / 1e6
    return {"mb": total, "files": len(sizes), "writer_mb_s": total / zarr_s, "raw_mb_s": total / raw_s,
            "ratio": raw_s / zarr_s}


def bench_writer(tmp: Path, mb: float, repeats: int, layouts: dict[str, dict], hooks: int = 4, width: int = 1024,
                 batch_tokens: int = 2048) -> dict:
    """The store writer alone (no model) against raw writes of the same bytes, per storage layout:
    the median over ``repeats`` interleaved pairs of the ratio writer MB/s / raw MB/s."""
    out = {}
    for rep in range(repeats):
        for name, layout in layouts.items():
            out.setdefault(name, []).append(writer_once(tmp, f"{name}-{rep}", mb, hooks, width, batch_tokens, **layout))
    summary = {}
    for name, runs in out.items():
        summary[name] = {"ratio": float(np.median([r["ratio"] for r in runs])), "ratios": [r["ratio"] for r in runs],
                         "writer_mb_s": float(np.median([r["writer_mb_s"] for r in runs])),
                         "raw_mb_s": float(np.median([r["raw_mb_s"] for r in runs])),
                         "mb": runs[0]["mb"], "files": runs[0]["files"], "layout": layouts[name]}
    return {"layouts": summary, "hooks": hooks, "width": width, "batch_tokens": batch_tokens, "target": ">= 0.7"}


def bench_checksum(ws, mb, repeats) -> dict:
    """Write, then read, the same rows into a store with and without crc32c (``store.array_codecs``), and
    read them through the checked view (``Extraction.activations``). Every block of 4 chunks is timed in
    all variants back to back, alternating the order, so that the machine's noise hits them alike."""
    import zarr

    from mistudio.storage.reads import CheckedArray
    from mistudio.storage.layout import WRITE_CONFIG, array_codecs

    width, rows, block = 1024, int(mb * 2**20 / (1024 * 2)), 1024 * 4
    data = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float16)
    seconds = {k: [0.0] * repeats for k in ("write_plain", "write_crc", "read_plain", "read_crc", "read_checked")}

    def timed(key: str, rep: int, fn) -> None:
        start = time.perf_counter()
        fn()
        seconds[key][rep] += time.perf_counter() - start

    for rep in range(repeats):
        arrays = {}
        for name in ("plain", "crc"):
            group = zarr.open_group(str(Path(ws) / f"checksum-{rep}-{name}.zarr"), mode="w")
            arrays[name] = group.create_array("a", shape=data.shape, chunks=(1024, width), dtype="float16",
                                              fill_value=0, config=WRITE_CONFIG, **array_codecs(name == "crc"))
        checked = CheckedArray(arrays["crc"], ws, rows)
        for i, b in enumerate(range(0, rows, block)):  # as the writer thread does: whole chunks, a few at a time
            for name in ("plain", "crc")[:: 1 if i % 2 else -1]:
                timed(f"write_{name}", rep, lambda: arrays[name].__setitem__(slice(b, b + block), data[b:b + block]))
        for i, b in enumerate(range(0, rows, block)):
            views = [("read_plain", arrays["plain"]), ("read_crc", arrays["crc"]), ("read_checked", checked)]
            for key, view in views[:: 1 if i % 2 else -1]:
                timed(key, rep, lambda: view[b:b + block])
    size = data.nbytes / 1e6
    mb_s = {k: size / float(np.median(v)) for k, v in seconds.items()}
    ratios = {"write_ratio": ("write_crc", "write_plain"), "read_ratio": ("read_crc", "read_plain"),
              "checked_read_ratio": ("read_checked", "read_crc")}
    return {"mb": size, "repeats": repeats, **{f"{k}_mb_s": v for k, v in mb_s.items()},
            **{k: float(np.median(np.array(seconds[b]) / np.array(seconds[a]))) for k, (a, b) in ratios.items()},
            **{k + "s": [float(x) for x in np.array(seconds[b]) / np.array(seconds[a])] for k, (a, b) in ratios.items()}}


def loader_store(folder: Path, mb: float, width: int = 1024, shard_mb: float = 0, dtype: str = "float32"):
    """A COMPLETED store of random float32 activations, about ``mb`` MB, written straight through ExtractionStore
    (2 MB chunks; ``shard_mb`` 0: one file per chunk, format 1; else shards of about that size, format 2), stored
    as ``dtype``."""
    from mistudio.storage.codec import record_committed
    from mistudio.storage.layout import numpy_dtype
    from mistudio.storage.metadata import ExtractionMeta
    from mistudio.storage.store import ExtractionStore

    n = int(mb * 2**20 / (width * numpy_dtype(dtype).itemsize))
    lengths = np.full(n // 128, 128)
    meta = ExtractionMeta(id="bench-loader", nonce="bench", status="EXTRACTING", params={"dtype": dtype},
                          model={"name_or_path": str(ms.packaged_minilm_path())})
    store = ExtractionStore.create(str(folder), meta)
    rng = np.random.default_rng(0)
    tokens, plan = plan_for_ids([rng.integers(0, 1000, size=int(k)) for k in lengths], {"layers.0.residual": width},
                                dtype, chunk_mb=2.0, shard_mb=shard_mb)
    store.allocate(tokens, plan, {"exclude_special": False})
    arr = store.activations("layers.0.residual")
    block = arr.shards[0] if arr.shards else arr.chunks[0] * 16
    for a in range(0, arr.shape[0], block):  # bfloat16 is stored as its uint16 bit pattern
        values = rng.standard_normal((min(block, arr.shape[0] - a), width), dtype=np.float32)
        arr[a:a + block] = values.astype(numpy_dtype(dtype)).view(arr.dtype)
    record_committed([arr], 0, arr.shape[0])  # written through Zarr: its chunk records, as the writer makes them
    store.update(status="COMPLETED", progress={"tokens_committed": arr.shape[0], "samples_committed": len(lengths)},
                 statistics={"layers.0.residual": {"mean": 0.0, "std": 1.0}})
    return ms.Extraction(store)


def drop_cache(files: list[Path]) -> None:
    """Evict the files' pages from the page cache (no root needed: POSIX_FADV_DONTNEED on each file)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


LOADER_LAYOUTS = {"chunks 2 MB (format 1)": 0, "shards 32 MB (format 2)": 32}


def bench_loader(folder: Path, mb: float, repeats: int) -> dict:
    """Loader MB/s (batches of 4096 as torch tensors) ÷ a raw sequential read of the same unit files, page
    cache warm and cold (every unit file's pages dropped before each pass, for every side), per layout."""
    hp = "layers.0.residual"
    out = {}
    for layout, shard_mb in LOADER_LAYOUTS.items():
        root = folder / f"loader-{shard_mb}.zarr"
        ext = loader_store(root, mb, shard_mb=shard_mb)
        arr = ext.activations(hp)
        files = sorted((root / "activations" / hp / "c").glob("*/0"), key=lambda p: int(p.parent.name))
        nbytes = arr.nbytes

        def raw_files():  # the baseline: a fresh array per file (32 MB shards: page faults on every read)
            for f in files:
                np.fromfile(f, dtype=np.uint8)

        buf = np.empty(max(f.stat().st_size for f in files), np.uint8)

        def raw_readinto(buf=buf):  # the memcpy bound: each file read into one reused buffer
            for f in files:
                with open(f, "rb", buffering=0) as fh:
                    fh.readinto(buf)

        def raw_zarr(arr=arr):
            for a in range(0, arr.shape[0], arr.chunks[0]):
                arr.zarr[a:a + arr.chunks[0]]

        def loader(shuffle, ext=ext):
            epochs = ext.loader(hp, batch_size=4096, shuffle=shuffle)  # one loader, one epoch per run, as in training

            def run():
                for _batch in epochs:
                    pass
            return run

        runs = {"raw_files": raw_files, "raw_readinto": raw_readinto, "raw_zarr": raw_zarr,
                "shuffled": loader(True), "unshuffled": loader(False)}
        for run in runs.values():  # warm the page cache and the code paths
            run()
        secs: dict[str, list[float]] = {f"{name}_{cache}": [] for cache in ("warm", "cold") for name in runs}
        for _ in range(repeats):  # interleaved, so drift of this shared machine hits all alike
            for cache in ("warm", "cold"):
                for name, run in runs.items():
                    if cache == "cold":
                        drop_cache(files)
                    start = time.perf_counter()
                    run()
                    secs[f"{name}_{cache}"].append(time.perf_counter() - start)
        mb_s = {name: nbytes / 1e6 / float(np.median(s)) for name, s in secs.items()}
        row = {"mb": nbytes / 1e6, "files": len(files), "mb_s": mb_s, "chunk_rows": arr.chunks[0],
               "shard_rows": arr.shards[0] if arr.shards else None, "width": 1024,
               # the drop worked if a cold raw read is clearly slower than a warm one
               "cold_drop_effective": mb_s["raw_readinto_cold"] < 0.5 * mb_s["raw_readinto_warm"]}
        for cache in ("warm", "cold"):
            for name in ("shuffled", "unshuffled", "raw_zarr"):
                row[f"{name}_{cache}_ratio"] = mb_s[f"{name}_{cache}"] / mb_s[f"raw_files_{cache}"]
                row[f"{name}_{cache}_vs_readinto"] = mb_s[f"{name}_{cache}"] / mb_s[f"raw_readinto_{cache}"]
        out[layout] = row
        shutil.rmtree(root, ignore_errors=True)
    return {"layouts": out, "target": ">= 0.8 shuffled (warm)"}


TOKEN_BUDGET_CHILD = """
import json, os, sys, threading, time
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, sys.argv[4])
import numpy as np
import mistudio as ms
from mistudio.data import plan_batches, plan_order, tokenize
from mistudio.engine import forward_batches
from mistudio.models import load_model
from mistudio.request import Request
from mistudio.specs import ModelSpec
from run import rss_now, texts

loaded = load_model(ModelSpec(name_or_path=sys.argv[1], device="cpu"))
data = tokenize(Request.build(model=sys.argv[1], dataset=texts(int(sys.argv[2])), max_length=128), loaded.tokenizer,
                loaded.vocab_size)
order = plan_order(data.lengths)
ids = np.concatenate([data.ids[i] for i in order])
offsets = np.concatenate([[0], np.cumsum(data.lengths[order])]).astype(np.int64)
capture = Request.build(model=sys.argv[1], layers=[5], hooks=["residual", "mlp"], **json.loads(sys.argv[3]))
for _ in forward_batches(loaded, ids, offsets, capture.model_copy(update={"batch_size": 1, "max_batch_tokens": None}),
                         0, 2):
    pass  # warm-up on two samples: the allocator has not yet seen a big batch
batches = plan_batches(offsets, capture, 0, len(order))
width = lambda b: int(offsets[b + 1] - offsets[b])
base, peak, done = rss_now(), [0.0], threading.Event()

def sample():
    while not done.wait(0.005):
        peak[0] = max(peak[0], rss_now() - base)

threading.Thread(target=sample, daemon=True).start()
started, cpu = time.perf_counter(), time.process_time()
for _ in forward_batches(loaded, ids, offsets, capture, 0, len(order)):
    pass
secs, cpu = time.perf_counter() - started, time.process_time() - cpu
done.set()
print(json.dumps({"tokens_per_s": int(offsets[-1]) / secs, "tokens_per_cpu_s": int(offsets[-1]) / cpu,
                  "useful_fraction": int(offsets[-1]) / sum((e - b) * width(b) for b, e in batches),
                  "batches": len(batches), "largest_batch_tokens": max((e - b) * width(b) for b, e in batches),
                  "peak_rss_above_start_mb": peak[0]}))
"""


def bench_token_budget(model_dir, n, quick=False, server=None) -> dict:
    """Fixed batch sizes vs padded-token budgets through the real capture path (forward_batches, no writer),
    each in a fresh process: tokens per wall second and per CPU second (this process's threads: less
    sensitive to other load on the machine), useful-token fraction, the largest batch in padded tokens, and
    peak RSS above the start of the run (sampled every 5 ms)."""
    configs = {"batch 8": {"batch_size": 8}, "batch 32": {"batch_size": 32},
               "budget 1024 tokens (= 8 x 128)": {"max_batch_tokens": 1024},
               "budget 4096 tokens (= 32 x 128)": {"max_batch_tokens": 4096}}
    if quick:  # one budget: the script's smoke check (a process each costs torch's import)
        configs = {k: v for k, v in configs.items() if k.startswith("budget 1024")}
    out = {}
    for name, kw in configs.items():
        stdout = child_stdout(TOKEN_BUDGET_CHILD, [model_dir, str(n), json.dumps(kw), str(HERE)], server)
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def rss_now() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


EXTRACT = dict(layers=[1, 3, 5], hooks=["residual", "mlp", "attention"], batch_size=16, dtype="float16",
               max_length=128, device="cpu")  # the figure: tiny GPT-2 6 x 384, 3 layers x 3 hooks


def bench_extraction(model_dir, tmp: Path, n: int, repeats: int, device: str = "cpu") -> dict:
    """Steady-state ``ms.extract`` tokens/s (the engine's own timing, fixed costs excluded) against the limit:
    a bare batched forward to the last captured layer plus a raw write of the same bytes to files of the
    store's storage-unit sizes. ``repeats`` times (bare forward, extraction, bare forward); the median ratio.
    On a GPU the forward and the writer overlap, so ``overlap_limit`` (the slower of the two) is given too."""
    loaded = load_model(ModelSpec(name_or_path=model_dir, device=device))  # model_dtype "auto", as the job's
    data = tokenize(Request.build(model="bench", dataset=texts(n), max_length=128), loaded.tokenizer, loaded.vocab_size)
    order = plan_order(data.lengths)
    bare_forward(loaded, data.ids, order[:32], 16)  # warm-up
    runs = []
    last = max(EXTRACT["layers"])
    for rep in range(repeats):  # bare forwards before and after each extraction: the machine's drift cancels
        before, real, _ = bare_forward(loaded, data.ids, order, 16, last_layer=last)
        ext = ms.extract(model_dir, texts(n), workspace=str(tmp / f"ex-{rep}"), progress=False,
                         **{**EXTRACT, "device": device})
        after, _, _ = bare_forward(loaded, data.ids, order, 16, last_layer=last)
        sizes = _units_bytes(ext.store, ext.hook_points)
        pool = np.random.default_rng(rep).standard_normal(max(sizes) // 2).astype(np.float16)
        raw_s = _raw_write(tmp / f"ex-raw-{rep}", [pool[: s // 2] for s in sizes])
        secs = (before + after) / 2
        limit, rate, n_tokens = real / (secs + raw_s), ext.metadata["timings"]["tokens_per_s"], ext.n_tokens
        shutil.rmtree(tmp / f"ex-{rep}"), shutil.rmtree(tmp / f"ex-raw-{rep}")
        runs.append({"extract_tokens_per_s": rate, "bare_s": secs, "raw_write_s": raw_s,
                     "limit_tokens_per_s": limit, "ratio": rate / limit,
                     "overlap_limit_tokens_per_s": real / max(secs, raw_s), "bare_tokens_per_s": real / secs})
    return {"ratio": float(np.median([r["ratio"] for r in runs])), "runs": runs, "tokens": n_tokens,
            "bytes": sum(sizes), "target": ">= 0.95"}


def bench_ttfb(model_dir, tmp: Path, n: int, repeats: int, load_delay_s: float = 0.0) -> dict:
    """Fixed costs: time from ``ws.submit`` to the start of the first batch (config, weights, tokenizer,
    tokenization, allocation) against loading the model alone (``load_model``); a fresh workspace each
    time (no model cache). Tokenizing the same texts alone is reported too.

    ``load_delay_s`` adds that many seconds to every weight load (alone and in the job alike): the slow
    read of a large checkpoint from disk or network, which a small model from the page cache does not have."""
    import mistudio.runner

    spec = ModelSpec(name_or_path=model_dir, device="cpu")
    loaded = load_model(spec)  # imports and page cache
    real_load = mistudio.runner.load_model

    def load_model_slowly(spec):
        time.sleep(load_delay_s)
        return real_load(spec)

    mistudio.runner.load_model = load_model_slowly
    try:
        return _ttfb_runs(model_dir, tmp, n, repeats, spec, loaded, load_model_slowly)
    finally:
        mistudio.runner.load_model = real_load


def _ttfb_runs(model_dir, tmp, n, repeats, spec, loaded, load_model) -> dict:
    runs = []
    for rep in range(repeats):
        start = time.perf_counter()
        load_model(spec)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        tokenize(Request.build(model="bench", dataset=texts(n), max_length=128), loaded.tokenizer, loaded.vocab_size)
        tokenize_s = time.perf_counter() - start
        first: list[float] = []
        start = time.perf_counter()
        job = ms.Workspace(str(tmp / f"ttfb-{rep}-{time.time_ns()}")).submit(
            model_dir, texts(n), **{**EXTRACT, "layers": [0]},
            before_batch=lambda i, b: first.append(time.perf_counter()) if not first else None)
        while not first and not job.done:
            time.sleep(0.001)
        job.cancel()  # the rest of the extraction is not this figure
        job.wait()
        assert first, job.error
        runs.append({"load_s": load_s, "tokenize_s": tokenize_s, "first_batch_s": first[0] - start,
                     "ratio": (first[0] - start) / load_s})
    return {"ratio": float(np.median([r["ratio"] for r in runs])), "runs": runs, "samples": n, "target": "<= 1.2"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run under a minute")
    parser.add_argument("--model", default=None, help="a local model folder instead of the tiny GPT-2")
    parser.add_argument("--out", default=str(HERE / "out" / "results.json"))
    parser.add_argument("--only", default=None, help="comma-separated steps, e.g. memory,cancel (no table)")
    args = parser.parse_args()
    q = args.quick
    # --quick: the child processes (memory, token_budget) fork from a warm copy of this one, taken before it computes
    server = ForkServer(preload=WARM_MODULES) if q else None
    torch.manual_seed(0)
    results = {"quick": q, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=MEMORY_FS) as mem:
        tmp, mem = Path(tmp), Path(mem)  # mem: stores and raw files of writer/extraction (no disk throttling)
        model_dir = args.model or tiny_gpt2(tmp / "model", n_layer=12, width=128 if q else 256)
        model6 = lambda: args.model or (str(tmp / "model6") if (tmp / "model6").exists()
                                        else tiny_gpt2(tmp / "model6", n_layer=6, width=384))
        steps = [
            ("overhead", lambda: bench_overhead(model_dir, str(tmp / "ws1"), 64 if q else 512, 8, [3, 7, 11],
                                                1 if q else 5)),
            ("batching", lambda: bench_batching(model_dir, 24 if q else 1024)),
            ("early_stop", lambda: bench_early_stop(model_dir, 32 if q else 512)),
            ("memory", lambda: bench_memory(model_dir, str(tmp / "ws2"), *((50, 200) if q else (1000, 10000)),
                                            server=server)),
            ("cancel", lambda: bench_cancel(model_dir, str(tmp / "ws3"), 120 if q else 400)),
            ("write", lambda: bench_write(str(tmp), 64 if q else 512)),
            ("checksum", lambda: bench_checksum(str(tmp), 32 if q else 256, 2 if q else 6)),
            ("loader", lambda: bench_loader(tmp, 64 if q else 512, 1 if q else 3)),
            ("token_budget", lambda: bench_token_budget(model_dir, 64 if q else 1024, q, server)),
            ("extraction", lambda: bench_extraction(model6(), mem, 64 if q else 1024, 1 if q else 3)),
            ("ttfb", lambda: {"real load": bench_ttfb(model6(), tmp, 500 if q else 2000, 1 if q else 3),
                              "load + 3 s": bench_ttfb(model6(), tmp, 500 if q else 2000, 1 if q else 3,
                                                       load_delay_s=0.5 if q else 3.0)}),
            ("writer", lambda: bench_writer(mem, 32 if q else 512, 1 if q else 5, QUICK_LAYOUTS if q else WRITER_LAYOUTS)),
        ]
        for name, step in steps:
            if args.only and name not in args.only.split(","):
                continue
            started = time.perf_counter()
            results[name] = step()
            print(f"[{name}] {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    if server is not None:
        server.close()
    if args.only:
        print(json.dumps({k: v for k, v in results.items() if k in args.only.split(",")}, indent=1))
    else:
        print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


def print_table(r: dict) -> None:
    o, e, m, c, w, k = r["overhead"], r["early_stop"], r["memory"], r["cancel"], r["write"], r["checksum"]
    for name, row in r["token_budget"].items():
        print(f"{'token budget: ' + name:<44}{row['tokens_per_cpu_s']:>10.0f} tok/CPU-s  useful {row['useful_fraction']:.3f}"
              f"  largest batch {row['largest_batch_tokens']} tokens  peak RSS +{row['peak_rss_above_start_mb']:.0f} MB"
              f"  ({row['batches']} batches)")
    print(f"\n{'figure':<44}{'value':>14}  target")
    print(f"{'overhead: extract / bare forward tokens/s':<44}{o['ratio']:>14.3f}  >= 0.95"
          f"   (median of {len(o['ratios'])} interleaved pairs: {', '.join(f'{r:.3f}' for r in o['ratios'])})")
    for name, row in r["batching"].items():
        print(f"{'batching: ' + name:<44}{row['speedup']:>13.2f}x  useful tokens {row['useful_fraction']:.3f}"
              f"  ({row['tokens_per_s']:.0f} tok/s)")
    print(f"{'early stop: layer 1 of 12 / full forward':<44}{e['ratio']:>14.3f}  <= 0.25")
    print(f"{'memory: peak RSS growth ' + str(m['samples'][0]) + ' -> ' + str(m['samples'][1]) + ' samples':<44}"
          f"{m['growth']:>14.3f}  < 0.10   ({m['peak_rss_mb'][0]:.0f} -> {m['peak_rss_mb'][1]:.0f} MB while extracting,"
          f" {m['tokens'][0]} -> {m['tokens'][1]} tokens)")
    print(f"{'cancel latency (batches)':<44}{c['latency_in_batches']:>14.2f}  <= 1     ({c['latency_s'] * 1000:.0f} ms)")
    print(f"{'write: zarr MB/s / raw file MB/s':<44}{w['ratio']:>14.3f}           ({w['zarr_mb_s']:.0f} vs "
          f"{w['raw_mb_s']:.0f} MB/s)")
    print(f"{'checksum: crc32c write MB/s / plain':<44}{k['write_ratio']:>14.3f}           ({k['write_crc_mb_s']:.0f} vs "
          f"{k['write_plain_mb_s']:.0f} MB/s)")
    print(f"{'checksum: crc32c read MB/s / plain':<44}{k['read_ratio']:>14.3f}           ({k['read_crc_mb_s']:.0f} vs "
          f"{k['read_plain_mb_s']:.0f} MB/s)")
    print(f"{'checked view read MB/s / raw zarr (crc32c)':<44}{k['checked_read_ratio']:>14.3f}           "
          f"({k['read_checked_mb_s']:.0f} MB/s)")
    for name, row in r["writer"]["layouts"].items():
        print(f"{'writer MB/s / raw write, ' + name:<44}{row['ratio']:>14.3f}  >= 0.7   ({row['writer_mb_s']:.0f} vs "
              f"{row['raw_mb_s']:.0f} MB/s, {row['files']} files)")
    x, t = r["extraction"], r["ttfb"]
    ratios = ", ".join(f"{run['ratio']:.3f}" for run in x["runs"])
    print(f"{'extraction / limit (forward + raw write)':<44}{x['ratio']:>14.3f}  >= 0.95  "
          f"(median of {len(x['runs'])}: {ratios})")
    for name, row in t.items():
        print(f"{'time to first batch / model load, ' + name:<44}{row['ratio']:>14.3f}  <= 1.2   "
              f"({row['runs'][0]['first_batch_s']:.2f} s vs {row['runs'][0]['load_s']:.2f} s load, "
              f"{row['runs'][0]['tokenize_s']:.2f} s tokenize alone)")


    if "loader" in r:
        for layout, lo in r["loader"]["layouts"].items():
            m = lo["mb_s"]
            for cache in ("warm", "cold"):
                note = "" if cache == "warm" else f"; drop took effect: {lo['cold_drop_effective']}"
                for name in ("shuffled", "unshuffled", "raw_zarr"):
                    who = "zarr in order" if name == "raw_zarr" else f"loader {name}"
                    label = f"{who} / raw read, {cache}, {layout.split(' (')[0]}"
                    target = ">= 0.8" if name == "shuffled" else ""
                    print(f"{label:<58}{lo[name + '_' + cache + '_ratio']:>8.3f}  {target:<6}"
                          f"  ({m[name + '_' + cache]:.0f} vs {m['raw_files_' + cache]:.0f} MB/s np.fromfile, "
                          f"{m['raw_readinto_' + cache]:.0f} MB/s into one buffer{note})")

if __name__ == "__main__":
    main()
