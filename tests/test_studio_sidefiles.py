"""studio.json and models.json, malformed or hostile: the real Studio opens anyway, with defaults for what is bad, a
note naming the file and what was wrong, the bad file set aside (never deleted, never overwritten), bounded reads,
and writes that never follow a link."""
from __future__ import annotations

import html
import json
import os
import stat
from pathlib import Path

import pytest

import mistudio as ms
from mistudio.widgets.sidefiles import MAX_SIDE_FILE_BYTES, SideFile, read_text, set_aside, write_json
from mistudio.widgets.studio import StudioSettings


def note_text(studio) -> str:
    return html.unescape(studio.files_note.value)


def set_aside_files(folder: Path, name: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(f"{name}.bad-"))


def write(content: bytes):
    return lambda path: path.write_bytes(content)


def fifo(path: Path) -> None:
    os.mkfifo(path)


def link_to_dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def folder(path: Path) -> None:
    path.mkdir()
    (path / "inside.txt").write_text("kept")


def huge(path: Path) -> None:
    with open(path, "wb") as f:  # sparse: 100 MB that cost no disk
        f.truncate(100 * 1024 * 1024)


def deep(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


# (case, how the file is made, what the note must say, what is kept from it)
STUDIO_CASES = [
    ("list", write(b'["gpt2", {"model": "gpt2"}]'), "holds a list, not an object", {}),
    ("number-as-model", write(b'{"model": 42, "dataset": {"max_samples": 7}}'), "'model' = 42", {"max_samples": 7}),
    ("dict-as-dataset-field", write(b'{"dataset": {"path": {"x": 1}, "max_length": 64}}'), "'dataset.path'",
     {"max_length": 64}),
    ("text-as-dataset", write(b'{"dataset": "my.jsonl", "model_dtype": "float32"}'), "'dataset' = 'my.jsonl'",
     {"model_dtype": "float32"}),
    ("strings-for-booleans", write(b'{"extract": {"checksum": "false", "exclude_special": "yes", "batch_size": 4}}'),
     "'extract.checksum' = 'false'", {"batch_size": 4}),
    ("nested-garbage", write(json.dumps({"extract": {"layers": [[1, [2]], {"a": None}], "hooks": {"x": [1]}},
                                          "dismissed": [1, {"a": 2}], "unknown": {"deep": [[[]]]}}).encode()),
     "not a setting the Studio knows", {}),
    ("bad-values", write(b'{"model_dtype": "float64", "dataset": {"source": "ftp", "max_samples": -5}}'),
     "'model_dtype' = 'float64'", {}),
    ("window-past-the-box", write(b'{"extract": {"window": 1000000000000000000, "batch_size": 4}}'),
     "'window' = 1000000000000000000 cannot be shown", {"batch_size": 4}),  # the box clamped it, unsaid
    ("nul-in-model", write(b'{"model": "gpt2\\u0000x"}'), "NUL", {}),
    ("truncated", write(b'{"model": "gpt2", "dataset": {"sou'), "not valid JSON", {}),
    ("empty", write(b""), "not valid JSON", {}),
    ("invalid-utf8", write(b'{"model": "\xff\xfe gpt2"}'), "not UTF-8", {}),
    ("too-deep", deep, "nests too deeply", {}),
    ("100MB", huge, "more than a side file holds", {}),
    ("fifo", fifo, "named pipe (FIFO)", {}),
    ("link-to-dev-zero", link_to_dev_zero, "a link to '/dev/zero', which is a character device", {}),
    ("folder", folder, "it is a folder", {}),
]


@pytest.mark.parametrize("case,make,said,kept", STUDIO_CASES, ids=[c[0] for c in STUDIO_CASES])
def test_bad_studio_json_opens_with_a_note_and_is_set_aside(workspace, case, make, said, kept):
    root = Path(workspace)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "studio.json"
    make(path)
    before = path.read_bytes() if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20 else None
    studio = ms.Studio(workspace=workspace)
    assert studio.children  # it opened, with its tabs
    note = note_text(studio)
    assert studio.files_note.layout.display == "" and "studio.json" in note and said in note, note
    # the values that could be read are kept; the rest are the form's defaults
    if "max_samples" in kept:
        assert studio.dataset_picker.max_samples.value == kept["max_samples"]
    if "max_length" in kept:
        assert studio.dataset_picker.max_length.value == kept["max_length"]
    if "model_dtype" in kept:
        assert studio.model_picker.dtype.value == kept["model_dtype"]
    if "batch_size" in kept:
        assert studio.extraction_panel.batch_size.value == kept["batch_size"]
    # set aside, as it was (a link stays a link, a folder a folder, a FIFO a FIFO), never deleted
    [aside] = set_aside_files(root, "studio.json")
    assert aside.name in note and not os.path.lexists(path)
    if case == "link-to-dev-zero":
        assert aside.is_symlink() and os.readlink(aside) == "/dev/zero"
    elif case == "folder":
        assert (aside / "inside.txt").read_text() == "kept"
    elif case == "fifo":
        assert stat.S_ISFIFO(aside.lstat().st_mode)
    elif before is not None:
        assert aside.read_bytes() == before
    # the next save writes a good file, which the next Studio reads without a note
    assert studio.save_settings() is True
    assert path.is_file() and not path.is_symlink()
    StudioSettings.model_validate(json.loads(path.read_text()))
    again = ms.Studio(workspace=workspace)
    assert again.files_note.layout.display == "none" and again.files_note.value == ""
    assert set_aside_files(root, "studio.json") == [aside]


MODELS_CASES = [
    ("object", write(b'{"folders": ["/tmp"]}'), "holds an object, not a list"),
    ("wrong-items", write(b'[42, null, {"a": 1}, ["x"]]'), "'item [0]' = 42"),
    ("truncated", write(b'["/tmp/a", "/tm'), "not valid JSON"),
    ("invalid-utf8", write(b'["/tmp/\xff"]'), "not UTF-8"),
    ("link-to-dev-zero", link_to_dev_zero, "character device"),
    ("folder", folder, "it is a folder"),
    ("fifo", fifo, "named pipe (FIFO)"),
]


@pytest.mark.parametrize("case,make,said", MODELS_CASES, ids=[c[0] for c in MODELS_CASES])
def test_bad_models_json_opens_with_a_note_and_is_set_aside(workspace, gpt2_dir, case, make, said):
    root = Path(workspace)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "models.json"
    make(path)
    studio = ms.Studio(workspace=workspace)
    note = note_text(studio)
    assert studio.files_note.layout.display == "" and "models.json" in note and said in note, note
    [aside] = set_aside_files(root, "models.json")
    assert aside.name in note and not os.path.lexists(path)
    # Remember folder writes a good models.json; the next Studio lists the folder and says nothing
    studio.model_picker.set_model(gpt2_dir)
    studio.model_picker.add_button.click()
    assert json.loads(path.read_text()) == [str(Path(gpt2_dir).resolve())]
    again = ms.Studio(workspace=workspace)
    assert again.files_note.value == "" and str(Path(gpt2_dir).resolve()) in again.model_picker.choice.options


def test_models_json_keeps_the_good_folders(workspace, gpt2_dir):
    root = Path(workspace)
    root.mkdir(parents=True, exist_ok=True)
    good = str(Path(gpt2_dir).resolve())
    (root / "models.json").write_text(json.dumps([good, 42, "x" * 5000]))
    studio = ms.Studio(workspace=workspace)
    assert good in studio.model_picker.choice.options
    note = note_text(studio)
    assert "'item [1]' = 42" in note and "'item [2]'" in note and "at most 4096 characters" in note


def test_both_files_bad_both_said(workspace):
    root = Path(workspace)
    root.mkdir(parents=True, exist_ok=True)
    (root / "studio.json").write_text("[]")
    (root / "models.json").write_text("{}")
    note = note_text(ms.Studio(workspace=workspace))
    assert "studio.json" in note and "models.json" in note


def test_set_aside_never_overwrites(tmp_path):
    path = tmp_path / "studio.json"
    contents = [b"first bad", b"second bad", b"third bad"]
    for content in contents:
        path.write_bytes(content)
        set_aside(path)  # within the same second: each gets its own name
    kept = set_aside_files(tmp_path, "studio.json")
    assert len(kept) == 3 and sorted(p.read_bytes() for p in kept) == sorted(contents)


def test_writes_never_follow_a_link(workspace, tmp_path):
    """A studio.json that is a link to a (readable, valid) file elsewhere: saving replaces the link, the file it
    pointed at is untouched."""
    root = Path(workspace)
    root.mkdir(parents=True, exist_ok=True)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"model_dtype": "float16"}')
    (root / "studio.json").symlink_to(elsewhere)
    studio = ms.Studio(workspace=workspace)
    assert studio.model_picker.dtype.value == "float16" and studio.files_note.value == ""
    studio.model_picker.dtype.value = "float32"
    assert studio.save_settings()
    assert not (root / "studio.json").is_symlink()
    assert json.loads((root / "studio.json").read_text())["model_dtype"] == "float32"
    assert elsewhere.read_text() == '{"model_dtype": "float16"}'
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_reads_are_bounded(tmp_path):
    path = tmp_path / "side.json"
    path.write_bytes(b" " * (MAX_SIDE_FILE_BYTES + 1))
    with pytest.raises(Exception, match="more than a side file holds"):
        read_text(path)
    path.write_bytes(b"{}")
    assert read_text(path) == "{}"
    assert read_text(tmp_path / "absent.json") is None


def test_a_failed_write_is_said_not_raised(workspace):
    """The workspace folder replaced by a file after the Studio opened (root writes anywhere, so not chmod): the
    save fails, returns False and the note says why; nothing raises."""
    root = Path(workspace)
    root.mkdir(parents=True, exist_ok=True)
    studio = ms.Studio(workspace=workspace)
    moved = root.with_name("moved-away")
    root.rename(moved)
    root.write_text("not a folder")
    assert studio.save_settings() is False
    note = note_text(studio)
    assert "studio.json" in note and "could not be written" in note and "permissions" in note
    assert root.read_text() == "not a folder"


def test_saved_settings_round_trip_without_a_note(workspace):
    studio = ms.Studio(workspace=workspace)
    studio.dataset_picker.max_samples.value = 33
    studio.extraction_panel.batch_size.value = 4
    assert studio.save_settings()
    side = SideFile(Path(workspace) / "studio.json")
    settings = side.load(StudioSettings)
    assert side.problems == [] and settings.dataset.max_samples == 33 and settings.extract.batch_size == 4
    again = ms.Studio(workspace=workspace)
    assert again.files_note.value == "" and again.dataset_picker.max_samples.value == 33
    assert again.extraction_panel.batch_size.value == 4


def test_write_json_is_atomic_over_a_folder_it_cannot_replace(tmp_path):
    (tmp_path / "studio.json").mkdir()
    with pytest.raises(OSError):
        write_json(tmp_path / "studio.json", {})
    assert (tmp_path / "studio.json").is_dir() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
