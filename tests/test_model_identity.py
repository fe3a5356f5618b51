"""The model is part of a store's identity: its fingerprint (weights, config, tokenizer files) is recorded, a
resume with a re-saved model is refused naming both fingerprints, and a folder re-saved in place is loaded again
in the same kernel."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import mistudio as ms
from mistudio.errors import InputError
from mistudio.fingerprints import differences, file_digest, fingerprint
from mistudio.specs import ModelSpec

from conftest import cancelled_at, gate

OPTIONS = dict(layers=[1], hooks=["residual"], dtype="float32", max_samples=40, max_length=32, batch_size=4)


def resave(folder, seed: int, **changes) -> None:
    """Save new random weights (and optionally another config) into ``folder``, as more training would."""
    import transformers as T

    config = T.AutoConfig.from_pretrained(folder)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    T.AutoModel.from_config(config).save_pretrained(folder)


@pytest.fixture
def model(gpt2_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(gpt2_dir, folder)
    return str(folder)


def test_the_fingerprint_is_recorded_and_follows_the_files(model, workspace, tmp_path):
    ext = ms.extract(model, "sample", workspace=workspace, progress=False, **OPTIONS)
    recorded = ext.record.model.fingerprint
    assert recorded == fingerprint(ModelSpec(name_or_path=model))
    assert set(recorded) == {"weights", "config", "tokenizer", "files"}
    assert "model.safetensors" in recorded["files"] and "tokenizer.json" in recorded["files"]
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)  # the same bytes elsewhere: the same model
    assert {k: v for k, v in fingerprint(ModelSpec(name_or_path=str(copy))).items() if k != "files"} == \
        {k: v for k, v in recorded.items() if k != "files"}
    resave(copy, seed=5)
    assert fingerprint(ModelSpec(name_or_path=str(copy)))["weights"] != recorded["weights"]
    before = file_digest(copy / "model.safetensors")
    with open(copy / "model.safetensors", "r+b") as f:  # one byte, same size: a new digest
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert file_digest(copy / "model.safetensors") != before


@pytest.mark.parametrize("change", ["weights", "width"])
def test_a_resaved_model_refuses_resume_and_the_original_resumes(change, model, workspace):
    ws = ms.Workspace(workspace)
    job = cancelled_at(ws, model, "sample", at_batch=3, **OPTIONS)
    kept = {p.name: p.read_bytes() for p in Path(model).iterdir()}
    resave(model, seed=9, **({"n_embd": 48} if change == "width" else {}))
    with pytest.raises(InputError, match="is not the one this store was made with") as caught:
        ws.resume(job.id)
    message = str(caught.value)
    assert ("weights and config changed" if change == "width" else "its weights changed") in message
    assert job.extraction().record.model.fingerprint["weights"][:12] in message and "retry" in message
    assert ws.job(job.id).status == "CANCELLED" and job.extraction().verify().ok  # nothing written
    for name, data in kept.items():  # the original files back: it resumes
        (Path(model) / name).write_bytes(data)
    resumed = ws.resume(job.id).wait(120)
    assert resumed.status == "COMPLETED", resumed.error


def test_a_resume_computes_in_the_precision_of_the_stored_rows_where_auto_resolves_otherwise(model, workspace,
                                                                                            monkeypatch):
    """model_dtype='auto' is float32 on a CPU and bfloat16 on most GPUs: a store begun on one and resumed on the
    other held rows of both precisions, and its record called them all the second."""
    import mistudio.models as models

    ws = ms.Workspace(workspace)
    options = {**OPTIONS, "max_samples": 24}
    job = cancelled_at(ws, model, "sample", at_batch=2, **options)  # 'auto' on this CPU: float32
    assert job.extraction().record.model.dtype == "float32" and job.extraction().record.params.model_dtype == "auto"
    elsewhere = models.resolve_dtype
    monkeypatch.setattr(models, "resolve_dtype",  # as 'auto' resolves on a GPU with bfloat16
                        lambda dtype, device: torch.bfloat16 if dtype == "auto" else elsewhere(dtype, device))
    from mistudio.runner import _check_same_precision

    with pytest.raises(InputError, match=r"holds \d+ samples computed in float32, and this run would compute in "
                       r"bfloat16: one store holds one precision"):  # what the runner says if anything else differs
        _check_same_precision(job.extraction().record, "bfloat16")
    ws.runner.models.clear()  # the model loads again, as in a new kernel on that machine
    assert ws.resume(job.id).wait(120).status == "COMPLETED"
    ext = job.extraction()
    assert ext.record.model.dtype == "float32"
    monkeypatch.setattr(models, "resolve_dtype", elsewhere)
    clean = ms.extract(model, "sample", workspace=workspace, progress=False, **options)
    hp = "layers.1.residual"
    np.testing.assert_array_equal(ext.activations(hp)[:], clean.activations(hp)[:])  # every row in float32


def test_files_in_subfolders_are_not_the_model_and_old_fingerprints_compare_alike(model, workspace):
    """A trainer's checkpoint-100/ saved inside the model folder is not what from_pretrained loads: it does not
    refuse a resume. A store recorded before (its fingerprint hashed subfolders too) compares by its top files."""
    ws = ms.Workspace(workspace)
    job = cancelled_at(ws, model, "sample", at_batch=3, **OPTIONS)
    checkpoint = Path(model) / "checkpoint-100"
    checkpoint.mkdir()
    shutil.copy(Path(model) / "config.json", checkpoint / "config.json")
    (checkpoint / "model.safetensors").write_bytes(b"not these weights")
    current = fingerprint(ModelSpec(name_or_path=model))
    assert "checkpoint-100/model.safetensors" not in current["files"]
    assert current["weights"] == job.extraction().record.model.fingerprint["weights"]
    old_style = {**current, "files": {**current["files"], "checkpoint-100/model.safetensors": "0" * 64},
                 "weights": "1" * 64}  # as a store recorded it: subfolder files hashed into the parts
    assert differences(old_style, current) == []
    assert differences({**old_style, "files": {**old_style["files"], "model.safetensors": "2" * 64}}, current) == \
        ["weights"]
    assert ws.resume(job.id).wait(120).status == "COMPLETED"


def test_a_pytorch_bin_beside_the_safetensors_is_not_the_model(model, workspace):
    """from_pretrained loads model.safetensors and ignores a pytorch_model.bin beside it (a conversion left over):
    the .bin does not refuse a resume. A store recorded before (every weights file hashed) compares alike; a
    changed safetensors still refuses."""
    ws = ms.Workspace(workspace)
    job = cancelled_at(ws, model, "sample", at_batch=3, **OPTIONS)
    recorded = job.extraction().record.model.fingerprint
    (Path(model) / "pytorch_model.bin").write_bytes(b"a leftover conversion, never loaded")
    current = fingerprint(ModelSpec(name_or_path=model))
    assert "pytorch_model.bin" in current["files"] and current["weights"] == recorded["weights"]
    old_style = {**current, "weights": "1" * 64}  # as a store recorded it: the .bin hashed into the weights
    assert differences(old_style, current) == []
    assert differences({**old_style, "files": {**old_style["files"], "model.safetensors": "2" * 64}}, current) == \
        ["weights"]
    assert ws.resume(job.id).wait(120).status == "COMPLETED"
    # the .bin is the model where the model's own safetensors are absent, whatever other safetensors lie beside
    beside = {"pytorch_model.bin": "3" * 64, "adapter_model.safetensors": "4" * 64, "config.json": "5" * 64}
    assert differences({"files": beside}, {"files": {**beside, "pytorch_model.bin": "6" * 64}}) == ["weights"]


def test_the_runner_refuses_a_model_changed_after_the_resume_was_accepted(model, workspace):
    """The check at the start of the run, for a model re-saved between ws.resume and the job's start."""
    ws = ms.Workspace(workspace)
    job = cancelled_at(ws, model, "sample", at_batch=3, **OPTIONS)
    blocker_hook, blocker_reached, blocker_release = gate(at_batch=0)
    blocker = ws.submit(model, "sample", before_batch=blocker_hook, **OPTIONS)  # holds the runner
    assert blocker_reached.wait(60)
    resumed = ws.resume(job.id)  # accepted: the files are still the original ones; queued behind the blocker
    kept = {p.name: p.read_bytes() for p in Path(model).iterdir()}
    resave(model, seed=11)
    blocker_release.set()
    blocker.wait(120)
    resumed.wait(120)
    assert resumed.status == "FAILED" and resumed.error["error_type"] == "VALIDATION"
    assert "is not the one this store was made with" in resumed.error["error_message"]
    assert job.extraction().verify().ok
    # the store is not stranded: its rows stand, the model's files were the problem. Back, it resumes.
    assert resumed.error["resume_available"]
    for name, data in kept.items():
        (Path(model) / name).write_bytes(data)
    assert ws.resume(job.id).wait(120).status == "COMPLETED"


def test_a_moved_model_folder_resumes_from_where_it_is_now(model, workspace, tmp_path):
    """A model folder that moved (or a network mount that is down) refuses the resume up front, leaving the store
    as it was; ``resume(model=)`` points it at the folder's new place, the files being the same."""
    ws = ms.Workspace(workspace)
    clean = ms.extract(model, "sample", workspace=str(tmp_path / "clean"), progress=False, **OPTIONS)
    job = cancelled_at(ws, model, "sample", at_batch=3, **OPTIONS)
    moved = tmp_path / "moved"
    Path(model).rename(moved)
    with pytest.raises(InputError, match=r"cannot resume yet: model folder .* does not exist.*pass model= with where "
                                         "it is now"):
        ws.resume(job.id)
    assert ws.job(job.id).status == "CANCELLED"  # nothing was changed
    resumed = ws.resume(job.id, model=str(moved)).wait(120)
    assert resumed.status == "COMPLETED", resumed.error
    ext = resumed.extraction()
    assert ext.record.model.name_or_path == str(moved)
    np.testing.assert_array_equal(ext.activations("layers.1.residual")[:], clean.activations("layers.1.residual")[:])
    other = tmp_path / "other"
    shutil.copytree(moved, other)
    resave(other, seed=3)
    job = cancelled_at(ws, str(moved), "sample", at_batch=3, **OPTIONS)
    with pytest.raises(InputError, match="is not the one this store was made with"):  # another model: refused
        ws.resume(job.id, model=str(other))


def test_a_relative_model_path_is_recorded_where_it_points(model, workspace, tmp_path, monkeypatch):
    """``model='./gpt2'`` is recorded as the absolute folder: opened from another folder, whose own ``./gpt2`` is
    another model, the store's token strings are still its own tokenizer's."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    shutil.copytree(model, project / "gpt2")
    shutil.copytree(ms.packaged_minilm_path(), elsewhere / "gpt2")  # another tokenizer under the same name
    monkeypatch.chdir(project)
    ext = ms.extract("./gpt2", ["The quick brown fox"], workspace=workspace, progress=False, **OPTIONS)
    assert ext.record.model.name_or_path == str(project / "gpt2")
    want = ext.sample(0)["tokens"]
    monkeypatch.chdir(elsewhere)
    assert ms.open_extraction(ext.id, workspace=workspace).sample(0)["tokens"] == want


def test_a_tokenizer_changed_under_a_store_is_refused_not_used(model, workspace, tmp_path):
    ext = ms.extract(model, ["The quick brown fox"], workspace=workspace, progress=False, **OPTIONS)
    want = ext.sample(0)["tokens"]
    original = Path(tmp_path / "original")
    shutil.copytree(model, original)
    minilm = Path(ms.packaged_minilm_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, Path(model) / name)  # the folder re-saved with another tokenizer
    reopened = ms.open_extraction(ext.id, workspace=workspace)
    with pytest.raises(InputError, match=r"the tokenizer at .* is not the one this store was made with.*"
                                         r"ext\.tokenizer ="):
        reopened.sample(0)
    import transformers as T

    reopened.tokenizer = T.AutoTokenizer.from_pretrained(original)  # the way out the message gives
    assert reopened.sample(0)["tokens"] == want
    shutil.rmtree(model)
    with pytest.raises(InputError, match="does not exist"):  # gone: said plainly, not a Hub connection error
        ms.open_extraction(ext.id, workspace=workspace).sample(0)


def test_a_folder_resaved_in_place_is_loaded_again_in_the_same_kernel(model, workspace):
    first = ms.extract(model, "sample", workspace=workspace, progress=False, **OPTIONS)
    resave(model, seed=21)
    second = ms.extract(model, "sample", workspace=workspace, progress=False, **OPTIONS)
    assert second.record.model.fingerprint["weights"] != first.record.model.fingerprint["weights"]
    import transformers as T

    reference = T.AutoModel.from_pretrained(model).eval()  # the new weights, loaded fresh
    ids = second.store.tokens("input_ids")[0:int(second.sample_offsets[1])]
    with torch.no_grad():
        want = reference(torch.as_tensor(np.asarray(ids, np.int64))[None], output_hidden_states=True)
    np.testing.assert_allclose(second.activations("layers.1.residual")[0:len(ids)],
                               want.hidden_states[2][0].numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(first.activations("layers.1.residual")[0:len(ids)],
                           second.activations("layers.1.residual")[0:len(ids)])


def test_cli_resume_takes_the_model_where_it_is_now(model, workspace, tmp_path, capsys):
    from mistudio.cli import main

    job = cancelled_at(ms.Workspace(workspace), model, "sample", at_batch=3, **OPTIONS)
    moved = tmp_path / "moved"
    Path(model).rename(moved)
    assert main(["resume", job.id, "--workspace", workspace]) == 2
    err = capsys.readouterr().err
    assert "cannot resume yet" in err and "pass --model with where it is now" in err and "Traceback" not in err
    assert main(["resume", job.id, "--workspace", workspace, "--model", str(moved)]) == 0
    assert f"{job.id}: COMPLETED" in capsys.readouterr().out
