"""The command line's planning side: estimate, presets, and the new extract flags (in-process)."""
from __future__ import annotations

import json
import sys

import pytest

import mistudio as ms
from mistudio.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_estimate_prints_summary_and_warnings(gpt2_dir, workspace, capsys, monkeypatch):
    code, out, _ = run(capsys, "--workspace", workspace, "estimate", "--model", gpt2_dir, "--layers", "0,2",
                       "--hooks", "residual,mlp", "--max-samples", "20", "--batch-size", "auto")
    assert code == 0 and "20 samples" in out and "on disk" in out and "4 hook points" in out
    assert not ms.Workspace(workspace).extractions().shape[0]  # nothing created
    monkeypatch.setattr(sys.modules["mistudio.plan"], "_free_disk", lambda workspace: 1000)
    code, out, _ = run(capsys, "--workspace", workspace, "estimate", "--model", gpt2_dir, "--layers", "1",
                       "--max-samples", "20")
    assert code == 0 and "warning: the store needs" in out and "1000 B free" in out


def test_extract_new_flags(gpt2_dir, workspace, capsys, tmp_path):
    code, out, _ = run(capsys, "--workspace", workspace, "extract", "--model", gpt2_dir, "--layers", "1",
                       "--max-samples", "12", "--batch-size", "auto", "--micro-batch-size", "2", "--window", "16",
                       "--stride", "8", "--exclude-special", "--no-checksum")
    assert code == 0 and "COMPLETED" in out
    ext = ms.Workspace(workspace).open(ms.Workspace(workspace).extractions()["id"][0])
    params = ext.metadata["params"]
    assert params["batch_size_auto"]["chosen"] == params["batch_size"]
    assert (params["micro_batch_size"], params["window"], params["stride"]) == (2, 16, 8)
    assert params["exclude_special"] is True and params["checksum"] is False


def test_bad_values_name_the_fix(gpt2_dir, workspace, capsys, tmp_path):
    code, _, err = run(capsys, "--workspace", workspace, "extract", "--model", gpt2_dir, "--layers", "1",
                       "--batch-size", "auto", "--max-batch-tokens", "64")
    assert code == 2 and "pass one of them" in err
    code, _, err = run(capsys, "--workspace", workspace, "estimate", "--model", gpt2_dir, "--layers", "1",
                       "--chat-template", str(tmp_path / "nope.jinja"))
    assert code == 2 and "is not a file" in err and "auto" in err
    code, _, err = run(capsys, "--workspace", workspace, "estimate", "--layers", "1")
    assert code == 2 and "--model is required" in err
    with pytest.raises(SystemExit) as exit_:
        main(["extract", "--model", gpt2_dir, "--layers", "1", "--batch-size", "big"])
    assert exit_.value.code == 2 and "or auto" in capsys.readouterr().err
    code, _, err = run(capsys, "--workspace", workspace, "presets", "show", "nope")
    assert code == 2 and "no preset 'nope'" in err


def test_presets_commands_and_extract_with_preset(gpt2_dir, workspace, capsys, tmp_path):
    ws = ms.Workspace(workspace)
    ws.save_preset("mid", model=gpt2_dir, layers=[2], hooks=["residual", "mlp"], max_samples=10, batch_size=4)
    code, out, _ = run(capsys, "--workspace", workspace, "presets")
    assert code == 0 and out.startswith("mid")
    code, out, _ = run(capsys, "--workspace", workspace, "presets", "show", "mid")
    assert code == 0 and json.loads(out)["layers"] == [2]
    target = tmp_path / "mid.json"
    code, out, _ = run(capsys, "--workspace", workspace, "presets", "export", "mid", str(target))
    assert code == 0 and target.exists()
    code, out, _ = run(capsys, "--workspace", workspace, "presets", "import", str(target), "--name", "copy")
    assert code == 0 and set(ws.presets()) == {"mid", "copy"}
    code, out, _ = run(capsys, "--workspace", workspace, "estimate", "--preset", "mid")
    assert code == 0 and "10 samples" in out and "2 hook points" in out
    code, out, _ = run(capsys, "--workspace", workspace, "extract", "--preset", "mid", "--max-samples", "6")
    assert code == 0 and "COMPLETED" in out
    ext = ws.open(ws.extractions()["id"][0])
    assert ext.n_samples == 6 and ext.metadata["params"]["batch_size"] == 4  # the flag overrides, the rest stays
    code, out, _ = run(capsys, "--workspace", workspace, "presets", "delete", "copy")
    assert code == 0 and set(ws.presets()) == {"mid"}


def test_a_listing_piped_into_a_reader_that_stops_ends_quietly(workspace, tmp_path):
    """`mistudio jobs | head`: the reader closes the pipe; the listing ends with SIGPIPE's exit code, no traceback."""
    import os
    import subprocess

    os.makedirs(workspace, exist_ok=True)
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that has already stopped: the first write breaks the pipe
    try:
        done = subprocess.run([sys.executable, "-m", "mistudio.cli", "jobs", "--workspace", workspace],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == "", done.stderr
