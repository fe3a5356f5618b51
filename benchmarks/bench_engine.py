"""The engine's own work per batch, before and after a change, in one run:

    python benchmarks/bench_engine.py [--device cuda] [--before REV | --before-dir DIR] [--n 512] [--repeats 3]

``forward_batches`` (the job's capture path: hooks, row selection, the storage cast, the statistics, the copies to
the host; no writer) of the current engine and of the engine at ``REV`` (its ``engine.py`` and
``storage/stats.py``; ``--before-dir`` holds those two files where there is no git history), on the same batches,
against the bare batched forward of those batches (run.py's ``bare_forward``), interleaved ``repeats`` times so
the machine's drift cancels. Models: 6-layer GPT-2s of width 16 (a forward so cheap that the engine's fixed work
per batch shows, as on a GPU, where small models are launch-bound) and 384 (the issue's); layers 1, 3, 5 ×
residual/MLP/attention, float16 storage, batch 16.

``thread_teams``: the bare forward in the main thread, on a second thread while it lives, and in the main thread
while that thread lives idle and after it ended. Each thread that ran torch on the CPU keeps an OpenMP team while it
lives; with more team threads than cores libgomp throttles the spin-waiting the forward's small ops rely on. A job
runs on a second thread: this is the ceiling it meets on the CPU whatever the engine does (and the notebook's own
forwards meet it while the workspace's job thread lives).

``host_statistics``: the statistics' numpy work a batch (the job thread's ``from_sources``, the writer's ``merge``)
of each engine, interleaved.

Also counted, device-independent: torch calls per batch (a ``TorchFunctionMode`` sees every torch function and
tensor method, the model's own included), with 1 hook point and with 9: the slope is the engine's work per hook
point. The JSON lands in ``--out`` (default ``benchmarks/out/engine.json``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402

import mistudio.engine as engine_now  # noqa: E402
from mistudio.data import plan_order, tokenize  # noqa: E402
from mistudio.models import load_model  # noqa: E402
from mistudio.request import Request  # noqa: E402
from mistudio.specs import ModelSpec  # noqa: E402

HOOKS = dict(layers=[1, 3, 5], hooks=["residual", "mlp", "attention"], batch_size=16, dtype="float16")
ONE_HOOK = dict(HOOKS, layers=[5], hooks=["residual"])


def load_before(folder: Path):
    """The engine module as of ``folder``'s ``engine.py``, bound to that folder's ``stats.py``."""
    saved = sys.modules["mistudio.storage.stats"]
    modules = {}
    try:
        for name, file, package in (("mistudio.storage._stats_before", "stats.py", "mistudio.storage"),
                                    ("mistudio._engine_before", "engine.py", "mistudio")):
            spec = importlib.util.spec_from_file_location(name, folder / file)
            module = importlib.util.module_from_spec(spec)
            module.__package__ = package
            sys.modules[name] = module
            spec.loader.exec_module(module)
            modules[file] = module
            sys.modules["mistudio.storage.stats"] = module  # the old engine imports the old statistics
    finally:
        sys.modules["mistudio.storage.stats"] = saved
    return modules["engine.py"]


def before_files(rev: str, folder: Path) -> Path:
    for path, file in (("mistudio/engine.py", "engine.py"), ("mistudio/storage/stats.py", "stats.py")):
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=HERE.parent, check=True, capture_output=True,
                              text=True).stdout
        (folder / file).write_text(text)
    return folder


class CountCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def capture(engine, loaded, ids, offsets, request) -> tuple[float, int]:
    """Seconds and batches of one pass of ``engine.forward_batches`` (its rows on the host at the end)."""
    start = time.perf_counter()
    batches = sum(1 for _ in engine.forward_batches(loaded, ids, offsets, request, 0, len(offsets) - 1))
    return time.perf_counter() - start, batches


def calls_per_batch(engine, loaded, ids, offsets, request) -> float:
    with CountCalls() as counter:
        _, batches = capture(engine, loaded, ids, offsets, request)
    return counter.calls / batches


def host_statistics(engines: dict, repeats: int, rows: int = 800, points: int = 9) -> dict:
    """Microseconds a batch of the host's statistics work, each engine's own ``HookStats``, interleaved: on the
    job's thread ``from_sources`` (norm histograms, outlier candidates) and on the writer's ``merge`` (into the
    running accumulators), for ``points`` hook points of ``rows`` rows (d = 16 stored in float16, some outliers)."""
    import timeit

    rng = np.random.default_rng(0)
    norms = (np.abs(rng.normal(size=(points, rows))) * 5).astype(np.float32)
    norms[:, :: rows // 8] *= 100
    sums, stored = [[1.0, 2.0, 3.0, 0]] * points, [np.zeros((rows, 16), np.float16)] * points
    engines = {name: e for name, e in engines.items() if hasattr(e.HookStats, "from_sources")}  # since f9659e2
    times: dict[str, dict[str, list]] = {name: {"from_sources": [], "merge": []} for name in engines}
    for _ in range(max(3, repeats)):
        for name, engine in engines.items():
            stats = engine.HookStats
            batch = stats.from_sources(rows * 16, sums, norms, stored)
            accs = [stats.empty() for _ in range(points)]

            def merge():
                for acc, delta in zip(accs, batch):
                    stats.merge(acc, delta, 0)
            times[name]["from_sources"].append(timeit.timeit(
                lambda: stats.from_sources(rows * 16, sums, norms, stored), number=200) / 200 * 1e6)
            times[name]["merge"].append(timeit.timeit(merge, number=200) / 200 * 1e6)
    return {"hook_points": points, "rows": rows, "microseconds_per_batch": {
        name: {step: float(np.median(values)) for step, values in steps.items()} for name, steps in times.items()}}


def thread_teams(loaded, data, order, repeats: int) -> dict:
    """Bare-forward tokens/s: main thread; a second thread (the main thread's team alive); the main thread while
    that thread lives idle; the main thread once it has ended. Medians of ``repeats``."""
    from concurrent.futures import ThreadPoolExecutor

    def bare() -> float:
        seconds, real, _ = run.bare_forward(loaded, data.ids, order, 16, last_layer=5)
        return real / seconds

    rows: dict[str, list] = {}
    for _ in range(repeats):
        rows.setdefault("main thread", []).append(bare())
        worker = ThreadPoolExecutor(1)
        rows.setdefault("second thread", []).append(worker.submit(bare).result())
        rows.setdefault("main thread, the second alive", []).append(bare())
        worker.shutdown(wait=True)
        rows.setdefault("main thread, the second ended", []).append(bare())
    medians = {name: float(np.median(values)) for name, values in rows.items()}
    return {"tokens_per_s": medians, "second_thread_vs_main": medians["second thread"] / medians["main thread"],
            "main_with_second_alive_vs_main": medians["main thread, the second alive"] / medians["main thread"],
            "cpu_threads": torch.get_num_threads()}


def measure(model_dir: str, device: str, n: int, repeats: int, engines: dict) -> dict:
    loaded = load_model(ModelSpec(name_or_path=model_dir, device=device))
    data = tokenize(Request.build(model="bench", dataset=run.texts(n), max_length=128), loaded.tokenizer,
                    loaded.vocab_size)
    order = plan_order(data.lengths)
    ids = np.concatenate([data.ids[i] for i in order])
    offsets = np.concatenate([[0], np.cumsum(data.lengths[order])]).astype(np.int64)
    request = Request.build(model="bench", **HOOKS)
    one = Request.build(model="bench", **ONE_HOOK)
    few = slice(0, min(len(offsets), 65))
    for engine in engines.values():  # warm-up: allocators, kernels, the thread pools
        capture(engine, loaded, ids, offsets[few], request)
    run.bare_forward(loaded, data.ids, order[:64], 16, last_layer=5)
    rows: dict[str, list] = {"bare": [], **{name: [] for name in engines}}
    for _ in range(repeats):
        seconds, real, _ = run.bare_forward(loaded, data.ids, order, 16, last_layer=5)
        rows["bare"].append(real / seconds)
        for name, engine in engines.items():
            seconds, _ = capture(engine, loaded, ids, offsets, request)
            rows[name].append(int(offsets[-1]) / seconds)
    out: dict = {"tokens": int(offsets[-1]), "batches": capture(engines["after"], loaded, ids, offsets, request)[1],
                 "tokens_per_s": rows}
    for name, engine in engines.items():
        ratios = [e / b for e, b in zip(rows[name], rows["bare"])]
        nine = calls_per_batch(engine, loaded, ids, offsets, request)
        single = calls_per_batch(engine, loaded, ids, offsets, one)
        out[name] = {"ratio_vs_bare": float(np.median(ratios)), "ratio_runs": ratios,
                     "torch_calls_per_batch_9_hook_points": nine, "torch_calls_per_batch_1_hook_point": single,
                     "torch_calls_per_extra_hook_point": (nine - single) / 8}
    out["after_vs_before_tokens_per_s"] = float(np.median([a / b for a, b in zip(rows["after"], rows["before"])]))
    out["host_statistics"] = host_statistics(engines, repeats)
    if device == "cpu":
        out["thread_teams"] = thread_teams(loaded, data, order, repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--before", default="bb2a4ec", help="the git revision whose engine is 'before'")
    parser.add_argument("--before-dir", default="", help="a folder with the 'before' engine.py and stats.py")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--widths", default="16,384")
    parser.add_argument("--out", default=str(HERE / "out" / "engine.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        folder = Path(args.before_dir) if args.before_dir else before_files(args.before, Path(tmp))
        engines = {"before": load_before(folder), "after": engine_now}
        results = {"torch": torch.__version__, "device": args.device, "n": args.n, "before": args.before_dir or
                   args.before, "models": {}}
        for width in (int(w) for w in args.widths.split(",")):
            model = run.tiny_gpt2(Path(tmp) / f"m{width}", n_layer=6, width=width)
            results["models"][f"6x{width}"] = measure(model, args.device, args.n, args.repeats, engines)
            print(f"6x{width}", json.dumps(results["models"][f"6x{width}"]), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
