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


def test_extract_words_refusals_found_while_planning_as_flags_like_estimate(gpt2_dir, workspace, tmp_path, capsys):
    oov = tmp_path / "oov.jsonl"
    oov.write_text("[1, 2, 99999]\n[3, 4]\n")
    template, plain = tmp_path / "chat.jinja", tmp_path / "plain.jsonl"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    plain.write_text('{"text": "hello there"}\n')
    for flags, cli_words, python_words in (
            (["--dataset", oov], "pass --oov-policy skip", "oov_policy="),
            (["--dataset", plain, "--chat-template", template], "leave out --chat-template", "chat_template=")):
        said = {}
        for command in ("estimate", "extract"):
            code, _, err = run(capsys, "--workspace", workspace, command, "--model", gpt2_dir, "--max-samples", 2,
                               *flags)
            assert code == 2 and cli_words in err and python_words not in err, err
            said[command] = [line for line in err.splitlines() if line.startswith("error:")]
        assert said["extract"] == said["estimate"]
    with pytest.raises(ms.InputError, match="oov_policy='skip'"):  # Python keeps its own words
        ms.extract(gpt2_dir, str(oov), max_samples=2, workspace=workspace, progress=False)


def test_timeout_none_means_no_limit_on_extract_as_on_train(gpt2_dir, workspace, capsys):
    code, _, err = run(capsys, "--workspace", workspace, "extract", "--model", gpt2_dir, "--timeout", "-5")
    assert code == 2 and "pass --timeout 600, or leave out --timeout for no limit" in err and "None" not in err
    ms.Workspace(workspace).save_preset("short", model=gpt2_dir, timeout_s=0.001, max_samples=2)
    code, out, err = run(capsys, "--workspace", workspace, "extract", "--preset", "short", "--timeout", "none")
    assert code == 0 and "COMPLETED" in out, err  # the preset's limit is lifted, not refused as 'not a number'
    ext = ms.Workspace(workspace).open(ms.Workspace(workspace).extractions()["id"][0])
    assert ext.metadata["params"]["timeout_s"] is None


def help_of(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


@pytest.mark.parametrize("command", ["extract", "estimate"])
def test_extract_help_speaks_flags_not_python(command, capsys):
    from mistudio.request import Request

    text = help_of(capsys, command)
    for name in Request.model_fields:  # a keyword's name (device_map) in help is Python's spelling
        assert "_" not in name or f" {name}" not in text, name
    for python in ("None", "True", "False", "{hook point", "model=", "an int, a list of ints", "'all'"):
        assert python not in text, python
    assert "layers.3.residual=/path/to/sae" in text and "(default --checksum)" in text
    assert "(none, or left out: no limit)" in text or command == "estimate"


def test_the_command_line_never_offers_an_extraction_retry_it_does_not_have(gpt2_dir, workspace, tmp_path, capsys):
    from mistudio.errors import render
    from mistudio.fingerprints import RESUME_RISK

    code, _, _ = run(capsys, "--workspace", workspace, "extract", "--model", gpt2_dir, "--max-samples", 2)
    done = ms.Workspace(workspace).extractions()["id"][0]
    code, _, err = run(capsys, "--workspace", workspace, "resume", done)
    assert code == 2 and "nothing to resume (`mistudio extract` with the flags you want makes a new" in err
    from mistudio.errors import retry_words

    err = render("There is nothing stored to resume from: " + retry_words("retry it"), "cli")  # workspace.resume's
    assert err == "There is nothing stored to resume from: run `mistudio extract` again with the same flags (a new " \
        "extraction)"
    for said in (err, render(RESUME_RISK, "cli")):
        assert "retry" not in said.lower(), said
    assert render("There is nothing stored to resume from: " + retry_words("retry it")).endswith(": retry it")


def test_refusals_of_flags_give_the_command_line_forms(gpt2_dir, workspace, capsys):
    for flags, said in ((["--layers", "abc"], "give an index, a list such as 0,3, a range such as 2-5"),
                        (["--hooks", ""], "--hooks '' is empty: choose from residual, mlp, attention, e.g. pass "
                                          "--hooks residual,mlp"),
                        (["--latent-width", "4"], "pass --saes HOOK_POINT=FOLDER with it")):
        code, _, err = run(capsys, "--workspace", workspace, "estimate", "--model", gpt2_dir, *flags)
        assert code == 2 and said in err and "an int" not in err and "{" not in err, err
    with pytest.raises(ms.InputError, match=r"pass saes=\{hook point: SAE folder\} with it"):
        ms.estimate(gpt2_dir, latent_width=4, workspace=workspace)
    with pytest.raises(ms.InputError, match="give an int, a list of ints"):
        ms.estimate(gpt2_dir, layers="abc", workspace=workspace)


def test_importing_a_hand_edited_preset_names_the_file_and_its_key(gpt2_dir, workspace, tmp_path, capsys):
    import json

    def preset_file(name: str, text: str):
        path = tmp_path / name
        path.write_text(text)
        return path

    good = {"model": gpt2_dir, "layers": [1]}
    for text, said in (
            (json.dumps({"name": "a", "arguments": {**good, "batch_size": "lots"}}),
             '"batch_size": "lots" is not a whole number'),
            (json.dumps({"name": "a", "arguments": {**good, "checksum": "maybe"}}), '"checksum": "maybe" is not true'),
            (json.dumps({"name": "a", "arguments": {**good, "layers": [7]}}),
             '"layers": [7]: layer index 7 is out of range: this model has 3 layers, use 0 to 2 (or set "layers": '
             '"all")'),
            (json.dumps({"name": "a", "arguments": {**good, "bogus_arg": 1}}), "\"arguments\" has unknown keys "
                                                                               "'bogus_arg'"),
            ("not json", "it is not JSON: expecting value at line 1, column 1"),
            ('{"name": "a", "arguments": {"model": "m", "saes": {"layers.1.residual": "/a", "layers.1.residual": '
             '"/b"}}}', "it writes 'layers.1.residual' twice in one object: keep one of them"),  # not /a dropped
            ("[1]", "it is not a JSON object")):
        path = preset_file("p.json", text)
        code, _, err = run(capsys, "--workspace", workspace, "presets", "import", path)
        assert code == 2 and f"'{path}'" in err and said in err, err
        for python in ("Input should", "Value error", "JSONDecodeError", "--batch-size", "--layers"):
            assert python not in err, (python, err)
    assert not ms.Workspace(workspace).presets()


def test_a_shard_smaller_than_a_chunk_is_refused(gpt2_dir, workspace, capsys):
    code, _, err = run(capsys, "--workspace", workspace, "estimate", "--model", gpt2_dir, "--shard-mb", "0.001")
    assert code == 2 and "--shard-mb 0.001 is smaller than one chunk (--chunk-mb 2)" in err
    assert "pass --shard-mb 32 or more, or pass --shard-mb 0 for one file per chunk" in err
    code, out, _ = run(capsys, "--workspace", workspace, "estimate", "--model", gpt2_dir, "--shard-mb", "0.01",
                       "--chunk-mb", "0.01", "--max-samples", 2)
    assert code == 0 and "on disk" in out


def test_demo_takes_window_none_as_no_window(workspace, capsys):
    code, out, err = run(capsys, "--workspace", workspace, "demo", "--max-samples", 2, "--window", "none")
    assert code == 0 and "COMPLETED" in out, err
    ext = ms.Workspace(workspace).open(ms.Workspace(workspace).extractions()["id"][0])
    assert ext.metadata["params"]["window"] is None


def test_store_errors_offer_the_command_lines_way_to_extract_again():
    import pickle

    from mistudio.cli import say
    from mistudio.errors import RETRY_EXTRACTION, StoreCorrupted, StoreLost, classify, render

    damaged = StoreCorrupted("ws/extractions/x.zarr", "a chunk is short", "activations/layers.0.residual", (0, 0))
    assert str(damaged).endswith("re-extract (retry) to repair it")  # Python and the Studio have a retry
    assert say(damaged).endswith("re-extract (run `mistudio extract` again) to repair it") and "«" not in say(damaged)
    assert str(pickle.loads(pickle.dumps(damaged))) == str(damaged)
    lost = StoreLost("the store x was deleted while its job ran; what it held is gone: " + RETRY_EXTRACTION)
    record = classify(lost, {})
    assert record["error_message"].endswith("retry the extraction") and "«" not in str(lost)
    assert render(record["error_template"], "cli").endswith("run `mistudio extract` again with the same flags (a new "
                                                            "extraction)")


def test_an_sae_on_a_layer_the_model_lacks_names_saes(gpt2_dir, tmp_path, capsys):
    """--saes layers.9.residual=… on a 3-layer model said '--layers 9', a flag not given: it names --saes."""
    from mistudio.cli import main

    assert main(["--workspace", str(tmp_path / "ws"), "extract", "--model", gpt2_dir, "--max-samples", "1",
                 "--saes", f"layers.9.residual={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "--saes names layers.9.residual" in err and "layers 0 to 2" in err and "--layers 9" not in err, err


def test_device_and_model_folder_refusals_speak_flags(gpt2_dir, tmp_path, capsys):
    """--device cuda on a machine without one, and --model at a folder without config.json: flags, not device='cuda'
    and model=."""
    from mistudio.cli import main

    (tmp_path / "empty").mkdir()
    if not __import__("torch").cuda.is_available():
        assert main(["--workspace", str(tmp_path / "ws"), "extract", "--model", gpt2_dir, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "--device cuda but this machine has no CUDA GPU: pass --device cpu or --device auto" in err, err
    assert main(["--workspace", str(tmp_path / "ws"), "extract", "--model", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "point --model at a folder saved with save_pretrained" in err and "model=" not in err, err


def test_saes_given_twice_on_the_command_line_are_both_seen(gpt2_dir, workspace, tmp_path, capsys):
    """Two --saes flags kept only the last (argparse): both reach the request, which refuses a hook point named
    twice, and two flags for two hook points apply both."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    code, _, err = run(capsys, "--workspace", workspace, "estimate", "--model", gpt2_dir, "--layers", "1",
                       "--saes", f"layers.1.residual={tmp_path / 'a'}", "--saes", f"layers.1.residual={tmp_path / 'b'}")
    assert code == 2 and "--saes names layers.1.residual twice" in err, err
    from mistudio.cli import parser, request_options
    from mistudio.request import params

    args = parser().parse_args(["extract", "--model", gpt2_dir, "--saes", "layers.1.residual=/a", "--saes",
                                "layers.2.residual=/b"])
    assert request_options(args, params())["saes"] == "layers.1.residual=/a,layers.2.residual=/b"


def test_preset_file_refusals_name_each_front_ends_own_way(gpt2_dir, workspace, tmp_path, capsys):
    """A preset file's refusal told Python users to run `mistudio extract --help` and CLI users to call
    ws.export_preset: each is told its own."""
    import json

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"name": "a", "arguments": {"model": gpt2_dir, "layerz": [1]}}))
    code, _, err = run(capsys, "--workspace", workspace, "presets", "import", path)
    assert code == 2 and "`mistudio extract --help` lists them" in err and "export_preset" not in err, err
    assert "`mistudio presets export NAME PATH`" in err and "«" not in err, err
    with pytest.raises(ms.InputError) as caught:
        ms.Workspace(workspace).import_preset(path)
    said = str(caught.value)
    assert "help(ms.extract) lists them" in said and "ws.export_preset(name, path)" in said, said
    assert "mistudio" not in said.replace("ms.extract", ""), said


@pytest.mark.parametrize("argv, hint", [(["extract", "--batchsize", "8"], "--batchsize (did you mean --batch-size?)"),
                                        (["train", "ID", "layers.0.residual", "--expansion-factr", "4"],
                                         "--expansion-factr (did you mean --expansion-factor?)"),
                                        (["cleanup", "--dlete"], "--dlete (did you mean --delete?)")])
def test_a_mistyped_flag_gets_its_command_usage_and_the_flag_it_is_close_to(argv, hint, capsys):
    with pytest.raises(SystemExit) as ended:
        main(argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and f"usage: mistudio {argv[0]}" in err and hint in err, err
