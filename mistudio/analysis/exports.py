"""Sharing a store and its feature pages in the formats other tools read.

- :func:`export_html`: chosen feature pages as one self-contained HTML file (an index, then the pages).
- :func:`export_neuronpedia`: Neuronpedia's bulk-import layout for one source (features, activations and
  explanations as gzipped JSON-lines batches, the metadata records beside them).
- :func:`to_hf_dataset`: a store as a Hugging Face ``datasets.Dataset``, one row per stored sample: raw hook
  points as (len, d) arrays, SAE latents sparse (each token's non-zero latents: indices and values).
- :func:`to_saelens_cache`: a hook point in SAELens's cached-activations layout, rows packed to a context size.

The two store exports stream: a block of samples (or of packed rows) at a time, never the whole store.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from ..errors import InputError, MistudioError
from .feature_page import PAGE_CSS, check_page, escape, feature_page_html, number
from .feature_view import LATENT_SUFFIX, display_pieces, is_latent, resolve_scheme
from .features import page_caveats

if TYPE_CHECKING:
    import datasets

    from ..extraction import Extraction


# -- HTML -------------------------------------------------------------------------------------------------
def _page_title(page: dict) -> str:
    return f"{page['hook_point']} · {page['kind']} {int(page['feature'])}"


def export_html(pages: Iterable[dict], path: str | Path, title: str = "mistudio feature pages",
                hide_special: bool = False, scheme: str = "auto") -> Path:
    """Write ``pages`` (feature page dicts, :mod:`mistudio.analysis.feature_page`) to one HTML file: an index with a
    line per page (density, max, note) linking to its anchor, then the pages. Nothing in the file loads anything:
    no scripts, no images, no fonts, and a Content-Security-Policy that forbids every fetch."""
    pages = list(pages)
    if not pages:
        raise InputError("export_html got no pages: pass a list of feature page dicts")
    for page in pages:
        check_page(page)
    index, bodies = [], []
    for i, page in enumerate(pages):
        note = str(page.get("note") or "").strip().splitlines()
        density = None if page["density"] is None else 100 * float(page["density"])
        index.append(f'<tr><td><a href="#p{i}">{escape(_page_title(page))}</a></td>'
                     f'<td class="num">{number(density, ".3g")}%</td><td class="num">{number(page["max"])}</td>'
                     f'<td>{escape(note[0][:120]) if note else ""}</td></tr>')
        bodies.append(f'<div id="p{i}">{feature_page_html(page, hide_special=hide_special, scheme=scheme, style=False)}'
                      '<p class="msfp-back"><a href="#index">↑ index</a></p></div>')
    text = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{PAGE_CSS}\nbody{{margin:16px;font-family:system-ui,sans-serif}}"
            ".msfp-index td,.msfp-index th{padding:1px 8px}.msfp-index .num{text-align:right}"
            ".msfp-back{margin:0 0 18px;font-size:12px}</style></head><body>"
            f'<h1 style="font-size:20px">{escape(title)}</h1><table class="msfp-index" id="index"><tr><th>feature</th>'
            f'<th class="num">density</th><th class="num">max</th><th>note</th></tr>{"".join(index)}</table>'
            f'{"".join(bodies)}</body></html>\n')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- Neuronpedia ------------------------------------------------------------------------------------------
# The columns each record may hold, with their Prisma types, copied from Neuronpedia's schema:
# hijohnnylin/neuronpedia @ ebb8426fc550ad5d1f76d52c271a624af3c08a57, apps/webapp/prisma/schema.prisma (models
# Neuron, Activation, Explanation, Model, Source, SourceSet, SourceRelease). REQUIRED are the fields without
# "?" and without @default, plus "id" of Activation and Explanation: its @default(cuid()) is filled in by the
# Prisma client, and the bulk importer (apps/webapp/lib/db/import.ts, importJsonlString) inserts raw SQL rows
# with jsonb_to_recordset, taking the column list from the first line of each file (so every line of a file has
# the same keys here). Only columns mistudio fills are listed in OPTIONAL.
NEURONPEDIA_REQUIRED: dict[str, dict[str, str]] = {
    "Neuron": {"modelId": "String", "layer": "String", "index": "String"},
    "Activation": {"id": "String", "tokens": "String[]", "index": "String", "layer": "String", "modelId": "String",
                   "maxValue": "Float", "maxValueTokenIndex": "Int", "minValue": "Float", "values": "Float[]",
                   "creatorId": "String"},
    "Explanation": {"id": "String", "modelId": "String", "layer": "String", "index": "String",
                    "description": "String", "authorId": "String"},
    "Model": {"id": "String", "creatorId": "String", "layers": "Int", "neuronsPerLayer": "Int", "owner": "String"},
    "SourceSet": {"modelId": "String", "name": "String", "description": "String", "creatorName": "String",
                  "urls": "String[]", "creatorId": "String"},
    "Source": {"id": "String", "modelId": "String", "setName": "String", "creatorId": "String"},
    "SourceRelease": {"name": "String", "description": "String", "urls": "String[]", "creatorName": "String",
                      "creatorId": "String"},
}
NEURONPEDIA_OPTIONAL: dict[str, dict[str, str]] = {
    "Neuron": {"sourceSetName": "String?", "creatorId": "String?", "maxActApprox": "Float?",
               "frac_nonzero": "Float", "freq_hist_data_bar_heights": "Float[]",
               "freq_hist_data_bar_values": "Float[]", "pos_str": "String[]", "pos_values": "Float[]",
               "neg_str": "String[]", "neg_values": "Float[]"},
    "Activation": {"dataIndex": "String?", "dataSource": "String?", "binMin": "Float?", "binMax": "Float?",
                   "binContains": "Float?", "qualifyingTokenIndex": "Int?"},
    "Explanation": {},
    "Model": {"displayName": "String", "displayNameShort": "String", "instruct": "Boolean",
              "visibility": "Visibility", "inferenceEnabled": "Boolean"},
    "SourceSet": {"visibility": "Visibility", "hasDashboards": "Boolean", "releaseName": "String?"},
    "Source": {"visibility": "Visibility", "hasDashboards": "Boolean", "dataset": "String?",
               "num_prompts": "Int?", "notes": "String?"},
    "SourceRelease": {"visibility": "Visibility", "descriptionShort": "String?"},
}
# Neuronpedia's default user (apps/webapp/lib/env.ts DEFAULT_CREATOR_USER_ID, created by prisma/seed.ts); the
# converters in utils/neuronpedia-utils fall back to it too
NEURONPEDIA_DEFAULT_CREATOR = "clkht01d40000jv08hvalcvly"
_NEURONPEDIA_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")  # the Model id rule of the schema's zod annotation
_LAYER = re.compile(r"^layers\.(\d+)\.")


def _finite(value: Any) -> float:
    """A JSON-safe float: None and NaN (a token without an activation row) become 0.0. Infinities (values past
    the storage dtype's range) never reach here: :func:`_overflowed` refuses their pages first."""
    if value is None:
        return 0.0
    x = float(value)
    return x if math.isfinite(x) else 0.0


def _overflowed(page: dict) -> bool:
    """The page shows a value stored as ±inf (past float16's range, say): Neuronpedia's records would read 0."""
    values = [page["max"], *(v for band in page["bands"] for v in band["values"])]
    values += [v for example in (*page["top"], *(e for band in page["bands"] for e in band["examples"]))
               for v in example["values"]]
    return any(v is not None and math.isinf(float(v)) for v in values)


def _record_id(*parts: Any) -> str:
    """A stable, cuid-shaped id (25 characters, starting with 'c'): importing the same export twice inserts
    nothing new (the importer's INSERT ... ON CONFLICT DO NOTHING)."""
    return "c" + hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:24]


def _texts(tokens: Sequence[str], tokenizer: Any, scheme: str) -> list[str]:
    """Token strings as text: the tokenizer's own decoding of each token when given (as TransformerLens's
    to_str_tokens, which Neuronpedia's dashboards hold), else each piece's display text alone ('Ġthe' -> ' the',
    a piece of a character split over pieces '�', as decoding it alone reads)."""
    if tokenizer is not None:
        return [_token_text(tokenizer, str(t)) for t in tokens]
    scheme = resolve_scheme([str(t) for t in tokens], scheme)
    return [display_pieces([str(t)], scheme)[0] for t in tokens]


def _token_text(tokenizer: Any, token: str) -> str:
    """One token decoded. SentencePiece's decoder drops the leading space of a decode (``'▁the'`` alone reads
    ``'the'``, ``'▁'`` reads ``''``), so a word-initial piece is decoded after an anchor piece, whose text is then
    cut off: ``' the'``, as it reads in its sentence."""
    if not token.startswith("▁"):
        return tokenizer.convert_tokens_to_string([token])
    anchor = tokenizer.convert_tokens_to_string(["a"])
    both = tokenizer.convert_tokens_to_string(["a", token])
    return both[len(anchor):] if both.startswith(anchor) else tokenizer.convert_tokens_to_string([token])


NEURONPEDIA_BINS = 40  # SAEDashboard's histogram: equal-width bins over the firing range (utils_fns.HistogramData)


def _freq_hist(page: dict, n_bins: int = NEURONPEDIA_BINS) -> tuple[list[float], list[float]]:
    """The page's firing values as SAEDashboard's histogram, which Neuronpedia draws on a linear axis: ``n_bins``
    equal-width bins from the lowest firing bin's lower edge to the feature's maximum, as (heights, centres). The
    page's log-width bins are spread over them by overlap, each bin's count as if uniform inside it (a log bin's
    count set on a linear axis as it is would move the peak to the wider bins); the heights sum to the count."""
    hist = page.get("histogram") or {}
    counts, edges = list(hist.get("counts", [])), [float("nan") if e is None else float(e)
                                                    for e in hist.get("edges", [])]
    bins = [(lo, hi, int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts) if lo >= 0 and hi > 0 and c]
    if not bins:
        return [], []
    top = page.get("max")
    top = float(top) if top is not None and math.isfinite(float(top)) else bins[-1][0]
    spans = [(lo, max(lo, min(hi, top)), c) for lo, hi, c in bins]  # no value lies above the maximum
    low, high = spans[0][0], max(spans[-1][1], spans[0][0])
    if high == low:
        return [float(sum(c for _, _, c in spans))], [low]
    step = (high - low) / n_bins
    cuts = [low + i * step for i in range(n_bins + 1)]
    heights = [0.0] * n_bins
    for lo, hi, count in spans:
        if hi == lo:  # a bin squeezed to a point at the maximum: its values are the maximum
            heights[min(n_bins - 1, int((lo - low) / step))] += count
            continue
        for i in range(max(0, int((lo - low) / step)), min(n_bins, int((hi - low) / step) + 1)):
            overlap = min(hi, cuts[i + 1]) - max(lo, cuts[i])
            if overlap > 0:
                heights[i] += count * overlap / (hi - lo)
    return [round(h, 4) for h in heights], [low + (i + 0.5) * step for i in range(n_bins)]


def _share_in(page: dict, lo: float, hi: float) -> float:
    """The share of all the page's tokens whose value lies in ``[lo, hi]``, read from its histogram as the
    quantile bands' edges are (geometric inside a log bin, linear in the bin from 0 and in the overflow bin, which
    ends at the maximum): SAEDashboard's CONTAINS of an interval, consistent with the interval written beside it."""
    hist, n = page.get("histogram") or {}, int(page.get("n_tokens") or 0)
    if not n or not hi >= lo:
        return 0.0
    edges = [float("nan") if e is None else float(e) for e in hist.get("edges", [])]
    top, floor = _finite(page.get("max")), hist.get("floor")
    inside, lowest = 0.0, True
    for a, b, count in zip(edges[:-1], edges[1:], hist.get("counts", [])):
        if not count or not (a >= 0 and b > 0):
            continue
        log_bin = a > 0 and math.isfinite(b)
        b = min(b, max(a, top))  # no value lies above the maximum (the overflow bin ends there)
        if lowest and floor is not None:  # nor below the smallest sampled firing value, as the quantiles read it
            a = min(max(a, float(floor)), b)
        lowest = False
        x0, x1 = max(a, lo), min(b, hi)
        if x1 < x0:
            continue
        if b == a:  # every value of the bin is a
            inside += count
        elif log_bin and a > 0:
            inside += count * math.log(x1 / x0) / math.log(b / a) if x1 > x0 else 0.0
        else:
            inside += count * (x1 - x0) / (b - a)
    return inside / n


def _activation(example: dict, page: dict, where: dict, k: int, bin_range: tuple[float, float, float],
                tokenizer: Any, scheme: str, dataset: str | None) -> dict:
    values = [_finite(v) for v in example["values"]]
    top = max(values)
    return {"id": _record_id(page["extraction"], where["modelId"], where["layer"], page["feature"], k,
                             example["row"]),
            **where, "index": str(int(page["feature"])),
            "tokens": _texts(example["tokens"], tokenizer, scheme), "values": values,
            "maxValue": top, "maxValueTokenIndex": values.index(top), "minValue": min(values),
            "dataIndex": str(int(example["dataset_row"])), "dataSource": dataset,
            "binMin": bin_range[0], "binMax": bin_range[1], "binContains": bin_range[2],
            "qualifyingTokenIndex": int(example["peak"])}


def _feature_records(page: dict, model_id: str, source_id: str, source_set: str, creator_id: str, tokenizer: Any,
                     scheme: str, dataset: str | None) -> tuple[dict, list[dict], dict | None]:
    index = str(int(page["feature"]))
    heights, values = _freq_hist(page)
    logits = page.get("logits") or {"promoted": [], "suppressed": []}
    pos, neg = list(logits.get("promoted", [])), list(logits.get("suppressed", []))
    feature = {"modelId": model_id, "layer": source_id, "index": index, "sourceSetName": source_set,
               "creatorId": creator_id, "maxActApprox": _finite(page["max"]), "frac_nonzero": _finite(page["density"]),
               "freq_hist_data_bar_heights": heights, "freq_hist_data_bar_values": values,
               "pos_str": _texts([e["token"] for e in pos], tokenizer, scheme),
               "pos_values": [_finite(e["value"]) for e in pos],
               "neg_str": _texts([e["token"] for e in neg], tokenizer, scheme),
               "neg_values": [_finite(e["value"]) for e in neg]}
    where = {"modelId": model_id, "layer": source_id, "creatorId": creator_id}
    # SAEDashboard's conventions (sae_dashboard/neuronpedia/neuronpedia_converter.py): top activations have
    # binMin -1, binMax the feature's maximum and binContains -1; a quantile interval gives its value range and
    # the share of all tokens whose value lies in it (sequence_data_generator.py: CONTAINS), here read from the
    # histogram as the band's edges are
    acts = [_activation(e, page, where, k, (-1.0, _finite(page["max"]), -1.0), tokenizer, scheme, dataset)
            for k, e in enumerate(page["top"])]
    for b, band in enumerate(page["bands"]):
        v0, v1 = (_finite(v) for v in band["values"])
        acts += [_activation(e, page, where, f"band{b}.{k}", (v0, v1, _share_in(page, v0, v1)),
                             tokenizer, scheme, dataset) for k, e in enumerate(band["examples"])]
    note = str(page.get("note") or "").strip()
    explanation = None
    if note:
        explanation = {"id": _record_id(model_id, source_id, index, "explanation", note), "modelId": model_id,
                       "layer": source_id, "index": index, "description": note, "authorId": creator_id}
    return feature, acts, explanation


def _write_jsonl(path: Path, records: Sequence[dict], compress: bool) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records).encode("utf-8")
    if compress:
        path.write_bytes(gzip.compress(text, compresslevel=5))
    else:
        path.write_bytes(text)


def export_neuronpedia(pages: Iterable[dict], folder: str | Path, model_id: str, source_set: str, *,
                       creator_id: str = NEURONPEDIA_DEFAULT_CREATOR, creator_name: str = "mistudio",
                       description: str | None = None, dataset: str | None = None, tokenizer: Any = None,
                       scheme: str = "auto", n_layers: int | None = None, release: str | None = None,
                       urls: Sequence[str] = (), batch_size: int = 256, overwrite: bool = False,
                       allow_dropped: bool = False) -> Path:
    """Write feature pages of one hook point in Neuronpedia's bulk-import layout and return the source folder:

    ``folder/<model_id>/<layer>-<source_set>/`` with ``model.jsonl``, ``sourceset.jsonl``, ``source.jsonl``
    (``release.jsonl`` with ``release=``), ``features/batch-<i>.jsonl.gz`` (table Neuron),
    ``activations/batch-<i>.jsonl.gz`` (table Activation: the top examples and the quantile-band examples) and
    ``explanations/batch-<i>.jsonl.gz`` (table Explanation: a page's ``note``, when it has one); the same
    layout Neuronpedia's own converters write (utils/neuronpedia-utils) and its importer reads
    (apps/webapp/app/api/admin/import/route.ts). ``model_id`` is the model's Neuronpedia id (e.g. ``gpt2-small``);
    ``tokenizer`` (the extraction's) turns token pieces into the text Neuronpedia shows. ``n_layers``: the model's
    layer count (default: the pages' ``n_layers``, from the store's metadata). Streams: ``batch_size``
    pages at a time. Left out: correlated features (Neuronpedia's are Pearson correlations; the page holds
    co-firing counts) and steering vectors. Token values without an activation row are written as 0. A feature
    whose values were past the storage dtype's range (stored as ±inf) is refused, every such feature named: its
    records would show 0 where it is strongest. Pages of SAE latents the store kept too narrow (firing latents
    dropped for want of width) are refused too: their densities, histograms and contexts would count only each
    token's largest latents; ``allow_dropped=True`` exports them, said in the source's notes. Activation ids are
    derived from the extraction, the feature, the example and its row: exporting the same store again gives the
    same ids, another store's export new ones (the importer keeps a row whose id it already holds). The export is
    written beside ``folder``'s target and moved into place when complete: a refusal or a failure leaves an
    earlier export there as it was."""
    for name, value in (("model_id", model_id), ("source_set", source_set)):
        if not isinstance(value, str) or not _NEURONPEDIA_NAME.match(value):
            raise InputError(f"{name}={value!r} is not a Neuronpedia name: use letters, digits, '-' and '_' only "
                             "(e.g. 'gpt2-small', 'res-mistudio')")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r} is not a positive integer: pass how many features per file")
    pages = iter(pages)
    first = next(pages, None)
    if first is None:
        raise InputError("export_neuronpedia got no pages: pass the feature pages of one hook point")
    check_page(first)
    hook_point = first["hook_point"]
    dropped = int(first.get("dropped_latents") or 0)
    if dropped and not allow_dropped:
        raise InputError(f"{hook_point}: the store left out {dropped:,} firing latents for want of width, so its "
                         "densities, histograms and contexts count only each token's largest: Neuronpedia would show "
                         "them as exact. Extract again with a wider «latent_width» (up to the SAE's d_sae) or "
                         "«latent_coverage», or «pass allow_dropped=True» to export them, said in the source's notes")
    match = _LAYER.match(str(hook_point))
    if not match:
        raise InputError(f"hook point {hook_point!r} names no layer: Neuronpedia sources are per layer "
                         "(layers.N.residual|mlp|attention)")
    source_id = f"{int(match.group(1))}-{source_set}"
    target = Path(folder) / model_id / source_id
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise InputError(f"{target} already holds an export: pass overwrite=True to replace it, or another folder")
    with _replaced_when_complete(target) as root:
        for sub in ("features", "activations", "explanations"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        kinds = {"residual": "Residual stream", "mlp": "MLP out", "attention": "Attention out"}
        base = str(hook_point).removesuffix(LATENT_SUFFIX)
        kind = kinds.get(base.rsplit(".", 1)[-1], base) + (" SAE" if is_latent(hook_point) else "")
        description = description or f"{kind} · {first['kind']}s · mistudio"
        public = "PUBLIC"
        layers = int(n_layers if n_layers is not None else first.get("n_layers") or 0)
        _write_jsonl(root / "model.jsonl", [{"id": model_id, "displayName": model_id, "displayNameShort": model_id,
                                              "creatorId": creator_id, "layers": layers,
                                              "neuronsPerLayer": int(first["d"]), "owner": creator_name,
                                              "instruct": False, "visibility": public, "inferenceEnabled": False}],
                     False)
        sourceset = {"modelId": model_id, "name": source_set, "description": description,
                     "creatorName": creator_name, "urls": list(urls), "creatorId": creator_id, "visibility": public,
                     "hasDashboards": True, "releaseName": release}
        _write_jsonl(root / "sourceset.jsonl", [sourceset], False)
        _write_jsonl(root / "source.jsonl", [{"id": source_id, "modelId": model_id, "setName": source_set,
                                               "creatorId": creator_id, "visibility": public, "hasDashboards": True,
                                               "dataset": dataset, "num_prompts": None,
                                               "notes": f"mistudio extraction {first['extraction']}, {hook_point}"
                                                        + (f"; {dropped:,} firing latents left out for want of width: "
                                                           "densities and histograms count each token's largest "
                                                           "only" if dropped else "")}],
                     False)
        if release is not None:
            _write_jsonl(root / "release.jsonl", [{"name": release, "description": description, "urls": list(urls),
                                                    "creatorName": creator_name, "creatorId": creator_id,
                                                    "visibility": public, "descriptionShort": description}], False)

        def batches() -> Iterator[list[dict]]:
            batch: list[dict] = []
            for page in itertools.chain([first], pages):
                check_page(page)
                if page["hook_point"] != hook_point:
                    raise InputError(f"pages of several hook points ({hook_point!r}, {page['hook_point']!r}): a "
                                     "Neuronpedia source holds one; export each hook point on its own")
                batch.append(page)
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

        n_explained, overflowed = 0, []
        for i, batch in enumerate(batches()):
            overflowed += [int(page["feature"]) for page in batch if _overflowed(page)]
            if overflowed:  # the rest is still read, to name every such feature at once
                continue
            features, activations, explanations = [], [], []
            for page in batch:
                feature, acts, explanation = _feature_records(page, model_id, source_id, source_set, creator_id,
                                                              tokenizer, scheme, dataset)
                features.append(feature)
                activations += acts
                explanations += [explanation] if explanation else []
            _write_jsonl(root / "features" / f"batch-{i}.jsonl.gz", features, True)
            _write_jsonl(root / "activations" / f"batch-{i}.jsonl.gz", activations, True)
            if explanations:
                _write_jsonl(root / "explanations" / f"batch-{n_explained}.jsonl.gz", explanations, True)
                n_explained += 1
        if overflowed:
            listed = ", ".join(map(str, overflowed[:20])) + (f" … ({len(overflowed):,} in all)"
                                                             if len(overflowed) > 20 else "")
            raise InputError(f"{hook_point}: feature(s) {listed} have values past the store's range (stored as "
                             "±inf): Neuronpedia's records would show 0 where they are strongest. Extract again with "
                             "«dtype='bfloat16'» (or 'float32') to export them, or export the other features")

    return target


@contextlib.contextmanager
def _replaced_when_complete(target: Path) -> Iterator[Path]:
    """A folder to write ``target``'s new content in, beside it; moved into ``target``'s place (replacing what was
    there) when the block completes, removed if it raises: a refused or failed export leaves the old one."""
    root = target.with_name(f".{target.name}.partial-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        yield root
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    root.rename(target)


# -- store exports ------------------------------------------------------------------------------------------
def _committed_samples(ext: "Extraction") -> int:
    record = ext.record
    return len(ext.sample_index) if record.status == "COMPLETED" else int(record.progress.samples_committed)


def _value_dtype(ext: "Extraction", hook_point: str) -> str:
    name = np.dtype(ext.activations(hook_point).dtype).name
    return name if name in ("float16", "float32") else "float32"


def _check_hook_points(ext: "Extraction", hook_points: Any, latents: bool = True) -> list[str]:
    """The hook points asked for, checked against the store: raw ones and, with ``latents``, SAE latents
    (``<hook point>.latents``); None: all of them."""
    known = list(ext.hook_points) + (list(ext.latent_points) if latents else [])
    if hook_points is None:
        return known
    chosen = [hook_points] if isinstance(hook_points, str) else list(hook_points)
    if not latents:
        sparse = [hp for hp in chosen if is_latent(hp) and hp in ext.latent_points]
        if sparse:
            base = sparse[0][:-len(LATENT_SUFFIX)]
            raise InputError(f"{sparse[0]} holds SAE latents, and this export writes dense activations: "
                             f"pass {base!r} (its activations), or export the latents with to_hf_dataset")
    bad = [hp for hp in chosen if hp not in known]
    if bad or not chosen:
        raise InputError(f"hook points {bad or chosen!r} are not in extraction {ext.id}: it has {known}")
    if len(set(chosen)) < len(chosen):
        raise InputError(f"hook points {chosen!r} name one twice: pass each once")
    return chosen


def _fingerprint(ext: "Extraction", *parts: Any) -> str:
    """Names the exact content: the store (location and nonce), its commit mark and the export's options."""
    record = ext.record
    key = json.dumps([ext.location, record.nonce, record.committed_tokens(), *map(str, parts)])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


BLOCK_BYTES = 32 << 20  # rows read from the store, and rows handed to the arrow writer, at a time (about)


def _sample_blocks(ext: "Extraction", n_samples: int, block_rows: int) -> Iterator[tuple[int, int]]:
    """Runs [k0, k1) of stored samples holding about ``block_rows`` activation rows (at least one sample)."""
    offsets = ext.activation_offsets
    k0 = 0
    while k0 < n_samples:
        k1 = int(np.searchsorted(offsets, offsets[k0] + block_rows, side="right")) - 1
        k1 = min(max(k1, k0 + 1), n_samples)
        yield k0, k1
        k0 = k1


def _token_lists(flat: np.ndarray, ptr: np.ndarray, kept: np.ndarray) -> list[np.ndarray]:
    """One array per token from a CSR slice (``flat`` split at ``ptr``, the kept tokens' row pointers); a token
    without an activation row (not ``kept``) gets an empty one."""
    pieces = np.split(flat, ptr[1:-1] - ptr[0])
    if kept.all():
        return pieces
    out, it = [], iter(pieces)
    empty = flat[:0]
    for k in kept:
        out.append(next(it) if k else empty)
    return out


def _samples(ext: "Extraction", hook_points: list[str], tokens: bool, block_rows: int) -> Iterator[dict]:
    """Every committed stored sample in stored order, as ``Extraction.sample`` gives it, read a block at a time;
    SAE latents (``<hp>.latents``) as ``<hp>.latents.indices`` and ``.values``: per token its non-zero latents,
    read through ``Extraction.latents`` (the checked read) one block of rows at a time."""
    n = _committed_samples(ext)
    offsets, act_offsets, rows = ext.sample_offsets, ext.activation_offsets, ext.sample_index
    arrays = {hp: ext.activations(hp) for hp in hook_points if not is_latent(hp)}
    latents = [hp for hp in hook_points if is_latent(hp)]
    for k0, k1 in _sample_blocks(ext, n, block_rows):
        t0, t1, a0, a1 = int(offsets[k0]), int(offsets[k1]), int(act_offsets[k0]), int(act_offsets[k1])
        ids = np.asarray(ext.store.tokens("input_ids")[t0:t1])
        special = ext.special_flags(t0, t1)
        block = {hp: np.asarray(arr[a0:a1]).astype(_value_dtype(ext, hp), copy=False)  # bfloat16: as float32
                 for hp, arr in arrays.items()}
        sparse = {hp: ext.latents(hp, slice(a0, a1)) for hp in latents}
        for k in range(k0, k1):
            s, e = int(offsets[k]) - t0, int(offsets[k + 1]) - t0
            r0, r1 = int(act_offsets[k]) - a0, int(act_offsets[k + 1]) - a0
            kept = ~special[s:e] if r1 - r0 < e - s else np.ones(e - s, dtype=bool)
            out = {"dataset_row": int(rows[k]), "input_ids": ids[s:e].astype(np.int32), "special": special[s:e],
                   "kept": kept}
            for hp, values in block.items():
                part = values[r0:r1]
                if not kept.all():
                    full = np.full((e - s, part.shape[1]), np.nan, dtype=part.dtype)
                    full[kept] = part
                    part = full
                out[hp] = part
            for hp, csr in sparse.items():
                ptr = csr.indptr[r0:r1 + 1]
                out[f"{hp}.indices"] = _token_lists(csr.indices[ptr[0]:ptr[-1]].astype(np.int32), ptr, kept)
                out[f"{hp}.values"] = _token_lists(csr.data[ptr[0]:ptr[-1]].astype(np.float32), ptr, kept)
            if tokens:
                out["tokens"] = ext.tokenizer.convert_ids_to_tokens([int(i) for i in out["input_ids"]])
            yield out


def _materialise(generator: Any, features: "datasets.Features", fingerprint: str, path: str | Path | None,
                 row_bytes: int, cache_dir: str | Path | None = None, description: str = "") -> "datasets.Dataset":
    """Build the dataset from a generator, writing arrow batches of about :data:`BLOCK_BYTES`.

    Without ``path`` it stays in the Hugging Face cache (``cache_dir``, else the default), keyed by
    ``fingerprint``: an unchanged store is not exported twice. With ``path`` it is generated in a temporary folder
    beside ``path`` and its arrow file is moved into the layout ``save_to_disk`` writes (``data-*.arrow``,
    ``state.json``, ``dataset_info.json``), the way SAELens's ``CacheActivationsRunner._consolidate_shards``
    assembles its cache: each byte is written once, not twice (no second copy on disk, even for a moment).
    ``description`` becomes the dataset's ``info.description`` (in ``dataset_info.json`` with ``path``)."""
    import datasets

    batch = max(1, BLOCK_BYTES // max(1, row_bytes))

    def build(where: str | None) -> "datasets.Dataset":
        try:
            return datasets.Dataset.from_generator(generator, features=features, fingerprint=fingerprint,
                                                   cache_dir=where, writer_batch_size=batch)
        except datasets.exceptions.DatasetGenerationError as exc:
            if isinstance(exc.__cause__, MistudioError):  # a damaged chunk, a bad value: say it as it is
                raise exc.__cause__ from None
            raise

    if path is None:
        dataset = build(None if cache_dir is None else str(cache_dir))
        dataset.info.description = description or dataset.info.description
        return dataset
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".mistudio-export-", dir=path.parent))
    try:
        built = build(str(scratch))
        files, info, split = [f["filename"] for f in built.cache_files], asdict(built.info), built.split
        info["description"] = description or info["description"]
        del built
        path.mkdir(exist_ok=True)
        names = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
        for src, name in zip(files, names):
            shutil.move(src, path / name)
        state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": fingerprint,
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                 "_split": None if split is None else str(split)}
        (path / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        (path / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2),
                                                encoding="utf-8")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return datasets.load_from_disk(str(path))


def _check_target(path: str | Path | None) -> None:
    if path is not None and Path(path).exists() and (not Path(path).is_dir() or any(Path(path).iterdir())):
        raise InputError(f"{path} exists and is not an empty folder: pass a new path (nothing is overwritten)")


def latent_facts(ext: "Extraction", hook_point: str) -> dict:
    """What an export says about the SAE behind ``<hp>.latents``: its folder, fingerprint, architecture,
    ``d_sae``, ``k``, hook name, and how the store keeps its latents (``width`` a token, the largest)."""
    info = ext.latent_info(hook_point)
    return {"sae": info.sae, "fingerprint": info.fingerprint, "architecture": info.architecture,
            "d_sae": int(info.d_sae), "k": info.k, "hook_name": info.hook_name, "width": int(info.width),
            "width_reason": info.width_reason}


def count_latents(dataset: "datasets.Dataset", hook_point: str) -> int:
    """The non-zero latents the ``<hp>.latents.indices`` column of a :func:`to_hf_dataset` export holds, counted
    from its arrow offsets (no value is read)."""
    column = f"{hook_point}.indices"
    if column not in dataset.column_names:
        raise InputError(f"the dataset has no column {column!r}: its columns are {dataset.column_names}")
    return sum(len(chunk.flatten().flatten()) for chunk in dataset.data.column(column).chunks)


def _hf_caveats(ext: "Extraction", chosen: list[str]) -> dict[str, list[str]]:
    """The store's warnings about each exported hook point (latents dropped for want of width, values past the
    storage dtype's range), worded for Python."""
    return {hp: lines for hp in chosen if (lines := page_caveats(ext, hp))}


def _hf_description(ext: "Extraction", chosen: list[str]) -> str:
    dtype = ext.record.params.dtype or "float16"
    lines = [f"mistudio extraction {ext.id} of {ext.record.model.name_or_path}, one row per stored sample "
             f"(stored order): {', '.join(chosen)}. Stored as {dtype}"
             + (" (exported as float32, exactly)." if dtype == "bfloat16" else ".")]
    for hp in chosen:
        if is_latent(hp):
            f = latent_facts(ext, hp)
            k = "" if f["k"] is None else f", k {f['k']}"
            lines.append(f"{hp}: the latents of the SAE at {f['sae']} (architecture {f['architecture']}, d_sae "
                         f"{f['d_sae']}{k}, hook {f['hook_name']}, "
                         f"fingerprint {f['fingerprint']}); the store keeps each token's {f['width']} largest "
                         f"({f['width_reason']}). Columns {hp}.indices (int32) and {hp}.values (float32): per "
                         "token its non-zero latents, in the store's order; a token without an activation row "
                         "(kept False) has none.")
    lines += [f"Caveat: {line}" for caveats in _hf_caveats(ext, chosen).values() for line in caveats]
    return "\n".join(lines)


def to_hf_dataset(ext: "Extraction", hook_points: str | Sequence[str] | None = None, path: str | Path | None = None,
                  tokens: bool = False, block_rows: int | None = None, cache_dir: str | Path | None = None) \
        -> "datasets.Dataset":
    """A store as a ``datasets.Dataset``, one row per committed stored sample, in stored order (longest first):
    ``dataset_row``, ``input_ids`` (int32), ``special`` and ``kept`` (bool per token: ``kept`` is False where
    ``exclude_special`` stored no activation row), ``tokens`` (strings, with ``tokens=True``) and per raw hook
    point a (len, d) array, float16/float32 as stored, bfloat16 as float32 (exact; NaN rows where not kept), as
    ``ext.sample(row)`` gives them. An SAE's latents (``<hp>.latents``, see ``ext.latent_points``) give two columns,
    sparse: ``<hp>.latents.indices`` (int32) and ``<hp>.latents.values`` (float32), per token the list of its
    non-zero latents (empty slots dropped; none where not kept): concatenated over the kept tokens in stored order
    they are ``ext.latents(hp)``'s CSR rows. The SAEs (folder, fingerprint, architecture, d_sae), the storage
    dtype and the store's caveats (latents dropped for want of width, values past the dtype's range) are named in
    ``info.description`` (and, with ``path``, in ``mistudio_export.json`` beside the data, with the counts).
    ``hook_points`` defaults to every raw hook point and every SAE's latents.

    Streamed from the store ``block_rows`` activation rows at a time (default: about 32 MB). With ``path``
    it is saved there in ``save_to_disk``'s layout (``datasets.load_from_disk(path)`` opens it; an existing
    non-empty folder is refused) and returned loaded from there; else it stays in the Hugging Face cache
    (``cache_dir``, else the default), keyed by the store, its commit mark and these options."""
    import datasets

    chosen = _check_hook_points(ext, hook_points)
    _check_target(path)
    features = {"dataset_row": datasets.Value("int64"), "input_ids": datasets.Sequence(datasets.Value("int32")),
                "special": datasets.Sequence(datasets.Value("bool")), "kept": datasets.Sequence(datasets.Value("bool"))}
    if tokens:
        features["tokens"] = datasets.Sequence(datasets.Value("string"))
    token_bytes = 0
    for hp in chosen:
        if is_latent(hp):
            features[f"{hp}.indices"] = datasets.Sequence(datasets.Sequence(datasets.Value("int32")))
            features[f"{hp}.values"] = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
            token_bytes += int(ext.latent_info(hp).width) * 8 * 2  # the block's slots, then its CSR
        else:
            width = int(ext.activations(hp).shape[1])
            features[hp] = datasets.Array2D(shape=(None, width), dtype=_value_dtype(ext, hp))
            token_bytes += width * np.dtype(_value_dtype(ext, hp)).itemsize
    block_rows = block_rows or max(1, BLOCK_BYTES // max(1, token_bytes))
    mean_length = max(1, int(ext.sample_offsets[-1]) // max(1, len(ext.sample_index)))

    def generate():
        yield from _samples(ext, chosen, tokens, block_rows)

    fingerprint = _fingerprint(ext, "hf", chosen, tokens)
    dataset = _materialise(generate, datasets.Features(features), fingerprint, path, token_bytes * mean_length,
                           cache_dir, _hf_description(ext, chosen))
    if path is not None:
        info = {"format": "mistudio hf dataset", "extraction": ext.id, "location": ext.location,
                "model": ext.record.model.name_or_path, "hook_points": chosen, "rows": len(dataset),
                "dtype": ext.record.params.dtype or "float16", "caveats": _hf_caveats(ext, chosen),
                "tokens": int(sum(len(c.flatten()) for c in dataset.data.column("input_ids").chunks)),
                "latents": {hp: {**latent_facts(ext, hp), "non_zero": count_latents(dataset, hp)}
                            for hp in chosen if is_latent(hp)},
                "bytes": sum(f.stat().st_size for f in Path(path).glob("data-*.arrow"))}
        (Path(path) / "mistudio_export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return dataset


_TL_HOOKS = {"residual": "hook_resid_post", "mlp": "hook_mlp_out", "attention": "hook_attn_out"}


def transformer_lens_name(hook_point: str) -> str | None:
    """TransformerLens's name of a mistudio hook point (``layers.3.residual`` -> ``blocks.3.hook_resid_post``,
    ``mlp`` -> ``hook_mlp_out``, ``attention`` -> ``hook_attn_out``), as SAELens names its columns; else None."""
    m = re.match(r"^layers\.(\d+)\.(\w+)$", hook_point)
    if not m or m.group(2) not in _TL_HOOKS:
        return None
    return f"blocks.{int(m.group(1))}.{_TL_HOOKS[m.group(2)]}"


def to_saelens_cache(ext: "Extraction", hook_point: str, path: str | Path, context_size: int = 128,
                     hook_name: str | None = None, dtype: str | None = None, block_rows: int | None = None) \
        -> "datasets.Dataset":
    """One hook point in SAELens's cached-activations layout (what ``CacheActivationsRunner`` writes and
    ``ActivationsStore`` reads with ``use_cached_activations=True``): a dataset in ``save_to_disk``'s layout at
    ``path`` whose rows hold a column named ``hook_name`` (default: the TransformerLens name,
    ``blocks.N.hook_resid_post`` ...) of ``Array2D((context_size, d_in))`` activations and a ``token_ids``
    column of ``context_size`` int32 ids. Point SAELens at it with ``cached_activations_path=path``,
    ``hook_name``, ``context_size`` and ``d_in``.

    Rows are packed the way SAELens packs documents (``concat_and_batch_sequences``): the stored samples'
    activation rows, concatenated in stored order (longest sample first), cut every ``context_size`` rows; no
    separator or BOS is inserted (there is no activation for one), a sample's own special tokens stay where
    the tokenizer put them, and with ``exclude_special`` only the tokens that have activation rows are packed.
    As in SAELens the last ``n % context_size`` rows, too few for a full row, are left out (the count is in
    ``mistudio_export.json`` beside the data). Each activation is the one the model computed in its own
    document's context, not in the packed row's. Not shuffled (``CacheActivationsRunner`` shuffles by default;
    SAELens's training loader mixes its buffer anyway). ``dtype`` defaults to the store's (float16/float32)."""
    import datasets

    (chosen,) = _check_hook_points(ext, [hook_point], latents=False)
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
        raise InputError(f"context_size={context_size!r} is not a positive integer: pass SAELens's context size")
    dtype = dtype or _value_dtype(ext, chosen)
    if dtype not in ("float16", "float32"):
        raise InputError(f"dtype={dtype!r} cannot be stored in an arrow column here: pass 'float32' or 'float16'")
    hook_name = hook_name or transformer_lens_name(chosen)
    if not hook_name:
        raise InputError(f"hook point {chosen!r} has no TransformerLens name: pass hook_name= (the name your "
                         "SAELens config uses)")
    _check_target(path)
    acts = ext.activations(chosen)
    mark, width = int(ext.committed_tokens()), int(acts.shape[1])
    n_rows = mark // context_size
    if n_rows == 0:
        raise InputError(f"extraction {ext.id} has {mark} committed activation rows, fewer than context_size="
                         f"{context_size}: pass a smaller context_size")
    ids = ext.store.tokens("input_ids")
    row_bytes = context_size * width * np.dtype(dtype).itemsize
    per_block = max(1, (block_rows // context_size) if block_rows else BLOCK_BYTES // row_bytes)

    def generate():
        for r0 in range(0, n_rows, per_block):
            r1 = min(n_rows, r0 + per_block)
            a0, a1 = r0 * context_size, r1 * context_size
            values = np.asarray(acts[a0:a1]).astype(dtype, copy=False)
            where = np.asarray(ext.token_index(np.arange(a0, a1)))
            block_ids = np.asarray(ids[int(where[0]):int(where[-1]) + 1])[where - where[0]].astype(np.int32)
            for j in range(r1 - r0):
                s = slice(j * context_size, (j + 1) * context_size)
                yield {hook_name: values[s], "token_ids": block_ids[s]}

    features = datasets.Features({hook_name: datasets.Array2D(shape=(context_size, width), dtype=dtype),
                                  "token_ids": datasets.Sequence(datasets.Value("int32"), length=context_size)})
    dataset = _materialise(generate, features, _fingerprint(ext, "saelens", chosen, context_size, hook_name, dtype),
                           path, row_bytes)
    info = {"format": "sae_lens cached activations", "extraction": ext.id, "location": ext.location,
            "hook_point": chosen, "hook_name": hook_name, "context_size": context_size, "d_in": width, "dtype": dtype,
            "n_rows": n_rows, "tokens_packed": n_rows * context_size, "tokens_left_out": mark - n_rows * context_size,
            "order": "stored samples concatenated in stored order (longest first), no separators"}
    (Path(path) / "mistudio_export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return dataset
