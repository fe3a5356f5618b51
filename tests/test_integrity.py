"""Store integrity on real stores: checksums, missing/damaged chunks and metadata, verify() and the CLI."""
from __future__ import annotations

import json
import os
import re
import threading
import shutil
from pathlib import Path

import numpy as np
import pytest

import mistudio as ms
from mistudio.cli import main as cli
from mistudio.errors import StoreCorrupted
from mistudio.storage.reads import CheckedArray
from mistudio.storage.store import MAX_ARRAY_METADATA_BYTES, MAX_GROUP_METADATA_BYTES
from mistudio.storage.verify import quick_check, verify

from conftest import TEXTS

HP = "layers.1.residual"
ARRAY = f"activations/{HP}"
BASE = dict(layers=[0, 1], hooks=["residual", "mlp"], batch_size=2, dtype="float32", chunk_mb=0.01)
DATA = TEXTS * 4  # several 64-row chunks


@pytest.fixture(scope="module")
def made(gpt2_dir, tmp_path_factory):
    """One completed store (checksums on) and its values, copied by each test that damages it."""
    ws = str(tmp_path_factory.mktemp("integrity") / "ws")
    ext = ms.extract(gpt2_dir, DATA, workspace=ws, progress=False, **BASE)
    assert ext.activations(HP).chunks[0] == 64 and ext.n_tokens > 4 * 64
    return ws, ext.id, {hp: ext.activations(hp)[:] for hp in ext.hook_points}


@pytest.fixture
def copy(made, tmp_path):
    """(workspace, id, store folder, reference values) of a fresh copy of the completed store."""
    ws, ext_id, ref = made
    shutil.copytree(ws, tmp_path / "ws")
    return str(tmp_path / "ws"), ext_id, tmp_path / "ws" / "extractions" / f"{ext_id}.zarr", ref


def chunk_file(store: Path, array: str, index: int) -> Path:
    return store / array / "c" / str(index) / "0" if array.startswith("activations") else store / array / "c" / "0"


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[len(data) // 3] ^= 0x10
        path.write_bytes(bytes(data))


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_clean_store_verifies_and_checked_reads_equal_raw(copy, capsys):
    ws, ext_id, store, ref = copy
    ext = ms.open_extraction(ext_id, workspace=ws)
    report = ext.verify()
    assert report.ok and report.checksums is True and not report.problems, str(report)
    n_units = sum(-(-ext.n_tokens // 64) for _ in ext.hook_points) + 4  # + one chunk per token array
    assert report.chunks_checked == n_units and report.bytes_checked > ref[HP].nbytes
    assert "OK" in str(report) and ext.metadata["storage"]["checksum"] is True
    a = ext.activations(HP)
    assert isinstance(a, CheckedArray) and a.shape == ref[HP].shape and a.dtype == np.float32 and len(a) == a.shape[0]
    assert a.metadata.dimension_names == ("token", "feature") and a.zarr.shape == a.shape
    idx = np.array([200, 3, 3, 70])
    for got, want in [(a[10:150], ref[HP][10:150]), (a[10:150, 5], ref[HP][10:150, 5]), (a[:, 7], ref[HP][:, 7]),
                      (a[idx], ref[HP][idx]), (a[-1], ref[HP][-1]), (np.asarray(a), ref[HP])]:
        np.testing.assert_array_equal(got, want)
    assert quick_check(ext.store).ok
    assert run_cli(capsys, "verify", ext_id, "--workspace", ws)[0] == 0


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_damaged_chunk_is_named_by_verify_reads_and_cli(copy, capsys, how):
    ws, ext_id, store, ref = copy
    damage(chunk_file(store, ARRAY, 2), how)
    ext = ms.open_extraction(ext_id, workspace=ws)
    report = ext.verify()
    assert not report.ok and len(report.problems) == 1, str(report)
    problem = report.problems[0]
    assert (problem.array, problem.chunk) == (ARRAY, (2, 0)) and problem.file.endswith(f"{ARRAY}/c/2/0")
    a = ext.activations(HP)
    for read in (lambda: a[130:140], lambda: a[:, 3], lambda: a[np.array([5, 150])], lambda: np.asarray(a)):
        with pytest.raises(StoreCorrupted, match=rf"{ARRAY} chunk \(2, 0\)") as info:
            read()
        assert info.value.location == ext.location and info.value.chunk == (2, 0)
    np.testing.assert_array_equal(a[:128], ref[HP][:128])  # other chunks still read
    row = int(ext.sample_index[np.searchsorted(ext.sample_offsets, 140, side="right") - 1])
    with pytest.raises(StoreCorrupted):
        ext.sample(row, tokens=False)
    code, out = run_cli(capsys, "verify", ext_id, "--workspace", ws)
    assert code == 1 and ARRAY in out and "chunk (2, 0)" in out and "DAMAGED" in out
    assert quick_check(ext.store).ok is (how == "flip")  # presence and sizes only: no decoding


def test_damaged_token_chunk(copy):
    ws, ext_id, store, _ = copy
    damage(chunk_file(store, "tokens/input_ids", 0), "delete")
    ext = ms.open_extraction(ext_id, workspace=ws)
    with pytest.raises(StoreCorrupted, match="tokens/input_ids chunk"):
        ext.store.input_ids()
    assert [p.array for p in ext.verify().problems] == ["tokens/input_ids"]


def test_damaged_array_metadata(copy, capsys):
    ws, ext_id, store, _ = copy
    ext = ms.open_extraction(ext_id, workspace=ws)
    (store / ARRAY / "zarr.json").write_text('{"zarr_format": 3, "shape": [')
    report = ext.verify()
    assert [(p.array, p.file) for p in report.problems] == [(ARRAY, f"{ext.location}/{ARRAY}/zarr.json")]
    with pytest.raises(StoreCorrupted, match=f"{ARRAY}.*zarr.json"):
        ext.activations(HP)
    code, out = run_cli(capsys, "verify", ext_id, "--workspace", ws)
    assert code == 1 and f"{ARRAY}/zarr.json" in out


def test_damaged_group_metadata(copy, capsys):
    ws, ext_id, store, _ = copy
    ext = ms.open_extraction(ext_id, workspace=ws)
    meta = json.loads((store / "zarr.json").read_text())
    (store / "zarr.json").write_text(json.dumps(meta)[:200])
    with pytest.raises(StoreCorrupted, match="zarr.json"):
        ms.Workspace(ws).open(ext_id)
    with pytest.raises(StoreCorrupted, match="zarr.json"):
        ext.metadata  # an extraction opened before the damage
    report = verify(str(store))
    assert not report.ok and report.problems[0].file.endswith(f"{ext_id}.zarr/zarr.json")
    code, out = run_cli(capsys, "verify", ext_id, "--workspace", ws)
    assert code == 1 and "zarr.json" in out
    assert run_cli(capsys, "verify", "no-such-id", "--workspace", ws)[0] == 2


@pytest.mark.parametrize("array", [None, ARRAY, "tokens/input_ids"])
@pytest.mark.parametrize("how", ["oversized", "fifo"])
def test_metadata_no_store_has_is_refused_before_it_is_parsed(copy, how, array):
    """A zarr.json (the group's or an array's) larger than any store's (valid JSON, padded: parsing a crafted
    300 MB one took gigabytes) or a FIFO (a read would block forever): the listing, opening, reads and verify name
    it and go on."""
    ws, ext_id, store, _ = copy
    meta = store / (array or "") / "zarr.json"
    if how == "oversized":
        text = meta.read_text()
        limit = MAX_GROUP_METADATA_BYTES if array is None else MAX_ARRAY_METADATA_BYTES
        with meta.open("w") as f:
            f.write(text)
            f.write(" " * (limit + 1 - len(text.encode())))
    else:
        meta.unlink()
        os.mkfifo(meta)
    said = "metadata is (not a regular file|.* bytes, more than)"
    outcome: dict = {}

    def use_it():  # on a thread: a hang fails the test instead of stopping the suite
        rows = ms.Workspace(ws).extractions()
        outcome["row"] = rows.set_index("id").loc[ext_id]
        outcome["report"] = verify(str(store))
        with pytest.raises(StoreCorrupted, match=said) as refused:
            ext = ms.Workspace(ws).open(ext_id)  # opening reads the group's; a read, its array's
            ext.sample(0) if array == "tokens/input_ids" else ext.activations(HP)[:]
        outcome["refused"] = refused.value

    worker = threading.Thread(target=use_it, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "a metadata file blocked the listing, verify or a read"
    assert set(outcome) == {"row", "report", "refused"}, outcome
    row, report = outcome["row"], outcome["report"]
    assert row["damaged"] and re.search(said, row["problem"]), row
    assert not report.ok and report.problems[0].file == str(meta), str(report)
    assert outcome["refused"].file == str(meta)


def test_without_checksums_reads_the_same(gpt2_dir, workspace, made):
    ext = ms.extract(gpt2_dir, DATA, workspace=workspace, progress=False, checksum=False, **BASE)
    assert ext.metadata["storage"]["checksum"] is False and ext.metadata["params"]["checksum"] is False
    assert not ext.activations(HP).zarr.compressors
    report = ext.verify()
    assert report.ok and report.checksums is False and "no checksums" in str(report)
    for hp, want in made[2].items():
        np.testing.assert_array_equal(ext.activations(hp)[:], want)
    store = Path(ext.location)
    damage(chunk_file(store, ARRAY, 1), "truncate")  # a truncated chunk is caught even without checksums
    assert [p.chunk for p in ext.verify().problems] == [(1, 0)]
    with pytest.raises(StoreCorrupted):
        ext.activations(HP)[64:70]


def test_in_progress_store_is_checked_below_its_mark_only(gpt2_dir, workspace):
    def fail_at(index: int, batch: int) -> None:
        if index == 6:
            raise RuntimeError("stop here")

    job = ms.Workspace(workspace).submit(gpt2_dir, DATA, before_batch=fail_at, **BASE)
    assert job.wait(60).status == "FAILED"
    ext = job.extraction()
    mark = ext.metadata["progress"]["tokens_committed"]
    assert 64 < mark < ext.n_tokens - 128, "the mark should leave chunks above it"
    report = ext.verify()
    assert report.ok and report.commit_mark == mark, str(report)
    store = Path(ext.location)
    above = chunk_file(store, ARRAY, -(-mark // 64))
    assert not above.exists()  # never written: not a problem
    ext.activations(HP)[mark:]  # uncommitted rows read as Zarr gives them
    damage(chunk_file(store, ARRAY, 0), "delete")
    assert [(p.array, p.chunk) for p in ext.verify().problems] == [(ARRAY, (0, 0))]
    assert not quick_check(ext.location).ok


def test_reading_past_the_mark_of_a_running_job_says_so_not_damage(gpt2_dir, workspace):
    """The shard a job is filling has no index yet: a read that reaches into it is told to read the committed rows,
    never that a healthy store is damaged and must be re-extracted."""
    from conftest import gate

    hook, reached, release = gate(at_batch=6)
    job = ms.Workspace(workspace).submit(gpt2_dir, DATA, before_batch=hook, **{**BASE, "shard_mb": 0.05})
    try:
        assert reached.wait(60)
        ext = job.extraction()
        with pytest.raises(ms.InputError, match=r"past the [\d,]+ rows committed so far.*\[:\d+\]") as caught:
            ext.activations(HP)[:ext.n_tokens]
        mark = int(re.search(r"\[:(\d+)\]", str(caught.value)).group(1))  # the writer may still be committing
        assert 0 < mark <= ext.committed_tokens() < ext.n_tokens  # batch 5: the message names the mark it read
        assert f"past the {mark:,} rows committed" in str(caught.value)
        assert ext.activations(HP)[:mark].shape == (mark, 32)  # the committed rows read, checked
    finally:
        job.cancel()
        release.set()
    assert job.wait(60).status == "CANCELLED" and job.extraction().verify().ok


def test_incoherent_metadata_and_missing_array(copy):
    ws, ext_id, store, _ = copy
    ext = ms.open_extraction(ext_id, workspace=ws)
    n = ext.n_samples
    ms.Workspace(ws).store(ext_id, writable=True).update(progress={"samples_committed": n - 1})
    shutil.rmtree(store / "activations" / "layers.0.mlp")
    text = str(ext.verify())
    assert f"COMPLETED but only {n - 1} of {n} samples" in text and "not at tokens_committed" in text
    assert "activations/layers.0.mlp (activations/layers.0.mlp/zarr.json): the array is missing" in text
    with pytest.raises(StoreCorrupted, match="layers.0.mlp.*missing"):
        ext.activations("layers.0.mlp")


def test_a_store_folder_left_without_its_group_file_is_named_so(copy, tmp_path):
    """What a store deleted or moved while its job wrote leaves (its arrays, no zarr.json): opening or resuming it
    says so and how to clear it, never zarr's GroupNotFoundError; a folder that is no store is still not one."""
    ws_root, ext_id, store, _ = copy
    (store / "zarr.json").unlink()
    ws = ms.Workspace(ws_root)
    for call in (lambda: ws.open(ext_id), lambda: ws.resume(ext_id), lambda: ms.open_extraction(str(store))):
        with pytest.raises(StoreCorrupted, match="has a store's arrays but no zarr.json .*delete it"):
            call()
    row = ws.extractions().set_index("id").loc[ext_id]
    assert row["status"] == "UNREADABLE" and "no zarr.json" in row["problem"]
    ws.delete(ext_id)
    assert not store.exists()
    (tmp_path / "plain").mkdir()
    with pytest.raises(ms.InputError, match="is not a mistudio extraction store"):
        ms.open_extraction(str(tmp_path / "plain"))


def test_damage_a_resume_meets_says_so_and_offers_no_resume(gpt2_dir, tmp_path):
    """Damage below the mark that a resume can see up front (a shard cut short) is refused before it changes
    anything; damage it meets while it runs (the chunk the mark cuts, which it reads back) fails it as
    STORE_DAMAGED in plain words, with resume_available False (a resume would stop there again) and retry as the
    fix, not as an unexpected error."""
    from conftest import cancelled_at
    from mistudio.widgets.common import PLAIN_ERRORS

    ws = ms.Workspace(tmp_path / "ws")
    options = dict(layers=[1], dtype="float32", chunk_mb=0.01, max_samples=120, batch_size=2)
    job = cancelled_at(ws, gpt2_dir, "sample", at_batch=12, shard_mb=0.05, **options)
    ext = job.extraction()
    assert ext.committed_tokens() > 2 * ext.activations(HP).shards[0]
    shard = Path(ext.location) / "activations" / HP / "c" / "0" / "0"
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(StoreCorrupted, match=r"c/0/0.*the shard file is"):
        ws.resume(job.id)
    assert ws.job(job.id).status == "CANCELLED"  # refused, nothing changed

    job = cancelled_at(ws, gpt2_dir, "sample", at_batch=12, shard_mb=0, max_length=100, **options)  # a file a chunk
    ext = job.extraction()
    rows, mark = ext.activations(HP).chunks[0], ext.committed_tokens()
    assert mark % rows, (mark, rows)  # the mark cuts a chunk: the resume reads it back to write it whole
    cut = Path(ext.location) / "activations" / HP / "c" / str(mark // rows) / "0"
    raw = bytearray(cut.read_bytes())
    raw[10] ^= 0xFF
    cut.write_bytes(bytes(raw))
    resumed = ws.resume(job.id).wait(60)
    error = resumed.error
    assert resumed.status == "FAILED" and error["error_type"] == "STORE_DAMAGED", error
    assert error["resume_available"] is False and error["retry_available"] is True, error
    assert "damaged" in error["error_message"] and "verify" in error["error_message"], error
    assert PLAIN_ERRORS["STORE_DAMAGED"] == "Its store is damaged"


def test_a_store_deleted_while_it_is_opened_is_said_plainly(gpt2_dir, tmp_path, monkeypatch):
    """Another process deletes the store between the check that its folder is there and zarr's read of its
    metadata: the error says the store is not there, not zarr's GroupNotFoundError naming a LocalStore."""
    from mistudio.storage import store as store_module

    ext = ms.extract(gpt2_dir, TEXTS[:2], workspace=str(tmp_path), layers=[1], progress=False)
    real = store_module.GuardedLocalStore.get

    async def deleted_meanwhile(self, key, *args, **kwargs):  # the folder goes after the store was opened
        shutil.rmtree(ext.location, ignore_errors=True)
        return await real(self, key, *args, **kwargs)

    monkeypatch.setattr(store_module.GuardedLocalStore, "get", deleted_meanwhile)
    with pytest.raises(FileNotFoundError, match=r"the store .* is not there \(deleted or moved\)"):
        store_module.open_group(ext.location)


def test_a_reader_while_the_store_is_set_up_is_told_to_wait_not_that_it_is_damaged(gpt2_dir, tmp_path):
    """Arrays are made one by one before the metadata says how many rows they hold: a reader that opens the store
    in between, and finds an array not made yet, is told the job has stored nothing yet, not to re-extract."""
    from mistudio.storage.store import ExtractionStore

    ext = ms.extract(gpt2_dir, TEXTS[:4], workspace=str(tmp_path), layers=[0, 1], progress=False)
    store = ExtractionStore.open(ext.location, writable=True)
    store.update(status="LOADING", progress={"tokens_total": None, "tokens_committed": 0, "samples_committed": 0})
    shutil.rmtree(Path(ext.location) / "activations" / HP)  # as if not made yet
    reader = ExtractionStore.open(ext.location)
    with pytest.raises(ms.InputError, match=rf"holds no activations/{HP} yet.*wait"):
        reader.array(f"activations/{HP}")
