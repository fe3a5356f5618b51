"""One declaration of the parameters, layers that point one way, and every front end speaking its own words."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mistudio as ms
from mistudio import cli
from mistudio.errors import InputError, render
from mistudio.request import Request, params

ROOT = Path(__file__).resolve().parents[1]
FIELDS = set(Request.model_fields)


def test_import_layers_and_no_cycles():
    """The import-linter contracts in pyproject.toml: layers point down, no cycle even through function-level
    imports."""
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_every_module_has_a_layer():
    """A module in no layer escapes the contract: each of the package's modules and packages is placed."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    placed = {name.strip() for layer in contracts[0]["layers"] for name in layer.split("|")}
    package = ROOT / "mistudio"
    found = {f"mistudio.{p.stem}" for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    found |= {f"mistudio.{p.name}" for p in package.iterdir()
              if (p / "__init__.py").exists() and p.name != "resources"}  # resources: the bundled sample, no code
    assert found - placed == set(), "add these to a layer in pyproject.toml"


def _options(subcommand: str) -> dict[str, str]:
    """dest -> help of a sub-command's options."""
    parser = cli.parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[subcommand]
    return {a.dest: a.help for a in sub._actions if a.option_strings and a.dest != "help"}


def test_cli_flags_studio_fields_and_python_keywords_are_the_requests_fields(workspace, gpt2_dir):
    extract = _options("extract")
    assert set(extract) - {"workspace", "preset"} == FIELDS
    run_only = {p.name for p in params() if p.group == "run"}
    assert set(_options("estimate")) - {"workspace", "preset", "probe"} == FIELDS - run_only
    assert all(text and "specs." not in text for text in extract.values())  # every flag explained, in words
    not_fields = {"self", "workspace", "storage_options", "progress", "preset", "cluster", "probe", "before_batch"}
    for fn in (ms.extract, ms.estimate, ms.Workspace.submit):
        assert set(inspect.signature(fn).parameters) - not_fields == FIELDS, fn.__name__
    studio = ms.Studio(workspace=workspace, model=gpt2_dir)
    panel = studio.extraction_panel
    assert set(panel.form_fields()) == FIELDS
    # form -> Request -> form: every field shows what it holds
    request = Request.build(**panel.form_arguments())
    changed = request.replace(window=64, stride=16, max_samples=12, checksum=False, oov_policy="skip",
                              timeout_s=90.0, device_map={"": "cpu"}, encoding="latin-1", chat_template="auto",
                              hooks=["mlp", "attention"], layers=[1, 2], exclude_special=True, shard_mb=0.0)
    panel.show_arguments(changed.fields())
    assert Request.build(**panel.form_arguments()) == changed


def test_workspace_is_accepted_after_every_sub_command():
    parser = cli.parser()
    for name, sub in next(a for a in parser._actions if a.dest == "command").choices.items():
        assert any("--workspace" in a.option_strings for a in sub._actions), name


@pytest.mark.parametrize("style, expected", [
    ("python", "window=600 is more than 512: pass window=512 or less; pass checksum=False"),
    ("cli", "--window 600 is more than 512: pass --window 512 or less; pass --no-checksum"),
    ("studio", "'Window' 600 is more than 512: set 'Window' to 512 or less; untick 'Checksums'"),
])
def test_messages_name_the_parameter_in_each_front_ends_words(style, expected):
    exc = InputError("«window=600» is more than 512: «pass window=512» or less; «pass checksum=False»")
    names = {p.name: (p.flag, p.label) for p in params()}
    assert exc.render(style, names) == expected and exc.param == "window"
    assert str(exc) == render(exc.template)


def test_cli_errors_speak_flags_not_python(gpt2_dir, workspace, capsys):
    code = cli.main(["extract", "--workspace", workspace, "--model", gpt2_dir, "--layers", "0", "--window", "9999"])
    err = capsys.readouterr().err
    assert code == 2 and "--window 9999 is more than the 128 positions" in err and "pass --window 128" in err
    assert "window=" not in err
    ms.extract(gpt2_dir, ["a text"], workspace=workspace, progress=False)
    done = ms.Workspace(workspace).extractions()["id"][0]
    code = cli.main(["delete", done, "--workspace", workspace])
    err = capsys.readouterr().err
    assert code == 2 and "pass --force" in err and "force=True" not in err


def test_cli_starts_without_the_model_code(workspace):
    """--help, jobs, verify and presets never import torch or transformers."""
    env = {**os.environ, "MISTUDIO_WORKSPACE": workspace}
    probe = ("import sys, runpy; sys.argv = ['mistudio'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('mistudio.cli', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('HEAVY', [m for m in ('torch', 'transformers', 'pandas') if m in sys.modules])")
    for argv in (["--help"], ["jobs"], ["presets"], ["verify", "nope"]):
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=env,
                             timeout=60).stdout
        assert "HEAVY []" in out, (argv, out[-500:])
