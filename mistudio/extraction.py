"""Read access to one stored extraction: metadata, arrays, and a dataset row's activations."""
from __future__ import annotations

import math
import operator
from functools import cached_property, partial
from typing import Any

import numpy as np
from scipy import sparse

from .analysis import stats as analysis
from .data import special_ids
from .errors import InputError, StoreCorrupted
from .fingerprints import check_same_tokenizer
from .models import load_tokenizer
from .saes import other_model_warning
from .specs import ModelSpec
from .analysis.feature_view import LATENT_SUFFIX
from .analysis.loader import LATENT_FORMS, ActivationLoader, latent_index_damage
from .storage import featstats
from .storage.metadata import ExtractionMeta
from .storage.reads import DECODE_ERRORS, CheckedArray
from .storage.layout import numpy_dtype
from .storage.store import ExtractionStore
from .storage.verify import VerifyReport, verify


class Extraction:
    """A stored extraction, any status. Reads only what is asked for."""

    def __init__(self, store: ExtractionStore):
        self.store = store

    @classmethod
    def open(cls, location: str, storage_options: dict | None = None) -> "Extraction":
        """The extraction stored at ``location`` (a path or an fsspec URL), read-only."""
        return cls(ExtractionStore.open(location, storage_options=storage_options))

    def __repr__(self) -> str:
        return (f"Extraction({self.id!r}, status={self.status}, samples={self.n_samples}, tokens={self.n_tokens}, "
                f"hook_points={self.hook_points})")

    @property
    def metadata(self) -> dict:
        """The store's ``attrs['mistudio']``, read fresh."""
        return self.record.to_json()

    @property
    def record(self) -> ExtractionMeta:
        """The metadata as typed models (status, progress, error, lineage ...), read fresh."""
        try:
            self.store.refresh()
            return self.store.record
        except FileNotFoundError:
            raise
        except DECODE_ERRORS as exc:
            raise StoreCorrupted(self.location, f"its group metadata cannot be read ({type(exc).__name__}: {exc})",
                                 file=f"{self.location.rstrip('/')}/zarr.json") from exc

    @property
    def id(self) -> str:
        """The store's id in its workspace (its folder name)."""
        return self.store.name

    @property
    def location(self) -> str:
        return self.store.location

    @property
    def status(self) -> str:
        return self.record.status

    @property
    def hook_points(self) -> list[str]:
        return list(self.store.record.hook_points)

    @property
    def n_samples(self) -> int:
        """Samples in the extraction's plan (all of them once COMPLETED; see ``metadata['progress']``)."""
        return int(self.store.record.progress.samples_total or 0)

    @property
    def n_tokens(self) -> int:
        """Activation rows in the plan: every token, less the special ones with ``exclude_special``."""
        return int(self.store.record.progress.tokens_total or 0)

    def activations(self, hook_point: str) -> "CommittedRows":
        """The array ``(rows, d)`` of one hook point, in stored order (lazy, read-only, checked), over the rows
        committed when it is made: ``len()`` is ``committed_tokens()`` (``n_tokens`` once COMPLETED; call again
        to see rows a running job committed since).

        Slice it like a numpy array (negative indices and open slices count from the last committed row); a
        selection past those rows reads the commit mark again: rows committed since are read, a planned row not
        yet written raises ``InputError`` naming the rows committed and the fix (never the zeros Zarr gives for
        it); a missing or damaged chunk below the commit mark raises ``StoreCorrupted``.
        ``.zarr`` is the raw Zarr array (the planned length, unchecked: for xarray/dask)."""
        record = self.record
        self._check_hook_point(hook_point, record)
        return CommittedRows(self.store.activations(hook_point), self.location, self, record)

    def _checked(self, hook_point: str, mark: int) -> CheckedArray:
        self._check_hook_point(hook_point)
        return CheckedArray(self.store.activations(hook_point), self.location, mark)

    def _check_hook_point(self, hook_point: str, record: ExtractionMeta | None = None) -> None:
        """A hook point the store holds passes; any other is an ``InputError`` naming those it holds."""
        held = list((record or self.store.record).hook_points)
        if hook_point not in held:
            raise InputError(f"hook point {hook_point!r} is not in extraction {self.id}: it has {held}")

    # -- SAE latents --------------------------------------------------------------------------------
    @property
    def latent_points(self) -> list[str]:
        """The SAE latents the store holds: ``<hook point>.latents`` for each SAE applied."""
        return [f"{hp}.latents" for hp in self.store.record.latents]

    def _latent_hook(self, hook_point: str, record: ExtractionMeta | None = None) -> str:
        point = hook_point.removesuffix(".latents")
        if point not in (record or self.store.record).latents:
            raise InputError(f"{hook_point!r} holds no SAE latents in extraction {self.id}: its latents are "
                             f"{self.latent_points or 'none (no SAE was applied)'}")
        return point

    def latent_info(self, hook_point: str):
        """The SAE applied at a hook point and how its latents are stored (``metadata.LatentInfo``)."""
        return self.store.record.latents[self._latent_hook(hook_point)]

    def latent_arrays(self, hook_point: str) -> tuple["CommittedRows", "CommittedRows"]:
        """The checked (indices, values) arrays of an SAE's latents, ``(rows, width)``: per token its largest
        latents; a 0 value is an empty slot. Like :meth:`activations` they span the rows committed as the
        metadata was last read (``committed_tokens()`` reads it fresh); a read past them raises ``InputError``."""
        record = self.store.record
        point = self._latent_hook(hook_point, record)
        arrays = tuple(CommittedRows(self.store.array(f"latents/{point}/{name}"), self.location, self, record)
                       for name in ("indices", "values"))
        width = record.latents[point].width
        for name, arr in zip(("indices", "values"), arrays):
            if arr.ndim != 2 or int(arr.shape[1]) != width:
                raise StoreCorrupted(self.location, f"its shape {tuple(arr.shape)} disagrees with the metadata's "
                                                    f"{width} latents a token", f"latents/{point}/{name}")
        return arrays

    def latents(self, hook_point: str, rows: slice | np.ndarray | None = None) -> "LatentMatrix":
        """An SAE's latents as a :class:`LatentMatrix` (a ``scipy.sparse.csr_matrix`` whose ``sum``, ``mean``,
        ``max``, ``min`` and ``@`` answer as numpy's on the dense matrix), (rows, d_sae) float32, over ``rows``
        (a slice or an array of activation rows, indexed like :meth:`activations`: over the committed rows;
        default: every committed row). ``.toarray()`` is the dense encoding."""
        self.committed_tokens()  # the record read fresh: the arrays span today's committed rows
        index, values = self.latent_arrays(hook_point)
        info = self.latent_info(hook_point)
        selection = slice(None) if rows is None else rows
        idx, vals = index[selection], values[selection].astype(np.float32)
        fired = vals != 0
        if fired.any() and int(idx[fired].max()) >= info.d_sae:  # checksums pass on a value written through Zarr
            raise StoreCorrupted(self.location, f"a latent index {int(idx[fired].max())} is past the SAE's "
                                                f"{info.d_sae} latents", f"latents/{self._latent_hook(hook_point)}"
                                                                         "/indices")
        indptr = np.concatenate([[0], np.cumsum(fired.sum(axis=1))]).astype(np.int64)
        return LatentMatrix((vals[fired], idx[fired].astype(np.int64), indptr), shape=(len(idx), info.d_sae))

    def feature(self, hook_point: str, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """One SAE latent's non-zero activations over every committed row: ``(rows, values)`` in row order, read
        from the by-feature index (a block's entries of this latent: one or two small reads), and for the block
        still being filled from its rows."""
        record = self.store.record  # one copy of the metadata per call
        point = self._latent_hook(hook_point, record)
        info = record.latents[point]
        if isinstance(latent, (bool, np.bool_)) or not isinstance(latent, (int, np.integer)) or \
                not 0 <= latent < info.d_sae:
            raise InputError(f"latent {latent!r} is not one of the {info.d_sae} latents of {point}: give an int from "
                             f"0 to {info.d_sae - 1}", param="feature")
        latent_rows = self.latent_arrays(point)  # their width checked against the metadata's
        mark, block_rows, width = record.committed_tokens(), info.block_rows, info.width
        entries = block_rows * width
        base = f"latents/{point}"
        offsets = CheckedArray(self.store.array(f"{base}/feature_offsets"), self.location, -(-mark // block_rows))
        rows_arr = CheckedArray(self.store.array(f"{base}/feature_rows"), self.location,
                                -(-mark // block_rows) * entries)
        values_arr = CheckedArray(self.store.array(f"{base}/feature_values"), self.location,
                                  -(-mark // block_rows) * entries)
        found_rows, found_values = [], []
        for block in range(-(-mark // block_rows)):
            first, stop = block * block_rows, min((block + 1) * block_rows, mark)
            row = self._block_offsets(offsets, block, info.d_sae, block_rows)
            if row is not None and row[info.d_sae + 1] >= stop - first and row[info.d_sae + 2] == first:
                a, b = int(row[latent]), int(row[latent + 1])
                if not 0 <= a <= b <= int(row[info.d_sae]) <= entries:
                    raise StoreCorrupted(self.location, f"the by-feature index of block {block} gives latent {latent} "
                                                        f"entries {a}..{b} of {int(row[info.d_sae])}: out of order",
                                         f"{base}/feature_offsets", (block, 0))
                if b > a:
                    rel = rows_arr[block * entries + a:block * entries + b]
                    keep = rel < stop - first
                    found_rows.append(first + rel[keep].astype(np.int64))
                    found_values.append(values_arr[block * entries + a:block * entries + b][keep].astype(np.float32))
                continue
            index, values = latent_rows  # not indexed yet (the block being filled): its rows
            idx, vals = index[first:stop], values[first:stop].astype(np.float32)
            hit = (idx == latent) & (vals != 0)
            found_rows.append(first + np.nonzero(hit)[0].astype(np.int64))
            found_values.append(vals[hit])
        if not found_rows:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(found_rows), np.concatenate(found_values)

    def _block_offsets(self, offsets: CheckedArray, block: int, d_sae: int, block_rows: int) -> np.ndarray | None:
        """A block's ``feature_offsets`` row (cached), or None when it was not written yet."""
        cache = self.__dict__.setdefault("_offsets_cache", {})
        key = (offsets.zarr.path, block)
        if key in cache:
            return cache[key]
        try:
            row = offsets[block]
        except StoreCorrupted as exc:
            if "missing" not in str(exc):
                raise
            return None
        if row.shape != (d_sae + 3,):
            raise StoreCorrupted(self.location, f"a feature_offsets row has {row.shape} entries, not {d_sae + 3}",
                                 offsets.zarr.path, (block, 0))
        n_rows = int(self.store.record.progress.tokens_total or 0)
        if int(row[d_sae + 1]) == min(block_rows, n_rows - block * block_rows):
            cache[key] = row  # a whole block's index does not change: kept
        return row

    def verify(self) -> VerifyReport:
        """Scan the store (every chunk below the commit mark decoded, checksums checked, metadata
        consistent) without changing it; ``report.ok`` and ``print(report)``."""
        return verify(self.location, self.store.storage_options)

    @cached_property
    def sample_index(self) -> np.ndarray:
        """Dataset row of each stored sample, in stored order."""
        return self.store.sample_index()

    @cached_property
    def sample_offsets(self) -> np.ndarray:
        """Token range ``[offsets[k], offsets[k+1])`` of the k-th stored sample."""
        return self.store.sample_offsets()

    @cached_property
    def activation_offsets(self) -> np.ndarray:
        """Activation-row range ``[offsets[k], offsets[k+1])`` of the k-th stored sample: the same as
        ``sample_offsets`` unless special tokens were excluded (``exclude_special=True``)."""
        return self.store.activation_offsets()

    @cached_property
    def _position_of_row(self) -> dict[int, int]:
        return {int(row): pos for pos, row in enumerate(self.sample_index)}

    @cached_property
    def tokenizer(self):
        """The tokenizer of the model the extraction was made with (loaded on first use, from where the model was;
        refused when its files are not the ones the store recorded). Assign one to read the store elsewhere."""
        model = self.store.record.model
        spec = ModelSpec(name_or_path=model.name_or_path, revision=model.revision)
        check_same_tokenizer(spec, model.fingerprint)
        return load_tokenizer(spec)

    def rows(self) -> np.ndarray:
        """Dataset rows present in the extraction, ascending."""
        return np.sort(self.sample_index)

    def token_range(self, row: int) -> tuple[int, int]:
        """``[start, stop)`` of a dataset row's tokens in the ``tokens/*`` arrays (and in the activations,
        unless special tokens were excluded: then see :meth:`activation_range`)."""
        pos = self._stored_position(row)
        return int(self.sample_offsets[pos]), int(self.sample_offsets[pos + 1])

    def activation_range(self, row: int) -> tuple[int, int]:
        """``[start, stop)`` of a dataset row's rows in ``activations(hp)``."""
        pos = self._stored_position(row)
        return int(self.activation_offsets[pos]), int(self.activation_offsets[pos + 1])

    def special_flags(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Which stored tokens (``tokens/*`` indices ``start:stop``) are markup, bool: ``tokens/special``; in a store
        from before that array, the tokenizer's special tokens (``data.special_ids``), as the loader reads it."""
        if "special" in self.store.group["tokens"]:
            return np.asarray(self.store.tokens("special")[start:stop], dtype=bool)
        return np.isin(np.asarray(self.store.tokens("input_ids")[start:stop]), special_ids(self.tokenizer))

    @cached_property
    def _kept_tokens(self) -> np.ndarray | None:
        if "activation_offsets" not in self.store.group["tokens"]:
            return None  # a row per token
        return np.flatnonzero(~self.special_flags())

    def token_index(self, rows: np.ndarray | int) -> np.ndarray | int:
        """The token (index into ``tokens/*``) of activation rows: the same numbers unless special tokens
        were excluded."""
        n_rows = int(self.sample_offsets[-1]) if self._kept_tokens is None else len(self._kept_tokens)
        where = np.asarray(rows)
        bad = where[(where < 0) | (where >= n_rows)]
        if bad.size:
            raise InputError(f"activation row {int(bad.flat[0])} is not in extraction {self.id}: its rows are "
                             f"0..{n_rows - 1}")
        return rows if self._kept_tokens is None else self._kept_tokens[rows]

    def _stored_position(self, row: int) -> int:
        pos = self._position_of_row.get(int(row))
        if pos is None:
            rows = self.sample_index
            raise InputError(f"dataset row {row} is not in extraction {self.id}: it holds {len(rows)} rows "
                             f"({int(rows.min())}..{int(rows.max())}, empty and skipped rows excluded); "
                             "see ext.rows()")
        record = self.record
        committed = record.progress.samples_committed
        if pos >= committed and record.status != "COMPLETED":
            raise InputError(f"dataset row {row} has not been extracted yet ({committed} of {self.n_samples} samples "
                             f"are saved, status {record.status}): resume the job to extract it")
        return pos

    def committed_tokens(self) -> int:
        """Tokens whose activations are final (all of them once COMPLETED)."""
        return self.record.committed_tokens()

    def sample_tokens(self, row: int) -> list[str]:
        """A dataset row's tokens as strings, as the model's tokenizer names them."""
        start, stop = self.token_range(row)
        return self._token_strings(self.store.tokens("input_ids")[start:stop])

    def _token_strings(self, ids: np.ndarray) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])

    def sample(self, row: int, hook_points: list[str] | None = None, tokens: bool = True) -> dict:
        """One dataset row (a whole document, however it was windowed), every key per token:

        ``input_ids``, ``tokens`` (strings), ``positions`` (position in the document), ``special`` (bool),
        ``kept`` (bool: the token has activation rows; False only for special tokens of an
        ``exclude_special`` store), ``role`` (chat data: codes of ``metadata['storage']['role_codes']``),
        ``window_positions`` (windowed stores: the token's position in the window it was taken from) and
        ``activations`` {hook point: (len, d)}, aligned with the tokens: rows of tokens that were not kept
        are NaN (``acts[sample['kept']]`` are the stored rows)."""
        start, stop = self.token_range(row)
        a_start, a_stop = self.activation_range(row)
        names = [n for n in ("role", "positions") if n in self.store.group["tokens"]]
        arrays = {n: self.store.tokens(n)[start:stop] for n in names}
        input_ids = self.store.tokens("input_ids")[start:stop]
        special = self.special_flags(start, stop)
        kept = ~special if a_stop - a_start < stop - start else np.ones(stop - start, dtype=bool)
        out = {
            "row": int(row),
            "input_ids": input_ids,
            "positions": np.arange(stop - start),
            "special": special,
            "kept": kept,
            "activations": {hp: self._aligned(self._checked(hp, a_stop)[a_start:a_stop], kept)
                            for hp in (hook_points or self.hook_points)},
        }
        if "role" in arrays:
            out["role"] = arrays["role"]
        if "positions" in arrays:
            out["window_positions"] = arrays["positions"]
        out["tokens"] = self._token_strings(input_ids) if tokens else None
        return out

    @staticmethod
    def _aligned(rows: np.ndarray, kept: np.ndarray) -> np.ndarray:
        if kept.all():
            return rows
        out = np.full((len(kept), rows.shape[1]), np.nan, dtype=rows.dtype)
        out[kept] = rows
        return out

    def outliers(self, hook_point: str) -> dict:
        """Tokens of ``hook_point`` with a norm over 100x the median: ``n`` (all of them), ``rows`` and
        ``norms`` (the first 100, as rows of ``activations(hook_point)``), ``threshold``, ``median``, and
        the norm ``quantiles`` {"0.5", "0.9", "0.99", "0.999"} (approximate, within about 5%), over committed rows."""
        self._check_hook_point(hook_point)
        stats = self.record.statistics.get(hook_point)
        if stats is None:
            return {"n": 0, "rows": np.zeros(0, np.int64), "norms": np.zeros(0), "threshold": None, "median": None,
                    "quantiles": {}}
        found = np.asarray(stats.outliers or np.zeros((0, 2)), dtype=np.float64).reshape(-1, 2)
        quantiles = stats.norm_quantiles
        return {"n": int(stats.n_outliers), "rows": found[:, 0].astype(np.int64), "norms": found[:, 1],
                "threshold": stats.outlier_threshold, "median": quantiles.get("0.5"), "quantiles": quantiles}

    def range_warnings(self) -> list[str]:
        """A line per hook point whose values went past the storage dtype's range (stored as ±inf) or were NaN,
        with the fix (marked for the front ends: see :func:`mistudio.errors.render`)."""
        out, dtype = [], self.record.params.dtype or "float16"
        for hp, stats in self.record.statistics.items():
            if stats.n_out_of_range:
                out.append(past_range(hp, stats.n_out_of_range, f"{stats.count:,} values", dtype,
                                      f"max |x| {stats.max_abs:.3g}"))
            if stats.n_nan:
                out.append(f"{hp}: {stats.n_nan:,} of {stats.count:,} values are NaN in the model's output")
        return out

    def latent_warnings(self) -> list[str]:
        """A line per SAE whose tokens lost latents for want of width (their statistics count only each token's
        ``width`` largest), whose latents went past the storage dtype's range (stored as ±inf) or were NaN, with
        the fix (marked for the front ends: see :func:`mistudio.errors.render`)."""
        out, dtype = [], self.record.params.dtype or "float16"
        for hp, stats in self.record.latent_statistics.items():
            info, point = self.record.latents[hp], f"{hp}.latents"
            if stats.dropped:
                out.append(dropped_latents(point, stats.dropped, stats.active, stats.rows_dropped, stats.rows,
                                           info.width, info.d_sae, k=info.k))
            if stats.n_out_of_range:
                out.append(past_range(point, stats.n_out_of_range, f"{stats.active - stats.dropped:,} stored latents",
                                      dtype, f"max {stats.max:.3g}"))
            if stats.n_nan:
                out.append(f"{point}: {stats.n_nan:,} latents are NaN in the SAE's output (not stored)")
        return out

    def sae_warnings(self) -> list[str]:
        """A line per SAE applied that says it was trained on another model than this extraction's (by weights when
        both are known, else by name): its latents may mean nothing here."""
        model = self.record.model
        weights = (model.fingerprint or {}).get("weights")
        found = (other_model_warning(f"{hp}: the SAE at {info.sae}", (info.trained_model, info.trained_weights),
                                     model.name_or_path, weights) for hp, info in self.record.latents.items())
        return [line for line in found if line]

    def warnings(self) -> list[str]:
        """What a researcher should know before trusting this store's values: :meth:`range_warnings`,
        :meth:`latent_warnings` and :meth:`sae_warnings` (marked for the front ends: see
        :func:`mistudio.errors.render`)."""
        return self.range_warnings() + self.latent_warnings() + self.sae_warnings()

    def to_xarray(self):
        """Every hook point as a lazy ``xarray.Dataset`` over (token, feature): the committed tokens, like
        :meth:`activations` (read raw: unchecked; bfloat16 stores: bfloat16 values, through ml_dtypes, as
        :meth:`to_dask` gives them)."""
        import xarray as xr

        record = self.record
        data = xr.open_zarr(self.store.location, consolidated=record.status == "COMPLETED",
                            storage_options=self.store.storage_options, group="activations")
        mark = record.committed_tokens()
        if "token" in data.sizes and data.sizes["token"] > mark:  # a stopped or running job: its committed rows
            data = data.isel(token=slice(0, mark))
        for name in list(data.data_vars):  # Zarr holds bfloat16 as its uint16 bits: read as the bits, not numbers
            if data[name].attrs.get("mistudio_dtype") == "bfloat16":
                bits, view = data[name].data, numpy_dtype("bfloat16")
                data[name] = data[name].copy(data=bits.map_blocks(lambda block: block.view(view), dtype=view))
        return data

    def to_dask(self, hook_point: str, latents: str = "sparse"):
        """One hook point as a lazy dask array over the committed rows, like :meth:`activations` (raw hook points
        read raw: unchecked; bfloat16 stores: bfloat16 values, through ml_dtypes).

        SAE latents (``"<hook point>.latents"``, see :attr:`latent_points`): every committed row, one block per
        stored chunk of rows, read through the checked arrays (checksums checked, a missing chunk or a latent
        index outside the SAE raises StoreCorrupted when the block is computed). ``latents=``:

        - ``"sparse"`` (default): shape (rows, d_sae), float32, blocks are :class:`LatentMatrix` (a
          ``scipy.sparse.csr_matrix`` whose reductions answer as numpy's). Works: ``.compute()`` (a CSR matrix,
          equal to :meth:`latents`), row slices and row lists, ``.map_blocks(f)`` (``f`` gets a CSR block; pass
          ``meta=`` for what it returns), ``.sum``, ``.mean``, ``.max``, ``.min`` (``axis=0|1|None``: numpy's
          answer on the dense latents), ``x @ w`` and ``da.tensordot(x, w, axes=1)`` with a dense ``w``,
          ``(x > 0).sum(0)``, ``da.count_nonzero``. Other numpy functions see a CSR block, not an array: use
          ``map_blocks``, or ``latents="dense"``.
        - ``"dense"``: shape (rows, d_sae), float32 numpy blocks (each block is d_sae wide in memory).
        - ``"fixed"``: the stored pair ``(indices, values)``, two dask arrays (rows, width) in their stored
          dtypes; an empty slot is index 0 with value 0.
        """
        import dask.array as da

        if latents not in LATENT_FORMS:
            raise InputError(f"«latents={latents!r}» must be one of {LATENT_FORMS}", param="latents")
        if hook_point.endswith(LATENT_SUFFIX):
            return self._latents_to_dask(hook_point, latents)
        if latents != "sparse":
            raise InputError(f"«latents={latents!r}» is for SAE latents, and {hook_point!r} is a raw hook point: "
                             f"«pass latents='sparse'» (the default) or one of {self.latent_points}", param="latents")
        checked = self.activations(hook_point)
        raw = da.from_zarr(checked.zarr)
        if len(checked) < raw.shape[0]:  # a running or stopped job's store: past its committed rows Zarr reads zeros
            raw = raw[:len(checked)]
        if checked.dtype == raw.dtype:
            return raw
        return raw.map_blocks(lambda block, view=checked.dtype: block.view(view), dtype=checked.dtype)

    def _latents_to_dask(self, hook_point: str, form: str):
        import dask.array as da
        from dask.base import tokenize

        _register_with_dask()
        mark = self.committed_tokens()  # the record read fresh: the arrays below are checked up to this mark
        index, values = self.latent_arrays(hook_point)
        d_sae = int(self.latent_info(hook_point).d_sae)
        step = int(index.chunks[0])
        rows = tuple(min(step, mark - a) for a in range(0, mark, step)) or (0,)
        blocks = LatentBlocks(self, hook_point, d_sae)
        token = tokenize(self.location, hook_point, self.record.nonce, mark)
        if form == "fixed":
            return tuple(da.map_blocks(partial(blocks.fixed, part), chunks=(rows, (int(arr.shape[1]),)),
                                       dtype=arr.dtype, meta=np.empty((0, 0), arr.dtype), name=f"latent-{part}-{token}")
                         for part, arr in (("indices", index), ("values", values)))
        x = da.map_blocks(blocks.sparse, chunks=(rows, (d_sae,)), dtype=np.float32,
                          meta=LatentMatrix((0, d_sae), dtype=np.float32), name=f"latents-{token}")
        if form == "dense":
            return x.map_blocks(_dense, dtype=np.float32, meta=np.empty((0, 0), np.float32))
        return x

    # -- training and dataset-wide queries (mistudio.loader, mistudio.analysis) -------------------
    def loader(self, hook_points: str | list[str], batch_size: int = 4096, shuffle: bool = True, seed: int = 0,
               exclude_special: bool = False, dtype: str = "float32", device: str = "cpu", drop_last: bool = False,
               num_workers: int = 0, buffer_tokens: int | None = None, normalize: str | None = None,
               with_index: bool = False, prefetch: int = 2, rank: int | None = None,
               world_size: int | None = None, even_batches: bool = True, run_mb: float = 8.0,
               latents: str = "sparse") -> ActivationLoader:
        """A training loader over this extraction (every committed token once per epoch, shuffled, resumable;
        ``rank``/``world_size``: this process's share of the rows, taken from ``torch.distributed`` when it is
        initialised). Hook points may be SAE latents (``"layers.1.residual.latents"``, see :attr:`latent_points`):
        sparse CSR batches (batch, d_sae) by default, ``latents="dense"`` or ``"fixed"`` (the stored
        (indices, values) pair).

        See :func:`mistudio.loader` for the options.
        """
        return ActivationLoader(self, hook_points, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                exclude_special=exclude_special, dtype=dtype, device=device, drop_last=drop_last,
                                num_workers=num_workers, buffer_tokens=buffer_tokens, normalize=normalize,
                                with_index=with_index, prefetch=prefetch, rank=rank, world_size=world_size,
                                even_batches=even_batches, run_mb=run_mb, latents=latents)

    def feature_stats(self, hook_point: str, bins: int = 64, cluster=None) -> analysis.FeatureStats:
        """Per-feature mean/std/max/min/fraction active/histogram over every committed token (cached in the store)."""
        return analysis.feature_stats(self, hook_point, bins=bins, cluster=cluster)

    def feature_statistics(self, hook_point: str, **options) -> featstats.FeatureStatistics:
        """Dashboard statistics per feature: density, mean, max, log-binned histogram, top examples, quantile-band
        samples, co-occurrence (saved by the extraction as it ran, else one streamed pass, cached)."""
        return analysis.feature_statistics(self, hook_point, **options)

    def top_examples(self, hook_point: str, feature: int | list[int], k: int = 20, context: int = 8, cluster=None):
        """The k tokens where ``feature`` is largest, with their context (cached in the store)."""
        return analysis.top_examples(self, hook_point, feature, k=k, context=context, cluster=cluster)


class LatentMatrix(sparse.csr_matrix):
    """SAE latents (:meth:`Extraction.latents`, and each block of :meth:`Extraction.to_dask`'s sparse form): a
    ``scipy.sparse.csr_matrix`` whose reductions answer as numpy's do on the dense matrix, so that dask's run over
    the blocks and a researcher's ``z.mean(axis=0)`` is numpy's. ``sum``, ``mean``, ``max`` and ``min`` take
    ``axis`` (an int, a tuple or None), ``dtype``, ``out`` and ``keepdims`` and give an ndarray (a numpy scalar
    for the whole matrix; an empty slot counts as 0, as in the dense matrix); ``z @ w`` and ``np.matmul(z, w)``
    with a dense ``w`` give an ndarray. Other operators are scipy's (a comparison gives a plain CSR matrix)."""

    def _axes(self, axis) -> tuple[int, ...]:
        return (0, 1) if axis is None else tuple(sorted({int(a) % 2 for a in np.atleast_1d(axis)}))

    def _shaped(self, values, axes: tuple[int, ...], keepdims: bool, out) -> np.ndarray:
        """A reduction's values (numpy's shape: ``keepdims`` or not) written to ``out`` when given."""
        values = np.asarray(values)
        if len(axes) == 2:
            values = values.reshape((1, 1) if keepdims else ())
        else:
            values = values.reshape((1, -1) if axes == (0,) else (-1, 1)) if keepdims else values.ravel()
        if out is not None:
            out[...] = values
            return out
        return values[()] if values.ndim == 0 else values

    def sum(self, axis=None, dtype=None, out=None, keepdims=False):
        axes = self._axes(axis)
        whole = sparse.csr_matrix(self)
        total = whole.sum(dtype=dtype) if len(axes) == 2 else whole.sum(axis=axes[0], dtype=dtype)
        return self._shaped(total, axes, keepdims, out)

    def mean(self, axis=None, dtype=None, out=None, keepdims=False):
        axes = self._axes(axis)
        if dtype is None:  # numpy's: integers and booleans average to float64, floats in their own type
            dtype = self.dtype if np.issubdtype(self.dtype, np.inexact) else np.dtype(np.float64)
        count = int(np.prod([self.shape[a] for a in axes]))
        total = np.asarray(self.sum(axis=axes if len(axes) == 1 else None, dtype=dtype, keepdims=keepdims))
        with np.errstate(invalid="ignore", divide="ignore"):  # an empty matrix: NaN, as numpy's
            mean = (total / count).astype(dtype, copy=False)
        if out is not None:
            out[...] = mean
            return out
        return mean[()] if mean.ndim == 0 else mean

    def _extreme(self, which: str, axis, out, keepdims, options: dict):
        if options:  # numpy's initial= and where=
            raise InputError(f"{which}() of sparse SAE latents takes axis, out and keepdims, not "
                             f"{', '.join(options)}: call .toarray() first for numpy's other options")
        axes = self._axes(axis)
        if 0 in self.shape:
            raise ValueError(f"zero-size array to reduction operation {which}imum which has no identity")
        whole = sparse.csr_matrix(self)
        values = getattr(whole, which)() if len(axes) == 2 else getattr(whole, which)(axis=axes[0]).toarray()
        return self._shaped(np.asarray(values, dtype=self.dtype), axes, keepdims, out)

    def max(self, axis=None, out=None, keepdims=False, **options):
        return self._extreme("max", axis, out, keepdims, options)

    def min(self, axis=None, out=None, keepdims=False, **options):
        return self._extreme("min", axis, out, keepdims, options)

    def __matmul__(self, other):
        product = sparse.csr_matrix(self) @ other
        return np.asarray(product) if isinstance(product, np.matrix) else product

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """``np.matmul(z, w)`` (what dask's ``@`` calls on each block) as ``z @ w``; any other ufunc as on a plain
        CSR matrix (numpy's operators defer to scipy's, as without this method)."""
        plain = [sparse.csr_matrix(x) if isinstance(x, LatentMatrix) else x for x in inputs]
        if ufunc is np.matmul and method == "__call__" and len(plain) == 2 and not kwargs:
            product = plain[0] @ plain[1]
            return np.asarray(product) if isinstance(product, np.matrix) else product
        operator = _OPERATORS.get(ufunc)
        if operator is not None and method == "__call__" and len(plain) == 2 and not kwargs:
            return operator(*plain)
        return getattr(ufunc, method)(*plain, **kwargs)


_OPERATORS = {np.add: operator.add, np.subtract: operator.sub, np.multiply: operator.mul,
              np.true_divide: operator.truediv, np.power: operator.pow, np.greater: operator.gt,
              np.greater_equal: operator.ge, np.less: operator.lt, np.less_equal: operator.le,
              np.equal: operator.eq, np.not_equal: operator.ne}


LatentBlock = LatentMatrix  # its name when it was only the dask blocks'


def _concatenate_latents(blocks: list, axis: int = 0) -> LatentMatrix:
    """Blocks of latents joined as dask joins them (in reductions): a :class:`LatentMatrix` again."""
    if axis not in (0, 1):
        raise ValueError(f"SAE latents are 2-D: they join along axis 0 or 1, not {axis}")
    return LatentMatrix((sparse.vstack if axis == 0 else sparse.hstack)(blocks, format="csr"))


def _register_with_dask() -> None:
    """Let dask join :class:`LatentMatrix` blocks as such (its scipy rule makes plain matrices, whose ``sum`` has no
    ``keepdims``); idempotent, done in every process that makes blocks."""
    from dask.array.dispatch import concatenate_lookup

    concatenate_lookup.register(LatentMatrix, _concatenate_latents)


class LatentBlocks:
    """Reads the blocks of :meth:`Extraction.to_dask` over SAE latents (picklable: a process reopens the store
    by location)."""

    def __init__(self, ext: Extraction, hook_point: str, d_sae: int):
        self.ext, self.hook_point, self.d_sae = ext, hook_point, d_sae
        self._arrays: dict | None = None

    def __getstate__(self) -> dict:
        ext = self.ext
        return {**self.__dict__, "ext": (type(ext), ext.location, ext.store.storage_options), "_arrays": None}

    def __setstate__(self, state: dict) -> None:
        cls, location, options = state["ext"]
        self.__dict__.update({**state, "ext": cls.open(location, options)})

    @staticmethod
    def _rows(block_info: dict) -> tuple[int, int]:
        return tuple(block_info[None]["array-location"][0])

    def sparse(self, block_info: dict | None = None) -> LatentMatrix:
        """A block's rows as CSR, through :meth:`Extraction.latents` (its checks)."""
        _register_with_dask()
        a, b = self._rows(block_info)
        return self.ext.latents(self.hook_point, slice(a, b))

    def fixed(self, part: str, block_info: dict | None = None) -> np.ndarray:
        """A block of the stored ``indices`` or ``values``; indices checked to be latents of the SAE (the writer
        puts 0 in an empty slot, so any index past d_sae is damage)."""
        a, b = self._rows(block_info)
        if self._arrays is None:
            self.ext.committed_tokens()  # the record read fresh: checked up to today's mark
            self._arrays = dict(zip(("indices", "values"), self.ext.latent_arrays(self.hook_point)))
        rows = self._arrays[part][a:b]
        what = latent_index_damage(rows, self.d_sae, a) if part == "indices" else None
        if what:
            raise StoreCorrupted(self.ext.location, what,
                                 f"latents/{self.hook_point.removesuffix(LATENT_SUFFIX)}/indices")
        return rows


def _dense(block: sparse.spmatrix) -> np.ndarray:
    return block.toarray()


class CommittedRows(CheckedArray):
    """A :class:`~mistudio.storage.reads.CheckedArray` over the rows committed when it was made (what
    :meth:`Extraction.activations` and :meth:`Extraction.latent_arrays` give): its ``shape[0]`` and ``len()`` are
    those rows, and negative indices and open slices (``[-5:]``, ``[:]``) count from the last of them.

    A selection that names a row past them reads the commit mark again: rows a running job committed since are
    read (checked); a row still not written (a stopped job's, or a running one's next) raises ``InputError``
    naming the rows committed and the fix, never the zeros Zarr gives for it. An index past the plan is numpy's
    ``IndexError``; a slice past it stops at its end, as numpy's does."""

    def __init__(self, arr, location: str, ext: "Extraction", record: ExtractionMeta):
        self.planned = int(arr.shape[0])
        super().__init__(arr, location, min(record.committed_tokens(), self.planned))
        self.ext = ext

    shape = property(lambda self: (self.mark, *self.zarr.shape[1:]))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    nbytes = property(lambda self: self.size * np.dtype(self.dtype).itemsize)

    def __repr__(self) -> str:
        return (f"<CommittedRows {self.zarr.path} shape={self.shape} of {self.planned:,} planned rows "
                f"dtype={self.dtype} chunks={self.chunks}>")

    def _read(self, key, out):
        explicit, reach = self._explicit(key)
        if reach <= self.mark:
            return super()._read(explicit, out)
        record = self.ext.record  # read fresh: the job may have committed more since this view was made
        mark = min(record.committed_tokens(), self.planned)
        if reach > mark:
            raise self.past_mark(reach, mark, record)
        return CheckedArray(self.zarr, self.location, mark)._read(explicit, out)

    def past_mark(self, reach: int, mark: int, record: ExtractionMeta) -> InputError:
        """The error of a read up to row ``reach`` past the ``mark`` rows committed."""
        status, name = str(getattr(record.status, "value", record.status)), self.ext.id
        fix = ("its job is still writing them: read them once it has (len(ext.activations(...)) says how far it got)"
               if record.live else f"resume the job to extract them (ms.Workspace(...).resume({name!r}))")
        return InputError(f"a read of {self.zarr.path} up to row {reach:,} reaches past the {mark:,} rows committed "
                          f"so far in extraction {name} (status {status}; {self.planned:,} rows planned): read rows "
                          f"below {mark:,} (e.g. [:{mark}]), or {fix}")

    def _explicit(self, key) -> tuple[Any, int]:
        """``key`` with its row selection made explicit (no negative index, no open bound: those count from the
        committed rows), and the row it reaches up to (its largest row + 1; 0 for none)."""
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if isinstance(key, tuple) and not key:
            rows = Ellipsis
        n, planned = self.mark, self.planned
        if rows is Ellipsis:
            stands_for = self.ndim - len(rest)  # dimensions the Ellipsis covers
            if stands_for < 1:
                return self._explicit(tuple(rest))
            return (slice(0, n), *[slice(None)] * (stands_for - 1), *rest), n
        if isinstance(rows, slice):
            if rows.step is not None and rows.step < 0:  # open and negative bounds count from the committed rows
                start = n - 1 if rows.start is None else int(rows.start) + n if rows.start < 0 else int(rows.start)
                stop = -1 if rows.stop is None else max(int(rows.stop) + n if rows.stop < 0 else int(rows.stop), -1)
                r = range(min(start, planned - 1), stop, int(rows.step))  # past the mark: the read refuses it
                explicit = slice(r.start, r.stop if r.stop >= 0 else None, r.step) if len(r) else slice(0, 0)
                return (explicit, *rest), (r[0] + 1 if len(r) else 0)
            start, stop = (min(max(bound + n if bound < 0 else bound, 0), planned)
                           for bound in (int(rows.start or 0), n if rows.stop is None else int(rows.stop)))
            return (slice(start, stop, rows.step), *rest), stop if stop > start else 0
        if isinstance(rows, (int, np.integer)) and not isinstance(rows, (bool, np.bool_)):
            row = self._rows_in(np.asarray([int(rows)]))[0]
            return (row, *rest), int(row) + 1
        picked = np.asarray(rows)
        if picked.dtype == bool:
            if picked.ndim != 1 or len(picked) not in (n, planned):
                raise IndexError(f"a boolean row mask of length {len(picked)} does not match the {n:,} committed "
                                 f"rows of {self.zarr.path}")
            picked = np.flatnonzero(picked)
        picked = self._rows_in(picked)
        return (picked, *rest), int(picked.max()) + 1 if picked.size else 0

    def _rows_in(self, rows: np.ndarray) -> np.ndarray:
        """Row numbers with negative ones counted from the last committed row, each within the plan."""
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"rows must be integers, slices or a boolean mask; got {rows.dtype} values")
        given, rows = rows, np.where(rows < 0, rows + self.mark, rows).astype(np.int64)
        outside = (rows < 0) | (rows >= self.planned)
        if outside.any():
            raise IndexError(f"row {int(given[np.flatnonzero(outside)[0]])} is out of bounds for the {self.mark:,} "
                             f"committed rows ({self.planned:,} planned) of {self.zarr.path}")
        return rows


def dropped_latents(point: str, dropped: int, active: int, rows_dropped: int, rows: int, width: int, d_sae: int,
                    where: str = "", k: int | None = None) -> str:
    """The warning for ``dropped`` of ``active`` firing latents of ``point`` left out for want of ``width`` (on
    ``rows_dropped`` of ``rows`` rows; ``where``: of what, when not the store), with a width that keeps them: a
    top-k SAE's ``k`` (all it fires), else about 1.5 x the busiest rows' L0 (up to ``d_sae``) or more coverage."""
    said = (f"{point}: {dropped:,} of {active:,} firing latents{where} ({dropped / active:.1%}) "
            f"{'would be' if where else 'were'} dropped for want of width, on {rows_dropped:,} of {rows:,} rows: "
            f"the store keeps each token's {width} largest, so densities, means and co-firing count a latent only "
            "where it was among them (lower bounds for latents that fire small): ")
    if k is not None:
        return said + f"«pass latent_width={k}», the SAE's k (all a top-{k} SAE fires), or leave it out"
    busy = width + math.ceil(dropped / rows_dropped)  # mean L0 of the rows cut
    wider = min(d_sae, 16 * math.ceil(1.5 * busy / 16))
    return said + f"«pass latent_width={wider}» (up to the SAE's d_sae, {d_sae:,}) or a higher «latent_coverage»"


def past_range(point: str, n: int, of: str, dtype: str, largest: str) -> str:
    """The warning for ``n`` of ``of`` values of ``point`` stored as ±inf, past ``dtype``'s range, with the fix."""
    return (f"{point}: {n:,} of {of} were past {dtype}'s range and are stored as ±inf ({largest}): "
            "«pass dtype='bfloat16'» (or 'float32')")
