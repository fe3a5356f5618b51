"""Feature dashboards at scale: the feature table's first paint and a feature page, on 1M tokens x 16,384 features.

    python benchmarks/bench_features.py            # 1,048,576 tokens x 16,384 features (about 4 minutes, 2 CPUs)
    python benchmarks/bench_features.py --quick    # 16,384 tokens x 1,024 features (a smoke run)

What the table and a page read, made real without a dense 1M x 16k store (32 GB in float16):

- **token ids**: a real store (``ExtractionStore.allocate``) of the bundled sample tokenized by the bundled
  MiniLM's tokenizer, repeated to ``--tokens`` tokens in samples of at most 128, special tokens flagged;
- **statistics**: SAE-like latents (``--active`` of ``--features`` a token, skewed so densities range from ~25% to
  ~0.1%, exponential values) made block by block from a seeded generator and fed to the real
  ``FeatureStatsAccumulator`` as sparse (CSR) batches, then saved where ``ext.feature_statistics`` finds them (the
  store's ``analysis/`` cache, crc32c-checked);
- **values of one feature at a few rows**: the storage chunks holding the timed pages' example contexts are written
  (dense float16 rows regenerated from the same generator), every other chunk is left absent: a page that read
  anything else would fail (a missing chunk below the commit mark raises).

Timed (median of ``--repeats``, seconds): the statistics read from the store (once per store), the table's first
paint (sort by density + the first 25 rows with their top tokens + the row labels the widget shows; cold: the first
time for this store, reading its token ids; warm: another sort), a page (``feature_page`` without the token-means pass,
see below, and its HTML), and a logit table (d=768, the MiniLM's 30,522 tokens). Token means of a raw neuron read the
whole column once (then cached in the store): ``--dense-rows`` times that pass on a real dense store of the same width
and extrapolates to ``--tokens``. Prints a table; writes benchmarks/out/features.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's mistudio, whatever is installed
HP = "layers.0.residual"
BLOCK = 8192  # rows the generator makes at a time (a multiple of every chunk's rows)


def tokenized(n_tokens: int, tokenizer) -> list[np.ndarray]:
    """Samples of the bundled sample, tokenized (at most 128 tokens), repeated until there are ``n_tokens``."""
    from mistudio.data import sample_texts

    texts = [t for t in sample_texts() if t.strip()]
    encoded = [np.asarray(ids, np.int32) for ids in tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
    out, total, i = [], 0, 0
    while total < n_tokens:
        ids = encoded[i % len(encoded)][: n_tokens - total]
        if len(ids):
            out.append(ids)
            total += len(ids)
        i += 1
    return out


def make_store(location: str, samples: list[np.ndarray], d: int, tokenizer, model: str):
    """A real store, allocated (token arrays written), COMPLETED, with no activation chunk written."""
    from mistudio.extraction import Extraction
    from mistudio.plan import plan_for_ids
    from mistudio.storage.metadata import ExtractionMeta, ModelInfo, new_nonce
    from mistudio.storage.store import ExtractionStore

    store = ExtractionStore.create(location, ExtractionMeta(id=Path(location).name, nonce=new_nonce(),
                                                            status="EXTRACTING", params={"dtype": "float16"},
                                                            model=ModelInfo(name_or_path=model, model_type="bert")))
    tokens, layout = plan_for_ids(samples, {HP: d}, "float16")
    tokens["special"] = np.isin(tokens["input_ids"], tokenizer.all_special_ids)
    store.allocate(tokens, layout, {"exclude_special": False}, chunk_records=False)  # chunks written by hand
    n, n_samples = len(tokens["input_ids"]), len(samples)
    store.update(status="COMPLETED", progress={"samples_committed": n_samples, "tokens_committed": n,
                                               "samples_done": n_samples, "tokens_done": n})
    return Extraction.open(location)


def block_values(block: int, d: int, active: int, seed: int = 0):
    """Rows ``[block * BLOCK, (block + 1) * BLOCK)`` of the synthetic latents as CSR (offsets, indices, values)."""
    rng = np.random.default_rng([seed, block])
    idx = np.sort((d * rng.random((BLOCK, active)) ** 2).astype(np.int64), axis=1)  # low features commoner
    keep = np.ones_like(idx, bool)
    keep[:, 1:] = idx[:, 1:] != idx[:, :-1]
    offsets = np.concatenate([[0], np.cumsum(keep.sum(1))])
    return offsets, idx[keep], rng.exponential(1.0, int(keep.sum())).astype(np.float32)


def dense_rows(block: int, d: int, active: int) -> np.ndarray:
    offsets, indices, values = block_values(block, d, active)
    out = np.zeros((BLOCK, d), np.float16)
    out[np.repeat(np.arange(BLOCK), np.diff(offsets)), indices] = values
    return out


def accumulate(ext, d: int, active: int):
    """The real accumulator fed with every block (CSR); returns it and the seconds it took."""
    from mistudio.storage.featstats import CSR, FeatureStatsAccumulator

    n = int(ext.committed_tokens())
    acc = FeatureStatsAccumulator(d)
    documents = np.searchsorted(np.asarray(ext.activation_offsets), np.arange(n), side="right") - 1
    seconds = 0.0
    for block in range(-(-n // BLOCK)):
        a, b = block * BLOCK, min(n, (block + 1) * BLOCK)
        offsets, indices, values = block_values(block, d, active)
        cut = offsets[b - a]
        start = time.perf_counter()
        acc.update(a, CSR(offsets[:b - a + 1], indices[:cut], values[:cut]), documents[a:b])
        seconds += time.perf_counter() - start
    return acc, seconds


def save_statistics(ext, acc) -> None:
    """Where ``ext.feature_statistics(hp)`` finds them: the store's ``analysis/`` cache entry of its streamed pass
    (arrays crc32c-checked, the mark written last). Written here with ``write_empty_chunks`` (an all-zero array,
    such as ``nan_count``, still gets its chunk: ``stats.cache_write`` does not ask for it yet, so its entries read
    back as missing and are recomputed)."""
    import zarr

    from mistudio.analysis import stats as analysis
    from mistudio.storage.layout import array_codecs

    state = acc.state_dict()
    mark = int(ext.committed_tokens())
    group = zarr.open_group(store=ext.location, path=analysis.cache_path("featstats", HP, json.dumps({})), mode="w",
                            zarr_format=3)
    for name, data in state.items():
        if isinstance(data, np.ndarray):
            group.create_array(name, data=data, config={"write_empty_chunks": True}, **array_codecs(True))
    group.attrs.update({**{k: v for k, v in state.items() if not isinstance(v, np.ndarray)}, "mark": mark})


def page_rows(ext, stats, feature: int, context: int = 8) -> np.ndarray:
    """Every activation row a page of ``feature`` reads: its examples and their context windows."""
    rows = [stats.top_rows(feature)[:20]] + [b["rows"] for b in stats.quantile_examples(feature)]
    rows = np.concatenate(rows).astype(np.int64)
    offsets = np.asarray(ext.sample_offsets)
    sample = np.searchsorted(offsets, rows, side="right") - 1
    out = [np.arange(max(offsets[s], r - context), min(offsets[s + 1], r + context + 1)) for r, s in zip(rows, sample)]
    return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)


def raw_activations(ext):
    """The hook point's Zarr array opened for writing, past the store's size checks (its chunks are not there yet:
    this benchmark writes only those it reads)."""
    import zarr

    from mistudio.storage.layout import WRITE_CONFIG

    return zarr.open_array(store=f"{ext.location}/activations/{HP}", mode="r+").with_config(WRITE_CONFIG)


def write_chunks(ext, rows: np.ndarray, d: int, active: int) -> int:
    """Write the storage chunks holding ``rows``, and the first and last chunk (a store's reads check that those
    exist before trusting its size), as dense values regenerated from the generator; returns bytes."""
    arr = raw_activations(ext)
    chunk = int(arr.chunks[0])
    written = 0
    for c in np.unique(np.concatenate([rows, [0, int(arr.shape[0]) - 1]]) // chunk):
        a = int(c) * chunk
        block = a // BLOCK
        values = dense_rows(block, d, active)[a - block * BLOCK:a - block * BLOCK + chunk]
        n = min(chunk, int(arr.shape[0]) - a)
        arr[a:a + n] = values[:n]
        written += values[:n].nbytes
    return written


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def dense_column_pass(folder: Path, rows: int, d: int, tokenizer, model: str) -> dict:
    """Token means of a raw neuron: one pass over its column, timed on a real dense store of ``rows`` x ``d``."""
    from mistudio.analysis import feature_view

    samples = tokenized(rows, tokenizer)
    ext = make_store(str(folder / "dense.zarr"), samples, d, tokenizer, model)
    arr = raw_activations(ext)
    rng = np.random.default_rng(1)
    step = int(arr.chunks[0]) * 16
    for a in range(0, rows, step):
        arr[a:min(rows, a + step)] = rng.standard_normal((min(rows, a + step) - a, d)).astype(np.float16)
    feature_view.token_counts(ext)  # the token ids, read once per store (not part of a feature's pass)
    ext.tokenizer  # noqa: B018 - loaded once per extraction, as in a page
    start = time.perf_counter()
    feature_view.token_means(ext, HP, 5)
    seconds = time.perf_counter() - start
    return {"rows": rows, "d": d, "seconds": seconds, "rows_per_s": rows / seconds,
            "mb_per_s": rows * d * 2 / seconds / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--active", type=int, default=32, help="latents firing per token")
    parser.add_argument("--pages", type=int, default=3, help="features whose pages are timed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-rows", type=int, default=8192, help="rows of the dense store for the column pass")
    parser.add_argument("--state", help="an .npz file: the accumulated statistics are saved there, and read from "
                        "there when it exists (same --tokens, --features, --active), skipping the accumulation")
    parser.add_argument("--quick", action="store_true", help="16,384 tokens x 1,024 features, 2 pages, 2 repeats")
    parser.add_argument("--out", default=str(HERE / "out" / "features.json"))
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.features, args.pages, args.repeats, args.dense_rows = 1 << 14, 1024, 2, 2, 1024

    import torch

    from mistudio.analysis import features
    from mistudio.analysis.feature_page import feature_page_html
    from mistudio.analysis.logit_effects import Unembedding, logit_effects
    from mistudio.models import packaged_minilm_path
    from mistudio.widgets.features_panel import table_label
    from transformers import AutoTokenizer

    model = str(packaged_minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    d = args.features
    tmp = Path(tempfile.mkdtemp(prefix="mistudio-bench-features-"))
    results: dict = {"tokens": args.tokens, "features": d, "active": args.active}
    try:
        start = time.perf_counter()
        ext = make_store(str(tmp / "ext_bench_features.zarr"), tokenized(args.tokens, tokenizer), d, tokenizer, model)
        results["store_s"] = time.perf_counter() - start
        state_file = Path(args.state) if args.state else None
        if state_file is not None and state_file.exists():  # the same synthetic state, fed in an earlier run
            from mistudio.storage.featstats import FeatureStatsAccumulator

            with np.load(state_file, allow_pickle=False) as saved:
                acc = FeatureStatsAccumulator.from_state_dict({k: (saved[k] if saved[k].ndim else saved[k].item())
                                                               for k in saved.files})
            results["state_from"] = str(state_file)
        else:
            acc, seconds = accumulate(ext, d, args.active)
            results.update(accumulate_s=seconds, accumulate_tokens_per_s=args.tokens / seconds)
            if state_file is not None:
                state_file.parent.mkdir(parents=True, exist_ok=True)
                np.savez(state_file, **{k: np.asarray(v) for k, v in acc.state_dict().items()})
        results["state_mb"] = acc.nbytes / 1e6
        save_statistics(ext, acc)
        del acc

        start = time.perf_counter()
        stats = ext.feature_statistics(HP)  # from the store: read, crc-checked, rebuilt
        results["statistics_load_s"] = time.perf_counter() - start
        density = stats.density
        order = np.argsort(-density)
        chosen = [int(order[int(q * (d - 1))]) for q in np.linspace(0.0, 0.9, args.pages)]  # dense to rare
        wanted = np.unique(np.concatenate([page_rows(ext, stats, f) for f in chosen]))
        results["chunk_bytes_written"] = write_chunks(ext, wanted, d, args.active)
        results["pages"] = [{"feature": f, "density": float(density[f])} for f in chosen]

        def first_paint(sort: str) -> list[str]:
            table = features.FeatureTable(ext, HP, statistics=stats)
            table.arrange(sort, descending=True)
            return [table_label(row) for row in table.page(0, 25)]

        start = time.perf_counter()
        labels = first_paint("density")  # cold: reads the store's token ids, builds the token texts
        results["table_first_paint_cold_s"] = time.perf_counter() - start
        results["table_first_paint_warm_s"], _ = median_time(lambda: first_paint("max"), args.repeats)
        results["table_first_rows"] = labels[:3]

        start = time.perf_counter()
        page = features.feature_page(ext, HP, chosen[0], statistics=stats, n_token_means=0)
        results["page_cold_s"] = time.perf_counter() - start  # the first page: token arrays, the tokenizer's names
        for entry, f in zip(results["pages"], chosen):
            entry["page_s"], page = median_time(lambda f=f: features.feature_page(
                ext, HP, f, statistics=stats, n_token_means=0), args.repeats)
            entry["html_s"], html = median_time(lambda: feature_page_html(page), args.repeats)
            entry["html_kb"] = len(html) / 1e3
            entry["examples"] = len(page["top"]) + sum(len(b["examples"]) for b in page["bands"])
        results["page_warm_s"] = max(e["page_s"] + e["html_s"] for e in results["pages"])

        vocab = len(tokenizer)
        gen = torch.Generator().manual_seed(0)
        unembedding = Unembedding(W_U=torch.randn(768, vocab, generator=gen), gain=torch.ones(768),
                                  tokenizer=tokenizer, model_type="gpt2", norm="ln_f", convention="weight", tied=True)
        direction = torch.randn(768, generator=gen)
        unembedding.folded  # noqa: B018 - folded once per model, as the page's cached unembedding is
        results["logits_s"], _ = median_time(lambda: logit_effects(direction, unembedding, k=10), args.repeats)
        results["dense_column_pass"] = dense_column_pass(tmp, args.dense_rows, d, tokenizer, model)
        results["dense_column_pass"]["extrapolated_s"] = args.tokens / results["dense_column_pass"]["rows_per_s"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    dense = results["dense_column_pass"]
    fed = (f"{results['accumulate_tokens_per_s']:,.0f} tokens/s into the accumulator" if "accumulate_s" in results
           else f"state read from {results['state_from']}")
    print(f"store: {args.tokens:,} tokens x {d:,} features (allocated in {results['store_s']:.1f} s); statistics: "
          f"{fed}, state {results['state_mb']:.0f} MB; {results['chunk_bytes_written'] / 1e6:.0f} MB of chunks "
          "written for the timed pages")
    rows = [("statistics read from the store (once per store)", results["statistics_load_s"]),
            ("table first paint, cold (first time for this store)", results["table_first_paint_cold_s"]),
            ("table first paint, warm (another sort)", results["table_first_paint_warm_s"]),
            ("first page, cold (token arrays, token names)", results["page_cold_s"])]
    rows += [(f"page of feature {e['feature']} (density {100 * e['density']:.3g}%, {e['examples']} examples) "
              f"+ HTML ({e['html_kb']:.0f} kB)", e["page_s"] + e["html_s"]) for e in results["pages"]]
    rows += [("logit table (d=768, 30,522 tokens)", results["logits_s"]),
             (f"token means, raw neuron: one column pass ({dense['mb_per_s']:,.0f} MB/s), extrapolated to "
              f"{args.tokens:,} rows (then cached)", dense["extrapolated_s"])]
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:>8.3f} s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
