"""A unit file in the wrong place (two shards swapped, a shard of another hook point, a shard of another store of
the same geometry, two chunk files of a format-1 store) is refused by ``verify`` and by checked reads: each chunk's
checksum is recorded for its place. Stores from before the records verify and read as they always did."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import mistudio as ms
from mistudio.cli import main as cli
from mistudio.errors import StoreCorrupted
from mistudio.storage import positions

from conftest import TEXTS

HPS = ["layers.0.residual", "layers.1.residual"]  # the same width: one geometry
BASE = dict(layers=[0, 1], hooks=["residual"], batch_size=2, dtype="float32", chunk_mb=0.01)
SHARDED, UNSHARDED = dict(shard_mb=0.03), dict(shard_mb=0)  # 64-row chunks; 3 a shard, or one file each
DATA = TEXTS * 4


def _extract(gpt2_dir, root: Path, data=DATA, **layout):
    ext = ms.extract(gpt2_dir, data, workspace=str(root / "ws"), progress=False, **BASE, **layout)
    return ext, Path(ext.location)


@pytest.fixture(scope="module")
def stores(gpt2_dir, tmp_path_factory):
    """A sharded store, another one of the same geometry (other texts), its twin (the same texts: the same values,
    another store), and a format-1 store: with their values."""
    made = {}
    for name, layout, data in (("sharded", SHARDED, DATA), ("other", SHARDED, [t.upper() for t in DATA]),
                               ("twin", SHARDED, DATA),
                               ("unsharded", UNSHARDED, DATA)):
        ext, folder = _extract(gpt2_dir, tmp_path_factory.mktemp(name), data, **layout)
        made[name] = folder, {hp: ext.activations(hp)[:] for hp in HPS}
    sharded = ms.open_extraction(str(made["sharded"][0]))
    assert sharded.activations(HPS[0]).shards is not None and sharded.activations(HPS[0]).shards[0] == 192
    assert ms.open_extraction(str(made["unsharded"][0])).activations(HPS[0]).shards is None
    assert len(made["other"][1][HPS[0]]) >= 4 * 192
    return made


def _copy(stores, name: str, tmp_path: Path) -> Path:
    folder = tmp_path / "copy.zarr"
    shutil.copytree(stores[name][0], folder)
    return folder


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def _unit(store: Path, hp: str, index: int) -> Path:
    return store / "activations" / hp / "c" / str(index) / "0"


def _refused(folder: Path, hp: str, unit: int, rows: slice) -> None:
    """verify names the misplaced unit and says so; a checked read of its rows raises, naming it too."""
    ext = ms.open_extraction(str(folder))
    report = ext.verify()
    assert not report.ok, str(report)
    problems = [p for p in report.problems if p.array == f"activations/{hp}" and p.chunk == (unit, 0)]
    assert problems, str(report)
    assert "another place" in problems[0].what and problems[0].file.endswith(f"activations/{hp}/c/{unit}/0")
    with pytest.raises(StoreCorrupted, match=rf"activations/{hp} chunk \({unit}, 0\).*another place"):
        ext.activations(hp)[rows]


def test_a_clean_store_keeps_records_and_verifies(stores):
    for name in ("sharded", "unsharded"):
        folder, ref = stores[name]
        ext = ms.open_extraction(str(folder))
        key = ext.metadata["storage"]["chunk_records"]
        assert isinstance(key, str) and len(key) >= 16
        assert ext.activations(HPS[0]).attrs[positions.ATTRIBUTE] == key
        assert (folder / "activations" / HPS[0] / positions.RECORDS_FILE).is_file()
        assert (folder / "tokens" / "input_ids" / positions.RECORDS_FILE).is_file()
        assert ext.verify().ok
        np.testing.assert_array_equal(ext.activations(HPS[0])[:], ref[HPS[0]])


def test_two_shards_of_one_array_swapped(stores, tmp_path):
    folder = _copy(stores, "sharded", tmp_path)
    _swap(_unit(folder, HPS[0], 1), _unit(folder, HPS[0], 3))
    _refused(folder, HPS[0], 1, slice(200, 210))
    _refused(folder, HPS[0], 3, slice(600, 610))


def test_a_shard_swapped_with_another_hook_points(stores, tmp_path):
    folder = _copy(stores, "sharded", tmp_path)
    _swap(_unit(folder, HPS[0], 2), _unit(folder, HPS[1], 2))
    _refused(folder, HPS[0], 2, slice(400, 410))
    _refused(folder, HPS[1], 2, slice(400, 410))


def test_a_shard_copied_in_from_another_store_of_the_same_geometry(stores, tmp_path):
    folder = _copy(stores, "sharded", tmp_path)
    shutil.copyfile(_unit(stores["other"][0], HPS[0], 1), _unit(folder, HPS[0], 1))
    _refused(folder, HPS[0], 1, slice(200, 210))


def test_an_array_folder_copied_in_from_another_store_is_named_by_verify(stores, tmp_path):
    folder = _copy(stores, "sharded", tmp_path)
    shutil.rmtree(folder / "activations" / HPS[0])
    shutil.copytree(stores["twin"][0] / "activations" / HPS[0], folder / "activations" / HPS[0])
    ext = ms.open_extraction(str(folder))
    report = ext.verify()
    assert not report.ok and any("another store" in p.what for p in report.problems), str(report)
    with pytest.raises(StoreCorrupted, match=rf"activations/{HPS[0]}.*folder comes from another store"):
        ext.activations(HPS[0])[:10]  # a read, the loader and a resume alike: the store's array is not this one
    with pytest.raises(StoreCorrupted, match="folder comes from another store"):
        ext.loader(HPS[0])


def test_two_chunk_files_of_a_format_1_store_swapped(stores, tmp_path):
    folder = _copy(stores, "unsharded", tmp_path)
    assert ms.open_extraction(str(folder)).metadata["format_version"] == 1
    _swap(_unit(folder, HPS[0], 0), _unit(folder, HPS[0], 2))
    _refused(folder, HPS[0], 0, slice(3, 5))
    _refused(folder, HPS[0], 2, slice(130, 140))


def test_a_damaged_record_is_refused_not_ignored(stores, tmp_path):
    folder = _copy(stores, "sharded", tmp_path)
    records = folder / "activations" / HPS[0] / positions.RECORDS_FILE
    records.write_bytes(records.read_bytes()[:4])  # only chunk 0's record is left
    ext = ms.open_extraction(str(folder))
    assert not ext.verify().ok
    with pytest.raises(StoreCorrupted, match="no record"):
        ext.activations(HPS[0])[200:210]
    np.testing.assert_array_equal(ext.activations(HPS[0])[:60], stores["sharded"][1][HPS[0]][:60])
    full = (stores["sharded"][0] / "activations" / HPS[0] / positions.RECORDS_FILE).read_bytes()
    assert len(full) == 4 * -(-ext.activations(HPS[0]).shape[0] // ext.activations(HPS[0]).chunks[0])
    records.write_bytes(full[:8] + bytes(4) + full[12:])  # chunk 2's record zeroed, as a power cut may leave it
    ext = ms.open_extraction(str(folder))
    assert not ext.verify().ok
    with pytest.raises(StoreCorrupted, match="no record"):
        ext.activations(HPS[0])[2 * ext.activations(HPS[0]).chunks[0]]


@pytest.fixture
def old_kind(monkeypatch):
    """Stores written from here on are of the kind written before chunk records (no key: no records)."""
    monkeypatch.setattr(positions, "new_key", lambda: None)


def test_a_store_from_before_the_records_reads_and_verifies_as_before(gpt2_dir, tmp_path, old_kind):
    ext, folder = _extract(gpt2_dir, tmp_path, **SHARDED)
    assert ext.metadata["storage"].get("chunk_records") is None
    assert positions.ATTRIBUTE not in ext.activations(HPS[0]).attrs
    assert not list(folder.rglob(positions.RECORDS_FILE))
    assert ext.verify().ok
    _swap(_unit(folder, HPS[0], 1), _unit(folder, HPS[0], 3))  # undetectable in such a store, as before
    assert ms.open_extraction(str(folder)).verify().ok


def test_a_resume_keeps_the_kind_of_its_store(gpt2_dir, tmp_path, monkeypatch):
    from conftest import cancelled_at

    for kind in ("old", "new"):
        with monkeypatch.context() as patch:
            if kind == "old":
                patch.setattr(positions, "new_key", lambda: None)
            ws = ms.Workspace(str(tmp_path / kind))
            job = cancelled_at(ws, gpt2_dir, DATA, at_batch=6, **BASE, **SHARDED)
        resumed = ws.resume(job.id).wait(120)  # the resume runs with the current code: records only in the new kind
        assert resumed.status == "COMPLETED"
        ext = ms.open_extraction(job.id, workspace=str(tmp_path / kind))
        assert ext.verify().ok, str(ext.verify())
        has = bool(list(Path(ext.location).rglob(positions.RECORDS_FILE)))
        assert has is (kind == "new") and (ext.metadata["storage"].get("chunk_records") is not None) is has


def test_rerecord_repairs_lost_records_and_blesses_no_damaged_bytes(stores, tmp_path):
    """The records file lost (a copy tool that skips dot files) or zeroed makes sound rows unreadable; re-recording
    them from each chunk's own checksum brings them back, and a chunk whose bytes are damaged stays refused."""
    folder = _copy(stores, "sharded", tmp_path)
    ref = stores["sharded"][1]
    workspace = tmp_path / "ws"
    (workspace / "extractions").mkdir(parents=True)
    moved = workspace / "extractions" / folder.name
    shutil.move(folder, moved)
    (moved / "activations" / HPS[0] / positions.RECORDS_FILE).unlink()
    records = moved / "activations" / HPS[1] / positions.RECORDS_FILE
    records.write_bytes(bytes(len(records.read_bytes())))
    ws = ms.Workspace(workspace)
    ext_id = ms.open_extraction(str(moved)).id
    assert not ws.open(ext_id).verify().ok
    with pytest.raises(StoreCorrupted, match="no record"):
        ws.open(ext_id).activations(HPS[0])[:10]
    done = ws.rerecord(ext_id)
    assert {f"activations/{hp}" for hp in HPS} <= set(done["recorded"]) and done["left"] == {}
    ext = ws.open(ext_id)
    assert ext.verify().ok
    for hp in HPS:
        np.testing.assert_array_equal(ext.activations(hp)[:], ref[hp])
    assert ws.rerecord(ext_id) == {"recorded": {}, "left": {}}  # nothing missing: nothing written
    _swap(_unit(moved, HPS[0], 1), _unit(moved, HPS[0], 3))  # moved files, their records intact: never blessed
    (moved / "activations" / HPS[1] / positions.RECORDS_FILE).unlink()
    done = ws.rerecord(ext_id)
    assert done["left"] == {f"activations/{HPS[0]}": 2 * 3} and f"activations/{HPS[1]}" in done["recorded"], done
    _refused(moved, HPS[0], 1, slice(200, 210))
    _swap(_unit(moved, HPS[0], 1), _unit(moved, HPS[0], 3))
    shard = _unit(moved, HPS[0], 1)
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF  # a bad block: the bytes no longer match their own checksum
    shard.write_bytes(bytes(raw))
    ws.rerecord(ext_id)
    assert not ws.open(ext_id).verify().ok
    with pytest.raises(StoreCorrupted, match="checksum"):
        ws.open(ext_id).activations(HPS[0])[200:210]
    records = moved / "activations" / HPS[0] / positions.RECORDS_FILE
    records.write_bytes(bytes(len(records.read_bytes())))
    _unit(moved, HPS[1], 2).unlink()  # a data file missing: nothing is written, not even the other array's
    with pytest.raises(ms.InputError, match="cannot be re-recorded, so nothing was"):
        ws.rerecord(ext_id)
    assert records.read_bytes() == bytes(len(records.read_bytes()))
    assert cli(["verify", "--workspace", str(workspace), ext_id]) == 1


def test_a_resume_over_chunks_whose_records_are_lost_is_refused_before_it_writes(gpt2_dir, tmp_path):
    """A resume checks that each committed chunk is the one recorded for its place before it writes: a lost records
    file is refused up front (naming it and the repair) instead of running to a COMPLETED store every read refuses;
    after the repair the resume completes and verifies."""
    from conftest import cancelled_at

    ws = ms.Workspace(tmp_path / "ws")
    job = cancelled_at(ws, gpt2_dir, "sample", at_batch=12, layers=[0], dtype="float32", chunk_mb=0.01,
                       shard_mb=0.05, max_samples=120, batch_size=2)
    ext = job.extraction()
    assert ext.committed_tokens() > ext.activations(HPS[0]).chunks[0]
    (Path(ext.location) / "activations" / HPS[0] / positions.RECORDS_FILE).unlink()
    with pytest.raises(StoreCorrupted, match=rf"activations/{HPS[0]}.*no record of its checksum.*--rerecord"):
        ws.resume(job.id)
    assert ws.job(job.id).status == "CANCELLED"  # nothing changed
    ws.rerecord(job.id)
    assert ws.resume(job.id).wait(120).status == "COMPLETED"
    assert ws.open(job.id).verify().ok
