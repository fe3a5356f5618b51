"""Mistakes a user makes, each met with a message that names the value and the fix (found by a hostile tester)."""
from __future__ import annotations

import pytest

import mistudio as ms
from mistudio.cli import main
from mistudio.errors import InputError
from mistudio.request import Request

OPTIONS = dict(layers=[0], hooks=["residual"], dtype="float32", max_length=16, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def ext(gpt2_dir, tmp_path_factory):
    return ms.extract(gpt2_dir, ["a short text", "another one"], workspace=str(tmp_path_factory.mktemp("ws")),
                      **OPTIONS)


def test_open_extraction_says_what_the_path_is(ext, tmp_path):
    workspace = ext.store.location.rsplit("/extractions/", 1)[0]
    with pytest.raises(InputError, match=r"is a workspace, not one extraction: .*open_extraction\('<id>', "
                                         r"workspace="):
        ms.open_extraction(workspace)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(InputError, match=r"is a file, not an extraction store"):
        ms.open_extraction(a_file)
    with pytest.raises(InputError, match=r"there is no store at .*nope.zarr.: that path does not exist"):
        ms.open_extraction(f"{workspace}/extractions/nope.zarr")
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(InputError, match=r"is not a mistudio extraction store \(.*\): give an extraction's .zarr"):
        ms.open_extraction(empty)
    assert ms.open_extraction(ext.store.location).id == ext.id


def test_cli_jobs_on_a_workspace_that_does_not_exist(tmp_path, capsys):
    assert main(["jobs", "--workspace", str(tmp_path / "typo")]) == 2
    assert "does not exist: check the path" in capsys.readouterr().err


@pytest.mark.parametrize("values, cli", [
    (dict(max_samples=0), "or leave out --max-samples"),
    (dict(saes="layers.0.residual"), "pass --saes layers.3.residual=/path/to/sae"),
    (dict(max_memory="x", device_map="auto"), "--max-memory '{\"0\": \"20GiB\", \"cpu\": \"60GiB\"}'"),
])
def test_hints_in_the_command_lines_own_form(gpt2_dir, values, cli):
    with pytest.raises(InputError) as caught:
        Request.build(model=gpt2_dir, dataset="sample", **values)
    assert cli in caught.value.render("cli")


def test_reads_refuse_what_would_be_wrong(ext):
    with pytest.raises(InputError, match=r"dtype='int8'.* floating-point"):
        ext.loader("layers.0.residual", batch_size=2, dtype="int8")
    with pytest.raises(InputError, match=rf"activation row 1000000 is not in extraction {ext.id}: its rows are 0\.\."):
        ext.token_index([10**6])


def test_settings_that_would_do_nothing_are_refused(gpt2_dir, workspace):
    with pytest.raises(InputError, match=r"latent_width=4.* no SAE is given"):
        Request.build(model=gpt2_dir, dataset="sample", latent_width=4)
    with pytest.raises(InputError, match=r"revision='main'.* is a local folder .*leave revision out"):
        Request.build(model=gpt2_dir, dataset="sample", revision="main")
    from conftest import cancelled_at

    ws = ms.Workspace(workspace)
    job = cancelled_at(ws, gpt2_dir, "sample", at_batch=2, max_batch_tokens=64,
                       **{k: v for k, v in OPTIONS.items() if k not in ("progress", "batch_size")})
    with pytest.raises(InputError, match=r"batches by max_batch_tokens=64: batch_size=2 would not apply"):
        ws.resume(job.id, batch_size=2)
    assert ws.job(job.id).status == "CANCELLED"
    assert ws.resume(job.id).wait(120).status == "COMPLETED"


def test_a_damaged_weights_file_is_named_with_the_fix_and_leaves_no_store(gpt2_dir, tmp_path, capsys):
    """A model folder whose model.safetensors is cut short: a plain refusal naming the folder and the fix (it was a
    traceback, an UNKNOWN failure and a FAILED store), in Python and on the command line."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(gpt2_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(InputError, match=r"damaged or cut short .*save the model again"):
        ms.extract(str(broken), ["a text"], layers=[0], workspace=str(tmp_path / "ws"), progress=False)
    assert not list((tmp_path / "ws").glob("extractions/*.zarr"))
    assert main(["--workspace", str(tmp_path / "cli"), "extract", "--model", str(broken), "--max-samples", "2"]) == 2
    err = capsys.readouterr().err
    assert "damaged or cut short" in err and "Traceback" not in err, err
    assert not list((tmp_path / "cli").glob("extractions/*.zarr"))
