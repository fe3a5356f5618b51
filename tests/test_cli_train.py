"""`mistudio train` and `mistudio trainings`: an SAE trained from the command line the way a researcher would (extract,
train, list, extract with the SAE by the command it prints), mistakes answered in command-line words, and Ctrl-C
in a real child process keeping a checkpoint that `mistudio train --resume` continues exactly."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

import mistudio as ms
from mistudio.cli import main, train_parser
from mistudio.analysis.sae_training import FIELD_HELP, TrainConfig

HP = "layers.1.residual"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def extracted(gpt2_dir, workspace, capsys):
    code, out, _ = run(capsys, "--workspace", workspace, "extract", "--model", gpt2_dir, "--layers", "1",
                       "--max-samples", "40", "--dtype", "float32")
    assert code == 0, out
    return out.splitlines()[0].split()[1].rstrip(":")  # "extraction <id>: COMPLETED"


def test_train_list_and_extract_with_the_sae_it_prints(extracted, workspace, capsys):
    code, out, err = run(capsys, "train", extracted, HP, "--workspace", workspace, "--d-sae", 64, "--k", 4,
                         "--batch-size", 64, "--n-tokens", 1000, "--lr", "3e-3", "--evaluate", "reconstruction")
    assert code == 0, err
    run_id = out.split()[2].rstrip(":")
    assert f"training run {run_id}: COMPLETED" in out
    assert "16 of 16 steps, 1,000 tokens; explained variance" in out  # n_tokens exactly: the last step is 40 rows
    assert "warning" not in out  # 1,000 tokens: not many passes over the store's rows
    assert "trained; evaluating the SAE (explained variance, L0, dead latents)..." in out + err  # not a silent 100%
    [evaluation] = [line for line in out.splitlines() if line.startswith("  evaluation  ")]
    assert "explained variance 0." in evaluation and "dead fraction" in evaluation
    job = ms.Workspace(workspace).training(run_id)
    assert job.status == "COMPLETED" and job.record.config["k"] == 4 and job.evaluation["l0"] <= 4
    code, listing, _ = run(capsys, "trainings", "--workspace", workspace)
    assert code == 0 and run_id in listing and "COMPLETED" in listing and "topk 64" in listing
    [row] = [line for line in listing.splitlines() if line.startswith(run_id)]
    assert f"{job.evaluation['explained_variance']:.3g}*" in row  # the evaluation's figures, as the Studio's grid
    assert "* the evaluation's (over up to 100,000 stored tokens), else the last training step's" in listing
    command = next(line for line in out.splitlines() if "extract with it:" in line).split("extract with it: ")[1]
    argv = shlex.split(command)
    assert argv[:2] == ["mistudio", "extract"] and f"{HP}={job.sae_path}" in argv
    code, out, err = run(capsys, "--workspace", workspace, *argv[1:])
    assert code == 0 and "COMPLETED" in out, err
    assert f"  latents     {HP}.latents (topk SAE, 64 latents, k 4): its features in the Studio's Features tab" in out
    ext = ms.open_extraction(out.split()[1].rstrip(":"), workspace=workspace)
    assert ext.latent_points == [f"{HP}.latents"] and ext.n_samples == 40  # the same data: the run said which


def test_a_run_over_the_same_rows_many_times_is_warned(extracted, workspace, capsys):
    code, out, err = run(capsys, "train", extracted, HP, "--workspace", workspace, "--d-sae", 32, "--k", 4,
                         "--batch-size", 512, "--epochs", 60, "--evaluate", "no")
    assert code == 0, err
    [warning] = [line for line in out.splitlines() if line.startswith("  warning     ")]
    assert "60 times" in warning and "train for less (--n-tokens, --epochs)" in warning, warning


def test_a_run_on_in_memory_data_does_not_print_a_command_that_reads_the_sample(gpt2_dir, workspace, capsys):
    """`mistudio extract` reads the bundled sample without --dataset: the printed command must ask for the data."""
    ext = ms.extract(gpt2_dir, [f"text number {i} about cats" for i in range(30)], layers=[1], dtype="float32",
                     workspace=workspace, progress=False)
    code, out, err = run(capsys, "train", ext.id, HP, "--workspace", workspace, "--d-sae", 64, "--k", 4,
                         "--batch-size", 32, "--n-tokens", 64, "--evaluate", "no")
    assert code == 0, err
    command = next(line for line in out.splitlines() if "extract with it:" in line)
    assert "--dataset sample" not in command and "--dataset DATA_FILE" in command
    assert "made from in-memory data, which is not saved" in out


def test_the_printed_command_reads_the_same_tokens_as_the_extraction_trained_on(gpt2_dir, workspace, capsys):
    """Windows, a stride, no special tokens, a model dtype: the command that extracts with the SAE repeats them all,
    so the SAE reads the tokens it was trained on."""
    code, out, err = run(capsys, "--workspace", workspace, "extract", "--model", gpt2_dir, "--layers", "1",
                         "--max-samples", "30", "--window", "32", "--stride", "16", "--no-add-special-tokens",
                         "--model-dtype", "float32", "--dtype", "float32")
    assert code == 0, err
    trained_on = ms.open_extraction(out.split()[1].rstrip(":"), workspace=workspace)
    code, out, err = run(capsys, "train", trained_on.id, HP, "--workspace", workspace, "--d-sae", 64, "--k", 4,
                         "--batch-size", 64, "--n-tokens", 256, "--evaluate", "no")
    assert code == 0, err
    argv = shlex.split(next(line for line in out.splitlines() if "extract with it:" in line).split(": ", 1)[1])
    for flag in ("--window 32", "--stride 16", "--no-add-special-tokens", "--model-dtype float32"):
        assert flag in " ".join(argv), flag
    code, out, err = run(capsys, "--workspace", workspace, *argv[1:])
    assert code == 0, err
    again = ms.open_extraction(out.split()[1].rstrip(":"), workspace=workspace)
    assert again.n_samples == trained_on.n_samples and again.n_tokens == trained_on.n_tokens
    assert (again.store.tokens("input_ids")[:] == trained_on.store.tokens("input_ids")[:]).all()


def test_mistakes_are_answered_in_command_line_words(extracted, workspace, capsys):
    code, _, err = run(capsys, "train", extracted, "layers.7.residual", "--workspace", workspace)
    assert code == 2 and f"hook point 'layers.7.residual' is not in extraction {extracted}" in err and HP in err
    code, _, err = run(capsys, "train", extracted, HP, "--workspace", workspace, "--k", 0, "--lr", "-1")
    assert code == 2 and "--k 0" in err and "--lr -1" in err and "k=0" not in err and "TrainConfig" not in err
    code, _, err = run(capsys, "train", extracted, HP, "--workspace", workspace, "--k", 100, "--d-sae", 64)
    assert code == 2 and "--k 100 is larger than --d-sae 64: pass --k 64 or a smaller k" in err
    code, _, err = run(capsys, "train", extracted, HP, "--workspace", workspace, "--timeout", -1)
    assert code == 2 and "--timeout -1 must be a positive number of seconds (leave out --timeout" in err
    code, _, err = run(capsys, "train", extracted, HP, "--workspace", workspace, "--d-sae", 64, "--expansion-factor", 4)
    assert code == 2 and "give --d-sae 64 or --expansion-factor 4, not both" in err
    code, _, err = run(capsys, "train", extracted, HP, "--workspace", workspace, "--epochs", 2, "--n-tokens", 100)
    assert code == 2 and "give --n-tokens 100 or --epochs 2, not both" in err  # as typed, not 2.0
    code, _, err = run(capsys, "train", "--workspace", workspace)
    assert code == 2 and "give the extraction's id and a hook point" in err
    code, _, err = run(capsys, "train", "--workspace", workspace, "--resume", "sae_nope", "--k", 3)
    assert code == 2 and "leave out --k" in err
    with pytest.raises(SystemExit):  # argparse's own answer for a flag that is not a setting
        main(["train", extracted, HP, "--top-k", "3"])
    assert "unrecognized arguments: --top-k 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", extracted, HP, "--n-tokens", "1e6"])
    assert "--n-tokens '1e6' is not a whole number" in capsys.readouterr().err
    code, _, err = run(capsys, "trainings", "--workspace", workspace + "-typo")
    assert code == 2 and "does not exist" in err
    code, out, _ = run(capsys, "trainings", "--workspace", workspace)
    assert code == 0 and "no training runs yet" in out  # nothing refused left a run behind


def test_every_training_setting_has_a_flag_with_help():
    flags = {a.dest: a for a in train_parser()._actions}
    for name in TrainConfig.__dataclass_fields__:
        assert name in flags and flags[name].help.startswith(FIELD_HELP[name]), name


def _ctrl_c_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_keeps_a_checkpoint_that_resume_continues(extracted, workspace, capsys):
    env = {**os.environ, "MISTUDIO_WORKSPACE": workspace, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "mistudio.cli", "train", extracted, HP, "--d-sae", "64",
                              "--k", "4", "--batch-size", "64", "--n-tokens", str(64 * 2000), "--evaluate", "no",
                              "--progress-every-steps", "20"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=_ctrl_c_as_in_a_terminal)
    deadline = time.monotonic() + 120
    while True:  # wait until the run has trained some steps
        assert time.monotonic() < deadline and child.poll() is None, child.stderr.read() if child.poll() else ""
        runs = ms.Workspace(workspace, recover=False).trainings()
        if len(runs) and (runs["step"].iloc[0] or 0) >= 40:
            break
        time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    run_id = runs["id"].iloc[0]
    assert child.returncode == 130 and "Traceback" not in err, err
    [said] = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert f"continue with `mistudio train --resume {run_id}`" in said and "checkpoint is kept" in said
    job = ms.Workspace(workspace).training(run_id)
    stopped = job.progress["step"]
    assert job.status == "CANCELLED" and 40 <= stopped < 2000
    code, out, err = run(capsys, "train", "--resume", run_id, "--workspace", workspace)
    assert code == 0 and f"training run {run_id}: COMPLETED" in out, err
    record = job.record
    assert [(r["last_step"], r["previous_status"]) for r in record.resumes] == [(stopped, "CANCELLED")]
    assert record.progress.step == 2000 and [h["step"] for h in job.history()] == list(range(20, 2001, 20))


def test_ctrl_c_before_a_run_exists_says_what_to_do_for_training(monkeypatch, capsys):
    """Ctrl-C while torch still imports: one line about training runs, not an empty one or the extractions'."""
    import mistudio.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt()

    monkeypatch.setattr(cli, "_train", interrupted)
    assert main(["train", "ext_x", HP]) == 130
    said = capsys.readouterr().err.strip()
    assert said == ("interrupted: `mistudio trainings` lists the runs; `mistudio train --resume RUN` continues a "
                    "stopped one")


def test_retry_makes_a_new_run_with_the_settings_changed(extracted, workspace, capsys):
    """`--retry RUN --SETTING VALUE`: the run's settings with those changed, linked to it; `none` gives a setting
    whose default is a number its None (here: kaiming's decoder norms)."""
    code, out, err = run(capsys, "train", extracted, HP, "--workspace", workspace, "--d-sae", 64, "--k", 4,
                         "--batch-size", 64, "--n-tokens", 256, "--evaluate", "no", "--timeout", 600)
    assert code == 0, err
    first = out.split()[2].rstrip(":")
    code, out, err = run(capsys, "train", "--retry", first, "--workspace", workspace, "--k", 8,
                         "--decoder-init-norm", "none", "--timeout", "none")
    assert code == 0, err
    second = out.split()[2].rstrip(":")
    record = ms.Workspace(workspace).training(second).record
    assert second != first and record.status == "COMPLETED" and record.retry_of == first
    assert record.config["k"] == 8 and record.config["decoder_init_norm"] is None and record.timeout_s is None
    assert record.config["d_sae"] == 64 and record.config["n_tokens"] == 256 and record.evaluate is False
    assert record.retry_overrides == {"k": 8, "decoder_init_norm": None, "timeout_s": None}
    code, out, err = run(capsys, "train", "--retry", first, "--workspace", workspace, "--hook-point",
                         "layers.7.residual")
    assert code == 2 and "hook point 'layers.7.residual' is not in extraction" in err
    code, _, err = run(capsys, "train", "--retry", first, HP, "--workspace", workspace)
    assert code == 2 and f"`--retry {first} --extraction ID` or `--retry {first} --hook-point NAME`" in err
    code, _, err = run(capsys, "train", "--retry", first, "--resume", first, "--workspace", workspace)
    assert code == 2 and "not both" in err
    code, _, err = run(capsys, "train", "--resume", first, "--workspace", workspace, "--k", 8, "--no-exclude-special")
    assert code == 2 and (f"leave out --k 8 --no-exclude-special (or make a new run with them: `mistudio train "
                          f"--retry {first} --k 8 --no-exclude-special`)") in err
    with pytest.raises(SystemExit):
        main(["train", extracted, HP, "--decoder-init-norm", "big"])
    assert "--decoder-init-norm 'big' is not a number (or none)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", extracted, HP, "--k", "none"])  # k has no None
    assert "--k 'none' is not a whole number" in capsys.readouterr().err


def test_python_names_the_settings_class_and_the_command_line_does_not():
    with pytest.raises(ms.InputError) as caught:
        TrainConfig(k=0, n_tokens=10, epochs=1)
    assert "TrainConfig.k=0 " in str(caught.value) and "TrainConfig: give n_tokens=10 or epochs=1" in str(caught.value)
    from mistudio.cli import say
    assert "TrainConfig" not in say(caught.value) and "--k 0" in say(caught.value)


def test_out_of_memory_says_resume_or_retry_with_half_the_batch(extracted, workspace, capsys, monkeypatch):
    import torch

    import mistudio.training as training

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "train_sae", out_of_memory)
    code, out, err = run(capsys, "train", extracted, HP, "--workspace", workspace, "--d-sae", 64, "--k", 4,
                         "--batch-size", 64, "--n-tokens", 256, "--evaluate", "no")
    run_id = out.split()[2].rstrip(":")
    assert code == 1 and f"training run {run_id}: FAILED [OOM]" in out and "--batch-size 32" in out, out
    assert (f"continue with `mistudio train --resume {run_id}` (the same batch: when memory is free), or make a new "
            f"run with half the batch: `mistudio train --retry {run_id} --batch-size 32`") in out
    monkeypatch.undo()
    code, out, err = run(capsys, "train", "--retry", run_id, "--batch-size", 32, "--workspace", workspace)
    assert code == 0 and "COMPLETED" in out, err
    assert ms.Workspace(workspace).trainings()["retry_of"].iloc[0] == run_id
