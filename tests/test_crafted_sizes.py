"""Crafted sizes (issue 16 part 5): metadata or an array's zarr.json claiming 10**12 rows, or offsets pointing past
the arrays, must never make the listing, `mistudio jobs`, verify, ext.sample, the analysis or the loader allocate
what is claimed. Each crafted store is driven in a real subprocess whose peak RSS is measured and bounded."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zarr

import mistudio as ms
from mistudio.storage.codec import record_committed

from conftest import TEXTS

HP = "layers.1.residual"
BIG = 10**12
RSS_SLACK_MB = 150  # a crafted store may cost this much more than reading the clean store (which is ~1 MB of data)

# Every entry point that sizes something by a store's claims, for each (name, workspace, id) given: one process
# imports mistudio once, then each store is driven in a forked child (its own peak RSS, its own address-space cap).
# Each child prints one line: per action the exception or "ok".
DRIVER = textwrap.dedent("""
    import json, os, resource, sys
    import mistudio as ms
    from mistudio.cli import main as cli
    ms.Workspace, ms.open_extraction, ms.analysis.loader  # imported once, before the children fork

    def drive(ws, eid, hp):
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a runaway allocation fails here
        open_ = lambda: ms.open_extraction(eid, workspace=ws)
        actions = {
            "listing": lambda: ms.Workspace(ws).extractions(),
            "cli_jobs": lambda: cli(["jobs", "--workspace", ws]),
            "verify": lambda: out.__setitem__("report", str(open_().verify())),
            "sample": lambda: open_().sample(int(open_().rows()[3]), tokens=False),
            "activations": lambda: open_().activations(hp)[:],
            "feature_stats": lambda: open_().feature_stats(hp),
            "top_examples": lambda: open_().top_examples(hp, 0),
            "loader": lambda: next(iter(open_().loader(hp, batch_size=64))),
        }
        out = {}  # filled before the actions run: verify writes its report into it
        for name, act in actions.items():
            try:
                act()
                out[name] = ["ok", ""]
            except Exception as exc:
                out[name] = [type(exc).__name__, str(exc)]
        rows = ms.Workspace(ws).extractions()
        row = rows[0] if isinstance(rows, list) else rows.iloc[0].to_dict()
        out["row"] = {"damaged": bool(row["damaged"]), "problem": str(row["problem"])}
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out

    for name, ws, eid, hp in json.loads(sys.argv[1]):
        pid = os.fork()
        if pid == 0:
            try:
                print("RESULT" + json.dumps([name, drive(ws, eid, hp)]), flush=True)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
""")


@pytest.fixture(scope="module")
def made(gpt2_dir, tmp_path_factory):
    ws = tmp_path_factory.mktemp("crafted") / "ws"
    ext = ms.extract(gpt2_dir, TEXTS * 4, workspace=str(ws), progress=False, layers=[1], hooks=["residual"],
                     batch_size=4, dtype="float32", chunk_mb=0.01)
    assert ext.activations(HP).chunks[0] == 64 and ext.n_tokens > 4 * 64
    return ws, ext.id


def drive(stores: dict[str, tuple[Path, str]]) -> dict[str, dict]:
    """{name: what every entry point gave on that store} (one driver process, a forked child per store)."""
    given = [[name, str(ws), ext_id, HP] for name, (ws, ext_id) in stores.items()]
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(given)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent.parent)
    results = dict(json.loads(x[len("RESULT"):]) for x in done.stdout.splitlines() if x.startswith("RESULT"))
    assert set(results) == set(stores), f"a driver died (rc {done.returncode}): {done.stderr[-2000:]}"
    return results


@pytest.fixture(scope="module")
def driven(made, tmp_path_factory):
    """Every crafted copy of the store and the clean one, driven; {name: (result, store folder)}."""
    ws, ext_id = made
    stores, folders = {"clean": (ws, ext_id)}, {}
    for name, (change, _) in CRAFTS.items():
        copy = tmp_path_factory.mktemp(name) / "ws"
        shutil.copytree(ws, copy)
        folders[name] = copy / "extractions" / f"{ext_id}.zarr"
        change(folders[name])
        stores[name] = (copy, ext_id)
    results = drive(stores)
    return {name: (results[name], folders.get(name)) for name in stores}


@pytest.fixture(scope="module")
def clean(driven):
    """What every entry point gives on the undamaged store, and the driver's peak RSS there."""
    result = driven["clean"][0]
    assert all(v == ["ok", ""] for k, v in result.items() if k not in NOT_DATA), result
    assert "DAMAGED" not in result["report"] and "problem" not in result["report"].lower(), result["report"]
    assert result["row"] == {"damaged": False, "problem": ""}
    return result


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _meta(**progress):
    def craft(store: Path):
        def change(group):
            meta = group["attributes"]["mistudio"]
            for key, value in progress.items():
                section, field = key.split("__")
                meta[section][field] = value
            group.pop("consolidated_metadata", None)
        _edit(store / "zarr.json", change)
    return craft


def _rows(array: str, chunk: bool = False):
    def craft(store: Path):
        def change(spec):
            spec["shape"][0] = BIG
            if chunk:
                spec["chunk_grid"]["configuration"]["chunk_shape"][0] = BIG
        _edit(store / array / "zarr.json", change)
    return craft


def _width(array: str):
    """The trailing dimension and its chunk set to BIG, and the metadata's hidden size agreeing: one chunk would
    be terabytes (verify once allocated a scratch chunk of that size)."""
    def craft(store: Path):
        _meta(model__hidden_size=BIG)(store)

        def change(spec):
            spec["shape"][1] = BIG
            spec["chunk_grid"]["configuration"]["chunk_shape"][1] = BIG
        _edit(store / array / "zarr.json", change)
    return craft


def _consistent(store: Path) -> None:
    """Metadata and every per-token array agree on 10**12 rows: only the files can tell."""
    _meta(progress__tokens_total=BIG, storage__n_input_tokens=BIG)(store)
    for array in (f"activations/{HP}", "tokens/input_ids", "tokens/special"):
        _rows(array)(store)


def _offsets(values):
    def craft(store: Path):
        arr = zarr.open_array(store=str(store), path="tokens/sample_offsets", mode="r+")
        data = arr[:]
        values(data)
        arr[:] = data
        record_committed([arr], 0, arr.shape[0])  # its chunk records agree: only the values can tell
    return craft


CRAFTS = {  # name: (craft, the file a refusal must name)
    "metadata_tokens_total": (_meta(progress__tokens_total=BIG), f"activations/{HP}/zarr.json"),
    "metadata_n_input_tokens": (_meta(storage__n_input_tokens=BIG), "tokens/input_ids/zarr.json"),
    "activations_rows": (_rows(f"activations/{HP}"), f"activations/{HP}/zarr.json"),
    "activations_rows_and_chunk": (_rows(f"activations/{HP}", chunk=True), f"activations/{HP}/zarr.json"),
    "activations_width": (_width(f"activations/{HP}"), f"activations/{HP}"),
    "input_ids_rows_and_chunk": (_rows("tokens/input_ids", chunk=True), "tokens/input_ids/zarr.json"),
    "sample_offsets_rows": (_rows("tokens/sample_offsets"), "tokens/sample_offsets/zarr.json"),
    "sample_index_rows": (_rows("tokens/sample_index"), "tokens/sample_index/zarr.json"),
    "metadata_and_arrays_agree": (_consistent, "c/"),  # the unit file that would hold the last claimed row
    "offsets_past_the_tokens": (_offsets(lambda d: d.__setitem__(len(d) // 2, BIG)), "tokens/sample_offsets/c/0"),
    "offsets_end_past_the_tokens": (_offsets(lambda d: d.__setitem__(-1, BIG)), "tokens/sample_offsets/c/0"),
}
READS_ALL = {"sample", "activations", "feature_stats", "top_examples", "loader"}
# what must be refused (StoreCorrupted naming the file) per craft: every read of the activations when their size is
# crafted; reading a sample when the token arrays' are (the other entry points never size anything by them)
REFUSED = {"metadata_tokens_total": READS_ALL, "activations_rows": READS_ALL, "activations_rows_and_chunk": READS_ALL,
           "metadata_and_arrays_agree": READS_ALL, "activations_width": READS_ALL}
NOT_DATA = ("row", "peak_rss_mb", "report")


@pytest.mark.parametrize("craft", list(CRAFTS))
def test_crafted_size_is_refused_by_name_within_a_memory_bound(driven, clean, craft):
    result, store = driven[craft]
    named = CRAFTS[craft][1]
    for action, (kind, message) in ((k, v) for k, v in result.items() if k not in NOT_DATA):
        assert kind in ("ok", "StoreCorrupted"), (action, kind, message)  # never MemoryError, never a raw error
        if kind == "StoreCorrupted":
            assert f"(file {store}/" in message, (action, message)
        if action in REFUSED.get(craft, {"sample"}):
            assert kind == "StoreCorrupted" and named in message, (action, kind, message)
    assert result["listing"][0] == "ok" and result["cli_jobs"][0] == "ok"
    if craft.startswith("offsets"):  # values, not sizes: the cheap listing check does not decode them; verify does
        assert "tokens/sample_offsets" in result["report"] and "not monotonic" in result["report"]
    else:  # the Jobs tab and `mistudio jobs` show the store damaged, with why
        assert result["row"]["damaged"] and result["row"]["problem"], result["row"]
    assert result["peak_rss_mb"] < clean["peak_rss_mb"] + RSS_SLACK_MB, (result["peak_rss_mb"], clean["peak_rss_mb"])


def test_a_clean_store_reads_as_before(made, tmp_path):
    """The size checks accept what the writer makes: sample offsets, activation rows, whole reads."""
    ws, ext_id = made
    ext = ms.open_extraction(ext_id, workspace=str(ws))
    offsets = ext.sample_offsets
    assert offsets[0] == 0 and offsets[-1] == ext.store.tokens("input_ids").shape[0]
    assert (ext.activation_offsets == offsets).all()
    assert ext.activations(HP)[:].shape == (ext.n_tokens, 32)
    row = int(ext.rows()[2])
    start, stop = ext.token_range(row)
    assert ext.sample(row, tokens=False)["activations"][HP].shape == (stop - start, 32)
