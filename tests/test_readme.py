"""The README's examples run as written on a fresh machine, offline.

Every ```python block runs, in order and in one namespace (a reader pasting them into one session), in a fresh
folder with ``HF_HUB_OFFLINE=1``; the ```bash blocks marked ``<!-- readme-test: run -->`` run at their place with
``bash -e``. A Python block that cannot run offline says why just above it:
``<!-- readme-test: not run (needs ...) -->``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```$", re.S | re.M)


def readme_blocks() -> list[dict]:
    """The README's fenced blocks: language, code, the readme-test mark above it (if any) and its line."""
    text = (ROOT / "README.md").read_text()
    return [{"lang": m["lang"], "code": m["code"], "mark": m["mark"], "line": text.count("\n", 0, m.start()) + 1}
            for m in BLOCK.finditer(text)]


def runs(block: dict) -> bool:
    if block["lang"] == "python":
        return not (block["mark"] or "").startswith("not run")
    return block["lang"] == "bash" and block["mark"] == "run"


def test_readme_blocks_say_whether_they_run():
    blocks = readme_blocks()
    python = [b for b in blocks if b["lang"] == "python"]
    skipped = [b for b in python if not runs(b)]
    assert len(python) - len(skipped) >= 8, "most Python examples run offline"
    for block in skipped:  # a reason, in words, for each one that does not
        assert re.fullmatch(r"not run \(.{8,}\)", block["mark"]), block
    assert [b for b in blocks if b["lang"] == "bash" and runs(b)], "a command-line block runs"
    first = next(b for b in python if "ms.extract(" in b["code"])
    assert "ms.packaged_minilm_path()" in first["code"] and '"gpt2"' in first["code"]  # offline, Hub variant named
    readme = (ROOT / "README.md").read_text()
    assert 'ms.HubDataset("imdb", "train", "text")' in readme  # the positional form the error messages suggest
    assert "ms.feature_view.feature_view(" in readme  # ms.feature_view is the module


@pytest.mark.slow
@pytest.mark.timeout(900)  # a dozen small extractions of a real MiniLM on the CPU
def test_readme_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MISTUDIO_WORKSPACE", raising=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    namespace: dict = {"__name__": "__readme__"}
    ran = []
    for block in readme_blocks():
        if not runs(block):
            continue
        where = f"README.md, the {block['lang']} block at line {block['line']}"
        if block["lang"] == "python":
            try:
                exec(compile(block["code"], where, "exec"), namespace)  # noqa: S102 - the README, as written
            except Exception as exc:  # noqa: BLE001 - say which block failed
                raise AssertionError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
        else:
            done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block["code"]], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{where} failed:\n{done.stdout}\n{done.stderr}"
            assert "COMPLETED" in done.stdout or "completed" in done.stdout.lower(), done.stdout
        ran.append(block["line"])
    assert len(ran) >= 9
    import mistudio as ms

    listed = ms.Workspace(tmp_path / "mistudio-workspace").extractions()
    assert len(listed) >= 8 and set(listed["status"]) <= {"COMPLETED", "CANCELLED"}
    assert (tmp_path / "data.jsonl").exists() and (tmp_path / "other-workspace" / "presets" / "mid.json").exists()
