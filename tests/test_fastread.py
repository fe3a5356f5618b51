"""The fast local read path of checked arrays (mistudio.fastread): same values as Zarr for both layouts,
the same StoreCorrupted on damage, Zarr for what it does not handle."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import mistudio as ms
from mistudio.errors import StoreCorrupted
from mistudio.storage.codec import Fallback

from conftest import TEXTS

HP = "layers.1.residual"
BASE = dict(layers=[0, 1], hooks=["residual"], batch_size=2, dtype="float32", chunk_mb=0.01)
LAYOUTS = {"chunks": dict(shard_mb=0), "shards": dict(shard_mb=0.04),
           "chunks-nocrc": dict(shard_mb=0, checksum=False), "shards-nocrc": dict(shard_mb=0.04, checksum=False)}


@pytest.fixture(scope="module")
def stores(gpt2_dir, tmp_path_factory):
    """{layout: workspace} of one completed store per layout (64-row chunks; shards of 5 chunks, the last partial)."""
    out = {}
    for name, layout in LAYOUTS.items():
        ws = str(tmp_path_factory.mktemp(f"fastread-{name}") / "ws")
        ext = ms.extract(gpt2_dir, TEXTS * 6, workspace=ws, progress=False, **BASE, **layout)
        a = ext.activations(HP)
        assert a.chunks[0] == 64 and a.shards == ((320, a.shape[1]) if "shards" in name else None)
        assert a.shape[0] > 2 * 320 and a.shape[0] % 320 and a.shape[0] % 64, a.shape  # partial last shard, chunk
        assert a._fast is not None and a._fast.g.crc == ("nocrc" not in name)
        out[name] = ws, ext.id
    return out


def opened(stores, name, tmp_path=None):
    """The extraction of a layout; with ``tmp_path``, of a fresh copy (to damage) and its activation folder."""
    ws, ext_id = stores[name]
    if tmp_path is not None:
        ws = str(shutil.copytree(ws, tmp_path / "ws"))
    ext = ms.open_extraction(str(Path(ws) / "extractions" / f"{ext_id}.zarr"))
    return ext, Path(ext.location) / "activations" / HP / "c"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fast_reads_equal_zarr_reads(stores, name):
    ext, _ = opened(stores, name)
    a = ext.activations(HP)
    n, d = a.shape
    rng = np.random.default_rng(0)
    spans = [(0, n), (0, 64), (64, 128), (300, 340), (n - 1, n), (n - 70, n), (320, 640), (5, 6)]
    spans += [tuple(sorted(rng.choice(n + 1, 2, replace=False))) for _ in range(60)]
    cols = [None, slice(3, 9), 7, [0, d - 1, 5], np.arange(d) % 3 == 0, slice(None, None, 2), -1]
    for i, (a0, b0) in enumerate(spans):
        col = cols[i % len(cols)]
        key = slice(a0, b0) if col is None else (slice(a0, b0), col)
        want = a.zarr[key]
        np.testing.assert_array_equal(a._fast.read(key), want, err_msg=str(key))  # the fast path itself
        got = a[key]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(a[:], a.zarr[:])
    np.testing.assert_array_equal(np.asarray(a), a.zarr[:])


def test_other_selections_go_through_zarr(stores):
    ext, _ = opened(stores, "shards")
    a = ext.activations(HP)
    for key in [5, slice(0, 100, 3), [3, 1, 400], (slice(None), 4), slice(10, 10)]:
        np.testing.assert_array_equal(a[key], a.zarr[key])
    for key in [5, slice(0, 100, 3), slice(10, 10), [1, 2]]:
        with pytest.raises(Fallback):
            a._fast.selection(key)


@pytest.mark.parametrize("name", ["chunks", "shards"])
def test_flipped_bit_names_the_chunk(stores, name, tmp_path):
    ext, c = opened(stores, name, tmp_path)
    a = ext.activations(HP)
    unit = c / "1" / "0"  # chunk 1 (rows 64-128) or shard 1 (rows 320-640)
    data = bytearray(unit.read_bytes())
    inner_chunk_2 = 2 * (64 * a.shape[1] * 4 + 4)  # in shard 1: rows 448-512
    data[inner_chunk_2 + 100 if name == "shards" else 100] ^= 0x10
    unit.write_bytes(bytes(data))
    rows = slice(450, 460) if name == "shards" else slice(70, 80)
    what = r"inner chunk\(s\) \(7, 0\) of the shard \(rows 448-512\)" if name == "shards" else \
        "the chunk cannot be decoded"
    with pytest.raises(StoreCorrupted, match=rf"activations/{HP} chunk \(1, 0\) \(file .*c/1/0\): {what}") as info:
        a[rows]
    assert info.value.chunk == (1, 0) and info.value.array == f"activations/{HP}" and info.value.file.endswith("c/1/0")
    with pytest.raises(StoreCorrupted, match=r"chunk \(1, 0\)"):
        a[rows.start:rows.start + 1, 3]  # a column too
    with pytest.raises(StoreCorrupted, match=r"chunk \(1, 0\)"):
        a[:]  # whole chunks, read straight into the output
    if name == "shards":
        np.testing.assert_array_equal(a[320:448], a.zarr[320:448])  # the shard's other inner chunks still read
    np.testing.assert_array_equal(a[:64], a.zarr[:64])


@pytest.mark.parametrize("how", ["truncate", "index"])
def test_damaged_shard_names_the_shard(stores, how, tmp_path):
    ext, c = opened(stores, "shards", tmp_path)
    a = ext.activations(HP)
    unit = c / "1" / "0"
    data = bytearray(unit.read_bytes())
    if how == "truncate":
        data = data[: len(data) - 100]
    else:
        data[-30] ^= 0x01  # an offset in the index
    unit.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupted, match=r"chunk \(1, 0\) .*the shard cannot be decoded: its index"):
        a[330:340]
    assert ext.verify().problems[0].chunk == (1, 0)  # verify agrees


@pytest.mark.parametrize("name", ["chunks", "shards"])
def test_every_selection_refuses_units_swapped_in_place(stores, name, tmp_path):
    """Two units of one array exchanged (each whole, its own checksum right): stepped slices, column picks, rows
    into a buffer of another dtype (a loader pooling float16 and float32 stores) are refused like a plain slice,
    never read through Zarr as the wrong rows."""
    ext, c = opened(stores, name, tmp_path)
    a = ext.activations(HP)
    first, second = c / "0" / "0", c / "1" / "0"
    held = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(held)
    n, d = a.shape
    keys = [slice(None, None, 2), slice(0, 320, 3), (slice(0, 320, 2), 5), (slice(None), [1, 2]), slice(300, 0, -7),
            (Ellipsis, 0), [5, 150, 300]]
    for key in keys:
        with pytest.raises(StoreCorrupted, match=r"chunk \(0, 0\)|chunk \(1, 0\)"):
            a[key]
    with pytest.raises(StoreCorrupted, match=r"chunk \(0, 0\)") as info:
        a.read_into(np.empty((n, d), np.float64), 0, n)
    workspace = str(Path(ext.location).parent.parent)
    assert f"`mistudio verify {ext.id} --workspace {workspace}" in str(info.value)  # the store named, not <id>


def test_stepped_slices_of_committed_rows_read_while_the_rest_is_unwritten(gpt2_dir, tmp_path):
    """A store whose job stopped part-way: a stepped slice below the commit mark reads (it is not 'past the
    committed rows'), equal to the same rows of the plain slice."""
    from conftest import fail_at

    ws = ms.Workspace(str(tmp_path / "ws"))
    job = ws.submit(gpt2_dir, TEXTS * 6, before_batch=fail_at(8), **BASE, shard_mb=0.04).wait(120)
    assert job.status == "FAILED"
    a = ws.open(job.id).activations(HP)
    mark = a.mark
    assert 0 < mark < a.zarr.shape[0]
    np.testing.assert_array_equal(a[:mark:2], a[:mark][::2])
    np.testing.assert_array_equal(a[1:mark:5, 3], a[:mark][1::5, 3])
    np.testing.assert_array_equal(a.read_into(np.empty((mark, a.shape[1]), np.float64), 0, mark), a[:mark])
    committed = a[:]  # negative steps count from the committed rows, as numpy's on them
    for key in (slice(None, None, -1), slice(-1, -4, -1), (slice(None, None, -5), slice(None, None, 2))):
        np.testing.assert_array_equal(a[key], committed[key], err_msg=str(key))
    with pytest.raises(ms.InputError, match="committed"):  # rows past the mark, stepping down: refused, not cut
        a[mark + 3:mark - 3:-1]


@pytest.mark.parametrize("name", ["chunks", "shards"])
def test_every_selection_form_reads_as_numpy_on_the_whole_array(stores, name):
    """Points on both axes, grids of a slice and an index, trailing Ellipsis, masks, repeats, negatives: numpy's
    answer on ``a[:]``; a few rows of a whole-array selection read a chunk at a time, not the array."""
    import tracemalloc

    ext, _ = opened(stores, name)
    a = ext.activations(HP)
    full = a[:]
    n = len(full)
    mask = np.random.default_rng(0).random(n) < 0.1
    keys = [([0, 1, 2], [0, 1, 2]), (slice(0, 9, 2), [0, 3]), ([[0, 1], [2, 3]],), ([5, 5, 1], 3), (mask, slice(1, 4)),
            (Ellipsis, 0), (7, Ellipsis), ([-1, -2],), ([0, n - 1], Ellipsis), (slice(None, None, 97), Ellipsis),
            (mask, Ellipsis), (slice(None, None, -3), [2, 0])]
    for key in keys:
        got, want = a[key], full[key]
        assert got.shape == want.shape, (key, got.shape, want.shape)
        np.testing.assert_array_equal(got, want, err_msg=str(key))
    from mistudio.storage.reads import CheckedArray

    checked = CheckedArray(ext.store.activations(HP), ext.location, n)  # the view under ext's, Ellipsis as given
    for view, key in ((a, [[0, n - 1], ...]), (a, [slice(None, None, 2), [5, 1, 5]]),
                      (a, [slice(None, None, -1), ..., 3]), (checked, [..., 3])):
        tracemalloc.start()
        try:
            view[tuple(key)]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # a chunk at a time, the columns asked for (whole rows would be the array; at d = 32 the row indices
        # themselves weigh a third of it)
        assert peak < 0.6 * full.nbytes, (key, peak, full.nbytes)


@pytest.mark.parametrize("edit", ["int32", "big-endian", "bfloat16", "input_ids float32"])
def test_a_zarr_json_that_reads_the_bytes_as_other_numbers_is_refused(stores, edit, tmp_path):
    """An array's zarr.json edited to another dtype of the same size, to big-endian bytes, or to bfloat16 over
    float32's bits (token ids as floats): every read (and verify) names the file instead of returning other
    numbers."""
    import json

    ext, c = opened(stores, "shards", tmp_path)
    meta_file = c.parent / "zarr.json"
    if edit == "input_ids float32":
        meta_file = Path(ext.location) / "tokens" / "input_ids" / "zarr.json"
        meta = json.loads(meta_file.read_text())
        meta["data_type"] = "float32"
        meta_file.write_text(json.dumps(meta))
        with pytest.raises(StoreCorrupted, match=r"tokens/input_ids.*float32, but this array holds whole numbers"):
            ms.open_extraction(ext.location).store.input_ids()
        assert [p.file for p in ms.open_extraction(ext.location).verify().problems] == [str(meta_file)]
        return
    meta = json.loads(meta_file.read_text())
    if edit == "int32":
        meta["data_type"] = "int32"
    elif edit == "big-endian":
        meta["codecs"][0]["configuration"]["codecs"][0]["configuration"]["endian"] = "big"
    else:
        meta["attributes"]["mistudio_dtype"] = "bfloat16"
    meta_file.write_text(json.dumps(meta))
    ext = ms.open_extraction(ext.location)
    with pytest.raises(StoreCorrupted, match=rf"activations/{HP}.*zarr.json.*(says its values are|codecs)"):
        ext.activations(HP)[:10]
    problems = ext.verify().problems
    assert [p.file for p in problems] == [str(meta_file)], problems


def test_truncated_chunk_and_missing_units(stores, tmp_path):
    for name, folder in (("chunks", "plain"), ("shards", "sharded")):
        ext, c = opened(stores, name, tmp_path / folder)
        a = ext.activations(HP)
        unit = c / "2" / "0"
        if name == "chunks":
            unit.write_bytes(unit.read_bytes()[:1000])
            with pytest.raises(StoreCorrupted, match=r"chunk \(2, 0\) .*the chunk cannot be decoded"):
                a[130:140]
        unit.unlink()
        with pytest.raises(StoreCorrupted, match=rf"chunk \(2, 0\) .*the {name[:-1]} is missing although rows"):
            a[:]


def test_remote_store_reads_through_zarr(gpt2_dir):
    ext = ms.extract(gpt2_dir, TEXTS * 2, workspace="memory://mistudio-fastread/ws", progress=False, **BASE,
                     shard_mb=0)
    a = ext.activations(HP)
    assert a._fast is None
    np.testing.assert_array_equal(a[10:200, 2:5], a.zarr[10:200, 2:5])


@pytest.mark.parametrize("shards", [None, (320, 16)])
def test_files_zarr_wrote_itself_read_the_same(tmp_path, shards):
    """Units that Zarr encoded (not ``write_unit``): its own inner chunk order within a shard, partial writes."""
    import zarr

    from mistudio.storage.reads import CheckedArray
    from mistudio.storage.layout import WRITE_CONFIG, array_codecs

    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(700, 16), chunks=(64, 16), shards=shards, dtype="float32",
                          fill_value=0, config=WRITE_CONFIG, **array_codecs(True))
    data = np.random.default_rng(1).standard_normal((700, 16)).astype("float32")
    for a0 in (600, 0, 300):  # out of order, ranges that cut units
        z[a0:a0 + 300] = data[a0:a0 + 300]
    a = CheckedArray(z, str(tmp_path / "a.zarr"), 700)
    assert a._fast is not None
    for key in [slice(0, 700), slice(10, 650), (slice(63, 321), [2, 5]), slice(640, 700)]:
        np.testing.assert_array_equal(a._fast.read(key), data[key])
