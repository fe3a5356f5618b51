"""Training loader: every stored row once per epoch, shuffled, split over ranks and DataLoader workers, resumable.

**Plan of an epoch.** The stores' rows are cut into *runs*: one chunk of an unsharded array, or up to ``run_mb``
of adjacent chunks inside one shard of a sharded array (read as one sequential run, so cold reads keep the
kernel's readahead). The runs are permuted by ``(seed, epoch)``; the permuted sequence of kept rows (special
tokens dropped with ``exclude_special``) is cut into contiguous ranges, one per rank (equal row counts, see
``even_batches``), and a rank's range into one per DataLoader worker (whole batches each, the partial batch to
the last worker). A cut inside a run makes two *pieces* of it; every row is in exactly one piece.

**Stream.** An iterator plays its pieces through ``lanes`` (``buffer_tokens`` / run rows, rounded up): each lane
holds one piece, read straight from the files into its own *slot* of the buffer (``read_into``: no other copy),
its kept rows in a random order (seeded by the piece). Rows leave the lanes round-robin: the stream is ordered
by the key (row number within its lane, lane), so each batch takes ``batch_size / lanes`` rows from every lane,
a uniform random sample of each lane's remaining rows (a stratified draw over the ``buffer_tokens`` rows in the
lanes). A lane that runs out takes the next piece of the plan. Every row stays exactly one lane lifetime, so a
slot is freed whole and the buffer never fragments. Lane j starts (lanes - 1 - j) / lanes of a run before lane
lanes - 1 (the lanes join one by one over the first half buffer of the epoch), so that they run out one at a
time, at the rate pieces are read, and nothing is read twice.
Batches are gathered from the slots (the second and last copy). Two background threads read the next pieces
(``prefetch`` batches' worth) into free slots while the training step runs: two reads in flight keep the
disk's queue busy. Memory: (lanes + pieces read ahead) slots of one run each, whatever the store's size.

**SAE latents.** A latent hook point's buffer rows are its stored fixed-width (indices, values) pairs; a batch
is made sparse (or dense) only when it is gathered (:func:`latent_batch`), so memory is bound by the width.

**State.** The stream is a function of the plan and the position in it, so a state is small: the stores (id,
nonce, commit mark), the settings that shape the order and the values (hook points, normalize and a digest of its
constants, dtype), the epoch and the batches already yielded.
``load_state_dict`` checks every field against this loader and its stores, then replays the lane schedule from
the piece sizes (no data read) and reads the pieces the lanes hold.
"""
from __future__ import annotations

import bisect
import copy
import hashlib
import heapq
import numbers
import reprlib
import threading
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .feature_view import LATENT_SUFFIX
from .stats import feature_moments, kept_moments
from ..data import special_ids
from ..engine import tensor_of
from ..errors import InputError, StoreCorrupted

if TYPE_CHECKING:
    from ..extraction import Extraction

STORE_SHIFT = 40  # a row id is (store << 40) | activation row
INDEX_KEYS = ("store", "row", "token_index")  # with_index=True: which store, its activation row, its token
VALUE_SETTINGS = ("hook_points", "normalize", "dtype", "norm_constants")  # states before them resume unchecked
NORMALIZE = (None, "mean_std", "unit_norm")
LATENT_FORMS = ("sparse", "dense", "fixed")  # how a batch of SAE latents comes out (see :func:`latent_batch`)
STATE_FORMAT = "mistudio.loader/2"
READ_THREADS = 2  # two reads in flight: the disk's queue stays busy while one read is being checked
RUN_MB = 8.0
MASK_BLOCK = 1 << 22  # tokens per read of a special-token mask when counting kept rows
MAX_EPOCH = 2**62
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 40, 40, 4, 4, 2


class ActivationLoader(IterableDataset):
    """Batches of stored activations for training; see :func:`loader`."""

    def __init__(self, extractions: "Extraction | Sequence[Extraction]", hook_points: str | Sequence[str],
                 batch_size: int = 4096, shuffle: bool = True, seed: int = 0, exclude_special: bool = False,
                 dtype: str = "float32", device: str = "cpu", drop_last: bool = False, num_workers: int = 0,
                 buffer_tokens: int | None = None, normalize: str | None = None, with_index: bool = False,
                 prefetch: int = 2, rank: int | None = None, world_size: int | None = None,
                 even_batches: bool = True, run_mb: float = RUN_MB, latents: str = "sparse"):
        self.extractions = list(extractions) if isinstance(extractions, (list, tuple)) else [extractions]
        self.single = isinstance(hook_points, str)
        self.hook_points = [hook_points] if self.single else list(hook_points)
        if not self.extractions or not self.hook_points:
            raise InputError("the loader needs at least one extraction and one hook point")
        for name, value, least in (("batch_size", batch_size, 1), ("prefetch", prefetch, 1),
                                   ("num_workers", num_workers, 0), ("seed", seed, 0)):
            if not _is_int(value) or value < least:
                raise InputError(f"«{name}={value!r}» must be a whole number >= {least}")
        if buffer_tokens is not None and (not _is_int(buffer_tokens) or buffer_tokens < 1):
            raise InputError(f"«buffer_tokens={buffer_tokens!r}» must be a whole number >= 1 (or None: the default)")
        if not isinstance(run_mb, (int, float)) or isinstance(run_mb, bool) or not 0 <= run_mb < 2**20:
            raise InputError(f"«run_mb={run_mb!r}» must be a number of MB >= 0 (0: one chunk at a time)")
        if normalize not in NORMALIZE:
            raise InputError(f"«normalize={normalize!r}» must be one of {NORMALIZE}")
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise InputError(f"«dtype={dtype!r}» must name a torch floating-point dtype (activations are real "
                             "numbers: an integer dtype would round them away): «pass dtype='float32'», 'bfloat16' "
                             "or 'float16'")
        if latents not in LATENT_FORMS:
            raise InputError(f"«latents={latents!r}» must be one of {LATENT_FORMS}: 'sparse' (a torch sparse CSR "
                             "batch), 'dense' (batch, d_sae), 'fixed' (the stored (indices, values) pair)")
        latent_points = [hp for hp in self.hook_points if hp.endswith(LATENT_SUFFIX)]
        if normalize is not None and latent_points:
            raise InputError(f"«normalize={normalize!r}» does not apply to SAE latents ({', '.join(latent_points)}): "
                             "«pass normalize=None» (normalize the raw hook points with a loader of their own)")
        self.latent_form = latents
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.widths, self.d_sae, self.row_widths = self._shapes(self.extractions[0], latent_points)
        for ext in self.extractions[1:]:
            widths, _, row_widths = self._shapes(ext, latent_points)
            if widths != self.widths:
                raise InputError(f"extraction {ext.id} has widths {widths}, the first one {self.widths}: "
                                 "stores loaded together need the same hook points and widths (latents: d_sae)")
            self._same_saes(ext)
            for key, width in row_widths.items():  # stored latent widths may differ: the buffer holds the widest
                self.row_widths[key] = max(self.row_widths[key], width)
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), bool(shuffle), int(seed), \
            bool(drop_last)
        self.dtype = str(torch_dtype).removeprefix("torch.")  # "half" and "float16" are one setting in a state
        self.device, self.num_workers, self.prefetch = device, int(num_workers), int(prefetch)
        self.normalize, self.with_index, self.exclude_special = normalize, with_index, bool(exclude_special)
        self.even_batches, self.run_mb = bool(even_batches), float(run_mb)
        self.limits = [ext.committed_tokens() for ext in self.extractions]  # a snapshot of the commit marks
        self.identity = [{"id": ext.id, "nonce": ext.record.nonce, "committed": int(limit)}
                         for ext, limit in zip(self.extractions, self.limits)]
        first = [next(iter(self.store_arrays(ext).values())) for ext in self.extractions]  # the geometry
        self.chunk_rows = [int(a.chunks[0]) for a in first]
        self.run_rows = [_run_rows(a, self.run_mb) for a in first]
        self.unit_rows = [int((a.shards or a.chunks)[0]) for a in first]
        self.runs = np.concatenate([np.zeros((0, 3), np.int64)] + [
            _runs(s, limit, self.unit_rows[s], self.run_rows[s]) for s, limit in enumerate(self.limits)])
        self.slot_rows = max(self.run_rows)
        default = max(8 * batch_size, 16 * self.slot_rows)
        self.buffer_tokens = buffer_tokens if buffer_tokens is not None else default
        self.lanes = max(1, -(-self.buffer_tokens // self.slot_rows)) if self.shuffle else 1
        # read ahead: ``prefetch`` batches' worth of runs (at least 2: one per reading thread)
        self.read_ahead = max(READ_THREADS, -(-self.prefetch * self.batch_size // self.slot_rows))
        self.slots = self.lanes + self.read_ahead
        self._special = [self._special_source(ext) for ext in self.extractions] if exclude_special else None
        self._masks: dict[int, np.ndarray] | None = None  # special-token masks of small stores
        self._norm = [self._norm_factors(s) for s in range(len(self.extractions))] if normalize else None
        self._row_tokens = ["activation_offsets" in ext.store.group["tokens"] for ext in self.extractions]
        self.epoch = 0
        self._run_kept: np.ndarray | None = None
        self._plan_cache: tuple | None = None
        self._spare_pool: dict | None = None
        self._arrays: list[dict] | None = None
        self._resume_skip: dict[int, int] = {}  # worker -> batches to skip (set by a resumed _WorkerPool)
        self._tag_worker = False  # in _WorkerPool's workers: batches carry the worker id

    # -- configuration helpers -----------------------------------------------------------------------
    def _shapes(self, ext: "Extraction", latent_points: list[str]) -> tuple[dict, dict, dict]:
        """({hook point: width of its batch rows}, {latent hook point: d_sae}, {buffer key: stored row width})."""
        widths, d_sae, row_widths = {}, {}, {}
        for key, array in self.store_arrays(ext, latent_points).items():
            row_widths[key] = int(array.shape[1])
        for hp in self.hook_points:
            if hp in latent_points:
                widths[hp] = d_sae[hp] = int(ext.latent_info(hp).d_sae)
            else:
                widths[hp] = row_widths[hp]
        return widths, d_sae, row_widths

    def _same_saes(self, ext: "Extraction") -> None:
        """Latents loaded together come from one SAE (when both stores recorded its fingerprint)."""
        first = self.extractions[0]
        for hp in self.d_sae:
            a, b = first.latent_info(hp).fingerprint, ext.latent_info(hp).fingerprint
            if a and b and a != b:
                raise InputError(f"the latents {hp} of extraction {ext.id} come from another SAE than those of "
                                 f"{first.id} (fingerprints {b[:12]} and {a[:12]}): load stores made with one SAE")

    def store_arrays(self, ext: "Extraction", latent_points: list[str] | None = None) -> dict:
        """{buffer key: checked array} of one store: a raw hook point's key is its name, a latent hook point's
        are ``(name, "indices")`` and ``(name, "values")`` (its fixed-width rows, what the buffer holds)."""
        latent_points = self.d_sae if latent_points is None else latent_points
        out: dict = {}
        for hp in self.hook_points:
            if hp in latent_points:
                ext.committed_tokens()  # the record read fresh: the arrays are checked up to today's mark
                out[(hp, "indices")], out[(hp, "values")] = ext.latent_arrays(hp)
            else:
                out[hp] = ext.activations(hp)
        return out

    @staticmethod
    def _special_source(ext: "Extraction") -> np.ndarray | str | None:
        """"none" when the store's rows hold no special token (made with ``exclude_special=True``), None when
        the store has ``tokens/special`` (a row per token), else the tokenizer's special ids."""
        tokens = ext.store.group["tokens"]
        if "activation_offsets" in tokens:
            return "none"
        if "special" in tokens:
            return None
        return special_ids(ext.tokenizer)

    def _norm_factors(self, store: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{hook point: (shift, scale)} over one store's committed rows, a function of ``normalize`` and the data
        alone (never of what a cache holds): "mean_std" per feature (:func:`feature_moments`: feature_stats' own
        numbers, computed in one pass when they are not cached), "unit_norm" one factor from the scalar statistics
        in the metadata (the same mean squared norm, with no pass). With ``exclude_special`` on a store that holds
        special tokens, both come from the rows the loader yields (:func:`kept_moments`, one pass, cached)."""
        ext, limit, out = self.extractions[store], self.limits[store], {}
        for hp in self.hook_points:
            kept = kept_moments(ext, hp, limit, lambda a, b: self.special_mask(store, a, b)) \
                if self._special is not None and not isinstance(self._special[store], str) else None
            if self.normalize == "mean_std":
                mean, std = kept[:2] if kept else feature_moments(ext, hp, limit)
                shift, scale = mean, np.where(std > 0, std, 1.0)
            else:  # unit_norm: one factor, so that the mean squared L2 norm of a row is 1
                if kept:
                    mean_sq_norm = kept[2]
                else:
                    stats = ext.record.statistics.get(hp)
                    if stats is None or stats.mean is None:
                        raise InputError(f"extraction {ext.id} has no statistics for {hp} to normalize with: "
                                         "«pass normalize='mean_std'» (computed from the rows) or None")
                    mean_sq_norm = (float(stats.std) ** 2 + float(stats.mean) ** 2) * self.widths[hp]
                shift, scale = np.float64(0.0), np.float64(np.sqrt(mean_sq_norm) or 1.0)
            out[hp] = (np.asarray(shift, np.float32), np.asarray(scale, np.float32))
        return out

    def _norm_fingerprint(self) -> str | None:
        """A digest of the normalization constants in use (None without ``normalize``), recorded in every state."""
        if self._norm is None:
            return None
        digest = hashlib.sha256()
        for factors in self._norm:
            for hp in self.hook_points:
                for value in factors[hp]:
                    digest.update(np.ascontiguousarray(value, np.float32).tobytes())
        return digest.hexdigest()[:16]

    def settings(self) -> dict:
        """The settings that shape the order of an epoch and the values of its rows (recorded in every state)."""
        return {"seed": self.seed, "shuffle": self.shuffle, "batch_size": self.batch_size,
                "drop_last": self.drop_last, "exclude_special": self.exclude_special, "lanes": self.lanes,
                "slot_rows": self.slot_rows, "run_rows": list(self.run_rows), "rank": self.rank,
                "world_size": self.world_size, "even_batches": self.even_batches,
                "hook_points": list(self.hook_points), "normalize": self.normalize, "dtype": self.dtype,
                "norm_constants": self._norm_fingerprint()}

    def token_index(self, stores: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The tokens (index into ``tokens/*``) of activation ``rows`` of ``stores``: the rows themselves but in
        a store made with ``exclude_special=True`` (:meth:`Extraction.token_index`)."""
        tokens = rows.copy()
        for s in np.unique(stores).tolist():
            if self._row_tokens[s]:
                mine = stores == s
                tokens[mine] = self.extractions[s].token_index(rows[mine])
        return tokens

    # -- reading -------------------------------------------------------------------------------------
    def arrays(self, store: int) -> dict:
        """{hook point: checked array} of one store (opened once per process)."""
        if self._arrays is None:
            self._arrays = [self.store_arrays(e) for e in self.extractions]
        return self._arrays[store]

    def special_mask(self, store: int, start: int, stop: int) -> np.ndarray | None:
        """True where a token of ``[start, stop)`` is dropped by ``exclude_special`` (None: none is)."""
        if self._special is None or isinstance(self._special[store], str):
            return None
        if self._masks is None:
            self._masks = {}
        whole = self._masks.get(store)
        if whole is None and self.limits[store] <= MASK_BLOCK:  # a small store's mask: read once, kept
            whole = self._masks[store] = self._read_mask(store, 0, self.limits[store])
        return whole[start:stop] if whole is not None else self._read_mask(store, start, stop)

    def _read_mask(self, store: int, start: int, stop: int) -> np.ndarray:
        group = self.extractions[store].store.group["tokens"]
        special = self._special[store]
        if special is None:
            return np.asarray(group["special"][start:stop]).astype(bool)
        return np.isin(group["input_ids"][start:stop], special)

    def read(self, store: int, start: int, stop: int, keep_special: bool = False) -> tuple[np.ndarray, dict]:
        """Rows ``[start, stop)`` of one store: (row ids, {hook point: rows}), filtered and normalized."""
        rows = {hp: array[start:stop] for hp, array in self.arrays(store).items()}
        self.check_latents(store, start, rows)
        ids = np.arange(start, stop, dtype=np.int64) | (store << STORE_SHIFT)
        mask = None if keep_special else self.special_mask(store, start, stop)
        if mask is not None and mask.any():
            ids, rows = ids[~mask], {hp: r[~mask] for hp, r in rows.items()}
        if self._norm is not None:
            rows = {hp: (r.astype(np.float32) - self._norm[store][hp][0]) / self._norm[store][hp][1]
                    for hp, r in rows.items()}
        return ids, rows

    def check_latents(self, store: int, start: int, rows: dict) -> None:
        """StoreCorrupted when a latent index of ``rows`` (read from ``start``) is outside ``[0, d_sae)``: the
        writer puts 0 in empty slots, so any other index is damage (the checksums pass on values written through
        Zarr), and a top-k decoder would index past its weights."""
        for hp, d_sae in self.d_sae.items():
            what = latent_index_damage(rows[(hp, "indices")], d_sae, start)
            if what:
                raise StoreCorrupted(self.extractions[store].location, what,
                                     f"latents/{hp.removesuffix(LATENT_SUFFIX)}/indices")

    def kept_offsets(self, store: int, start: int, stop: int) -> np.ndarray:
        """Offsets (from ``start``) of the rows of ``[start, stop)`` an epoch yields."""
        mask = self.special_mask(store, start, stop)
        return np.arange(stop - start, dtype=np.int64) if mask is None else np.flatnonzero(~mask)

    def run_kept(self) -> np.ndarray:
        """Rows each run yields (its tokens, less the special ones with ``exclude_special``); counted once, the
        masks read in blocks of whole storage units (runs never cross one), so memory stays bounded."""
        if self._run_kept is None:
            kept = self.runs[:, 2] - self.runs[:, 1]
            for s, limit in enumerate(self.limits):
                if self.special_mask(s, 0, 0) is None:
                    continue
                unit = self.unit_rows[s]
                block = max(unit, MASK_BLOCK // unit * unit)
                mine = np.flatnonzero(self.runs[:, 0] == s)
                for a in range(0, limit, block):
                    b = min(a + block, limit)
                    cum = np.concatenate([[0], np.cumsum(~self.special_mask(s, a, b), dtype=np.int64)])
                    inside = mine[(self.runs[mine, 1] >= a) & (self.runs[mine, 2] <= b)]
                    kept[inside] = cum[self.runs[inside, 2] - a] - cum[self.runs[inside, 1] - a]
            self._run_kept = kept
        return self._run_kept

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next ``iter()`` plays (then it counts on: e, e+1, ...)."""
        if not _is_int(epoch) or not 0 <= epoch < MAX_EPOCH:
            raise InputError(f"«epoch={epoch!r}» must be a whole number >= 0")
        self.epoch = int(epoch)

    @property
    def n_chunks(self) -> int:
        """Chunks (of the first hook point) below the commit marks, all stores together."""
        return int(sum(-(-limit // rows) for limit, rows in zip(self.limits, self.chunk_rows)))

    @property
    def n_runs(self) -> int:
        return len(self.runs)

    # -- the plan of an epoch ------------------------------------------------------------------------
    def rank_rows(self) -> tuple[int, int, int]:
        """(first, stop, padded) kept rows of this rank in the epoch's permuted sequence; ``padded`` is 1 when
        the rank repeats one row so that every rank has the same count (``even_batches``, not ``drop_last``)."""
        total = int(self.run_kept().sum())
        q, rem = divmod(total, self.world_size)
        r = self.rank
        if self.even_batches and self.drop_last:
            return r * q, (r + 1) * q, 0
        first, stop = r * q + min(r, rem), (r + 1) * q + min(r + 1, rem)
        return first, stop, int(self.even_batches and rem > 0 and r >= rem)

    def worker_rows(self, worker: int, n_workers: int) -> tuple[int, int]:
        """(first, stop) of a worker within its rank's rows (padding included): whole batches each, the
        rank's last (partial) batch to the last worker."""
        first, stop, pad = self.rank_rows()
        rows = stop - first + pad
        n_batches = -(-rows // self.batch_size)
        a = worker * n_batches // n_workers * self.batch_size
        b = rows if worker == n_workers - 1 else (worker + 1) * n_batches // n_workers * self.batch_size
        return min(a, rows), min(b, rows)

    def batches_of(self, rows: int) -> int:
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def plan(self, epoch: int, worker: int = 0, n_workers: int = 1) -> "Plan":
        """The pieces one worker of this rank plays in ``epoch``, in order (the last one asked is kept)."""
        key = (epoch, worker, n_workers)
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = (key, self._make_plan(epoch, worker, n_workers))
        return self._plan_cache[1]

    def _make_plan(self, epoch: int, worker: int, n_workers: int) -> "Plan":
        kept = self.run_kept()
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.runs)) if self.shuffle \
            else np.arange(len(self.runs))
        pieces = np.column_stack([self.runs[order], kept[order]])
        first, stop, pad = self.rank_rows()
        mine = self._cut(pieces, first, stop)
        if pad:
            mine = np.concatenate([mine, self._cut(mine if len(mine) else pieces, 0, 1)])
        a, b = self.worker_rows(worker, n_workers)
        mine = self._cut(mine, a, b)
        mine = mine[mine[:, 2] > mine[:, 1]]
        return Plan(mine, self.batches_of(int(mine[:, 3].sum())))

    def _cut(self, pieces: np.ndarray, first: int, stop: int) -> np.ndarray:
        """The parts of ``pieces`` (rows: store, start, stop, kept) holding kept rows ``[first, stop)`` of their
        concatenation; a piece cut inside is split at a kept row (its mask read)."""
        if stop <= first or not len(pieces):
            return pieces[:0]
        ends = np.cumsum(pieces[:, 3])
        starts = ends - pieces[:, 3]
        i, j = int(np.searchsorted(ends, first, "right")), int(np.searchsorted(starts, stop, "left"))
        out = pieces[i:j].copy()
        if not len(out):
            return out
        lo, hi = int(first - starts[i]), int(min(stop - starts[j - 1], pieces[j - 1, 3]))
        if len(out) == 1:
            out[0] = self._trim(out[0], lo, hi)
        else:
            out[0], out[-1] = self._trim(out[0], lo, int(out[0, 3])), self._trim(out[-1], 0, hi)
        return out

    def _trim(self, piece: np.ndarray, lo: int, hi: int) -> tuple[int, int, int, int]:
        """The part of a piece holding its kept rows ``[lo, hi)``."""
        s, a, b, k = (int(x) for x in piece)
        if lo == 0 and hi == k:
            return s, a, b, k
        offsets = self.kept_offsets(s, a, b)
        new_a = a + int(offsets[lo]) if lo > 0 else a
        new_b = a + int(offsets[hi - 1]) + 1 if hi < k else b
        return s, new_a, max(new_a, new_b), hi - lo

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        epoch, self.epoch = self.epoch, self.epoch + 1
        info = get_worker_info()
        if info is None and self.num_workers > 0:
            return _WorkerPool(self, epoch)
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        it = LoaderIterator(self, epoch, worker, n_workers, to_device=info is None)
        if self._resume_skip.get(worker):
            it.seek(self._resume_skip[worker])
        if info is not None:
            return _Tagged(it, worker if self._tag_worker else None)
        return it

    # Stores are reopened by location in a spawned worker (a forked one inherits them).
    def __getstate__(self) -> dict:
        state = {**self.__dict__, "_spare_pool": None, "_arrays": None, "_plan_cache": None,
                 "_masks": None}
        state["extractions"] = [(type(ext), ext.location, ext.store.storage_options) for ext in self.extractions]
        return state

    def __setstate__(self, state: dict) -> None:
        state["extractions"] = [cls.open(loc, opts) for cls, loc, opts in state["extractions"]]
        self.__dict__.update(state)


class Plan:
    """One worker's pieces of an epoch: ``pieces[i] = (store, start, stop, kept rows)``, and its batch count."""

    def __init__(self, pieces: np.ndarray, n_batches: int):
        self.pieces, self.n_batches = pieces, n_batches
        self.rows = int(pieces[:, 3].sum())

    def __len__(self) -> int:
        return len(self.pieces)


class _Reader:
    """Background threads reading the plan's pieces, in order, into free slots of the buffer.

    A thread claims the next piece only while fewer than ``read_ahead`` pieces are read ahead of the consumer
    and a slot is free; results are handed over by piece index, so the consumer sees them in plan order
    whatever thread read them. Holds no reference to the iterator (it is garbage collected, then stops us)."""

    def __init__(self, loader: ActivationLoader, plan: Plan, pool: dict, pool_ids: np.ndarray, free: list[int],
                 first: int, seeds: list[int]):
        self.loader, self.plan, self.pool, self.pool_ids, self.free = loader, plan, pool, pool_ids, free
        self.seeds = seeds
        self.cond = threading.Condition()
        self.claim = self.consumed = first
        self.results: dict[int, Any] = {}
        self.stopped = False
        n = min(READ_THREADS, max(0, len(plan) - first))
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"mistudio-loader-{i}")
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopped and self.claim < len(self.plan) and (
                        self.claim >= self.consumed + self.loader.read_ahead or not self.free):
                    self.cond.wait()
                if self.stopped or self.claim >= len(self.plan):
                    return
                i, slot = self.claim, self.free.pop()
                self.claim += 1
            try:
                item: Any = read_piece(self.loader, self.plan.pieces[i], slot, self.pool, self.pool_ids,
                                       self.seeds + [i])
            except BaseException as exc:  # noqa: BLE001 - raised in the consumer
                item = exc
                with self.cond:
                    self.free.append(slot)
            with self.cond:
                self.results[i] = item
                self.cond.notify_all()

    def get(self, i: int, starved=None) -> tuple[int, np.ndarray]:
        """Piece ``i`` (slot, buffer rows in play order). While it cannot be read for want of a free slot,
        ``starved()`` is called (outside the lock): the consumer frees the slots it no longer needs."""
        while True:
            with self.cond:
                while i not in self.results and (starved is None or self.free or self.claim > i):
                    self.cond.wait()
                if i in self.results:
                    break
            starved()
            starved = None
        with self.cond:
            item = self.results.pop(i)
            self.consumed = i + 1
            self.cond.notify_all()
        if isinstance(item, BaseException):
            self.stop()
            raise item
        return item

    def release(self, slots: list[int]) -> None:
        with self.cond:
            self.free.extend(slots)
            self.cond.notify_all()

    def stop(self, wait: bool = True) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if wait:  # a thread may be writing slot rows: let it finish before they are reused
            for t in self.threads:
                t.join()


def read_piece(loader: ActivationLoader, piece: np.ndarray, slot: int, pool: dict, pool_ids: np.ndarray,
               seed: list[int]) -> tuple[int, np.ndarray]:
    """Read one piece into its slot; return (slot, buffer rows of its kept rows in the order the lane plays)."""
    s, a, b, k = (int(x) for x in piece)
    base = slot * loader.slot_rows
    for key, array in loader.arrays(s).items():
        target = pool[key][base:base + b - a]
        if target.shape[1] == array.shape[1]:
            array.read_into(target, a, b)
        else:  # a store with fewer latents a token than another: its other slots are empty (index 0, value 0)
            target[:, :array.shape[1]] = array[a:b]
            target[:, array.shape[1]:] = 0
    loader.check_latents(s, a, {key: pool[key][base:base + b - a] for key in pool})
    pool_ids[base:base + b - a] = np.arange(a, b, dtype=np.int64) | (s << STORE_SHIFT)
    offsets = loader.kept_offsets(s, a, b)
    if len(offsets) != k:
        raise RuntimeError(f"rows {a}-{b} of store {loader.extractions[s].id} keep {len(offsets)} tokens, the plan "
                           f"counted {k}: its special-token mask changed while the loader was running")
    if loader.shuffle:
        offsets = offsets[np.random.default_rng(seed).permutation(k)]
    return slot, offsets + base


class LoaderIterator:
    """One epoch of one worker's share of this rank. ``state_dict()`` / ``load_state_dict()`` resume it exactly."""

    def __init__(self, loader: ActivationLoader, epoch: int, worker: int = 0, n_workers: int = 1,
                 to_device: bool = True):
        self.loader, self.to_device = loader, to_device
        self.torch_dtype = getattr(torch, loader.dtype)
        self.capacity = loader.slots * loader.slot_rows
        self.pool: dict | None = None
        self.pool_ids = np.empty(self.capacity, np.int64)
        self.peak_rows = 0  # the most rows the lanes ever held
        self._reader: _Reader | None = None
        self._start(epoch, worker, n_workers)

    def _buffer(self) -> dict:
        """{buffer key: (slots x run rows, stored width)}: the last finished epoch's when it fits (no page faults).
        A latent hook point's rows are its fixed-width (indices, values), never d_sae wide."""
        loader = self.loader
        shapes = {key: ((self.capacity, d), np.result_type(*(loader.arrays(s)[key].dtype
                                                             for s in range(len(loader.extractions)))))
                  for key, d in loader.row_widths.items()}
        spare, loader._spare_pool = loader._spare_pool, None
        if spare is None or {hp: (a.shape, a.dtype) for hp, a in spare.items()} != shapes:
            spare = {hp: np.empty(shape, dtype) for hp, (shape, dtype) in shapes.items()}
        return spare

    def _start(self, epoch: int, worker: int, n_workers: int) -> None:
        self._stop_reader()
        if self.pool is None:
            self.pool = self._buffer()
        self.epoch, self.worker, self.n_workers = epoch, worker, n_workers
        self.plan = self.loader.plan(epoch, worker, n_workers)
        lanes = self.loader.lanes
        self.lane_piece = np.full(lanes, -1, np.int64)
        self.lane_k0 = np.zeros(lanes, np.int64)
        self.lane_m = np.zeros(lanes, np.int64)
        self.lane_slot = np.full(lanes, -1, np.int64)
        self.alive = np.ones(lanes, bool)
        self.orders = np.zeros((lanes, self.loader.slot_rows), np.int64)
        # Lane j starts (lanes - 1 - j) / lanes of a run early (negative levels), so that the lanes run out one
        # after another, a run's worth of rows apart, and ask for their next pieces at the rate they are read.
        start = [-((lanes - 1 - j) * self.loader.slot_rows // lanes) for j in range(lanes)]
        self.lane_k0[:] = start
        self._ends = [(k * lanes + j, j) for j, k in enumerate(start)]  # heap of (key after a lane's rows, lane)
        heapq.heapify(self._ends)
        self.cursor = self._ends[0][0]  # stream key of the next row: level * lanes + lane
        self._active: list[int] = []  # lanes holding a piece, in order
        self._active_array = np.zeros(0, np.int64)
        self.next_piece = 0
        self.rows = 0  # rows yielded
        self.batches = 0
        self._free = list(range(self.loader.slots))[::-1]
        self._pending: list[int] = []  # slots of finished pieces, freed once their rows are gathered

    @property
    def seeds(self) -> list[int]:
        return [self.loader.seed, self.epoch, self.loader.rank, self.worker, 1]

    # -- the lane schedule -------------------------------------------------------------------------------
    def _advance(self, need: int, out: np.ndarray | None, flush) -> int:
        """Move the stream ``need`` rows on; with ``out``, write their buffer rows there (in stream order) and
        take the pieces' data from the reader, else only count (a replay: piece sizes from the plan)."""
        lanes, done, heap = self.loader.lanes, 0, self._ends
        while done < need and heap:
            e = heap[0][0]  # the first stream key where a lane has no row: it takes the next piece there
            if e <= self.cursor:
                _, lane = heapq.heappop(heap)
                self._refill(lane, e // lanes, out is not None, flush, done)
                continue
            active, a = self._active, len(self._active)  # each of them has rows at every key in [cursor, e)
            if not a:  # no lane has started yet: nothing before e
                self.cursor = e
                continue
            level, at = divmod(self.cursor, lanes)
            i0 = bisect.bisect_left(active, at)
            window = (e // lanes - level) * a + bisect.bisect_left(active, e % lanes) - i0
            t = min(need - done, window)
            idx = np.arange(i0, i0 + t)
            lv, ln = level + idx // a, self._active_array[idx % a]
            if out is not None:
                out[done:done + t] = self.orders[ln, lv - self.lane_k0[ln]]
            done += t
            self.cursor = e if t == window else int(lv[-1]) * lanes + int(ln[-1]) + 1
        return done

    def _refill(self, lane: int, level: int, with_data: bool, flush, done: int) -> None:
        if with_data and self.lane_slot[lane] >= 0:
            self._pending.append(int(self.lane_slot[lane]))
            self.lane_slot[lane] = -1
        if self.next_piece >= len(self.plan):  # the lane is done for this epoch
            self.alive[lane] = False
            if lane in self._active:
                self._active.remove(lane)
                self._active_array = np.array(self._active, np.int64)
            return
        if lane not in self._active:  # its first piece: the lane joins the round-robin
            bisect.insort(self._active, lane)
            self._active_array = np.array(self._active, np.int64)
        i = self.next_piece
        self.next_piece += 1
        m = int(self.plan.pieces[i, 3])
        self.lane_piece[lane], self.lane_k0[lane], self.lane_m[lane] = i, level, m
        heapq.heappush(self._ends, ((level + m) * self.loader.lanes + lane, lane))
        if with_data:
            if self._reader is None:
                self._reader = _Reader(self.loader, self.plan, self.pool, self.pool_ids, self._free, i, self.seeds)
            # gather what this batch has so far and free those slots, if the reader waits for one
            slot, order = self._reader.get(i, (lambda: flush(done)) if self._pending else None)
            self._load_lane(lane, slot, order)

    def _load_lane(self, lane: int, slot: int, order: np.ndarray) -> None:
        self.lane_slot[lane] = slot
        self.orders[lane, :len(order)] = order
        self.peak_rows = max(self.peak_rows, int(np.sum(self.lane_m[self.lane_slot >= 0])))

    # -- reader ----------------------------------------------------------------------------------------
    def _stop_reader(self, wait: bool = True) -> None:
        if self._reader is not None:
            self._reader.stop(wait)
            self._reader = None

    def _release(self) -> None:
        """End of epoch: stop reading and hand the buffer to the loader's next epoch."""
        self._stop_reader()
        if self.pool is not None:
            self.loader._spare_pool, self.pool = self.pool, None

    def close(self) -> None:
        """Stop reading ahead (also done when the iterator is garbage collected)."""
        self._stop_reader()

    def __del__(self) -> None:
        self._stop_reader(wait=False)

    # -- iteration ---------------------------------------------------------------------------------------
    def __iter__(self) -> "LoaderIterator":
        return self

    def __next__(self):
        try:
            return self._next()
        except StopIteration:
            raise
        except Exception:  # the epoch ends here: a later next() stops, never waits on the reader that stopped
            self._stop_reader()
            self.pool = None
            raise

    def _next(self):
        left = self.plan.rows - self.rows
        if self.batches >= self.plan.n_batches or left <= 0 or self.pool is None:
            self._release()
            raise StopIteration
        take = min(self.loader.batch_size, left)
        positions = np.empty(take, np.int64)
        out = {hp: np.empty((take, p.shape[1]), p.dtype) for hp, p in self.pool.items()}
        ids = np.empty(take, np.int64)
        gathered = [0]

        def flush(upto: int) -> None:
            lo = gathered[0]
            if upto > lo:
                for hp, p in self.pool.items():
                    np.take(p, positions[lo:upto], axis=0, out=out[hp][lo:upto], mode="clip")
                ids[lo:upto] = self.pool_ids[positions[lo:upto]]
                gathered[0] = upto
            if self._pending:
                if self._reader is not None:
                    self._reader.release(self._pending)
                else:  # resumed, and no piece read since: the slots are ours alone
                    self._free.extend(self._pending)
                self._pending = []

        got = self._advance(take, positions, flush)
        if got != take:
            raise RuntimeError(f"the loader's plan promised {take} more rows, its lanes held {got}")
        flush(take)
        self.rows += take
        self.batches += 1
        return self._to_batch(ids, out)

    def _to_batch(self, ids: np.ndarray, rows: dict[str, np.ndarray]):
        loader = self.loader
        if loader._norm is not None:
            stores = ids >> STORE_SHIFT
            for hp in rows:
                r = rows[hp] = rows[hp].astype(np.float32, copy=False)
                for s in (np.unique(stores).tolist() if len(loader.extractions) > 1 else [0]):
                    shift, scale = loader._norm[s][hp]
                    if len(loader.extractions) == 1:
                        np.subtract(r, shift, out=r)
                        np.divide(r, scale, out=r)
                    else:
                        mine = stores == s
                        r[mine] = (r[mine] - shift) / scale
        device = loader.device if self.to_device else "cpu"
        tensors = {hp: latent_batch(rows[(hp, "indices")], rows[(hp, "values")], loader.d_sae[hp],
                                    loader.latent_form, self.torch_dtype, device) if hp in loader.d_sae
                   else as_tensor(rows[hp], self.torch_dtype, device) for hp in loader.hook_points}
        if loader.with_index:
            stores, rows_of = ids >> STORE_SHIFT, ids & ((1 << STORE_SHIFT) - 1)
            tensors["store"], tensors["row"] = torch.from_numpy(stores), torch.from_numpy(rows_of)
            tensors["token_index"] = torch.from_numpy(loader.token_index(stores, rows_of))
            return tensors
        return tensors[loader.hook_points[0]] if loader.single else tensors

    # -- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where this epoch stands: stores, settings, epoch, batches yielded (a few hundred bytes)."""
        return {"format": STATE_FORMAT, "stores": copy.deepcopy(self.loader.identity),
                "settings": {**self.loader.settings(), "worker": self.worker, "n_workers": self.n_workers},
                "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken; InputError (naming the field) if it does not fit here."""
        expected = {**self.loader.settings(), "worker": self.worker, "n_workers": self.n_workers}
        epoch, batches = check_state(state, self.loader, expected, lambda e: self.loader.plan(
            e, self.worker, self.n_workers).n_batches)
        self._start(epoch, self.worker, self.n_workers)
        self.loader.epoch = max(self.loader.epoch, epoch + 1)
        self.seek(batches)

    def seek(self, batches: int) -> None:
        """Skip the first ``batches`` batches of this epoch: replay the lane schedule, then read the pieces the
        lanes hold (nothing else is read)."""
        rows = min(self.plan.rows, batches * self.loader.batch_size)
        if self._advance(rows, None, None) != rows:
            raise RuntimeError(f"replaying the plan gave fewer than {rows} rows")
        self.rows, self.batches = rows, batches
        for lane in np.flatnonzero(self.alive & (self.lane_piece >= 0)).tolist():
            slot = self._free.pop()
            i = int(self.lane_piece[lane])
            _, order = read_piece(self.loader, self.plan.pieces[i], slot, self.pool, self.pool_ids,
                                  self.seeds + [i])
            self._load_lane(lane, slot, order)


class _Tagged:
    """An iterator in a DataLoader worker process: its batches carry the worker's id (for :class:`_WorkerPool`'s
    ordering) unless ``worker`` is None, and damage reaches the main process as StoreCorrupted."""

    def __init__(self, it: LoaderIterator, worker: int | None):
        self.it, self.worker = it, worker

    def __iter__(self) -> "_Tagged":
        return self

    def __next__(self):
        batch = next(self.it)  # a StoreCorrupted reaches the main process rebuilt from its message
        return batch if self.worker is None else (self.worker, batch)


class _WorkerPool:
    """One epoch over ``num_workers`` DataLoader worker processes, each reading its own share of this rank.

    Batches come out round-robin over the workers (worker 0, 1, ..., skipping those done), whatever order the
    processes deliver them in; so the merged order is fixed by ``(seed, epoch)`` and a state is the count of
    batches yielded."""

    def __init__(self, loader: ActivationLoader, epoch: int):
        self.loader, self.epoch, self.device = loader, epoch, loader.device
        self.n_workers = loader.num_workers
        self.batches = 0
        self._it: Iterator | None = None
        self._plan_counts()

    def _plan_counts(self) -> None:
        self.per_worker = [self.loader.batches_of(b - a) for a, b in
                           (self.loader.worker_rows(w, self.n_workers) for w in range(self.n_workers))]
        self.total = sum(self.per_worker)

    def _schedule(self) -> tuple[dict[int, int], Iterator[int]]:
        """({worker: batches it already yielded}, the worker of each batch from ``self.batches`` on):
        round-robin over the workers, skipping those that are done."""
        counts = np.array(self.per_worker, np.int64)
        rounds = int(counts.max(initial=0))
        k, done, r = self.batches, np.zeros(self.n_workers, np.int64), 0
        first: list[int] = []
        while r < rounds:  # whole rounds before position k, then part of one
            active = np.flatnonzero(counts > r)
            if k < len(active):
                done[active[:k]] += 1
                first = active[k:].tolist()
                r += 1
                break
            done[active] += 1
            k -= len(active)
            r += 1

        def order() -> Iterator[int]:
            yield from first
            for later in range(r, rounds):
                yield from np.flatnonzero(counts > later).tolist()
        return {w: int(d) for w, d in enumerate(done)}, order()

    def _open(self) -> None:
        skip, order = self._schedule()
        worker_copy = copy.copy(self.loader)
        worker_copy.num_workers, worker_copy.epoch, worker_copy._spare_pool = 0, self.epoch, None
        worker_copy._resume_skip, worker_copy._tag_worker = skip, True
        self._order_it, self._stash = order, {w: [] for w in range(self.n_workers)}
        self._it = iter(DataLoader(worker_copy, batch_size=None, num_workers=self.n_workers,
                                   pin_memory=str(self.device).startswith("cuda")))

    def __iter__(self) -> "_WorkerPool":
        return self

    def __next__(self):
        if self._it is None:
            self._open()
        want = next(self._order_it, None)
        if want is None:
            raise StopIteration
        while not self._stash[want]:
            try:
                worker, batch = next(self._it)
            except StoreCorrupted as exc:  # torch rebuilt it from its worker's traceback: keep the message
                self.close()
                said = [line for line in str(exc).splitlines() if line.startswith("mistudio.errors.StoreCorrupted: ")]
                raise StoreCorrupted(said[-1].split(": ", 1)[1] if said else str(exc)) from None
            except Exception:
                self.close()
                raise
            self._stash[worker].append(batch)
        batch = self._stash[want].pop(0)
        self.batches += 1
        if isinstance(batch, dict):
            return {k: _moved(v, self.device) if k not in INDEX_KEYS else v for k, v in batch.items()}
        return _moved(batch, self.device)

    def state_dict(self) -> dict:
        """Where this epoch stands (as :meth:`LoaderIterator.state_dict`, for all workers together)."""
        return {"format": STATE_FORMAT, "stores": copy.deepcopy(self.loader.identity),
                "settings": {**self.loader.settings(), "worker": None, "n_workers": self.n_workers},
                "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (call before the first batch)."""
        expected = {**self.loader.settings(), "worker": None, "n_workers": self.n_workers}
        epoch, batches = check_state(state, self.loader, expected, lambda e: self.total)
        self.epoch, self.batches, self._it = epoch, batches, None
        self.loader.epoch = max(self.loader.epoch, epoch + 1)

    def close(self) -> None:
        """Stop the worker processes now (left to the garbage collector after an error, torch waited 5 s for
        each of them)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's own, as its __del__ calls it
        if shutdown is not None:
            shutdown()


def _moved(value: Any, device: str) -> Any:
    """A batch's tensor on ``device``; a latent (indices, values) pair (a list after a DataLoader) as a tuple."""
    if isinstance(value, (list, tuple)):
        return tuple(v.to(device) for v in value)
    return value.to(device)


_WIDER = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def as_tensor(rows: np.ndarray, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Host rows as a ``dtype`` tensor on ``device``. Widened to float32/float64 for the CPU by numpy: exact, and
    several times faster there than torch's float16/bfloat16 conversion (4096 x 384 float16: 2.6 ms, 10.5 ms)."""
    wider = _WIDER.get(dtype)
    if wider is not None and rows.dtype != wider and torch.device(device).type == "cpu":
        return torch.from_numpy(rows.astype(wider))
    return tensor_of(rows).to(device=device, dtype=dtype)


def latent_index_damage(indices: np.ndarray, d_sae: int, start: int) -> str | None:
    """What is wrong with stored latent indices (rows from ``start``) outside ``[0, d_sae)``, else None."""
    if not indices.size:
        return None
    low, high = int(indices.min()), int(indices.max())
    if 0 <= low and high < d_sae:
        return None
    bad = high if high >= d_sae else low
    row = start + int(np.argmax((indices == bad).any(axis=1)))
    return f"a latent index {bad} is {'past the SAE' if bad >= 0 else 'below 0, outside the SAE'}'s {d_sae} latents " \
           f"(row {row})"


def latent_batch(indices: np.ndarray, values: np.ndarray, d_sae: int, form: str, dtype: torch.dtype,
                 device: str) -> Any:
    """A batch of SAE latents from its fixed-width rows (``(batch, width)`` indices and values; a 0 value is an
    empty slot, index 0): ``"sparse"`` a ``torch.sparse_csr_tensor`` (batch, d_sae) whose rows hold their fired
    latents by ascending index, ``"dense"`` a (batch, d_sae) tensor (filled on ``device``: only the fixed-width
    rows travel), ``"fixed"`` the (indices as int64, values) pair of (batch, width) tensors."""
    if form == "fixed":
        return torch.from_numpy(indices.astype(np.int64)).to(device), as_tensor(values, dtype, device)
    fired = values != 0
    n, width = indices.shape
    if form == "dense":
        rows, slots = np.nonzero(fired)
        out = torch.zeros((n, d_sae), dtype=dtype, device=device)
        where = (torch.from_numpy(rows).to(device), torch.from_numpy(indices[rows, slots].astype(np.int64)).to(device))
        out[where] = as_tensor(values[rows, slots], dtype, device)
        return out
    key = np.where(fired, indices.astype(np.int64), d_sae)  # empty slots sort last
    order = np.argsort(key, axis=1)  # fired latents are distinct; the empty slots' order does not matter
    counts = fired.sum(axis=1)
    keep = np.arange(width) < counts[:, None]
    columns = np.take_along_axis(key, order, axis=1)[keep]
    picked = np.take_along_axis(values, order, axis=1)[keep]
    crow = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" is for torch's users, not ours
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(columns),
                                       as_tensor(picked, dtype, "cpu"), size=(n, d_sae),
                                       check_invariants=False).to(device)  # built valid: sorted, in range


# -- states ---------------------------------------------------------------------------------------------
def check_state(state: Any, loader: ActivationLoader, expected: dict, n_batches) -> tuple[int, int]:
    """(epoch, batches) of a state, after checking every field (type, range, consistency) against this loader
    and its stores; InputError naming the first field that does not fit. Nothing is read or allocated before
    it passes (``n_batches(epoch)`` plans that epoch once the rest is known to fit)."""
    def fail(what: str) -> InputError:
        return InputError(f"this loader state cannot be resumed here: {what}", param="state")

    if not isinstance(state, dict):
        raise fail(f"it is {_short(state)} (a {type(state).__name__}), not the dict state_dict() returns")
    keys = {"format", "stores", "settings", "epoch", "batches"}
    if set(state) != keys:
        old = "; it is a state of the earlier loader (mistudio < loader/2): start the epoch again" \
            if "next_chunk" in state else ""
        raise fail(f"its keys are {_short(sorted(map(str, state)))}, not {sorted(keys)}{old}")
    if not _same(state["format"], STATE_FORMAT):
        raise fail(f"state['format'] is {_short(state['format'])}, not {STATE_FORMAT!r}")
    stores = state["stores"]
    if type(stores) is not list or len(stores) != len(loader.identity):
        raise fail(f"state['stores'] is {_short(stores)}, not a list of {len(loader.identity)} store(s) as this "
                   "loader reads")
    for i, (got, want) in enumerate(zip(stores, loader.identity)):
        if type(got) is not dict or set(got) != set(want):
            raise fail(f"state['stores'][{i}] is {_short(got)}, not a dict with keys {sorted(want)}")
        for key, value in want.items():
            if not _same(got[key], value):
                what = {"id": "another store", "nonce": "another store (replaced since, at the same place)",
                        "committed": "this store at another commit mark"}[key]
                raise fail(f"state['stores'][{i}]['{key}'] is {_short(got[key])}: it was taken over {what}; this "
                           f"loader reads {key}={value!r} (resume over the same stores, committed to the same rows)")
    settings = state["settings"]
    # a state taken before VALUE_SETTINGS were recorded has the others: those are checked
    older = {key: value for key, value in expected.items() if key not in VALUE_SETTINGS}
    if type(settings) is not dict or set(settings) not in (set(expected), set(older)):
        raise fail(f"state['settings'] is {_short(settings)}, not a dict with keys {sorted(expected)}")
    for key, value in (expected if set(settings) == set(expected) else older).items():
        got = settings[key]
        if _same(got, value):
            continue
        if key == "norm_constants":
            raise fail(f"it was taken with other normalization constants (fingerprint {_short(got)}, here "
                       f"{value!r}) over the same stores: the statistics they come from changed (the store's "
                       "metadata or analysis/ cache was rewritten); resuming would scale its rows otherwise: start "
                       "the epoch again, or «pass normalize=None» to both")
        if key in ("hook_points", "normalize", "dtype"):
            raise fail(f"it was taken with «{key}={_short(got)}», this loader has {key}={value!r} (its batches "
                       f"would hold other values): make the loader with «{key}={_short(got)}»")
        if key in ("worker", "n_workers"):
            raise fail(f"it was taken by {_reader(settings['worker'], settings['n_workers'])}, this is "
                       f"{_reader(expected['worker'], expected['n_workers'])}: resume with the num_workers it was "
                       "taken with")
        if type(got) is not type(value) or type(value) is list:
            raise fail(f"state['settings']['{key}'] is {_short(got)}, this loader has {key}={value!r}" + (
                " (lanes and their rows follow from buffer_tokens, run_mb and the stores' chunks: make the loader "
                "with those the state was taken with)" if key in ("lanes", "slot_rows", "run_rows") else ""))
        if key in ("lanes", "slot_rows"):
            raise fail(f"it was taken with {key}={got}, this loader has {key}={value} (they follow from "
                       "«buffer_tokens» and «run_mb»: make the loader with those the state was taken with)")
        raise fail(f"it was taken with «{key}={got!r}», this loader has {key}={value!r}: make the loader with "
                   f"«{key}={got!r}»")
    epoch, batches = state["epoch"], state["batches"]
    if not _is_int(epoch) or not 0 <= epoch < MAX_EPOCH:
        raise fail(f"state['epoch'] is {_short(epoch)}, not a whole number in [0, 2**62)")
    if not _is_int(batches) or not 0 <= batches < MAX_EPOCH:
        raise fail(f"state['batches'] is {_short(batches)}, not a whole number >= 0")
    total = n_batches(int(epoch))
    if batches > total:
        raise fail(f"state['batches'] is {batches}, but epoch {epoch} has {total} batches here")
    return int(epoch), int(batches)


def _reader(worker: Any, n_workers: Any) -> str:
    """Who reads an epoch, as a state records it (``worker`` None: all of a loader's ``num_workers`` together)."""
    if worker is None:
        return f"a loader made with num_workers={n_workers!r} (its workers together)"
    if n_workers == 1:
        return "a loader made with num_workers=0 (in one process)"
    return f"worker {worker!r} of {n_workers!r} of a torch DataLoader"


def _same(got: Any, want: Any) -> bool:
    """``got`` equals ``want`` and has its types all the way down (plain Python values only)."""
    if type(got) is not type(want):
        return False
    if isinstance(want, list):
        return len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want))
    return got == want


def _short(value: Any) -> str:
    """A bounded repr (a state may hold anything, of any size)."""
    try:
        return _REPR.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int too long to print
        return f"<a {type(value).__name__}>"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _resolve_rank(rank: Any, world_size: Any) -> tuple[int, int]:
    """(rank, world size): the given ones, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None and world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
        return 0, 1
    if rank is None or world_size is None:
        raise InputError(f"pass both «rank={rank!r}» and «world_size={world_size!r}», or neither (then they come "
                         "from torch.distributed when it is initialised)")
    if not _is_int(world_size) or world_size < 1:
        raise InputError(f"«world_size={world_size!r}» must be a whole number >= 1")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise InputError(f"«rank={rank!r}» must be a whole number in [0, world_size={world_size})")
    return int(rank), int(world_size)


def _runs(store: int, limit: int, unit: int, run: int) -> np.ndarray:
    """Rows (store, start, stop) of a store's runs below ``limit``: ``run`` rows each, never across a unit."""
    starts = (np.arange(0, limit, unit, dtype=np.int64)[:, None] + np.arange(0, unit, run, dtype=np.int64)).ravel()
    starts = starts[starts < limit]
    stops = np.minimum(np.minimum(starts + run, (starts // unit + 1) * unit), limit)
    return np.column_stack([np.full(len(starts), store, np.int64), starts, stops])


def _run_rows(arr: Any, run_mb: float) -> int:
    """Rows read in one run: a chunk of an unsharded array; adjacent chunks of a shard up to ``run_mb``."""
    chunk = int(arr.chunks[0])
    if arr.shards is None:
        return chunk
    row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    per_run = max(1, int(run_mb * 2**20 // max(1, chunk * row_bytes)))
    return chunk * min(per_run, int(arr.shards[0]) // chunk)


def loader(extractions: "Extraction | Sequence[Extraction]", hook_points: str | Sequence[str],
           batch_size: int = 4096, shuffle: bool = True, seed: int = 0, exclude_special: bool = False,
           dtype: str = "float32", device: str = "cpu", drop_last: bool = False, num_workers: int = 0,
           buffer_tokens: int | None = None, normalize: str | None = None, with_index: bool = False,
           prefetch: int = 2, rank: int | None = None, world_size: int | None = None, even_batches: bool = True,
           run_mb: float = RUN_MB, latents: str = "sparse") -> ActivationLoader:
    """A training loader over one or several extractions (same hook points and widths).

    Yields ``(batch, d)`` tensors for one hook point, dicts {hook point: tensor} for a list (plus, with
    ``with_index=True``, ``store``, ``row``: the activation row, and ``token_index``: its token, the index into
    ``tokens/*``, another number than ``row`` in a store made with ``exclude_special=True``). Every committed row
    exactly once per epoch over all ranks and workers; order fixed by ``(seed, epoch)``: each ``iter()`` plays the
    next epoch, ``set_epoch(e)`` picks one.

    - ``shuffle``: runs (a chunk, or up to ``run_mb`` MB of adjacent chunks of a shard, read sequentially) in a
      random order, played through lanes holding ``buffer_tokens`` rows together (default: max(8 batches,
      16 runs)); each batch takes an equal share of random rows from every lane (see the module docstring).
      ``shuffle=False``: stored order. ``prefetch``: batches' worth of runs read ahead (at least 2 runs).
    - ``rank`` / ``world_size`` (default: torch.distributed's when initialised, else 0 / 1): each rank gets a
      contiguous share of the epoch's permuted rows, row counts differing by at most one. ``even_batches``
      (default True) makes every rank yield the same number of equally sized batches, as DistributedSampler
      does: with ``drop_last`` each rank takes ``total // world_size`` rows (the last ``total % world_size``
      rows of the epoch's order are skipped this epoch), without it the ranks short of one row repeat their
      first row. ``even_batches=False``: every row exactly once, batch counts may differ by one.
    - ``num_workers > 0`` reads in DataLoader worker processes, each a contiguous share of whole batches of
      its rank; batches come out round-robin over the workers, so the order does not depend on timing. In
      your own ``DataLoader(loader, batch_size=None, ...)`` call ``set_epoch`` every epoch.
    - ``exclude_special`` drops the tokenizer's special tokens (``tokens/special`` when the store has it).
    - ``normalize``: ``"mean_std"`` = (x - mean) / std per feature over every committed token (the mean and std of
      :meth:`Extraction.feature_stats`, each store its own: its cache when there is one, else one pass when the loader
      is made, then cached; the same numbers either way); ``"unit_norm"`` = x divided by one dataset-wide factor (from
      the scalar statistics in the metadata) so that the mean squared L2 norm of a row is 1. With ``exclude_special``
      both come from the rows yielded, special tokens left out (one pass, then cached). Stores of different storage
      dtypes load together; each row is exact, then cast to ``dtype``.
    - ``iter(loader).state_dict()`` / ``load_state_dict(state)`` resume mid-epoch exactly (in-process or with
      workers); a state from other stores, commit marks or settings (hook points, ``normalize`` and its
      constants, ``dtype`` included) raises InputError naming the field.
    - In-progress stores are read up to their commit mark when the loader is made.
    - SAE latents: a hook point ``"<hook point>.latents"`` (see :attr:`Extraction.latent_points`; alone or in a
      list with raw hook points, whose rows it matches token for token) yields, per ``latents``: ``"sparse"``
      (default) a ``torch.sparse_csr_tensor`` (batch, d_sae) of ``dtype``; ``"dense"`` a (batch, d_sae) tensor;
      ``"fixed"`` the stored (indices, values) pair of (batch, width) tensors (indices int64, an empty slot is
      index 0 with value 0: what a top-k decoder takes). The buffer holds the fixed-width rows, so its memory
      is bound by the width, never by d_sae. ``normalize`` does not apply to latents (InputError); a latent
      index outside the SAE raises StoreCorrupted. Through your own ``DataLoader`` the pair comes as a list.
      The first hook point's chunks cut the runs: in a mixed list put the latents first (their chunks hold more
      rows, so no chunk is read twice; 1.25x the rows/s of the raw hook point first, measured).
    """
    return ActivationLoader(extractions, hook_points, batch_size=batch_size, shuffle=shuffle, seed=seed,
                            exclude_special=exclude_special, dtype=dtype, device=device, drop_last=drop_last,
                            num_workers=num_workers, buffer_tokens=buffer_tokens, normalize=normalize,
                            with_index=with_index, prefetch=prefetch, rank=rank, world_size=world_size,
                            even_batches=even_batches, run_mb=run_mb, latents=latents)
