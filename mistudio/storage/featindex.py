"""The by-feature index of an SAE's latents: per block of rows, each latent's entries (rows and values) in one
region, so one latent's activations are a few small reads (``Extraction.feature``), never a scan."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .codec import Geometry, UnitWriter
from .reads import CheckedArray
from .store import ExtractionStore


class FeatureIndex:
    """The by-feature index of one SAE's latents, written a block at a time (a block: a chunk of the latents'
    ``indices``/``values``, ``block_rows`` rows) once the block's rows are in, on a thread of its own. A block's
    ``feature_offsets`` row says where each latent's entries start in the block's region of ``feature_rows``/
    ``feature_values`` (sorted by latent, then row), then the entry count, the rows it covers and its first row.
    Readers use a block's index when it covers the rows they need, and read the rows themselves otherwise (the
    block being filled), so the index never holds the commit mark back."""

    def __init__(self, store: ExtractionStore, hook_point: str, d_sae: int, block_rows: int, start_row: int):
        base = f"latents/{hook_point}"
        self.store, self.d_sae, self.block_rows = store, d_sae, block_rows
        self.offsets, self.rows, self.values = (store.array(f"{base}/{n}") for n in
                                                ("feature_offsets", "feature_rows", "feature_values"))
        self.indices_arr, self.values_arr = store.array(f"{base}/indices"), store.array(f"{base}/values")
        self.n_rows = int(self.indices_arr.shape[0])
        self.width = int(self.indices_arr.shape[1])
        self.writers = {name: (UnitWriter(arr, g) if (g := Geometry.of(arr)) is not None else None)
                        for name, arr in (("offsets", self.offsets), ("rows", self.rows), ("values", self.values))}
        self.block = start_row // block_rows
        self.pieces: list[tuple[np.ndarray, np.ndarray]] = []
        self.futures: list[Future] = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mistudio-index-{hook_point}")
        first = self.block * block_rows
        if start_row > first:  # the block the mark cuts: its committed rows come back
            self.pieces.append(self._read(first, start_row))
        for block in self.unindexed(self.block):  # blocks below the mark a crash left unindexed
            stop = min((block + 1) * block_rows, self.n_rows)
            self.futures.append(self.executor.submit(self._write, block, *self._read(block * block_rows, stop)))

    def _read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        mark = stop
        index = CheckedArray(self.indices_arr, self.store.location, mark)[start:stop]
        values = CheckedArray(self.values_arr, self.store.location, mark)[start:stop].view(self.values_arr.dtype)
        return index, values

    def unindexed(self, below: int) -> list[int]:
        """Blocks before ``below`` whose index is missing or does not cover the block."""
        out = []
        for block in range(below):
            try:
                row = CheckedArray(self.offsets, self.store.location, block + 1)[block]
                whole = min(self.block_rows, self.n_rows - block * self.block_rows)
                if int(row[self.d_sae + 1]) != whole or int(row[self.d_sae + 2]) != block * self.block_rows:
                    out.append(block)
            except Exception:  # noqa: BLE001 - missing or damaged: built again from the committed rows
                out.append(block)
        return out

    def add(self, index: np.ndarray, values: np.ndarray, received: int, flush: bool = False) -> None:
        """Rows up to ``received``: whole blocks are indexed (with ``flush`` the partial one too)."""
        self.pieces.append((index, values))
        while True:
            start = self.block * self.block_rows
            stop = min(start + self.block_rows, self.n_rows)
            if start >= self.n_rows or (received < stop and not (flush and received > start)):
                return
            upto = min(received, stop)
            index = np.concatenate([p[0] for p in self.pieces])
            values = np.concatenate([p[1] for p in self.pieces])
            self.futures.append(self.executor.submit(self._write, self.block, index[:upto - start],
                                                     values[:upto - start]))
            if upto < stop:  # a flush's partial block: its rows stay for the whole block later
                self.pieces = [(index, values)]
                return
            self.pieces = [(index[upto - start:], values[upto - start:])]
            self.block += 1

    @staticmethod
    def build(index: np.ndarray, values: np.ndarray, block: int, block_rows: int, width: int, d_sae: int,
              dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A block's index from its rows (``index``/``values`` as stored): (offsets row, entry rows, entry values),
        entries sorted by latent then row, padded (row -1, value 0) to the block's region."""
        entries = block_rows * width
        fired = values.reshape(-1) != 0  # bit patterns: a 0 value is an empty slot
        feature = index.reshape(-1)[fired].astype(np.int64)
        row = np.repeat(np.arange(len(index), dtype=np.int32), width)[fired]
        if len(feature) and (feature.min() < 0 or feature.max() >= d_sae):
            raise ValueError(f"a stored latent index is outside 0..{d_sae - 1}")
        order = np.lexsort((row, feature))
        offsets = np.zeros(d_sae + 3, np.int64)
        offsets[1:d_sae + 1] = np.cumsum(np.bincount(feature, minlength=d_sae))
        offsets[d_sae + 1], offsets[d_sae + 2] = len(index), block * block_rows
        rows = np.full(entries, -1, np.int32)
        rows[:len(order)] = row[order]
        vals = np.zeros(entries, dtype)
        vals[:len(order)] = values.reshape(-1)[fired][order]
        return offsets, rows, vals

    def _write(self, block: int, index: np.ndarray, values: np.ndarray) -> None:
        offsets, rows, vals = self.build(index, values, block, self.block_rows, self.width, self.d_sae,
                                         self.values.dtype)
        entries = self.block_rows * self.width
        for name, arr, data in (("rows", self.rows, rows), ("values", self.values, vals)):
            writer = self.writers[name]
            if writer is None:
                arr[block * entries:(block + 1) * entries] = data
            else:
                writer.replace_unit(block, data)
        if self.writers["offsets"] is None:
            self.offsets[block] = offsets
        else:
            self.writers["offsets"].append(block, [offsets[None, :]])
            self.writers["offsets"].sync()

    def close(self) -> None:
        try:
            for future in self.futures:
                future.result()
        finally:
            self.executor.shutdown(wait=True)
