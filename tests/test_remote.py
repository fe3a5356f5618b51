"""Workspaces and stores behind fsspec URLs: memory:// and file://, written and read back."""
from __future__ import annotations

import numpy as np
import pytest

import mistudio as ms
from conftest import fail_at


def test_memory_workspace_roundtrip(gpt2_dir):
    root = "memory://mistudio-test/ws"
    ext = ms.extract(gpt2_dir, "sample", layers=[0, 2], hooks=["residual", "mlp"], max_samples=30,
                     workspace=root, progress=False, dtype="float32")
    assert ext.location == f"{root}/extractions/{ext.id}.zarr"
    reopened = ms.open_extraction(ext.id, workspace=root)
    assert reopened.status == "COMPLETED" and reopened.n_tokens == ext.n_tokens
    np.testing.assert_array_equal(reopened.activations("layers.2.mlp")[:], ext.activations("layers.2.mlp")[:])
    by_url = ms.open_extraction(ext.location)
    assert by_url.sample(int(by_url.rows()[0]), tokens=False)["activations"]["layers.0.residual"].shape[1] == 32
    ws = ms.Workspace(root)
    rows = ws.extractions().to_dict("records")
    assert [r["id"] for r in rows] == [ext.id] and rows[0]["bytes"] > 0
    ds = reopened.to_xarray()
    assert ds["layers.0.residual"].shape == (ext.n_tokens, 32)
    report = reopened.verify()  # every chunk decoded through Zarr: a clean remote store is clean
    assert report.ok and report.chunks_checked > 0, report
    # cleanup and delete work through fsspec too
    failed = ws.submit(gpt2_dir, "sample", before_batch=fail_at(0)).wait(60)
    assert failed.status == "FAILED"
    assert list(ws.cleanup(dry_run=False)["id"]) == [failed.id]
    with pytest.raises(ms.InputError, match="COMPLETED: deleting it loses"):
        ws.delete(ext.id)
    assert ws.delete(ext.id, force=True) > 0 and ws.extractions().empty


@pytest.mark.parametrize("damage", ["empty entry", "swapped entries"])
def test_a_remote_shard_index_that_misplaces_committed_chunks_is_refused(gpt2_dir, damage):
    """A remote store's shard whose index (its crc32c right) says a committed inner chunk was never written, or
    puts two chunks in each other's place: Zarr would read zeros or other rows; every read refuses it."""
    import fsspec

    from mistudio.storage.codec import _crc32c

    root = f"memory://mistudio-index-{damage.replace(' ', '-')}/ws"
    ext = ms.extract(gpt2_dir, "sample", layers=[0], max_samples=30, workspace=root, progress=False,
                     dtype="float32", chunk_mb=0.01, shard_mb=0.04)
    a = ext.activations("layers.0.residual")
    assert a.shards is not None and a.shape[0] > a.shards[0]
    clean = a[:]
    fs = fsspec.filesystem("memory")
    shard = f"{ext.location.removeprefix('memory://')}/activations/layers.0.residual/c/0/0"
    data = bytearray(fs.cat(shard))
    per_shard = a.shards[0] // a.chunks[0]
    index_at = len(data) - (16 * per_shard + 4)
    table = np.frombuffer(bytes(data[index_at:-4]), "<u8").reshape(-1, 2).copy()
    if damage == "empty entry":
        table[1] = np.iinfo(np.uint64).max
    else:
        table[[1, 2]] = table[[2, 1]]
    raw = table.tobytes()
    data[index_at:] = raw + _crc32c(raw).to_bytes(4, "little")
    fs.pipe(shard, bytes(data))
    fresh = ms.open_extraction(ext.location).activations("layers.0.residual")
    what = "(never written|in order, back to back)"  # an empty entry also leaves the next out of its place
    for key in (slice(None), slice(0, 10), slice(None, None, 2)):
        with pytest.raises(ms.StoreCorrupted, match=rf"chunk \(0, 0\).*{what}"):
            fresh[key]
    np.testing.assert_array_equal(fresh[a.shards[0]:], clean[a.shards[0]:])  # the other shards still read
    problems = ms.open_extraction(ext.location).verify().problems
    assert [(p.array, p.chunk) for p in problems] == [("activations/layers.0.residual", (0, 0))], problems


def test_file_url_workspace_equals_local(gpt2_dir, tmp_path):
    args = dict(layers=[1], max_samples=20, progress=False, dtype="float32")
    local = ms.extract(gpt2_dir, "sample", workspace=str(tmp_path / "a"), **args)
    url = ms.extract(gpt2_dir, "sample", workspace=f"file://{tmp_path / 'b'}", **args)
    assert url.location.startswith(str(tmp_path / "b"))
    np.testing.assert_array_equal(local.activations("layers.1.residual")[:], url.activations("layers.1.residual")[:])


def test_s3_workspace_on_local_moto_server(gpt2_dir, tmp_path):
    """A real S3 protocol round trip against moto's server on 127.0.0.1 (the `remote` extra)."""
    import socket
    import subprocess
    import sys
    import time

    import pytest

    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import s3fs

        options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        fs = s3fs.S3FileSystem(**options)
        deadline = time.monotonic() + 30
        while True:
            try:
                fs.mkdir("mistudio-bucket")
                break
            except Exception:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.3)
        root = "s3://mistudio-bucket/ws"
        ext = ms.extract(gpt2_dir, "sample", layers=[1], hooks=["residual", "attention"], max_samples=25,
                         workspace=root, storage_options=options, progress=False, dtype="float32")
        local = ms.extract(gpt2_dir, "sample", layers=[1], hooks=["residual", "attention"], max_samples=25,
                           workspace=str(tmp_path / "local"), progress=False, dtype="float32")
        colleague = ms.open_extraction(ext.location, storage_options=options)
        assert colleague.status == "COMPLETED"
        for hp in ext.hook_points:
            np.testing.assert_array_equal(colleague.activations(hp)[:], local.activations(hp)[:])
        assert list(ms.Workspace(root, storage_options=options).extractions()["status"]) == ["COMPLETED"]
    finally:
        server.terminate()
        server.wait(10)
