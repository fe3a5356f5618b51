"""The synchronous extraction loop: batched forward passes, hooks, early stop, rows to the writer.

It knows nothing of threads or widgets: it takes a loaded model, an allocated store, what to
capture, a ``check`` callable (raises to cancel or time out) and a ``progress`` callback.

On CUDA, a batch's rows are copied into pinned host memory on a side stream while the next batch
computes (the device never waits for a copy); on any other device they are plain ``.cpu()`` copies.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np
import torch

from .specs import CaptureSpec
from .data import batch_ranges
from .errors import InputError
from .models import LoadedModel
from .store import ChunkWriter, ExtractionStore, HookStats


class _StopForward(Exception):
    """Raised by a hook after the last requested layer: the rest of the model is never run."""


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
    lengths = offsets[begin + 1:end + 1] - offsets[begin:end]
    width = int(lengths.max())
    batch = np.full((end - begin, width), pad_id, dtype=np.int64)
    mask = np.zeros((end - begin, width), dtype=np.int64)
    for row, (start, length) in enumerate(zip(offsets[begin:end], lengths)):
        cols = slice(0, length) if side == "right" else slice(width - length, width)
        batch[row, cols] = ids[start:start + length]
        mask[row, cols] = 1
    return batch, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding shifts nothing."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def check_ids(ids: np.ndarray, loaded: LoadedModel) -> None:
    """Stored ids must fit this model's embedding (a resume with another model would not)."""
    if len(ids) and (int(ids.max()) >= loaded.vocab_size or int(ids.min()) < 0):
        raise InputError(f"stored token ids reach {int(ids.max())}, outside this model's vocabulary "
                         f"(0..{loaded.vocab_size - 1}): resume with the model the extraction was made with")


def forward_batches(loaded: LoadedModel, ids: np.ndarray, offsets: np.ndarray, capture: CaptureSpec, begin: int,
                    end: int, check: Callable[[], None] | None = None,
                    before_batch: Callable[[int, int], None] | None = None
                    ) -> Iterator[tuple[int, int, dict[str, np.ndarray], dict[str, dict]]]:
    """Batched forwards over stored samples [begin, end): yields ``(first, stop, rows, stats)`` per batch:
    ``rows`` maps each hook point to its real-token rows (padding dropped) in stored order, ``stats``
    to their statistics accumulators (computed by torch on the model's values, before storage rounding).

    ``check()`` runs before each batch and before each block, so a cancel lands within one block.
    """
    storage_dtype = getattr(torch, capture.dtype)
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def capture_hook(hook_point: str):
        def hook(_module, _inputs, output):
            captured[hook_point] = _output_tensor(output)
        return hook

    def stop_hook(_module, _inputs, _output):
        raise _StopForward

    for hp in capture.hook_points():
        _, layer, kind = hp.split(".")
        handles.append(loaded.module(int(layer), kind).register_forward_hook(capture_hook(hp)))
    handles.append(loaded.blocks[max(capture.layers)].register_forward_hook(stop_hook))
    if check is not None:  # cancel/timeout also between blocks: a long batch is abandoned, never half-written
        for block in list(loaded.blocks)[: max(capture.layers) + 1]:
            handles.append(block.register_forward_pre_hook(lambda _module, _inputs: check()))
    device = loaded.device
    cuda = device.type == "cuda"
    copies = torch.cuda.Stream(device) if cuda else None
    pending = None  # CUDA: the previous batch, its device->host copies still in flight
    try:
        for index, (first, stop) in enumerate(batch_ranges(end, capture.batch_size, begin)):
            try:
                if check is not None:
                    check()
                if before_batch is not None:
                    before_batch(index, capture.batch_size)
                batch, mask = pad_batch(ids, offsets, first, stop, loaded.pad_id, capture.padding_side)
                attention = torch.from_numpy(mask).to(device)
                kwargs = {"input_ids": torch.from_numpy(batch).to(device), "attention_mask": attention}
                if "position_ids" in loaded.forward_args:
                    kwargs["position_ids"] = position_ids(attention)
                if "use_cache" in loaded.forward_args:
                    kwargs["use_cache"] = False
                captured.clear()
                with torch.inference_mode():
                    try:
                        loaded.model(**kwargs)
                    except _StopForward:
                        pass
                    if cuda:
                        current = _start_copies(captured, capture.hook_points(), mask, storage_dtype, copies)
                    else:
                        keep = attention.bool()
                        real = {hp: captured[hp][keep] for hp in capture.hook_points()}
                        stats = {hp: HookStats.of_tensor(values) for hp, values in real.items()}
                        rows = {hp: values.to(storage_dtype).cpu().numpy() for hp, values in real.items()}
                captured.clear()
            except BaseException:
                if pending is not None:  # a finished batch is never lost to a later batch's failure
                    done, pending = pending, None
                    yield _finish_copies(*done)
                raise
            if not cuda:
                yield first, stop, rows, stats
                continue
            if pending is not None:  # its copies ran on the side stream while this batch computed
                yield _finish_copies(*pending)
            pending = (first, stop, *current)
        if pending is not None:
            done, pending = pending, None
            yield _finish_copies(*done)
    finally:
        for handle in handles:
            handle.remove()
        captured.clear()


def _start_copies(captured: dict, hook_points: list[str], mask: np.ndarray, dtype: torch.dtype,
                  stream: "torch.cuda.Stream") -> tuple[dict, dict, "torch.cuda.Event"]:
    """CUDA: select the real tokens' rows (indices from the host mask: no sync), cast them, and copy them and
    their statistics into pinned host memory on a side stream, so the next forward never waits for it.
    Returns (pinned rows, (count, pinned sums) per hook point, the copies' event)."""
    device = next(iter(captured.values())).device
    keep = torch.from_numpy(np.flatnonzero(mask.reshape(-1))).to(device)
    device_rows, device_sums = {}, {}
    for hp in hook_points:
        values = captured[hp].reshape(-1, captured[hp].shape[-1]).index_select(0, keep)
        device_sums[hp] = HookStats.device_sums(values)
        device_rows[hp] = values.to(dtype)
    stream.wait_stream(torch.cuda.current_stream(device))  # the copies start once these are computed
    rows, sums = {}, {}
    with torch.cuda.stream(stream):
        for hp in hook_points:
            for source, out in ((device_rows[hp], rows), (device_sums[hp], sums)):
                host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
                host.copy_(source, non_blocking=True)
                source.record_stream(stream)  # its device memory is not reused before the copy ends
                out[hp] = host
        event = torch.cuda.Event()
        event.record(stream)
    return rows, {hp: (keep.numel() * rows[hp].shape[-1], sums[hp]) for hp in hook_points}, event


def _finish_copies(first: int, stop: int, rows: dict, sums: dict, event: "torch.cuda.Event") -> tuple:
    """Wait for a batch's copies: ``(first, stop, rows, stats)`` as ``forward_batches`` yields them; the rows
    are numpy views of the pinned buffers (the writer keeps them until written)."""
    event.synchronize()
    return (first, stop, {hp: host.numpy() for hp, host in rows.items()},
            {hp: HookStats.from_device(count, host.tolist()) for hp, (count, host) in sums.items()})


def run(loaded: LoadedModel, store: ExtractionStore, capture: CaptureSpec, *, start_sample: int = 0,
        check: Callable[[], None] | None = None, progress: Callable[[dict], None] | None = None,
        before_batch: Callable[[int, int], None] | None = None) -> dict:
    """Extract every sample from ``start_sample`` on into ``store``; return throughput figures.

    ``check()`` is called before each batch and may raise (cancel, timeout). ``before_batch(index,
    batch_size)`` is a test hook for fault injection. Whatever the outcome, rows of finished batches
    are written and committed before this returns or raises.
    """
    ids = store.input_ids()
    offsets = store.sample_offsets()
    check_ids(ids, loaded)
    n_samples = len(offsets) - 1
    writer = ChunkWriter(store, start_sample)
    tokens_total = int(offsets[-1] - offsets[start_sample])
    done_tokens = 0
    started = time.perf_counter()
    try:
        for first, stop, rows, stats in forward_batches(loaded, ids, offsets, capture, start_sample, n_samples,
                                                        check, before_batch):
            writer.put(stop - first, rows, stats)
            done_tokens += int(offsets[stop] - offsets[first])
            if progress is not None:
                elapsed = time.perf_counter() - started
                rate = done_tokens / elapsed if elapsed > 0 else 0.0
                progress({
                    "samples_done": stop, "samples_total": n_samples,
                    "tokens_done": int(offsets[stop]), "tokens_total": int(offsets[-1]),
                    "tokens_per_s": rate, "eta_s": (tokens_total - done_tokens) / rate if rate else None,
                    "batch_size": capture.batch_size,
                })
    finally:
        writer.close(flush=True)
    elapsed = time.perf_counter() - started
    return {"tokens": done_tokens, "seconds": elapsed, "tokens_per_s": done_tokens / elapsed if elapsed else 0.0}
