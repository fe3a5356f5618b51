"""One self-describing Zarr store per extraction: its metadata (the only writer of it), its arrays, and the
guard that keeps a job from writing a store that is not its own."""
from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from typing import Any

import numpy as np
import pydantic
import zarr

from ..errors import RE_EXTRACT, RETRY_EXTRACTION, InputError, StoreCorrupted, StoreLost
from . import metadata, positions
from .codec import Damaged, Geometry, check_recorded, fast_layout, record_committed, stored_crcs
from .files import fsync_dir, write_atomic
from .layout import CHECKSUM_BYTES, PER_SAMPLE, WRITE_CONFIG, StoreLayout, array_codecs, foreign_encoding, \
    numpy_dtype, storage_unit, unit_key, unit_name, zarr_dtype
from .lease import WriterLease
from .metadata import ExtractionMeta
from .reads import DECODE_ERRORS, CheckedArray

MAX_GROUP_METADATA_BYTES = 64 << 20  # a store's own zarr.json is kilobytes (a few MB consolidated)
MAX_ARRAY_METADATA_BYTES = 16 << 20  # an array's zarr.json: a few KB


def check_metadata_file(location: str, file: str, array: str | None = None) -> None:
    """Refuse a ``zarr.json`` no mistudio store has, before Zarr parses it: not a regular file (a FIFO would block
    the read), or larger than any store's (parsing a crafted 300 MB string took gigabytes). ``array``: the array
    or group it describes (None: the store's own group). A missing file is left to Zarr.

    A symbolic link is followed when it leads to a file inside the store's folder (a copy or sync tool may leave
    one; the store stays self-contained): that file is checked as above. A link that leads outside the store is
    refused (a store reads only its own files: a link elsewhere could feed it any file on the machine), and so
    is one that leads to nothing or to no regular file, each naming the link, its target and the fix."""
    try:
        info = os.stat(file, follow_symlinks=False)
    except OSError:
        return
    what = "its group metadata" if array is None else "its metadata"
    if stat.S_ISLNK(info.st_mode):
        info = _linked_metadata(location, file, array, what)
    if not stat.S_ISREG(info.st_mode):
        raise StoreCorrupted(location, f"{what} is not a regular file", array, file=file)
    limit = MAX_GROUP_METADATA_BYTES if array is None else MAX_ARRAY_METADATA_BYTES
    if info.st_size > limit:
        raise StoreCorrupted(location, f"{what} is {info.st_size:,} bytes, more than a store's can be ({limit:,}): it "
                                       "was not written by mistudio", array, file=file)


def _linked_metadata(location: str, file: str, array: str | None, what: str) -> os.stat_result:
    """The status of the file a metadata link leads to, when it is a regular file inside the store."""
    target, root = os.path.realpath(file), os.path.realpath(location)
    fix = ("Replace the link with the regular file it stands for (cp --remove-destination <that file> <the link>), "
           "or copy the store with its links resolved (cp -rL <store> <copy>)")
    if os.path.commonpath([root, target]) != root:
        raise StoreCorrupted(location, f"{what} is a symbolic link to {target}, outside the store: a store reads "
                                       "only files inside its folder", array, file=file, fix=fix)
    try:
        info = os.stat(target)
    except OSError as exc:
        raise StoreCorrupted(location, f"{what} is a symbolic link to {target}, which cannot be read "
                                       f"({exc.strerror or type(exc).__name__})", array, file=file, fix=fix) from None
    if not stat.S_ISREG(info.st_mode):
        raise StoreCorrupted(location, f"{what} is a symbolic link to {target}, which is not a regular file", array,
                             file=file, fix=fix)
    return info


class GuardedLocalStore(zarr.storage.LocalStore):
    """A local Zarr store whose every ``zarr.json`` (the group's, each array's) is checked by
    :func:`check_metadata_file` before Zarr reads it: one bad file is :class:`StoreCorrupted`, never a hang. It
    opens an existing store only: its folder is never made (Zarr's would be, with its parents), so a write to a
    store deleted or moved meanwhile is FileNotFoundError, not a new folder at the old path."""

    async def get(self, key: str, prototype=None, byte_range=None):
        if key == "zarr.json" or key.endswith("/zarr.json"):
            location = str(self.root)
            check_metadata_file(location, f"{location}/{key}", key[:-len("/zarr.json")] if "/" in key else None)
        return await super().get(key, prototype, byte_range)

    def _check_there(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"the store {self.root} is not there (deleted or moved)")

    async def _open(self, *, mode=None) -> None:
        self._check_there()
        await super()._open(mode=mode)

    async def _set(self, key: str, value, exclusive: bool = False) -> None:
        self._check_there()
        await super()._set(key, value, exclusive=exclusive)


def open_group(location: str, storage_options: dict | None = None, mode: str = "r", path: str | None = None,
               **options: Any) -> zarr.Group:
    """A store's Zarr group (or its sub-group at ``path``), its metadata read now: a local folder through a
    :class:`GuardedLocalStore`, a remote URL through ``storage_options``. ``options`` go to ``zarr.open_group``."""
    if "://" in location and not location.startswith("file://"):
        return zarr.open_group(store=location, mode=mode, path=path, storage_options=storage_options,
                               use_consolidated=False, **options)
    local = GuardedLocalStore(location.removeprefix("file://"), read_only=mode == "r")  # file:// is local too
    try:
        return zarr.open_group(store=local, mode=mode, path=path, use_consolidated=False, **options)
    except zarr.errors.GroupNotFoundError:
        local._check_there()  # the folder went (deleted by another process) after it was looked for: said so
        raise


class ExtractionStore:
    """A Zarr group: ``attrs['mistudio']`` metadata, ``tokens/*`` and ``activations/<hook point>``.

    The metadata is an :class:`~mistudio.metadata.ExtractionMeta`; ``update`` is its only writer. A store
    that a job writes is *guarded*: every write first checks that the store on disk is still the one this
    object opened (same nonce), so a deleted or replaced store fails the job instead of being recreated.
    """

    def __init__(self, location: str, group: zarr.Group, storage_options: dict | None = None,
                 record: ExtractionMeta | None = None):
        self.location = location
        self.group = group
        self.storage_options = storage_options
        self._lock = threading.RLock()
        self._record = record or metadata.parse(group.attrs.get("mistudio"))
        self.guarded = False
        self.lease: WriterLease | None = None  # held while this process writes (or deletes) the store
        self._same_as: tuple | None = None  # local: the group file's stamp (see _group_file_stamp) when last ours

    @classmethod
    def create(cls, location: str, meta: ExtractionMeta, storage_options: dict | None = None) -> "ExtractionStore":
        """A new store holding only its metadata (arrays come with :meth:`allocate`).

        It appears whole or not at all: a local store is built under a hidden temporary name and renamed
        into place; a remote one is created with its attributes in one write. Nobody (a ``cleanup`` in
        another process, say) ever sees a store folder without its metadata.
        """
        attrs = {"mistudio": meta.to_json()}
        if "://" in location and not location.startswith("file://"):
            with zarr.config.set({"json_indent": None}):
                zarr.create_group(store=zarr.storage.FsspecStore.from_url(location, storage_options=storage_options),
                                  zarr_format=3, attributes=attrs)
        else:
            path = location.removeprefix("file://")
            parent, name = os.path.split(path)
            tmp = os.path.join(parent, f".creating-{name}-{meta.nonce or metadata.new_nonce()}")
            try:
                with zarr.config.set({"json_indent": None}):
                    zarr.create_group(store=tmp, zarr_format=3, attributes=attrs)
                os.rename(tmp, path)
                fsync_dir(parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return cls.open(location, storage_options, writable=True)

    @classmethod
    def open(cls, location: str, storage_options: dict | None = None, writable: bool = False) -> "ExtractionStore":
        """Open an existing store; damaged group metadata raises :class:`StoreCorrupted` naming the file."""
        file = f"{location.rstrip('/')}/zarr.json"
        try:
            group = open_group(location, storage_options, "r+" if writable else "r")
            meta = group.attrs.get("mistudio")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            folder = location.removeprefix("file://")
            left = "://" not in folder and os.path.isdir(folder) and any(
                os.path.isdir(os.path.join(folder, part)) for part in ("activations", "tokens", "latents", "statistics"))
            if left and not os.path.lexists(os.path.join(folder, "zarr.json")):  # a store's arrays, no group file
                raise StoreCorrupted(location, "the folder has a store's arrays but no zarr.json (its metadata): what "
                                     "is left of a store deleted or moved while its job wrote; delete it",
                                     file=file) from exc
            raise
        except DECODE_ERRORS as exc:
            raise StoreCorrupted(location, f"its group metadata cannot be read ({type(exc).__name__}: {exc})",
                                 file=file) from exc
        if meta is None:
            raise ValueError(f"{location} is a Zarr group but not a mistudio extraction (no 'mistudio' attributes)")
        if not isinstance(meta, dict):
            raise StoreCorrupted(location, "attrs['mistudio'] is not a mapping", file=file)
        try:
            record = metadata.parse(meta)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            raise StoreCorrupted(location, f"attrs['mistudio'] is not valid metadata ({problems})", file=file) from exc
        return cls(location, group, storage_options, record)

    @property
    def name(self) -> str:
        """The store's folder name without ``.zarr``: its id in the workspace it was found in."""
        return self.location.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")

    # -- metadata -------------------------------------------------------------------------------
    @property
    def record(self) -> ExtractionMeta:
        """The typed metadata as this object last wrote or read it (a copy)."""
        with self._lock:
            return self._record.model_copy(deep=True)

    @property
    def meta(self) -> dict:
        """The metadata as a plain dict (JSON types), as this object last wrote or read it."""
        with self._lock:
            return self._record.to_json()

    def _read_disk(self) -> ExtractionMeta:
        group = open_group(self.location, self.storage_options)
        return metadata.parse(group.attrs.get("mistudio"))

    def refresh(self) -> dict:
        """Re-read the metadata from storage (another process may have written it)."""
        record = self._read_disk()
        with self._lock:
            self._record = record
            return record.to_json()

    @property
    def _group_file(self) -> str:
        """Local stores: the path of the group's ``zarr.json``."""
        return os.path.join(self.location.removeprefix("file://"), "zarr.json")

    def _group_file_stamp(self) -> tuple | None:
        """Local stores: (device, inode, mtime, ctime, size) of the group's ``zarr.json``; any write or replacement
        changes it (a file put back with its old mtime gets a new ctime)."""
        if not self.local:
            return None
        stat = os.stat(self._group_file)
        return stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size

    def check_same(self) -> None:
        """Raise :class:`StoreLost` if the store on disk is gone or is not the one this object opened. Locally a
        group file with the stamp it had when last found ours (or written by this object) is not read again: the
        writer checks before every batch, and reading the metadata cost 3 ms a batch."""
        try:
            stamp = self._group_file_stamp()
            if stamp is not None and stamp == self._same_as:
                return
            nonce = self._read_disk().nonce
        except (FileNotFoundError, KeyError, ValueError, TypeError, zarr.errors.GroupNotFoundError) as exc:
            why = exc or type(exc).__name__
            raise StoreLost(f"the store {self.location} was deleted or damaged while its job ran ({why}); "
                            "what it held is gone: " + RETRY_EXTRACTION) from exc
        if nonce != self._record.nonce:
            raise StoreLost(f"the store {self.location} was replaced by another store while its job ran: "
                            "this job stopped without touching it; " + RETRY_EXTRACTION)
        self._same_as = stamp

    def take_lease(self, purpose: str, job_id: str | None = None) -> WriterLease:
        """Take the store's writer lease for this object (``StoreBusy`` names the holder); metadata writes then
        check it. Idempotent while held."""
        if self.lease is None or not self.lease.held:
            self.lease = WriterLease.acquire(self.location, self.name, purpose, job_id, self.storage_options)
        return self.lease

    def release_lease(self) -> None:
        if self.lease is not None:
            self.lease.release()

    @property
    def local(self) -> bool:
        return "://" not in self.location or self.location.startswith("file://")

    def update(self, durable: bool = True, **sections: Any) -> dict:
        """Replace top-level metadata sections (``progress=...``) and write them; dict sections merge.

        Locally the group's ``zarr.json`` is replaced whole (compact JSON, a temporary file renamed over it) and,
        with ``durable``, flushed to the disk first: a crash or a power cut leaves the old metadata or the new."""
        with self._lock:
            if self.guarded:
                self.check_same()
            if self.lease is not None and self.lease.held:
                self.lease.check()
            record = metadata.merged(self._record, sections)
            if self.local:
                file = self._group_file
                with open(file, "rb") as f:
                    group = json.loads(f.read())
                group["attributes"] = {**group.get("attributes", {}), "mistudio": record.to_json()}
                written = write_atomic(file, json.dumps(group, separators=(",", ":"), allow_nan=True).encode(),
                                       durable)
                stamp = self._group_file_stamp() if self.guarded else None
                # ours if the file there is the one just written (a store swapped in meanwhile has another inode)
                self._same_as = stamp if stamp is not None and stamp[:2] == written else None
            else:
                with zarr.config.set({"json_indent": None}):
                    self.group.attrs.update({"mistudio": record.to_json()})
            self._record = record
            return record.to_json()

    # -- arrays ---------------------------------------------------------------------------------
    @property
    def is_allocated(self) -> bool:
        return "tokens" in self.group and "sample_offsets" in self.group["tokens"]

    def allocate(self, tokens: dict[str, np.ndarray], layout: StoreLayout, storage: dict[str, Any],
                 chunk_records: bool = True) -> None:
        """Create every array of ``layout`` and write the token arrays (``tokens``: name -> values in stored
        order, as :mod:`mistudio.plan` made them); record the layout in the metadata (``storage``: what the
        plan says of it: window, stride, role codes, exclude_special). ``chunk_records=False``: a store without
        chunk records (:mod:`.positions`), for rows written by hand through Zarr rather than by the writer."""
        key = positions.new_key() if chunk_records and self.local and all(a.checksum for a in layout.arrays) \
            else None
        with zarr.config.set({"json_indent": None}):  # compact metadata files
            for spec in layout.arrays:
                folder, name = spec.path.rsplit("/", 1)
                kind = folder.split("/", 1)[0]
                group = self.group.require_group(folder)
                shards = (spec.shard_rows, *spec.shape[1:]) if spec.shard_rows else None
                attributes = {"mistudio_dtype": spec.dtype} if zarr_dtype(spec.dtype) != spec.dtype else {}
                if key is not None and positions.recorded(spec.path):
                    attributes[positions.ATTRIBUTE] = key
                extra = {"attributes": attributes} if attributes else {}
                arr = group.create_array(name, shape=spec.shape, dtype=zarr_dtype(spec.dtype), **extra,
                                                chunks=(spec.chunk_rows, *spec.shape[1:]), shards=shards,
                                                dimension_names=spec.dims, config=WRITE_CONFIG,
                                                fill_value=0 if kind != "tokens" else None, overwrite=True,
                                                **array_codecs(spec.checksum))
                if kind == "tokens":
                    data = np.asarray(tokens[name])
                    if data.shape != spec.shape:
                        raise ValueError(f"token array {name} has shape {data.shape}, the layout says {spec.shape}")
                    arr[:] = data.astype(spec.dtype, copy=False)
                    record_committed([arr], 0, spec.shape[0])
        first = layout.activations[0]
        offsets = np.asarray(tokens["sample_offsets"])
        self.update(format_version=layout.format_version,
                    progress={"samples_total": len(offsets) - 1, "tokens_total": first.shape[0],
                              "samples_committed": 0, "tokens_committed": 0, "chunk_rows": first.chunk_rows},
                    hook_points=[a.path.split("/", 1)[1] for a in layout.activations],
                    storage={"checksum": first.checksum, "n_input_tokens": int(offsets[-1]),
                             "shard_rows": first.shard_rows, "chunk_records": key, **storage})

    def array(self, path: str) -> zarr.Array:
        """The raw Zarr array at ``path`` (``tokens/input_ids``), set up for writing; a missing array or
        damaged ``zarr.json`` raises :class:`StoreCorrupted` naming the file."""
        file = f"{self.location.rstrip('/')}/{path}/zarr.json"
        try:
            arr = self.group[path].with_config(WRITE_CONFIG)
        except (KeyError, FileNotFoundError) as exc:
            # not damaged: nothing was stored yet, or its arrays are being made (the metadata says how many rows
            # they hold once they all are)
            if not self.is_allocated or self._record.progress.tokens_total is None:
                raise InputError(self._nothing_stored(path)) from None
            raise StoreCorrupted(self.location, "the array is missing", path, file=file) from exc
        except DECODE_ERRORS as exc:
            raise StoreCorrupted(self.location, f"its metadata cannot be read ({type(exc).__name__}: {exc})", path,
                                 file=file) from exc
        self._check_size(arr, path, file)
        problem = foreign_encoding(arr, path, self._record.params.dtype)
        if problem is not None:
            raise StoreCorrupted(self.location, problem, path, file=file)
        self._check_own(arr, path, file)
        return arr

    def _check_own(self, arr: zarr.Array, path: str, file: str) -> None:
        """Refuse an array whose folder comes from another store (or from before this store kept chunk records):
        its chunk records are under another key than this store's, so they vouch for another store's data."""
        key = self._record.storage.chunk_records
        if key and positions.recorded(path) and arr.attrs.get(positions.ATTRIBUTE) != key:
            raise StoreCorrupted(self.location, "the array's folder comes from another store (or another copy of "
                                 f"one): its chunk records are under the key {arr.attrs.get(positions.ATTRIBUTE)!r}, "
                                 f"not this store's {key!r}", path, file=file,
                                 fix=f"Put this store's own folder back from a copy of it, or {RE_EXTRACT}")

    def recorded_arrays(self) -> list[tuple[str, zarr.Array, int]]:
        """(path, array, rows below which its chunks are recorded) of every array that keeps chunk records under
        this store's key: token arrays whole, activations and latents up to the commit mark."""
        record, group = self._record, self.group
        key = record.storage.chunk_records
        if not key or not self.local or not self.is_allocated:
            return []
        paths = [f"tokens/{name}" for name in group["tokens"].array_keys()]
        paths += [f"activations/{hp}" for hp in record.hook_points]
        paths += [f"latents/{hp}/{name}" for hp in record.latents for name in ("indices", "values")]
        out = []
        for path in paths:
            arr = self.array(path)  # an array under another key is refused there
            if positions.recorded(path):
                rows = int(arr.shape[0])
                out.append((path, arr, rows if path.startswith("tokens/") else min(record.committed_tokens(), rows)))
        return out

    def check_records(self) -> None:
        """Refuse (:class:`StoreCorrupted`, naming the array, chunk and file) a store whose committed chunks are not
        all the ones their records name (a records file lost or zeroed, a file moved): what a resume checks before
        it writes, so that it never runs to a COMPLETED store whose rows every read refuses. Reads 4 bytes a chunk
        (each chunk's own bytes are checked when it is read)."""
        for path, arr, below in self.recorded_arrays():
            try:
                check_recorded(positions.ChunkRecords.of(Geometry.of(arr)), below)
            except Damaged as exc:
                what = f"the {unit_name(arr)} is missing although rows below {below} are committed" \
                    if exc.missing else exc.what
                raise StoreCorrupted(self.location, what, path, exc.unit,
                                     f"{self.location.rstrip('/')}/{unit_key(arr, exc.unit)}") from None

    def rerecord(self) -> dict[str, dict[str, int]]:
        """Write the chunk records that are missing (none written, the records file lost, cut short or zeroed: a
        copy tool that skips dot files, a bad block) from the crc32c each chunk's own file holds, when the data files
        are where they belong. A record that names other data (a file moved, or copied in from another store) is left
        as it is, and so refused; a chunk whose bytes are damaged stays refused by its own checksum. Every array is
        read before any record is written: a missing data file changes nothing. Returns ``{"recorded": {path:
        chunks}, "left": {path: chunks whose record names other data}}``; hold the writer lease."""
        if not self._record.storage.chunk_records:
            raise InputError(f"the store {self.location} keeps no chunk records (made before them, or remote): "
                             "nothing to re-record; `mistudio verify` checks it as it is")
        todo, left = [], {}
        for path, arr, below in self.recorded_arrays():
            records = positions.ChunkRecords.of(Geometry.of(arr))
            try:
                crcs = stored_crcs(records, 0, records.final(below), below)
            except OSError as exc:  # a unit file missing: nothing to take a checksum from
                raise InputError(f"{path} of {self.location} cannot be re-recorded, so nothing was: {exc}. "
                                 "`mistudio verify` names what is missing: put it back from a copy, or re-extract "
                                 "(retry)") from exc
            missing, wrong = [], 0
            for chunk, crc in enumerate(crcs):
                if records.missing(chunk, crc):
                    missing.append((chunk, crc))
                elif records.misplaced(chunk, crc) is not None:
                    wrong += 1
            todo.append((path, records, missing))
            if wrong:
                left[path] = wrong
        for _, records, missing in todo:
            for chunk, crc in missing:
                records.put(chunk, crc)
            records.sync()
        return {"recorded": {path: len(missing) for path, _, missing in todo if missing}, "left": left}

    def _nothing_stored(self, path: str) -> str:
        """Why a store without arrays has no ``path``, and what to do: its arrays are made once its data is
        tokenized, so a job stopped before that (cancelled, or out of time while loading) left none."""
        record = self.record
        if record.status in (metadata.Status.FAILED, metadata.Status.CANCELLED):
            error = f" [{record.error.error_type}]" if record.error else ""
            then = "resume it" if metadata.can_resume(record.status, record.error) else "retry it"
            return (f"extraction {record.id} holds no {path}: its job stopped ({record.status.value}{error}) before "
                    f"it stored anything, so there is nothing to read; {then} to extract it")
        return (f"extraction {record.id} holds no {path} yet: its job ({record.status.value}) has not stored "
                "anything; wait for its first batch")

    def _claimed_rows(self, path: str) -> tuple[int | None, str, int]:
        """(rows the metadata gives the array at ``path`` or None, where it says so, rows its files must hold)."""
        record = self._record
        progress, storage = record.progress, record.storage
        total = progress.tokens_total
        if total is None:
            return None, "", 0
        folder, name = path.rsplit("/", 1)
        if folder == "tokens":
            samples = progress.samples_total
            if name in PER_SAMPLE and samples is not None:
                rows = samples + (name != "sample_index")
                return rows, f"progress.samples_total={samples:,}", rows
            n_input = storage.n_input_tokens if storage.n_input_tokens is not None else total
            where = "storage.n_input_tokens" if storage.n_input_tokens is not None else "progress.tokens_total"
            return n_input, f"{where}={n_input:,}", n_input  # token arrays are written whole at allocation
        if folder == "activations" or (folder.startswith("latents/") and name in ("indices", "values")):
            return total, f"progress.tokens_total={total:,}", min(record.committed_tokens(), total)
        return None, "", 0

    def _check_size(self, arr: zarr.Array, path: str, file: str) -> None:
        """Refuse an array whose ``zarr.json`` claims more than the metadata and its files back, before anything
        is read or allocated: its row count must be the metadata's, and the storage units of its rows that must
        be written (every row of a token array; an activation array's rows below the commit mark) must exist,
        the first and the last one at least the size of their chunks. A crafted or damaged size (10**12 rows)
        is :class:`StoreCorrupted` naming the file."""
        expected, where, needed = self._claimed_rows(path)
        key = (path, tuple(arr.shape), expected, needed)
        checked = self.__dict__.setdefault("_sizes_checked", set())
        if key in checked:
            return
        rows = int(arr.shape[0]) if arr.ndim else 0
        if expected is not None and rows != expected:
            raise StoreCorrupted(self.location, f"its zarr.json gives it {rows:,} rows but the metadata's {where} "
                                 "(the array's size is checked against the metadata before it is read)", path,
                                 file=file)
        if needed > 0:
            unit = storage_unit(arr)[0]
            for index in sorted({0, (min(needed, rows) - 1) // unit}):
                self._check_unit_file(arr, path, index, min(needed, rows))
        checked.add(key)

    def _check_unit_file(self, arr: zarr.Array, path: str, index: int, needed: int) -> None:
        """The storage unit ``index`` (which holds some of the first ``needed`` rows) exists, and, for the plain
        layouts mistudio writes, holds at least the bytes of its chunks below ``needed``."""
        unit = (index, *[0] * (arr.ndim - 1))
        key = unit_key(arr, unit)
        file = f"{self.location.rstrip('/')}/{key}"
        try:
            size = int(zarr.core.sync.sync(arr.store_path.store.getsize(key)))
        except (FileNotFoundError, OSError, KeyError) as exc:
            raise StoreCorrupted(self.location, f"the {unit_name(arr)} is missing, yet the metadata says rows up to "
                                 f"{needed:,} are written (a size larger than the files)", path, unit, file) from exc
        layout = fast_layout(arr) if arr.ndim in (1, 2) else None
        if layout is None:
            return
        inner_rows, crc = layout
        row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        first = index * storage_unit(arr)[0]
        chunks = -(-(min(needed, first + storage_unit(arr)[0]) - first) // inner_rows)
        least = chunks * (inner_rows * row_bytes + CHECKSUM_BYTES * crc)
        if size < least:
            raise StoreCorrupted(self.location, f"the {unit_name(arr)} file is {size:,} bytes, but its zarr.json "
                                 f"makes the {chunks:,} chunk(s) of its written rows {least:,} bytes (a size larger "
                                 "than the files)", path, unit, file)

    def tokens(self, name: str) -> CheckedArray:
        """A checked read-only view of ``tokens/<name>`` (written in full at allocation)."""
        arr = self.array(f"tokens/{name}")
        return CheckedArray(arr, self.location, arr.shape[0])

    def input_ids(self) -> np.ndarray:
        return self.tokens("input_ids")[:]

    def sample_offsets(self) -> np.ndarray:
        """Token range of each stored sample, checked: from 0 up to the token arrays' length, never decreasing."""
        return self._offsets("sample_offsets", self.array("tokens/input_ids").shape[0], "tokens/input_ids")

    def sample_index(self) -> np.ndarray:
        return self.tokens("sample_index")[:]

    def activation_offsets(self) -> np.ndarray:
        """Activation-row range of each stored sample (``tokens/activation_offsets``; stores from before it
        have a row per token, so their sample offsets), checked like the sample offsets, and at most one row
        per token."""
        if "activation_offsets" not in self.group["tokens"]:
            return self.sample_offsets()
        tokens = self.sample_offsets()
        rows = self._offsets("activation_offsets", int(self._record.progress.tokens_total or 0),
                             "progress.tokens_total")
        if len(rows) != len(tokens) or np.any(np.diff(rows) > np.diff(tokens)):
            raise StoreCorrupted(self.location, "its offsets give a sample more activation rows than tokens",
                                 "tokens/activation_offsets",
                                 file=f"{self.location.rstrip('/')}/tokens/activation_offsets/zarr.json")
        return rows

    def _offsets(self, name: str, end: int, what: str) -> np.ndarray:
        """``tokens/<name>``, whose values index other arrays: they must run from 0 to ``end`` (the length of
        ``what``) without decreasing, so that no range read from them is larger than the arrays (checked once
        here, before any caller sizes a buffer by them)."""
        checked = self.tokens(name)
        offsets = checked[:]
        bad, at = None, 0
        if offsets.ndim != 1 or not len(offsets):
            bad = "it is empty"
        elif offsets[0] != 0:
            bad = f"they start at {int(offsets[0]):,}, not at 0"
        elif offsets[-1] != end:
            bad, at = f"they end at {int(offsets[-1]):,}, not at {end:,} (the length of {what})", len(offsets) - 1
        elif np.any(np.diff(offsets) < 0):
            at = int(np.flatnonzero(np.diff(offsets) < 0)[0]) + 1
            bad = f"they decrease at entry {at:,}"
        if bad:
            unit = (at // checked.chunks[0],)
            raise StoreCorrupted(self.location, f"its offsets do not fit the arrays they index: {bad}",
                                 f"tokens/{name}", unit, f"{self.location.rstrip('/')}/{unit_key(checked.zarr, unit)}")
        return offsets

    def activations(self, hook_point: str) -> zarr.Array:
        """The raw (writable, unchecked) Zarr array of one hook point; readers use ``Extraction.activations``."""
        return self.array(f"activations/{hook_point}")

    def bytes_to_write(self) -> int | None:
        """Bytes the activation arrays still need above the commit mark (None before allocation)."""
        record = self.record  # from memory: the store may be gone (this feeds the failure's message)
        if record.progress.tokens_total is None or not record.model.hidden_size:
            return None
        left = record.progress.tokens_total - record.progress.tokens_committed
        itemsize = numpy_dtype(record.params.dtype or "float16").itemsize
        return left * record.model.hidden_size * itemsize * len(record.hook_points)

    def destroy(self) -> None:
        """Remove this store (see :meth:`remove`)."""
        self.remove(self.location, self.storage_options)

    @staticmethod
    def remove(location: str, storage_options: dict | None = None) -> None:
        """Remove a whole store. Locally it is first renamed to a hidden name, so it vanishes from every listing
        at once and a job still writing it notices."""
        if "://" in location and not location.startswith("file://"):
            import fsspec

            fs, path = fsspec.core.url_to_fs(location, **(storage_options or {}))
            fs.rm(path, recursive=True)
            return
        path = location.removeprefix("file://")
        trash = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}-{metadata.new_nonce()}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def consolidate(self) -> None:
        """Write consolidated metadata once, at the end, for fast `xarray.open_zarr`."""
        import warnings

        with warnings.catch_warnings(), zarr.config.set({"json_indent": None}):
            warnings.simplefilter("ignore", UserWarning)  # consolidation is not in the v3 spec; xarray reads it
            zarr.consolidate_metadata(self.group.store)


