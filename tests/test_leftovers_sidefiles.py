"""A store's small files in odd states, as a researcher meets them.

The feature notes (``analysis/notes/<hook point>/zarr.json``, written by ``set_note``): a FIFO or garbage in their
place is named as the notes file, with its fix (remove or replace that file), never as an array to re-extract,
and never blocks. A ``zarr.json`` that is a symbolic link: to a regular file inside the store (what a copy tool
may leave) it is read; to anything outside the store, to a FIFO, or to nothing, it is refused naming the link and
the fix."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import at_once

import mistudio as ms
from mistudio.analysis.features import get_note, notes, set_note
from mistudio.errors import InputError, StoreCorrupted

HP = "layers.1.residual"


@pytest.fixture(scope="module")
def made(gpt2_dir, tmp_path_factory):
    """(workspace, id) of a small completed store with a note on feature 3."""
    ws = str(tmp_path_factory.mktemp("made") / "ws")
    ext = ms.extract(gpt2_dir, "sample", workspace=ws, progress=False, layers=[1], hooks=["residual"],
                     max_samples=8, max_length=16, dtype="float32")
    set_note(ext, HP, 3, "fires on commas")
    return ws, ext.id


@pytest.fixture
def store(made, tmp_path) -> Path:
    """A fresh copy of the store's folder (the tests below damage it)."""
    ws, ext_id = made
    shutil.copytree(ws, tmp_path / "ws")
    return tmp_path / "ws" / "extractions" / f"{ext_id}.zarr"


# -- 3. the notes file ---------------------------------------------------------------------------------------------
def notes_file(store: Path) -> Path:
    return store / "analysis" / "notes" / HP / "zarr.json"


@pytest.mark.parametrize("how", ["fifo", "garbage"])
def test_an_unreadable_notes_file_is_named_with_its_fix(store, how):
    ext = ms.open_extraction(str(store))
    assert notes(ext, HP) == {3: "fires on commas"}
    file = notes_file(store)
    file.unlink()
    if how == "fifo":
        os.mkfifo(file)
    else:
        file.write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"3": ')
    for call in (lambda: notes(ext, HP), lambda: get_note(ext, HP, 3), lambda: set_note(ext, HP, 4, "new")):
        error = at_once(call, seconds=30)
        assert isinstance(error, InputError), error  # a value error the Features panel shows
        text = str(error)
        assert str(file) in text and "notes" in text and "remove" in text.lower(), text
        assert "re-extract" not in text and "array" not in text and "retry" not in text, text
    file.unlink()  # the fix the message gives
    assert notes(ext, HP) == {}
    set_note(ext, HP, 4, "new")
    assert notes(ext, HP) == {4: "new"}
    np.testing.assert_array_equal(ext.activations(HP)[:2], ms.open_extraction(str(store)).activations(HP)[:2])


def test_no_notes_yet_is_no_notes(store):
    shutil.rmtree(store / "analysis" / "notes")
    ext = ms.open_extraction(str(store))
    assert notes(ext, HP) == {} and get_note(ext, HP, 3) == ""


# -- 4. a symbolic link as a store's zarr.json -----------------------------------------------------------------
def test_a_group_metadata_link_to_a_file_inside_the_store_is_read(store, made):
    ws, ext_id = made
    reference = ms.open_extraction(ext_id, workspace=ws)
    group = store / "zarr.json"
    (store / "meta").mkdir()
    group.rename(store / "meta" / "group.json")
    group.symlink_to(Path("meta") / "group.json")  # relative, as cp -a or rsync -l keep it
    ext = ms.open_extraction(str(store))
    assert ext.record.nonce == reference.record.nonce and ext.status == "COMPLETED"
    np.testing.assert_array_equal(ext.activations(HP)[:], reference.activations(HP)[:])
    assert notes(ext, HP) == {3: "fires on commas"}
    array_meta = store / "activations" / HP / "zarr.json"  # an array's: the same rule
    array_meta.rename(store / "meta" / "array.json")
    array_meta.symlink_to(store / "meta" / "array.json")  # absolute, into the store
    linked = ms.open_extraction(str(store))
    np.testing.assert_array_equal(linked.activations(HP)[:], reference.activations(HP)[:])
    assert linked.verify().ok, linked.verify()
    assert ext_id in set(ms.Workspace(str(store.parent.parent)).extractions()["id"])


def test_a_store_reached_through_a_linked_folder_reads_its_linked_metadata(store, tmp_path):
    (store / "zarr.json").rename(store / "group.json")
    (store / "zarr.json").symlink_to("group.json")
    alias = tmp_path / "alias.zarr"
    alias.symlink_to(store, target_is_directory=True)
    assert ms.open_extraction(str(alias)).status == "COMPLETED"


@pytest.mark.parametrize("target", ["outside", "escape", "fifo", "dangling", "loop"])
def test_a_group_metadata_link_outside_the_store_or_to_no_file_is_refused(store, tmp_path, target):
    group = store / "zarr.json"
    outside = tmp_path / "elsewhere.json"
    shutil.copy(group, outside)  # a valid copy: refused for where it is, not for what it holds
    group.unlink()
    if target == "outside":
        group.symlink_to(outside)
        said = r"symbolic link to .*elsewhere\.json, outside the store"
    elif target == "escape":
        group.symlink_to(Path("..") / ".." / ".." / "elsewhere.json")  # relative, climbing out
        said = r"symbolic link to .*elsewhere\.json, outside the store"
    elif target == "fifo":
        os.mkfifo(store / "meta.fifo")
        group.symlink_to("meta.fifo")
        said = r"symbolic link to .*meta\.fifo, which is not a regular file"
    elif target == "dangling":
        group.symlink_to("gone.json")
        said = r"symbolic link to .*gone\.json, which cannot be read"
    else:
        group.symlink_to("zarr.json")
        said = r"symbolic link to .*zarr\.json, which cannot be read"
    error = at_once(ms.open_extraction, str(store), seconds=30)
    assert isinstance(error, StoreCorrupted), error
    assert error.file == str(group), error.file
    text = str(error)
    assert re.search(said, text), text
    assert "replace the link" in text.lower() and "re-extract" not in text, text
