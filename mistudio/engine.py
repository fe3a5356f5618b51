"""The synchronous extraction loop: batched forward passes, hooks, early stop, rows to the writer.

It knows nothing of threads or widgets: it takes a loaded model, an allocated store, the request (what to
capture, how to batch), a ``check`` callable (raises to cancel or time out) and a ``progress`` callback.

On CUDA, a batch's rows are copied into pinned host memory on a side stream while the next batch
computes (the device never waits for a copy); on any other device they are plain ``.cpu()`` copies.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .data import plan_batches, window_spans
from .errors import InputError
from .models import LoadedModel
from .request import Request
from .saes import SAE
from .storage.layout import latent_index_dtype
from .storage.stats import HookStats, LatentStats
from .storage.store import ExtractionStore
from .storage.writer import ChunkWriter


class _StopForward(Exception):
    """Raised by a hook after the last requested layer: the rest of the model is never run."""


_CUDNN_LOCK = threading.Lock()
_cudnn_users = 0  # forwards running inside without_cudnn_attention
_cudnn_was_enabled = False


@contextmanager
def without_cudnn_attention(device: torch.device) -> Iterator[None]:
    """CUDA: the forwards inside run without cuDNN's attention kernels. They build a graph per new batch shape and
    cache it per thread, so with dynamic padding on a job's thread most batches build one: on an H200 a 6-layer
    decoder's forward ran at 18k-24k tokens/s on a new thread against 305k-360k on the main thread, and at 214k
    there without cuDNN's (``benchmarks/RESULTS.md``). Flash and memory-efficient attention serve instead. PyTorch's
    switch is process-wide: it is turned back on when the last forward inside leaves, if it was on."""
    global _cudnn_users, _cudnn_was_enabled
    if device.type != "cuda" or not hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        yield
        return
    with _CUDNN_LOCK:
        if _cudnn_users == 0:
            _cudnn_was_enabled = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
        _cudnn_users += 1
    try:
        yield
    finally:
        with _CUDNN_LOCK:
            _cudnn_users -= 1
            if _cudnn_users == 0 and _cudnn_was_enabled:
                torch.backends.cuda.enable_cudnn_sdp(True)


def _output_tensor(output) -> torch.Tensor:
    """The hidden-state tensor of a sub-module's output (blocks and attention return tuples)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output[0] if hasattr(output, "__getitem__") else output.last_hidden_state


def pad_batch(ids: np.ndarray, offsets: np.ndarray, begin: int, end: int, pad_id: int,
              side: str) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic padding of samples [begin, end): (input ids, attention mask), both (batch, longest)."""
    spans = [(int(a), int(b), int(a)) for a, b in zip(offsets[begin:end], offsets[begin + 1:end + 1])]
    batch, mask, _ = pad_spans(ids, spans, pad_id, side)
    return batch, mask


def pad_spans(ids: np.ndarray, spans: list[tuple[int, int, int]], pad_id: int, side: str,
              special: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dynamic padding of token spans ``(start, stop, own_from)`` of ``ids``: (input ids, attention mask, keep),
    all (n spans, longest). ``keep`` marks the rows that go to the store: tokens in ``[own_from, stop)``, less
    those marked in ``special`` (when special tokens are excluded)."""
    width = max(stop - start for start, stop, _ in spans)
    batch = np.full((len(spans), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(spans), width), dtype=np.int64)
    keep = np.zeros((len(spans), width), dtype=bool)
    for row, (start, stop, own_from) in enumerate(spans):
        length = stop - start
        first = 0 if side == "right" else width - length
        batch[row, first:first + length] = ids[start:stop]
        mask[row, first:first + length] = 1
        kept = np.arange(start, stop) >= own_from
        keep[row, first:first + length] = kept if special is None else kept & ~special[start:stop]
    return batch, mask, keep


def sample_spans(offsets: np.ndarray, first: int, stop: int, request: Request) -> list[tuple[int, int, int]]:
    """The forwarded sequences of samples [first, stop): one per sample, or its windows (see ``window_spans``),
    as absolute ``(start, stop, own_from)`` token spans in stored order."""
    return [(int(base) + a, int(base) + b, int(base) + c)
            for base, end in zip(offsets[first:stop], offsets[first + 1:stop + 1])
            for a, b, c in window_spans(int(end - base), request.window, request.stride)]


def host_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as the store keeps them (no copy): bfloat16 as its 2-byte patterns (uint16)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def tensor_of(rows: np.ndarray) -> torch.Tensor:
    """A host array as a tensor without a copy (bfloat16 through its 2-byte patterns)."""
    if rows.dtype.name == "bfloat16":
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(rows)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding shifts nothing."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def check_ids(ids: np.ndarray, loaded: LoadedModel) -> None:
    """Stored ids must fit this model's embedding (a resume with another model would not)."""
    if len(ids) and (int(ids.max()) >= loaded.vocab_size or int(ids.min()) < 0):
        raise InputError(f"stored token ids reach {int(ids.max())}, outside this model's vocabulary "
                         f"(0..{loaded.vocab_size - 1}): resume with the model the extraction was made with")


@dataclass(frozen=True)
class Latents:
    """An SAE applied at a hook point: its latents are stored sparsely, the ``width`` largest per token."""

    sae: SAE
    width: int
    index_dtype: str  # the store's dtype of latent indices (uint16 for up to 65,536 latents, else int32)


def encode_latents(latents: Latents, values: torch.Tensor, storage_dtype: torch.dtype) -> tuple:
    """A batch of hook-point rows through the SAE, on their device: (indices, values as stored, statistics
    sources): per row the ``width`` largest latents (an empty slot: index 0, value 0), how many latents fired
    (value > 0) and were dropped for want of width, how many stored values are ±inf (past the storage dtype's
    range) and how many latents were NaN (not stored)."""
    sae = latents.sae
    z = sae.encode(values.to(device=sae.device, dtype=sae.dtype))
    width = min(latents.width, z.shape[-1])
    top, index = torch.topk(z, width, dim=-1)
    fired = top > 0
    top, index = torch.where(fired, top, 0), torch.where(fired, index, 0)
    active = (z > 0).sum(-1)
    dropped = (active - width).clamp(min=0)
    stored = top.to(storage_dtype)
    return index.to(torch.int32), stored, LatentStats.device_sums(active, dropped, top, stored, z.isnan().sum())


Staged = list[tuple[list[str], torch.Tensor]]  # (names, tensor whose first dimension indexes the names)


def batch_outputs(groups: Staged, request: Request, latents: dict[str, Latents],
                  storage_dtype: torch.dtype) -> tuple[Staged, list[tuple]]:
    """What a batch stores, on the device, from its captured groups (``_forward``): ``[(array paths, tensor as
    stored, one array per path along its first dimension)]`` and its statistics sources ``[(kind, keys, count,
    source tensors)]`` — raw hook points (HookStats, a group's at once) and SAE latents (LatentStats). A group of
    stored hook points costs one cast and one statistics pass however many hook points it holds."""
    stored = set(request.hook_points)
    outputs, stats = [], []
    for points, stack in groups:
        if points[0] in stored:  # a group is all stored or all SAE-only
            outputs.append(([f"activations/{hp}" for hp in points], stack.to(storage_dtype)))
            stats.append(("hook", points, stack[0].numel(), HookStats.device_sources(stack)))
    rows_of = {hp: stack[i] for points, stack in groups for i, hp in enumerate(points)}
    for hp, spec in latents.items():
        index, top, sums = encode_latents(spec, rows_of[hp], storage_dtype)
        outputs += [([f"latents/{hp}/indices"], index[None]), ([f"latents/{hp}/values"], top[None])]
        stats.append(("latents", [f"{hp}.latents"], len(index), (sums[None],)))
    return outputs, stats


def host_rows(outputs: Staged, latents: dict[str, Latents]) -> dict[str, np.ndarray]:
    """Host tensors as the store keeps them, an array per path (views of the staged tensors): bfloat16 as its
    2-byte patterns, latent indices in their dtype."""
    rows = {}
    for paths, tensor in outputs:
        host = host_numpy(tensor)
        rows.update((path, host[i]) for i, path in enumerate(paths))
    for hp, spec in latents.items():
        path = f"latents/{hp}/indices"
        rows[path] = rows[path].astype(spec.index_dtype, copy=False)
    return rows


def host_stats(stats: list[tuple], rows: dict[str, np.ndarray], storage_dtype: torch.dtype) -> dict[str, dict]:
    """The statistics accumulators of a batch, per hook point (and ``<hook point>.latents``), from their host
    source tensors and the rows as stored (``host_rows``; where infinities and NaNs are counted)."""
    out = {}
    limit, bfloat16 = torch.finfo(storage_dtype).max, storage_dtype == torch.bfloat16
    for kind, keys, count, sources in stats:
        sums = sources[0].tolist()
        if kind == "hook":
            stored = [rows[f"activations/{hp}"] for hp in keys]
            out.update(zip(keys, HookStats.from_sources(count, sums, sources[1].numpy(), stored, limit, bfloat16)))
        else:
            out[keys[0]] = LatentStats.from_device(sums[0])
    return out


def forward_batches(loaded: LoadedModel, ids: np.ndarray, offsets: np.ndarray, request: Request, begin: int,
                    end: int, check: Callable[[], None] | None = None,
                    before_batch: Callable[[int, int], None] | None = None, special: np.ndarray | None = None,
                    latents: dict[str, Latents] | None = None,
                    ) -> Iterator[tuple[int, int, dict[str, np.ndarray], dict[str, dict]]]:
    """Batched forwards over stored samples [begin, end): yields ``(first, stop, rows, stats)`` per batch:
    ``rows`` maps each array path (``activations/<hook point>``, and ``latents/<hook point>/indices|values`` for
    the SAEs in ``latents``) to its real-token rows (padding dropped) in stored order, ``stats`` each hook point
    (and ``<hook point>.latents``) to its statistics accumulators (computed by torch on the model's values,
    before storage rounding).

    With ``request.window`` a long sample is forwarded as several windows (sequences of their own, at most
    ``batch_size`` sequences a forward) and each token's row comes from the window that owns it. Tokens
    marked in ``special`` (given when special tokens are excluded) get no row. SAEs run on the device, on the
    hook point's rows, inside the same pass.

    ``check()`` runs before each batch and before each block, so a cancel lands within one block.
    """
    latents = latents or {}
    storage_dtype = getattr(torch, request.dtype)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    points = sorted(set(request.hook_points) | set(latents), key=lambda p: (int(p.split(".")[1]), p))

    def capture_hook(hook_point: str):
        def hook(_module, _inputs, output):
            captured[hook_point] = _output_tensor(output)
        return hook

    def stop_hook(_module, _inputs, _output):
        raise _StopForward

    for hp in points:
        _, layer, kind = hp.split(".")
        handles.append(loaded.module(int(layer), kind).register_forward_hook(capture_hook(hp)))
    last = max(int(p.split(".")[1]) for p in points)
    handles.append(loaded.blocks[last].register_forward_hook(stop_hook))
    if check is not None:  # cancel/timeout also between blocks: a long batch is abandoned, never half-written
        for block in list(loaded.blocks)[: last + 1]:
            handles.append(block.register_forward_pre_hook(lambda _module, _inputs: check()))
    device = loaded.input_device
    cuda = device.type == "cuda"
    copies = torch.cuda.Stream(device) if cuda else None
    pending = None  # CUDA: the previous batch, its device->host copies still in flight
    try:
        for index, (first, stop) in enumerate(plan_batches(offsets, request, begin, end)):
            try:
                if check is not None:
                    check()
                if before_batch is not None:
                    before_batch(index, request.batch_size if request.max_batch_tokens is None else stop - first)
                groups = _forward(loaded, ids, sample_spans(offsets, first, stop, request), points, request,
                                  special, captured, per_forward=request.micro_batch_size or (stop - first))
                with torch.inference_mode():
                    outputs, stats = batch_outputs(groups, request, latents, storage_dtype)
                    if cuda:
                        current = _start_copies(outputs, stats, copies)
                    else:
                        rows = host_rows(outputs, latents)
                        stats = host_stats(stats, rows, storage_dtype)
            except BaseException:
                if pending is not None:  # a finished batch is never lost to a later batch's failure
                    done, pending = pending, None
                    yield _finish_copies(*done, latents, storage_dtype)
                raise
            if not cuda:
                yield first, stop, rows, stats
                continue
            if pending is not None:  # its copies ran on the side stream while this batch computed
                yield _finish_copies(*pending, latents, storage_dtype)
            pending = (first, stop, *current)
        if pending is not None:
            done, pending = pending, None
            yield _finish_copies(*done, latents, storage_dtype)
    finally:
        for handle in handles:
            handle.remove()
        captured.clear()


def _forward(loaded: LoadedModel, ids: np.ndarray, spans: list[tuple[int, int, int]], points: list[str],
             request: Request, special: np.ndarray | None, captured: dict, per_forward: int) -> Staged:
    """Forward ``spans`` (``per_forward`` sequences at a time: micro-batches, or windows that outnumber the
    samples) and return the kept rows of the hook points, in order, on the input device (where a split model's
    rows meet), grouped: hook points of one width and dtype, all stored or all SAE-only, share one ``(hook points,
    rows, width)`` tensor, so what follows is a few torch calls a group, not a few per hook point. Rows are
    selected by indices taken from the host mask, so nothing waits for the device."""
    device = loaded.input_device
    stored = set(request.hook_points)
    padded = [pad_spans(ids, spans[at:at + per_forward], loaded.pad_id, request.padding_side, special)
              for at in range(0, len(spans), per_forward)]
    n_rows = sum(int(keep.sum()) for _, _, keep in padded)
    groups: Staged = []
    row = 0
    with torch.inference_mode():
        for batch, mask, keep in padded:
            attention = torch.from_numpy(mask).to(device)
            kwargs = {"input_ids": torch.from_numpy(batch).to(device), "attention_mask": attention}
            if "position_ids" in loaded.forward_args:
                kwargs["position_ids"] = position_ids(attention)
            if "use_cache" in loaded.forward_args:
                kwargs["use_cache"] = False
            captured.clear()
            try:
                with without_cudnn_attention(device):
                    loaded.model(**kwargs)
            except _StopForward:
                pass
            if not groups:
                groups = _groups(points, stored, captured, n_rows, device)
            kept = np.flatnonzero(keep.reshape(-1))
            at = slice(row, row + len(kept))
            kept_on = {}  # the indices, once per device (a split model's blocks may sit on several)
            for group_points, stack in groups:
                for i, hp in enumerate(group_points):
                    values = captured[hp]
                    flat = values.reshape(-1, values.shape[-1])
                    if flat.device not in kept_on:
                        kept_on[flat.device] = torch.from_numpy(kept).to(flat.device)
                    if flat.device == stack.device:
                        torch.index_select(flat, 0, kept_on[flat.device], out=stack[i, at])
                    else:  # rows meet on the input's device
                        stack[i, at].copy_(flat.index_select(0, kept_on[flat.device]))
            row += len(kept)
            captured.clear()
    return groups


def _groups(points: list[str], stored: set[str], captured: dict[str, torch.Tensor], n_rows: int,
            device: torch.device) -> Staged:
    """Empty ``(hook points, n_rows, width)`` tensors on ``device`` for the hook points as captured, grouped by
    (stored, width, dtype), in order of their first hook point."""
    keys: dict[tuple, list[str]] = {}
    for hp in points:
        values = captured[hp]
        keys.setdefault((hp in stored, values.shape[-1], values.dtype), []).append(hp)
    return [(group, torch.empty((len(group), n_rows, width), dtype=dtype, device=device))
            for (_, width, dtype), group in keys.items()]


def _start_copies(outputs: Staged, stats: list[tuple],
                  stream: "torch.cuda.Stream") -> tuple[Staged, list, "torch.cuda.Event"]:
    """CUDA: copy a batch's stored tensors and statistics sources into pinned host memory on a side stream, so the
    next forward never waits for it: a few copies a group of hook points. Returns (pinned outputs, statistics with
    pinned sources, the copies' event)."""
    device = outputs[0][1].device
    stream.wait_stream(torch.cuda.current_stream(device))  # the copies start once these are computed

    def pinned(source: torch.Tensor) -> torch.Tensor:
        host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
        host.copy_(source, non_blocking=True)
        source.record_stream(stream)  # its device memory is not reused before the copy ends
        return host

    with torch.cuda.stream(stream):
        rows = [(paths, pinned(t)) for paths, t in outputs]
        host = [(kind, keys, count, tuple(pinned(t) for t in sources)) for kind, keys, count, sources in stats]
        event = torch.cuda.Event()
        event.record(stream)
    return rows, host, event


def _finish_copies(first: int, stop: int, rows: Staged, stats: list, event: "torch.cuda.Event",
                   latents: dict[str, Latents], storage_dtype: torch.dtype) -> tuple:
    """Wait for a batch's copies: ``(first, stop, rows, stats)`` as ``forward_batches`` yields them; the rows
    are numpy views of the pinned buffers (the writer keeps them until written)."""
    event.synchronize()
    host = host_rows(rows, latents)
    return first, stop, host, host_stats(stats, host, storage_dtype)


def run(loaded: LoadedModel, store: ExtractionStore, request: Request, *, start_sample: int = 0,
        saes: dict[str, SAE] | None = None, check: Callable[[], None] | None = None,
        progress: Callable[[dict], None] | None = None,
        before_batch: Callable[[int, int], None] | None = None) -> dict:
    """Extract every sample from ``start_sample`` on into ``store``; return throughput figures.

    ``saes`` are the SAEs the store's metadata lists (``record.latents``), loaded on the model's device.
    ``check()`` is called before each batch and may raise (cancel, timeout). ``before_batch(index,
    batch_size)`` is a test hook for fault injection. Whatever the outcome, rows of finished batches
    are written and committed before this returns or raises.
    """
    latents = {hp: Latents(saes[hp], info.width, latent_index_dtype(info.d_sae))
               for hp, info in store.record.latents.items()}
    ids = store.input_ids()
    offsets = store.sample_offsets()
    rows_at = store.activation_offsets()  # progress counts activation rows
    special = store.tokens("special")[:] if store.record.storage.exclude_special else None
    check_ids(ids, loaded)
    n_samples = len(offsets) - 1
    writer = ChunkWriter(store, start_sample, request.statistics_points, loaded.input_device)
    tokens_total = int(rows_at[-1] - rows_at[start_sample])
    done_tokens = 0
    started = time.perf_counter()
    try:
        for first, stop, rows, stats in forward_batches(loaded, ids, offsets, request, start_sample, n_samples,
                                                        check, before_batch, special, latents):
            writer.put(stop - first, rows, stats)
            done_tokens += int(rows_at[stop] - rows_at[first])
            if progress is not None:
                elapsed = time.perf_counter() - started
                rate = done_tokens / elapsed if elapsed > 0 else 0.0
                progress({
                    "samples_done": stop, "samples_committed": writer.committed_sample, "samples_total": n_samples,
                    "tokens_done": int(rows_at[stop]), "tokens_total": int(rows_at[-1]),
                    "tokens_per_s": rate, "eta_s": (tokens_total - done_tokens) / rate if rate else None,
                    "batch_size": request.batch_size if request.max_batch_tokens is None else stop - first,
                })
    finally:
        writer.close(flush=True)
    elapsed = time.perf_counter() - started
    return {"tokens": done_tokens, "seconds": elapsed, "tokens_per_s": done_tokens / elapsed if elapsed else 0.0}
