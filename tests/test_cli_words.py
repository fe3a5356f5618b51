"""The command line's words: its refusals name its flags, in its syntax, and never end in a traceback."""
from __future__ import annotations

import pytest

import mistudio as ms
from mistudio.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_one_hook_point_named_twice_in_saes_is_refused_naming_both_folders(gpt2_dir, workspace, tmp_path, capsys):
    first, second = tmp_path / "sae_a", tmp_path / "sae_b"
    first.mkdir(), second.mkdir()
    code, _, err = run(capsys, "--workspace", workspace, "extract", "--model", gpt2_dir, "--layers", "2",
                       "--saes", f"layers.2.residual={first},layers.2.residual={second}")
    assert code == 2 and "--saes names layers.2.residual twice" in err
    assert str(first) in err and str(second) in err and "one SAE per hook point" in err
    assert not ms.Workspace(workspace).extractions().shape[0]
    with pytest.raises(ms.InputError, match="saes names layers.2.residual twice"):
        ms.estimate(gpt2_dir, layers=[2], saes={"layers.2.residual": str(first), "layers.02.residual": str(second)},
                    workspace=workspace)


def test_an_sae_without_a_folder_is_refused(gpt2_dir, workspace, capsys):
    code, _, err = run(capsys, "--workspace", workspace, "estimate", "--model", gpt2_dir, "--layers", "2",
                       "--saes", "layers.2.residual=")
    assert code == 2 and "--saes gives no folder for layers.2.residual" in err and "not an SAE folder" not in err


def test_exporting_a_preset_where_no_file_can_be_written_names_the_path(gpt2_dir, workspace, tmp_path, capsys):
    ms.Workspace(workspace).save_preset("p1", model=gpt2_dir, layers=[1])
    for target, why in ((tmp_path / "no" / "such" / "p.json", "no such folder"), (tmp_path, "it is a folder")):
        code, _, err = run(capsys, "--workspace", workspace, "presets", "export", "p1", target)
        assert code == 2 and f"cannot write the preset to '{target}' ({why})" in err and "Traceback" not in err
    code, out, _ = run(capsys, "--workspace", workspace, "presets", "export", "p1", tmp_path / "p.json")
    assert code == 0 and (tmp_path / "p.json").is_file()
