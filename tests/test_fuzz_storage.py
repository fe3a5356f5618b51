"""Property-based tests (hypothesis) of what a reader trusts (issue 16 part 6): the shard index check, the unit
decoder of checked reads on real unit files (generated indexes, wrapping offsets, huge lengths, overlaps, empty
markers below the mark, zero-length and truncated files, swapped-in FIFOs), and the metadata parser. Every input
gives the stored rows or ``StoreCorrupted`` naming the place (a typed error naming the field for metadata), never
another exception, and within a memory bound."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pydantic
import pytest
import zarr
from conftest import bounded_call
from hypothesis import HealthCheck, event, given, settings, strategies as st
from zarr.codecs import Crc32cCodec

from mistudio.errors import StoreCorrupted
from mistudio.storage import metadata
from mistudio.storage.codec import Damaged, FastReader, Geometry, _crc32c, check_index
from mistudio.storage.layout import CHECKSUM_BYTES, EMPTY, WRITE_CONFIG
from mistudio.storage.reads import CheckedArray
from mistudio.storage.store import ExtractionStore

N_ROWS, WIDTH, CHUNK, SHARD = 100, 4, 8, 32  # 4 shards of 4 chunks; the last shard holds 4 rows (one chunk)
FUZZ = settings(max_examples=150, deadline=20000, suppress_health_check=[HealthCheck.function_scoped_fixture])
U64 = 2**64


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A sharded float32 array written by Zarr with the writer's codecs (crc32c per chunk and on the index), its
    values, and its folder (each example copies the shard files back before damaging one)."""
    root = tmp_path_factory.mktemp("fuzz-store") / "a"
    arr = zarr.create_array(store=str(root), shape=(N_ROWS, WIDTH), chunks=(CHUNK, WIDTH), shards=(SHARD, WIDTH),
                            dtype="float32", fill_value=0, compressors=[Crc32cCodec()], config=WRITE_CONFIG)
    values = np.arange(N_ROWS * WIDTH, dtype=np.float32).reshape(N_ROWS, WIDTH) + 0.5
    arr[:] = values
    files = {p: p.read_bytes() for p in (root / "c").rglob("*") if p.is_file()}
    assert len(files) == 4
    return root, values, files


def restored(stored):
    root, values, files = stored
    for path, data in files.items():
        if path.is_dir() or path.is_fifo():
            path.rmdir() if path.is_dir() else path.unlink()
        path.write_bytes(data)
    arr = zarr.open_array(store=str(root), mode="r")
    return arr, values


def within_seconds(call, seconds: float = 10.0):
    """Run ``call`` in a thread; it must finish (a FIFO must never block a read)."""
    box = {}

    def run():
        try:
            box["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the read blocked"
    if "error" in box:
        raise box["error"]
    return box["result"]


# -- the shard index -------------------------------------------------------------------------------------------
@st.composite
def index_table(draw, g: Geometry):
    """A shard index: mostly the writer's own (chunks back to back, the tail maybe empty) with a few entries
    replaced, else any entries at all."""
    if draw(st.booleans()):
        return draw(st.lists(entry(g), min_size=g.per_shard, max_size=g.per_shard))
    written = draw(st.integers(0, g.per_shard))
    table = [(i * g.chunk_bytes, g.chunk_bytes) for i in range(written)] + [(EMPTY, EMPTY)] * (g.per_shard - written)
    for _ in range(draw(st.integers(0, 2))):
        table[draw(st.integers(0, g.per_shard - 1))] = draw(entry(g))
    return table


def entry(g: Geometry):
    cb = g.chunk_bytes
    return st.one_of(
        st.integers(0, g.per_shard - 1).map(lambda i: (i * cb, cb)),  # a well-placed chunk
        st.just((EMPTY, EMPTY)), st.just((EMPTY, cb)), st.just((0, EMPTY)), st.just((0, 0)),
        st.integers(1, 2**20).map(lambda k: (U64 - k, cb)),  # wraps past 2**64
        st.integers(0, 4 * cb).map(lambda o: (o, 2**63)),  # a huge length
        st.tuples(st.integers(0, 8 * cb), st.integers(0, 2 * cb)),  # overlapping, short, long
        st.tuples(st.integers(0, U64 - 1), st.integers(0, U64 - 1)))


@FUZZ
@given(st.data())
def test_check_index_gives_sound_offsets_or_a_value_error(stored, data):
    arr, _ = restored(stored)
    g = Geometry.of(arr)
    table = data.draw(index_table(g))
    raw = np.asarray(table, dtype="<u8").tobytes()
    crc = _crc32c(raw)  # valid, so that the entries themselves are checked; one in ten made wrong
    if data.draw(st.integers(0, 9)) == 0:
        crc ^= 1 << data.draw(st.integers(0, 31))
    raw += crc.to_bytes(CHECKSUM_BYTES, "little")
    if data.draw(st.integers(0, 9)) == 0:
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    written = sum(length for offset, length in table if (offset, length) != (EMPTY, EMPTY))
    size = data.draw(st.one_of(st.just(written + g.index_bytes), st.integers(0, 2**62)))
    try:
        offsets = check_index(raw, size, g)
    except ValueError as exc:
        assert str(exc)
        event("refused")
        return
    event("accepted")
    assert len(offsets) == g.per_shard
    end = 0
    for offset, (want_offset, length) in zip(offsets, table):
        if offset is None:
            assert (want_offset, length) == (EMPTY, EMPTY)
            continue
        assert offset == want_offset == end and length == g.chunk_bytes
        end += g.chunk_bytes
    assert end + g.index_bytes == size


# -- the unit decoder on real files ------------------------------------------------------------------------------
@st.composite
def damage(draw, g: Geometry, sizes: dict[int, int]):
    unit = draw(st.integers(0, 3))
    how = draw(st.sampled_from(["index", "index", "truncate", "zero", "extend", "flip", "folder", "fifo", "none"]))
    return unit, how, {
        "index": lambda: (draw(index_table(g)), draw(st.booleans())),
        "truncate": lambda: draw(st.integers(0, sizes[unit])),
        "extend": lambda: draw(st.binary(min_size=1, max_size=64)),
        "flip": lambda: (draw(st.integers(0, sizes[unit] - 1)), draw(st.integers(1, 255))),
    }.get(how, lambda: None)()


def apply(path: Path, how: str, arg, g: Geometry) -> None:
    data = bytearray(path.read_bytes())
    if how == "index":
        table, recrc = arg
        raw = np.asarray(table, dtype="<u8").tobytes()
        crc = _crc32c(raw) if recrc else int.from_bytes(data[-CHECKSUM_BYTES:], "little")
        data[-g.index_bytes:] = raw + crc.to_bytes(CHECKSUM_BYTES, "little")
    elif how == "truncate":
        del data[arg:]
    elif how == "zero":
        data.clear()
    elif how == "extend":
        data += arg
    elif how == "flip":
        data[arg[0]] ^= arg[1]
    if how == "folder":
        path.unlink()
        path.mkdir()
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        path.write_bytes(bytes(data))


@FUZZ
@given(st.data())
def test_checked_reads_give_the_stored_rows_or_store_corrupted(stored, data):
    arr, values = restored(stored)
    g = Geometry.of(arr)
    sizes = {u: g.unit_file(u).stat().st_size for u in range(4)}
    unit, how, arg = data.draw(damage(g, sizes))
    apply(g.unit_file(unit), how, arg, g)
    mark = data.draw(st.sampled_from([N_ROWS, N_ROWS, 3 * SHARD - 5, SHARD + CHUNK]))  # below: a shard being filled
    first = data.draw(st.integers(0, mark - 1))
    stop = data.draw(st.integers(first + 1, mark))
    checked = CheckedArray(arr, "fuzz-store", mark)
    bound = 3 * (stop - first) * WIDTH * 4 + 4 * g.chunk_bytes + (1 << 16)
    got = within_seconds(lambda: bounded_call(lambda: checked[first:stop], bound, StoreCorrupted))
    event(f"{how}: {type(got).__name__}")
    if isinstance(got, StoreCorrupted):
        assert got.array == arr.path and got.chunk is not None and got.file, str(got)
    else:
        np.testing.assert_array_equal(got, values[first:stop])
    reader = FastReader(g, mark)
    for decode in (False, True):  # what verify does per unit: the file's size, or Damaged saying what
        for u in range(-(-mark // SHARD)):
            try:
                assert within_seconds(lambda: reader.check_unit(u, decode=decode)) >= 0
            except Damaged as exc:
                assert exc.what and exc.unit[0] == u


# -- the metadata parser -----------------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=3), max_leaves=12)
VALID = [metadata.ExtractionMeta(id="x", nonce="n", status="COMPLETED").to_json(),
         metadata.ExtractionMeta.model_validate({  # an allocated store with SAE latents
             "id": "x", "nonce": "n", "status": "EXTRACTING", "hook_points": ["layers.0.residual"],
             "progress": {"samples_total": 10, "tokens_total": 100, "samples_committed": 2, "tokens_committed": 20,
                          "chunk_rows": 64},
             "storage": {"n_input_tokens": 100, "checksum": True},
             "latents": {"layers.0.residual": {"sae": "s", "d_sae": 64, "width": 4, "block_rows": 64}}}).to_json()]


def paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from paths(value, (*prefix, key))


@st.composite
def mutated(draw):
    """A valid record with one field (at any depth) replaced by generated JSON, or dropped, or a field added."""
    doc = json.loads(json.dumps(draw(st.sampled_from(VALID))))
    where = draw(st.sampled_from([p for p in paths(doc) if p]))
    parent = doc
    for key in where[:-1]:
        parent = parent[key]
    how = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
    if how == "replace":
        parent[where[-1]] = draw(JSON)
    elif how == "drop":
        del parent[where[-1]]
    else:  # a field added beside it: that is where an error points
        added = draw(st.text(min_size=1, max_size=6))
        parent[added] = draw(JSON)
        where = (*where[:-1], added)
    return doc, where


@settings(max_examples=300, deadline=10000)
@given(st.one_of(mutated(), JSON.map(lambda d: (d, ()))))
def test_metadata_parses_to_a_record_or_an_error_naming_the_field(case):
    doc, where = case
    try:
        record = metadata.parse(doc)
    except pydantic.ValidationError as exc:
        for error in exc.errors():
            assert error["loc"] or not isinstance(doc, dict), error  # a field is named, unless the whole is wrong
        if where and len(exc.errors()) == 1 and isinstance(doc, dict):
            assert exc.errors()[0]["loc"][:len(where)] == where[:len(exc.errors()[0]["loc"])]
        return
    assert isinstance(record, metadata.ExtractionMeta)
    again = metadata.parse(record.to_json())  # what is written reads back the same
    assert again.to_json() == record.to_json()
    progress = record.progress  # sizes are never negative
    assert record.committed_tokens() >= 0 and progress.samples_committed >= 0
    assert all(v is None or v >= 0 for v in (progress.samples_total, progress.tokens_total,
                                              record.storage.n_input_tokens))


@settings(max_examples=40, deadline=30000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(mutated().map(lambda c: c[0]), JSON))
def test_a_store_with_any_metadata_opens_or_is_store_corrupted_naming_the_file(tmp_path_factory, doc):
    root = tmp_path_factory.mktemp("meta") / "s.zarr"
    zarr.create_group(store=str(root), zarr_format=3, attributes={"mistudio": doc})
    try:
        store = ExtractionStore.open(str(root))
    except StoreCorrupted as exc:
        assert exc.file == f"{root}/zarr.json" and "mistudio" in exc.what
        return
    except ValueError as exc:  # a Zarr group that is not an extraction at all
        assert doc is None and "not a mistudio extraction" in str(exc)
        return
    assert isinstance(store.record, metadata.ExtractionMeta)


@pytest.mark.parametrize("mark", [N_ROWS, CHUNK])  # below the mark (the fast reader), above it (through Zarr)
def test_a_fifo_in_place_of_a_shard_is_refused_without_blocking(stored, mark):
    """Found by the fuzz suite: a FIFO swapped in for a unit file blocked every read of it forever."""
    arr, _ = restored(stored)
    g = Geometry.of(arr)
    apply(g.unit_file(1), "fifo", None, g)
    with pytest.raises(StoreCorrupted, match="not a regular file"):
        within_seconds(lambda: CheckedArray(arr, "fuzz-store", mark)[SHARD:SHARD + CHUNK], 5)
    with pytest.raises(Damaged, match="not a regular file"):
        within_seconds(lambda: FastReader(g, N_ROWS).check_unit(1, decode=True), 5)


@settings(max_examples=60, deadline=30000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(mutated().map(lambda c: c[0]), JSON))
def test_verify_reports_any_metadata_without_raising(tmp_path_factory, doc):
    """verify reads the raw metadata (it must report what the typed parser refuses): any JSON is a report."""
    from mistudio.storage.verify import verify

    root = tmp_path_factory.mktemp("meta") / "s.zarr"
    zarr.create_group(store=str(root), zarr_format=3, attributes={"mistudio": doc})
    report = verify(str(root))
    assert str(report)
    for problem in report.problems:
        assert problem.what and (problem.file or problem.array), problem
