"""One plan, shared by the runner and the estimate: read → chat template → windows and stride → special-token
exclusion → skipped and truncated rows → batches → store layout. ``ms.estimate`` is this plan without the
forwards (disk, device memory, and time with ``probe=True``).

:func:`check` runs every check that needs the model's config, its tokenizer or the first record of the data,
once, before any store exists; :func:`make_plan` tokenizes the whole dataset into the token arrays of the store,
in stored order, and the layout of every array. ``ws.submit`` does not estimate (tokenizing twice costs time on
big datasets): call :func:`estimate` first, as the Extract tab does.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .data import (ROLE_CODES, SKIP_REASONS, chat_template_of, check_source, dataset_bytes, plan_batches, plan_order,
                   report_line, special_ids, tokenize, window_positions, window_spans)
from .engine import Latents, forward_batches
from .extraction import dropped_latents
from .fingerprints import check_same_model, fingerprint
from .errors import InputError, counted, human_bytes, render, retry_words
from .listing import Folder, default_workspace, nearest_existing
from .models import (check_placement, describe_model, load_config, load_model, load_tokenizer, max_positions_of,
                     n_layers_of, resolve_device, resolve_dtype)
from .presets import Presets
from .request import Request, with_request_keywords
from .saes import SAE, check_applies, load_sae, other_model_warning
from .specs import parse_layers
from .storage.featfeed import snapshot_bytes
from .storage.layout import StoreLayout, plan_layout
from .storage.stats import LatentStats


def check(request: Request, config=None) -> Request:
    """Check the request against the model's config (layers in range, lengths within its positions, the packages
    its placement needs), its tokenizer (a chat template where one is asked for) and the data (reachable, readable,
    its text column present); return it with ``layers='all'`` resolved. Nothing is written."""
    config = config if config is not None else load_config(request.model_spec)
    n_layers = n_layers_of(config)
    layers = parse_layers(request.layers, n_layers)
    limit = max_positions_of(config)
    name = request.model
    if limit is not None and request.window is not None and request.window > limit:
        raise InputError(f"«window={request.window}» is more than the {limit} positions of model {name!r}: «pass "
                         f"window={limit}» or less", param="window")
    if limit is not None and request.window is None and request.max_length > limit:
        raise InputError(f"«max_length={request.max_length}» is more than the {limit} positions of model {name!r}: "
                         f"«pass max_length={limit}» or less (longer samples are cut)", param="max_length")
    check_placement(request.model_spec)
    for point, folder in (request.saes or {}).items():
        if int(point.split(".")[1]) >= n_layers:
            raise InputError(f"«saes» names {point}, but model {name!r} has {n_layers} layers: use a hook point of "
                             f"layers 0 to {n_layers - 1}", param="saes")
        check_applies(load_sae(folder), point, int(config.hidden_size))
    if request.chat_template == "auto":
        chat_template_of(load_tokenizer(request.model_spec), "auto")
    check_source(request)
    return request.model_copy(update={"layers": layers}) if layers != request.layers else request


def check_new(request: Request) -> Request:
    """What a new request must not ask, beyond :func:`check` (a retry or resume with a smaller batch may)."""
    micro, batch = request.micro_batch_size, request.batch_size
    if micro is not None and isinstance(batch, int) and request.max_batch_tokens is None and micro > batch:
        raise InputError(f"«micro_batch_size={micro}» is more than the batch («batch_size={batch}»): a batch is "
                         f"forwarded in pieces of at most its own size; «pass micro_batch_size={batch}» or less, or "
                         f"«pass batch_size={micro}»", param="micro_batch_size")
    return request


@dataclass
class Plan:
    """What a request will store: the token arrays in stored order, the layout of every array, what the metadata
    says of the layout (``storage``), and the data report (rows read, samples, skipped rows by reason, truncated
    rows and tokens, windows, activation rows)."""

    request: Request
    tokens: dict[str, np.ndarray]
    layout: StoreLayout
    storage: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return len(self.tokens["sample_index"])

    @property
    def n_tokens(self) -> int:
        return len(self.tokens["input_ids"])

    @property
    def n_rows(self) -> int:
        return self.layout.activations[0].shape[0]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.tokens["sample_offsets"])

    def with_latents(self, widths: dict[str, int], saes: dict[str, SAE]) -> StoreLayout:
        """The layout plus the arrays of each SAE's latents (``widths``: latents kept per token)."""
        r = self.request
        return self.layout.with_latents({hp: (widths[hp], saes[hp].d_sae) for hp in widths}, r.dtype, r.chunk_mb,
                                        r.shard_mb, r.checksum)

    def batches(self, batch_size: int | None = None) -> list[tuple[int, int]]:
        """The ``[first, stop)`` sample ranges the run forwards (``batch_size``: for ``'auto'``, a guess)."""
        return plan_batches(self.tokens["sample_offsets"], self.request, 0, self.n_samples, batch_size)


def make_plan(request: Request, tokenizer, vocab_size: int, hidden_size: int) -> Plan:
    """Tokenize the dataset as the run will, and plan the store: every token array and every array's layout."""
    tokenized = tokenize(request, tokenizer, vocab_size)
    order = plan_order(tokenized.lengths)
    lengths = tokenized.lengths[order]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate([tokenized.ids[i] for i in order]).astype(np.int32)
    special = np.isin(flat, special_ids(tokenizer))
    tokens = {"input_ids": flat, "sample_offsets": offsets, "sample_index": tokenized.rows[order].astype(np.int64),
              "special": special}
    storage: dict = {"exclude_special": request.exclude_special}
    n_rows = len(flat)
    if request.exclude_special:  # activation rows differ from tokens only then
        kept = np.concatenate([[0], np.cumsum(~special)])
        tokens["activation_offsets"] = kept[offsets].astype(np.int64)
        n_rows = int(kept[-1])
        if n_rows == 0:
            raise InputError("«exclude_special=True» leaves no token to extract: every token is a special token; "
                             "«pass exclude_special=False»", param="exclude_special")
    if tokenized.roles is not None:
        tokens["role"] = np.concatenate([tokenized.roles[i] for i in order]).astype(np.int8)
        storage["role_codes"] = dict(ROLE_CODES)
    if request.window is not None:
        tokens["positions"] = np.concatenate([window_positions(int(n), request.window, request.stride)
                                              for n in lengths])
        storage.update(window=request.window, stride=request.stride)
    n_windows = sum(len(window_spans(int(n), request.window, request.stride)) for n in lengths)
    hook_dims = {hp: hidden_size for hp in request.hook_points}
    layout = plan_layout(len(flat), len(lengths), n_rows, hook_dims, request.dtype, request.chunk_mb,
                         request.shard_mb, request.checksum, roles="role" in tokens, positions="positions" in tokens,
                         activation_offsets="activation_offsets" in tokens)
    report = {**tokenized.report(), "n_rows": n_rows, "n_windows": n_windows}
    return Plan(request, tokens, layout, storage, report)


def load_saes(request: Request, device, recorded: dict | None = None) -> dict[str, SAE]:
    """The request's SAEs, loaded on ``device``; with ``recorded`` (the store's ``latents``), each must be the
    one the store was made with (same weights' fingerprint)."""
    saes = {}
    for point, folder in (request.saes or {}).items():
        sae = load_sae(folder, device=device)
        sae.hook_point = point
        was = (recorded or {}).get(point)
        if was is not None and was.fingerprint and was.fingerprint != sae.fingerprint:
            raise InputError(f"the SAE at {folder} is not the one this store was made with (fingerprint "
                             f"{sae.fingerprint[:12]}, the store's {was.fingerprint[:12]}): its latents would mix two "
                             f"SAEs; put the original back, or {retry_words('retry into a new extraction')}",
                             param="saes")
        saes[point] = sae
    return saes


def check_unchanged(request: Request, meta) -> None:
    """Raise InputError when what a resume reads again is not what the store was made with: the model's files
    (weights, config, tokenizer) and the SAEs' weights."""
    check_same_model(request.model_spec.name_or_path, meta.model.fingerprint, fingerprint(request.model_spec))
    if request.saes and meta.latents:
        load_saes(request, "cpu", meta.latents)


WIDTH_SLACK = 1.5  # a probed width: 1.5 x the most latents that fired on one token of the first batch


def latent_widths(request: Request, saes: dict[str, SAE], loaded, plan: Plan,
                  measure: Callable[..., dict[str, np.ndarray]] | None = None) -> dict[str, tuple[int, str]]:
    """Latents kept per token, per SAE, with the reason: ``latent_width`` when given, a top-k SAE's k, else
    measured on the first batch (the longest samples). ``measure``: what measures it in place of
    :func:`latents_fired` on ``loaded`` (a dask run measures on a worker), called with ``(request, ids, offsets,
    points)``: the first batch's tokens alone."""
    out, probe = {}, []
    for point, sae in saes.items():
        known = known_width(request, sae)
        if known is not None:
            out[point] = known
        else:
            probe.append(point)
    if probe:
        ids, offsets = plan.tokens["input_ids"], plan.tokens["sample_offsets"]
        first, stop = plan.batches(AUTO_GUESS if request.batch_size == "auto" else None)[0]
        size = request if request.batch_size != "auto" else request.model_copy(update={"batch_size": AUTO_GUESS})
        batch_ids, batch_offsets = ids[offsets[first]:offsets[stop]], offsets[first:stop + 1] - offsets[first]
        if measure is None:
            measure = partial(latents_fired, loaded, saes)
        for point, fired in measure(size, batch_ids, batch_offsets, probe).items():
            out[point] = probed_width(np.asarray(fired), saes[point].d_sae, request.latent_coverage)
    return out


def known_width(request: Request, sae: SAE) -> tuple[int, str] | None:
    """The latents kept per token when known without the model, with the reason: ``latent_width`` (at most a top-k
    SAE's k, which is all it ever fires, and at most d_sae), or a top-k SAE's k; None: measured on a batch."""
    if request.latent_width is not None:
        most, of = (sae.k, f"the SAE's k, all a top-{sae.k} SAE fires") if sae.k is not None else (sae.d_sae, "d_sae")
        capped = f", capped at {most} ({of})" if request.latent_width > most else ""
        return min(request.latent_width, most), f"latent_width={request.latent_width}{capped}"
    if sae.k is not None:
        unused = "; latent_coverage does not apply to a top-k SAE" if request.latent_coverage is not None else ""
        return sae.k, f"the SAE's k (top-{sae.k}{unused})"
    return None


def probed_width(fired: np.ndarray, d_sae: int, coverage: float | None) -> tuple[int, str]:
    """The width of an SAE's latents from the latents that fired per token of the first batch, with the reason:
    ``coverage`` None: 1.5 x the most; else that quantile of them (the busier tokens lose their smallest, counted).
    Rounded up to 16, at most ``d_sae``."""
    if coverage is None:
        most = int(fired.max())
        width, reason = int(most * WIDTH_SLACK), f"{WIDTH_SLACK:g} x the {most} latents that fired on one token of " \
                                                 "the first batch"
    else:
        width = int(np.quantile(fired, coverage, method="higher"))
        reason = (f"latent_coverage={coverage:g}: {coverage:.1%} of the first batch's tokens fired at most {width} "
                  f"latents (the most: {int(fired.max())})")
    rounded = min(d_sae, max(16, -(-width // 16) * 16))
    return rounded, reason + (f", rounded up to {rounded} (a multiple of 16)" if rounded != width else "")


def latents_fired(loaded, saes: dict[str, SAE], request: Request, ids: np.ndarray, offsets: np.ndarray,
                  points: list[str]) -> dict[str, np.ndarray]:
    """How many latents of each SAE in ``points`` fired on each token of the samples ``offsets`` cuts ``ids`` into
    (one batch of ``request``), as int32 per token."""
    full = {p: Latents(saes[p], saes[p].d_sae, "int32") for p in points}
    fired: dict[str, list[np.ndarray]] = {p: [] for p in points}
    for _, _, rows, _ in forward_batches(loaded, ids, offsets, request, 0, len(offsets) - 1, latents=full):
        for point in points:
            fired[point].append((rows[f"latents/{point}/values"] != 0).sum(axis=1).astype(np.int32))
    return {p: np.concatenate(parts) if parts else np.zeros(1, np.int32) for p, parts in fired.items()}


def latent_infos(request: Request, saes: dict[str, SAE], widths: dict[str, tuple[int, str]],
                 layout: StoreLayout) -> dict[str, dict]:
    """What the store's metadata records of each SAE applied (``latents`` section)."""
    return {point: {"sae": request.saes[point], "fingerprint": sae.fingerprint, "architecture": sae.architecture,
                    "d_sae": sae.d_sae, "k": sae.k, "width": widths[point][0], "width_reason": widths[point][1],
                    "block_rows": layout.array(f"latents/{point}/indices").chunk_rows, "hook_name": sae.hook_name,
                    "trained_model": sae.trained_model[0], "trained_weights": sae.trained_model[1]}
            for point, sae in saes.items()}


def plan_for_ids(ids: list[np.ndarray], hook_dims: dict[str, int], dtype: str = "float32", chunk_mb: float = 2.0,
                 shard_mb: float = 32.0, checksum: bool = True) -> tuple[dict[str, np.ndarray], StoreLayout]:
    """The token arrays and layout of a store for token id lists in stored order (no tokenizer, no special
    tokens): what benchmarks and tests write by hand."""
    lengths = [len(a) for a in ids]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(ids).astype(np.int32)
    tokens = {"input_ids": flat, "sample_offsets": offsets, "sample_index": np.arange(len(ids), dtype=np.int64),
              "special": np.zeros(len(flat), bool)}
    return tokens, plan_layout(len(flat), len(ids), len(flat), hook_dims, dtype, chunk_mb, shard_mb, checksum)


# -- the estimate: the plan without the forwards ----------------------------------------------------
PROBE_SECONDS = 3.0  # probe=True times batches for about this long
AUTO_GUESS = 8  # batch_size="auto" is estimated at this size (its choice needs the model)


DEFAULT_BLOCK = 4096  # a disk's allocation unit when statvfs does not say


def _local_folder(workspace: str | os.PathLike | None) -> Path | None:
    """The workspace's nearest existing folder; None for remote workspaces."""
    root = str(workspace if workspace is not None else default_workspace())
    if "://" in root and not root.startswith("file://"):
        return None
    return nearest_existing(Path(root.removeprefix("file://")).expanduser().resolve())


def _free_disk(workspace: str | os.PathLike | None) -> int | None:
    """Bytes free where the workspace is; None for remote workspaces."""
    folder = _local_folder(workspace)
    return shutil.disk_usage(folder).free if folder is not None else None


def _block_size(workspace: str | os.PathLike | None) -> int:
    """The allocation unit of the workspace's disk (a file takes whole ones); 1 for remote workspaces."""
    folder = _local_folder(workspace)
    if folder is None:
        return 1
    stats = os.statvfs(folder)
    return stats.f_frsize or stats.f_bsize or DEFAULT_BLOCK


def _device_memory(device) -> int | None:
    """Total memory of the device the model runs on: the GPU's, or the machine's RAM for the CPU."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def peak_device_bytes(n_parameters: int, config: Any, batch: int, width: int, n_captured: int,
                      model_bytes: int) -> int:
    """Weights + the largest batch's working activations + its captured rows, all in the model dtype.

    For ``batch`` samples padded to ``width`` tokens (T = batch x width), hidden size h, MLP size m, heads a:
    ``n_parameters·b + T·(4h + 2m)·b + batch·a·width²·b + n_captured·T·h·b`` (b bytes per value). The middle
    terms are one block's transient tensors (residual, q/k/v/out, the MLP's hidden twice, the attention
    scores); earlier blocks' are freed (inference mode), so the count of layers up to the last one only adds
    its captured rows (the last term).
    """
    h = int(config.hidden_size)
    m = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h)
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1)
    tokens = batch * width
    return int(model_bytes * (n_parameters + tokens * (4 * h + 2 * m) + batch * heads * width * width
                              + n_captured * tokens * h))


@with_request_keywords
def estimate(model: Any = None, dataset: Any = None, layers: Any = None, hooks: Any = None, *,
             workspace: str | os.PathLike | None = None, probe: bool = False, preset: str | None = None,
             storage_options: dict | None = None, **options: Any) -> dict:
    """What ``ms.extract``/``ws.submit`` with these arguments will take, before launching it: the run's own plan
    (the same tokenizing, windows, special tokens and layout), without the forwards.

    Returns a dict with ``samples``, ``windows`` (forwarded sequences), ``tokens``, ``rows`` (activation rows per
    hook point), ``rows_read``, ``skipped`` ({reason: rows}), ``truncated`` (samples cut) and
    ``truncated_tokens``, ``batches``, ``bytes_on_disk`` (what the store will take on the workspace's disk, as
    ``du`` reads it: its files, as the allocator lays them out, rounded up to the disk's blocks, and its folders),
    ``file_bytes`` (the files' own bytes, as ``ws.extractions()`` counts them; within a few KB), ``dataset_bytes``
    (the dataset's size on disk: a file's, a saved folder's; None for in-memory data and Hub datasets),
    ``free_disk_bytes`` (the workspace's disk; None if remote), ``peak_device_bytes`` (see
    :func:`peak_device_bytes`), ``device_memory_bytes``, ``seconds`` (with ``probe=True``: the model is loaded and a
    few batches timed; else None), ``warnings`` (strings) and a one-line ``summary``. ``batch_size="auto"`` is
    estimated at batch 8 (its choice needs the model: ``auto_batch`` is True and the summary says so).
    ``preset=`` starts from a saved preset of ``workspace``, as ``ws.submit`` does. Run-only arguments
    (``timeout_s``, ``auto_retry_on_oom``) are accepted and change nothing.
    """
    if hooks is not None:
        options["hooks"] = hooks
    given = {k: v for k, v in (("model", model), ("dataset", dataset), ("layers", layers)) if v is not None}
    saved = Presets(Folder(workspace, storage_options)).read(preset) if preset is not None else {}
    args = {**saved, **given, **options}
    if args.get("model") is None:
        raise InputError("«model» is missing: «pass model» (a Hugging Face id or a local folder) or "
                         "«pass preset»", param="model")
    request = check_new(check(Request.build(**args)))
    facts = describe_model(request.model_spec)
    plan = make_plan(request, load_tokenizer(request.model_spec), facts["vocab_size"], facts["hidden_size"])
    return _figures(plan, facts, workspace, probe)


def _figures(plan: Plan, facts: dict, workspace: str | os.PathLike | None, probe: bool) -> dict:
    """The estimate's numbers from the plan."""
    request, lengths = plan.request, plan.lengths
    guess = AUTO_GUESS if request.batch_size == "auto" else None
    batches = plan.batches(guess)
    step = request.micro_batch_size
    largest = max(((min(step or e - b, e - b), int(lengths[b])) for b, e in batches), key=lambda x: x[0] * x[1])
    if request.window is not None:  # a forward holds at most batch-size windows of at most `window` tokens
        largest = (largest[0], min(largest[1], request.window))
    device = resolve_device(request.device)
    model_bytes = np.dtype(str(resolve_dtype(request.model_dtype, device)).removeprefix("torch.").replace(
        "bfloat16", "float16")).itemsize
    config = load_config(request.model_spec)
    peak = peak_device_bytes(facts["n_parameters"], config, largest[0], largest[1], len(request.hook_points),
                             model_bytes)
    loaded = load_model(request.model_spec) if probe else None
    saes = load_saes(request, loaded.input_device if loaded is not None else "cpu")  # once, where the probe runs
    layout, latent_notes = _latent_layout(plan, loaded, saes)
    block = _block_size(workspace)
    files = layout.bytes_on_disk + _statistics_bytes(request, layout)
    disk = layout.allocated_bytes(block) + _statistics_bytes(request, layout, block)
    free = _free_disk(workspace)
    memory = _device_memory(device)
    report = plan.report
    warnings = []
    if free is not None and disk > free:
        warnings.append(f"the store needs {human_bytes(disk)} but the workspace's disk has {human_bytes(free)} "
                        "free: free space, «pass workspace=<a folder on another disk>», or capture fewer hook points "
                        "or samples")
    if memory is not None and peak > memory:
        warnings.append(f"peak device memory {human_bytes(peak)} is above the {human_bytes(memory)} of {device}: "
                        "use a smaller «batch_size», «max_batch_tokens», «micro_batch_size», or «device_map»")
    budget = request.max_batch_tokens
    forwarded = np.minimum(lengths, request.window) if request.window is not None else lengths
    if budget is not None and int(forwarded.max()) > budget:
        warnings.append(_over_budget(forwarded, budget, request.window is not None))
    skipped = sum(report["skipped"].values())
    if skipped:
        why = "; ".join(f"{n:,} {SKIP_REASONS.get(r, r)}" for r, n in report["skipped"].items())
        warnings.append(f"{skipped:,} of {report['n_rows_read']:,} rows {'gives' if skipped == 1 else 'give'} no "
                        f"sample: {why}")
    warnings += latent_notes
    seconds, probed, latents_probed = _probe(plan, loaded, layout, saes) if probe else (None, {}, {})
    if probed.get("n_out_of_range"):
        warnings.append(f"{probed['n_out_of_range']:,} of {probed['count']:,} probed values are past "
                        f"{request.dtype}'s range (max |x| {probed['max_abs']:.3g}) and would be stored as ±inf: "
                        "«pass dtype='bfloat16'» (or 'float32')")
    warnings += _latent_warnings(request, latents_probed)
    result = {
        "samples": plan.n_samples, "windows": int(report["n_windows"]), "tokens": plan.n_tokens,
        "rows": plan.n_rows, "rows_read": int(report["n_rows_read"]), "skipped": dict(report["skipped"]),
        "truncated": int(report["n_truncated"]), "truncated_tokens": int(report["n_truncated_tokens"]),
        "batches": len(batches), "hook_points": request.hook_points, "bytes_on_disk": disk,
        "file_bytes": files, "data_bytes": layout.data_bytes,
        "free_disk_bytes": free, "peak_device_bytes": peak, "device": str(device), "device_memory_bytes": memory,
        "largest_batch": {"samples": largest[0], "width": largest[1]}, "n_parameters": facts["n_parameters"],
        "seconds": seconds, "warnings": [render(w) for w in warnings], "warning_templates": warnings,
        "auto_batch": guess is not None,
        "report": report, "report_line": report_line(report), "dataset_bytes": dataset_bytes(request.dataset),
    }
    source = (f"dataset {human_bytes(result['dataset_bytes'])}" if result["dataset_bytes"] is not None else "dataset"
              ) + f", {result['rows_read']:,} rows read"
    result["summary"] = f"{source} · {summary(result)}"
    return result


LATENT_GUESS = 64  # without a probe, a non-top-k SAE's width is guessed as this many latents a token


def _statistics_bytes(request: Request, layout: StoreLayout, block: int = 1) -> int:
    """Bytes of the feature statistics the pass saves (``feature_statistics``): one snapshot per key, on a disk of
    ``block``-byte blocks (1: the files' bytes)."""
    total = 0
    for key in request.statistics_points:
        if key.endswith(".latents"):
            d = layout.array(f"latents/{key.removesuffix('.latents')}/feature_offsets").shape[1] - 3
        else:
            d = layout.array(f"activations/{key}").shape[1]
        total += snapshot_bytes(int(d), block)
    return total


def _latent_layout(plan: Plan, loaded, saes: dict[str, SAE]) -> tuple[StoreLayout, list[str]]:
    """The layout with each SAE's latents (``saes``: the request's, loaded): their width as the run will choose it
    when it can be known without the model (``latent_width``, a top-k SAE's k), measured on the first batch with a
    probe, else guessed (said)."""
    request = plan.request
    if not request.saes:
        return plan.layout, []
    notes = []
    if loaded is not None:
        widths = {p: w for p, (w, _) in latent_widths(request, saes, loaded, plan).items()}
    else:
        widths = {}
        for point, sae in saes.items():
            known = known_width(request, sae)
            if known is None:
                widths[point] = min(LATENT_GUESS, sae.d_sae)
                notes.append(f"the latents of {point} are counted at {widths[point]} a token (a guess: the run "
                             "measures it on its first batch): «pass probe=True» to measure it, or «pass latent_width»")
            else:
                widths[point] = known[0]
    spec = request.model_spec
    weights = (fingerprint(spec) or {}).get("weights") if any(s.trained_model[1] for s in saes.values()) else None
    for point, sae in saes.items():
        note = other_model_warning(f"{point}: the SAE at {request.saes[point]}", sae.trained_model,
                                   spec.name_or_path, weights)
        notes += [note] if note else []
    return plan.with_latents(widths, saes), notes


def _probe(plan: Plan, loaded, layout: StoreLayout, saes: dict[str, SAE]) -> tuple[float, dict, dict[str, dict]]:
    """Time batches for about PROBE_SECONDS (longest first: a cautious rate), extrapolate; also what the probed
    values hold (counts of values past the storage dtype's range) and, per SAE of ``saes`` (on the model's device)
    applied at the width ``layout`` gives its latents, what its latents did (:class:`~.storage.stats.LatentStats`)."""
    request = plan.request
    if request.batch_size == "auto":
        request = request.model_copy(update={"batch_size": AUTO_GUESS})
    ids, offsets = plan.tokens["input_ids"], plan.tokens["sample_offsets"]
    latents = {p: Latents(sae, layout.array(f"latents/{p}/indices").shape[1], "int32") for p, sae in saes.items()}
    latent_seen = {f"{p}.latents": {**LatentStats.empty(), "width": held.width, "d_sae": held.sae.d_sae,
                                    "k": held.sae.k} for p, held in latents.items()}
    done, started, seen = 0, time.perf_counter(), {"count": 0, "n_out_of_range": 0, "max_abs": 0.0}
    for first, stop, _rows, stats in forward_batches(loaded, ids, offsets, request, 0, plan.n_samples,
                                                     latents=latents):
        done += int(offsets[stop] - offsets[first])
        for key, acc in stats.items():
            if key in request.hook_points:
                seen = {"count": seen["count"] + acc["count"], "n_out_of_range": seen["n_out_of_range"]
                        + acc["n_out_of_range"], "max_abs": max(seen["max_abs"], acc["max_abs"])}
            elif key in latent_seen:
                LatentStats.merge(latent_seen[key], acc)
        if time.perf_counter() - started > PROBE_SECONDS:
            break
    elapsed = time.perf_counter() - started
    return float(elapsed * offsets[-1] / max(1, done)), seen, latent_seen


def _latent_warnings(request: Request, probed: dict[str, dict]) -> list[str]:
    """What the probe saw each SAE's latents do that the store would lose (``probed``: :func:`_probe`'s): latents
    dropped for want of width, values past the storage dtype's range, NaN; the store's own
    :meth:`~.Extraction.latent_warnings`, ahead of the run."""
    out = []
    for point, stats in probed.items():
        if stats["dropped"]:
            out.append(dropped_latents(point, stats["dropped"], stats["active"], stats["rows_dropped"], stats["rows"],
                                       stats["width"], stats["d_sae"], where=" on the probed batches",
                                       k=stats["k"]))
        if stats["n_out_of_range"]:
            out.append(f"{point}: {stats['n_out_of_range']:,} of {stats['active'] - stats['dropped']:,} probed "
                       f"latents are past {request.dtype}'s range (max {stats['max']:.3g}) and would be stored as "
                       "±inf: «pass dtype='bfloat16'» (or 'float32')")
        if stats["n_nan"]:
            out.append(f"{point}: {stats['n_nan']:,} probed latents are NaN in the SAE's output (they would not be "
                       "stored)")
    return out


def _over_budget(lengths: np.ndarray, budget: int, windowed: bool = False) -> str:
    """The warning for samples longer than the token budget (not refused: a researcher may mean it); with a
    ``window``, ``lengths`` are the sequences forwarded (a long document's windows, one a forward at least)."""
    over, longest = int(np.sum(lengths > budget)), int(lengths.max())
    if windowed:
        return (f"{counted(over, 'sample')} {'is' if over == 1 else 'are'} forwarded in windows of up to {longest} "
                f"tokens, more than «max_batch_tokens={budget}»: each forward holds one and exceeds the budget; "
                f"«pass max_batch_tokens={longest}» or more to keep every forward within it, or a smaller «window»")
    if over == len(lengths):
        what = (f"every sample is longer than «max_batch_tokens={budget}» (up to {longest} tokens): each batch will "
                "hold one row and exceed the budget")
    else:
        what = (f"{counted(over, 'sample')} {'is' if over == 1 else 'are'} longer than «max_batch_tokens={budget}» "
                f"(up to {longest} tokens): each gets a batch of its own, over the budget")
    return (f"{what}; «pass max_batch_tokens={longest}» or more to keep every batch within it, or a smaller "
            "«max_length»")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def summary(result: dict) -> str:
    """One line: '≈ 12.4 GB on disk, 80.0 GB free · peak 9.1 GB of 80.0 GB · ~3 min'."""
    parts = [f"≈ {human_bytes(result['bytes_on_disk'])} on disk"
             + (f", {human_bytes(result['free_disk_bytes'])} free" if result["free_disk_bytes"] is not None else "")]
    memory = result["device_memory_bytes"]
    parts.append(f"peak {human_bytes(result['peak_device_bytes'])}"
                 + (f" of {human_bytes(memory)}" if memory else "")
                 + (f" (at batch {AUTO_GUESS}: auto chooses its batch at the run)" if result.get("auto_batch") else ""))
    if result["seconds"] is not None:
        parts.append(_duration(result["seconds"]))
    line = " · ".join(parts)
    return line + (f" · {counted(len(result['warnings']), 'warning')}" if result["warnings"] else "")
