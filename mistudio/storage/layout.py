"""The geometry of a store: which arrays, their chunk and shard rows, the key of each storage unit, and the exact
bytes the store will take on disk. The allocator creates exactly this layout and the estimate counts it.

A storage unit is the object one file holds: a chunk of an unsharded array (format version 1), or a shard of
``shard_rows`` rows made of inner chunks (format version 2).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .positions import RECORD_BYTES, recorded

SHARD_MB = 32.0  # default shard size of activation arrays (Request.shard_mb); see benchmarks/RESULTS.md
TOKEN_CHUNK_ROWS = 2**20  # rows per chunk of the 1-D token arrays
CHECKSUM_BYTES = 4  # crc32c appended to every chunk (and to a shard's index)
SHARD_INDEX_ENTRY = 16  # (offset, length) as two little-endian uint64 per inner chunk
EMPTY = 2**64 - 1  # an inner chunk that was never written, in a shard index
WRITE_CONFIG = {"write_empty_chunks": True}  # an all-zero chunk is still written: a missing one means damage
PER_SAMPLE = ("sample_offsets", "sample_index", "activation_offsets")  # token arrays indexed by sample
# the metadata files (compact JSON): the group's (about 4.7 KB with the model's fingerprint, plus ~0.9 KB of
# statistics per hook point), the writer lease file (~0.2 KB) and each array's (about 0.36 KB, twice: its own
# file and its copy in the consolidated metadata)
METADATA_BYTES, METADATA_PER_ARRAY, METADATA_PER_HOOK_POINT = 4900, 720, 900
RECORDS_KEY_BYTES = 45  # the chunk records' key, named in a metadata file


def numpy_dtype(name: str) -> np.dtype:
    """A storage dtype's numpy dtype (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def zarr_dtype(name: str) -> str:
    """The dtype Zarr stores: bfloat16 has no Zarr v3 dtype, so its 2-byte pattern is stored as uint16 (the array's
    ``mistudio_dtype`` attribute says bfloat16, and mistudio's reads return bfloat16 values)."""
    return "uint16" if name == "bfloat16" else name


def chunk_rows(width: int, itemsize: int, chunk_mb: float) -> int:
    """Rows per chunk so that a chunk holds about ``chunk_mb`` MB, a multiple of 64 rows."""
    rows = int(chunk_mb * 2**20 / max(1, width * itemsize))
    return max(64, rows // 64 * 64)


def shard_rows(rows_per_chunk: int, row_bytes: int, shard_mb: float, n_rows: int) -> int | None:
    """Rows per shard (a multiple of the chunk holding about ``shard_mb`` MB), or None for an unsharded array:
    when ``shard_mb`` is 0, or when the array fits in one shard (a small store keeps one file per chunk)."""
    if not shard_mb:
        return None
    per_shard = int(shard_mb * 2**20 // max(1, rows_per_chunk * row_bytes))
    rows = per_shard * rows_per_chunk
    return rows if per_shard > 1 and n_rows > rows else None


def array_codecs(checksum: bool) -> dict:
    """How every array's chunks are encoded (``create_array`` keywords): raw bytes, plus a crc32c checksum per
    chunk unless ``checksum`` is False. The one place that chooses codecs."""
    from zarr.codecs import Crc32cCodec

    return {"compressors": [Crc32cCodec()] if checksum else None}


@dataclass(frozen=True)
class ArrayLayout:
    """One array: its path in the store, shape, dtype, chunk rows, shard rows (None: unsharded), checksums."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    chunk_rows: int
    shard_rows: int | None
    checksum: bool

    @property
    def unit_rows(self) -> int:
        return self.shard_rows or self.chunk_rows

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * numpy_dtype(self.dtype).itemsize

    @property
    def chunk_bytes(self) -> int:
        """One encoded chunk: its rows (the last one padded) and its crc32c."""
        return self.chunk_rows * self.row_bytes + CHECKSUM_BYTES * self.checksum

    @property
    def dims(self) -> tuple[str, ...]:
        name = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("latents/"):
            return {"indices": ("token", "slot"), "values": ("token", "slot"),
                    "feature_offsets": ("block", "latent")}.get(name, ("entry",))
        return ("token", "feature") if len(self.shape) == 2 else ("sample",) if name in PER_SAMPLE else ("token",)

    @property
    def records_bytes(self) -> int:
        """Bytes of the array's chunk records (storage/positions.py: a local store with checksums), and of their
        key in its metadata files."""
        if not self.checksum or not recorded(self.path) or not self.shape[0]:
            return 0
        return RECORD_BYTES * math.ceil(self.shape[0] / self.chunk_rows) + 2 * RECORDS_KEY_BYTES

    @property
    def bytes_on_disk(self) -> int:
        """Bytes of the array's unit files once every row is written."""
        n = self.shape[0]
        if not n:
            return 0
        chunks = math.ceil(n / self.chunk_rows)
        if self.shard_rows is None:
            return chunks * self.chunk_bytes
        per_shard = self.shard_rows // self.chunk_rows
        index = per_shard * SHARD_INDEX_ENTRY + CHECKSUM_BYTES
        return chunks * self.chunk_bytes + math.ceil(n / self.shard_rows) * index

    def allocated_bytes(self, block: int) -> int:
        """What the array takes on a disk of ``block``-byte blocks: each unit file rounded up to whole blocks (a
        2-D array's unit sits in a folder of its own, ``c/<i>/0``), its folders, metadata and chunk records."""
        n = self.shape[0]
        folder_per_unit = block if len(self.shape) > 1 else 0
        if self.shard_rows is None:
            units = [(math.ceil(n / self.chunk_rows), self.chunk_bytes)] if n else []
        else:
            per_shard = self.shard_rows // self.chunk_rows
            index = per_shard * SHARD_INDEX_ENTRY + CHECKSUM_BYTES
            full, left = divmod(n, self.shard_rows)
            units = [(full, per_shard * self.chunk_bytes + index)]
            if left:
                units.append((1, math.ceil(left / self.chunk_rows) * self.chunk_bytes + index))
        data = sum(count * (whole_blocks(size, block) + folder_per_unit) for count, size in units)
        records = whole_blocks(self.records_bytes, block)
        return data + records + 3 * block  # its folder, its zarr.json and its c/ folder


def whole_blocks(n_bytes: int, block: int) -> int:
    """``n_bytes`` rounded up to whole blocks of ``block`` bytes."""
    return -(-n_bytes // block) * block


@dataclass(frozen=True)
class StoreLayout:
    """Every array of a store, and its format version (2 when any array is sharded)."""

    arrays: tuple[ArrayLayout, ...]

    @property
    def format_version(self) -> int:
        return 2 if any(a.shard_rows for a in self.arrays) else 1

    @property
    def data_bytes(self) -> int:
        """The unit files' bytes, exactly."""
        return sum(a.bytes_on_disk for a in self.arrays)

    @property
    def bytes_on_disk(self) -> int:
        """The whole store: its unit files exactly, its metadata files from their typical sizes (within a few KB)."""
        return self.data_bytes + sum(a.records_bytes for a in self.arrays) + METADATA_BYTES + RECORDS_KEY_BYTES \
            + (len(self.arrays) + 2) * METADATA_PER_ARRAY \
            + len(self.activations) * METADATA_PER_HOOK_POINT

    def allocated_bytes(self, block: int) -> int:
        """What the store takes on a disk of ``block``-byte blocks (``du`` reads this): its arrays', and each group's
        folder and zarr.json, the store's folder, its lease and its zarr.json (with every array's metadata again,
        consolidated)."""
        groups = {a.path.rsplit("/", i)[0] for a in self.arrays for i in range(1, a.path.count("/") + 1)}
        metadata = self.bytes_on_disk - self.data_bytes - sum(a.records_bytes for a in self.arrays)
        return sum(a.allocated_bytes(block) for a in self.arrays) + 2 * block * len(groups) \
            + 2 * block + whole_blocks(metadata, block)

    def array(self, path: str) -> ArrayLayout:
        return next(a for a in self.arrays if a.path == path)

    @property
    def activations(self) -> list[ArrayLayout]:
        return [a for a in self.arrays if a.path.startswith("activations/")]

    def with_latents(self, latents: dict[str, tuple[int, int]], dtype: str, chunk_mb: float, shard_mb: float,
                     checksum: bool) -> "StoreLayout":
        """This layout plus the arrays of SAE latents: ``latents`` maps a hook point to (width, d_sae)."""
        n_rows = self.activations[0].shape[0]
        extra = [a for hp, (width, d_sae) in latents.items()
                 for a in latent_arrays(hp, n_rows, width, d_sae, dtype, chunk_mb, shard_mb, checksum)]
        return StoreLayout(self.arrays + tuple(extra))


LATENT_INDEX_PARTS = 64  # a block's by-feature entries are read in 64 inner chunks (one feature's: one or two)


def latent_index_dtype(d_sae: int) -> str:
    return "uint16" if d_sae <= 2**16 else "int32"


def latent_arrays(hook_point: str, n_rows: int, width: int, d_sae: int, dtype: str, chunk_mb: float,
                  shard_mb: float, checksum: bool) -> list[ArrayLayout]:
    """The arrays of one SAE's latents, under ``latents/<hook point>/``: per row its ``width`` largest latents
    (``indices``, ``values``: a 0 value is an empty slot), and the same entries by feature per block of rows (a
    block is a chunk of ``indices``): ``feature_offsets`` (per block: where each latent's entries start, then
    the entry count and the rows indexed), ``feature_rows`` (row in the block) and ``feature_values``."""
    index_type = latent_index_dtype(d_sae)
    slot_bytes = numpy_dtype(index_type).itemsize + numpy_dtype(dtype).itemsize
    block = chunk_rows(width, slot_bytes, chunk_mb)
    per_shard = shard_rows(block, width * slot_bytes, shard_mb, n_rows)
    n_blocks = -(-n_rows // block)
    entries = block * width
    base = f"latents/{hook_point}"
    return [ArrayLayout(f"{base}/indices", (n_rows, width), index_type, block, per_shard, checksum),
            ArrayLayout(f"{base}/values", (n_rows, width), dtype, block, per_shard, checksum),
            ArrayLayout(f"{base}/feature_offsets", (n_blocks, d_sae + 3), "int64", 1, None, checksum),
            ArrayLayout(f"{base}/feature_rows", (n_blocks * entries,), "int32", entries // LATENT_INDEX_PARTS,
                        entries, checksum),
            ArrayLayout(f"{base}/feature_values", (n_blocks * entries,), dtype, entries // LATENT_INDEX_PARTS,
                        entries, checksum)]


def plan_layout(n_tokens: int, n_samples: int, n_rows: int, hook_dims: dict[str, int], dtype: str,
                chunk_mb: float, shard_mb: float, checksum: bool, *, roles: bool = False, positions: bool = False,
                activation_offsets: bool = False) -> StoreLayout:
    """The arrays ``ExtractionStore.allocate`` creates for ``n_tokens`` tokens of ``n_samples`` samples and
    ``n_rows`` activation rows per hook point (``hook_dims``: width of each)."""
    token_arrays = [("input_ids", n_tokens, "int32"), ("sample_offsets", n_samples + 1, "int64"),
                    ("sample_index", n_samples, "int64"), ("special", n_tokens, "bool")]
    if activation_offsets:
        token_arrays.append(("activation_offsets", n_samples + 1, "int64"))
    if roles:
        token_arrays.append(("role", n_tokens, "int8"))
    if positions:
        token_arrays.append(("positions", n_tokens, "int32"))
    arrays = [ArrayLayout(f"tokens/{name}", (n,), kind, max(1, min(n, TOKEN_CHUNK_ROWS)), None, checksum)
              for name, n, kind in token_arrays]
    itemsize = numpy_dtype(dtype).itemsize
    widest = max(hook_dims.values())
    rows = chunk_rows(widest, itemsize, chunk_mb)
    per_shard = shard_rows(rows, widest * itemsize, shard_mb, n_rows)
    arrays += [ArrayLayout(f"activations/{hp}", (n_rows, width), dtype, rows, per_shard, checksum)
               for hp, width in hook_dims.items()]
    return StoreLayout(tuple(arrays))


# -- units of an existing Zarr array ----------------------------------------------------------------
def storage_unit(arr: Any) -> tuple[int, ...]:
    """The shape of one stored object: the shard when the array is sharded, else the chunk."""
    return arr.shards or arr.chunks


def unit_name(arr: Any) -> str:
    return "chunk" if arr.shards is None else "shard"


def unit_key(arr: Any, index: tuple[int, ...]) -> str:
    """The store key of one storage unit (``activations/layers.1.residual/c/3/0``)."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key(index)}"


def units(arr: Any, first_row: int, stop_row: int) -> list[tuple[int, ...]]:
    """Indices of the storage units holding rows ``[first_row, stop_row)``, every unit along the other axes."""
    unit = storage_unit(arr)
    stop_row = min(stop_row, arr.shape[0])
    if stop_row <= first_row:
        return []
    rows = range(first_row // unit[0], math.ceil(stop_row / unit[0]))
    others = [range(math.ceil(s / u)) for s, u in zip(arr.shape[1:], unit[1:])]
    return [(i, *rest) for i in rows for rest in itertools.product(*others)]


def unit_rows(arr: Any, index: tuple[int, ...]) -> slice:
    rows = storage_unit(arr)[0]
    return slice(index[0] * rows, min((index[0] + 1) * rows, arr.shape[0]))


def has_checksum(arr: Any) -> bool:
    from zarr.codecs import Crc32cCodec

    return any(isinstance(c, Crc32cCodec) for c in arr.compressors)


_KINDS = {"input_ids": "iu", "sample_offsets": "iu", "sample_index": "iu", "activation_offsets": "iu", "special": "b",
          "role": "iu", "positions": "iu", "indices": "iu", "feature_offsets": "iu", "feature_rows": "iu"}  # by kind
_KIND_NAMES = {"iu": "whole numbers", "b": "flags (bool)"}


def foreign_encoding(arr: Any, path: str, dtype: str | None) -> str | None:
    """What in an array's ``zarr.json`` says its bytes are not what this store wrote (None: nothing): values of
    another dtype than the store's (``dtype``, its ``params.dtype``: activations and latent values; a bfloat16
    array is uint16 marked ``mistudio_dtype``), bytes not little-endian, codecs beyond bytes, crc32c and sharding.
    Such an edit would have every read decode the right bytes as wrong numbers."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    def plain(codecs: Any) -> bool:
        return all(isinstance(c, (BytesCodec, Crc32cCodec)) for c in codecs) and all(
            getattr(getattr(c, "endian", None), "value", "little") in ("little", None) for c in codecs)

    codecs = list(arr.metadata.codecs)
    sharded = len(codecs) == 1 and isinstance(codecs[0], ShardingCodec)
    if not (plain(codecs[0].codecs) and plain(codecs[0].index_codecs) if sharded else plain(codecs)):
        return ("its zarr.json encodes the chunks with codecs this store was not written with ("
                + ", ".join(type(c).__name__ for c in codecs) + "): every value would be read wrong")
    kind = _KINDS.get(path.rsplit("/", 1)[-1]) if path.startswith(("tokens/", "latents/")) else None
    if kind is not None and np.dtype(arr.dtype).kind not in kind:  # ids, offsets, flags: their kind of number
        return (f"its zarr.json says its values are {np.dtype(arr.dtype)}, but this array holds "
                f"{_KIND_NAMES[kind]}: every value would be read as another type")
    values = path.startswith("activations/") or (path.startswith("latents/") and path.endswith(("/values",
                                                                                                 "/feature_values")))
    if values and dtype is not None:
        marked = arr.attrs.get("mistudio_dtype") if hasattr(arr, "attrs") else None
        stored = np.dtype(arr.dtype)
        as_written = stored == np.dtype("uint16") and marked == "bfloat16" if dtype == "bfloat16" else \
            stored == np.dtype(dtype) and marked in (None, dtype)
        if not as_written:
            said = f"{marked} (over {stored})" if marked else str(stored)
            return (f"its zarr.json says its values are {said}, but the store's params.dtype is {dtype}: every "
                    "value would be read as another type")
    return None
