"""Correctness of captured activations: hook points, padding invariance, storage, row mapping."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import mistudio as ms
from mistudio.data import report_line

from conftest import TEXTS

FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "phi", "bert"]
ALL_HOOKS = ["residual", "mlp", "attention"]


def _extract(folder, workspace, **kw):
    args = dict(layers=[0, 1, 2], hooks=ALL_HOOKS, dtype="float32", workspace=workspace, progress=False,
                device="cpu")  # compared with float32 forwards on the CPU (on a GPU "auto" would run bfloat16)
    args.update(kw)
    return ms.extract(folder, TEXTS, **args)


def _close(a, b, rel=1e-4):
    scale = max(float(np.abs(b).max()), 1e-6)
    return float(np.abs(a - b).max()) <= rel * scale


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_alone_and_residual_equals_hidden_states(family, tiny_models, workspace):
    folder = tiny_models[family]
    alone = _extract(folder, workspace, batch_size=1)
    right = _extract(folder, workspace, batch_size=8, padding_side="right")
    left = _extract(folder, workspace, batch_size=8, padding_side="left")
    for hp in alone.hook_points:
        ref = alone.activations(hp)[:]
        assert np.isfinite(ref).all()
        assert _close(right.activations(hp)[:], ref), f"{family} {hp}: right padding changed values"
        assert _close(left.activations(hp)[:], ref), f"{family} {hp}: left padding changed values"

    # residual == output_hidden_states of the same model, run one text at a time
    model = AutoModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    n_layers = 3
    for row in right.rows():
        ids = tok(TEXTS[row])["input_ids"]
        with torch.inference_mode():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        sample = right.sample(int(row), tokens=False)
        assert list(sample["input_ids"]) == ids
        for layer in range(n_layers if family == "bert" else n_layers - 1):  # decoders norm the last state
            got = sample["activations"][f"layers.{layer}.residual"]
            assert _close(got, hidden[layer + 1][0].numpy()), f"{family} layer {layer} residual != hidden_states"
        # attention and mlp are the sub-module outputs before they are added back: for pre-norm decoders
        # the block's update is exactly their sum
        if family != "bert":
            update = sample["activations"]["layers.1.residual"] - sample["activations"]["layers.0.residual"]
            parts = sample["activations"]["layers.1.attention"] + sample["activations"]["layers.1.mlp"]
            assert _close(parts, update), f"{family}: attention + mlp != residual update"


def test_stored_tokens_and_rows_after_bucketing(gpt2_dir, workspace):
    ext = _extract(gpt2_dir, workspace, batch_size=4, hooks=["residual"], layers=[1])
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    kept = [i for i, t in enumerate(TEXTS) if t.strip()]
    real = sum(len(tok(TEXTS[i])["input_ids"]) for i in kept)
    assert ext.n_tokens == real
    assert ext.activations("layers.1.residual").shape == (real, 32)
    assert sorted(ext.rows().tolist()) == kept
    assert ext.metadata["dataset"]["report"]["n_skipped_invalid"] == 2  # "" and "   "
    # stored order is longest first, so the row mapping is not the identity
    assert ext.sample_index.tolist() != sorted(ext.sample_index.tolist())
    for row in kept:
        sample = ext.sample(row)
        assert sample["tokens"] == tok.convert_ids_to_tokens(tok(TEXTS[row])["input_ids"])
        assert sample["activations"]["layers.1.residual"].shape == (len(sample["tokens"]), 32)
    with pytest.raises(ms.InputError, match="row 3 is not in extraction"):
        ext.sample(3)


def test_store_layout_chunks_stats_and_xarray(minilm_dir, workspace):
    import xarray as xr
    import zarr

    ext = ms.extract(minilm_dir, "sample", layers=[2], hooks=["residual", "mlp"], max_samples=120,
                     workspace=workspace, progress=False, batch_size=16)
    meta = ext.metadata
    assert meta["status"] == "COMPLETED" and meta["format_version"] == 1
    arr = ext.activations("layers.2.residual")
    assert arr.dtype == np.float16 and arr.metadata.dimension_names == ("token", "feature")
    chunk_bytes = arr.chunks[0] * arr.chunks[1] * 2
    assert 1 * 2**20 <= chunk_bytes <= 4 * 2**20
    group = zarr.open_group(ext.location, mode="r")
    offsets = group["tokens/sample_offsets"][:]
    assert offsets[-1] == ext.n_tokens == group["tokens/input_ids"].shape[0]
    values = arr[:].astype(np.float32)
    stats = meta["statistics"]["layers.2.residual"]
    assert stats["count"] == values.size
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-4, abs=1e-6)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-3)
    assert stats["max_abs"] == pytest.approx(np.abs(values).max(), rel=1e-3)  # torch's values, before float16
    assert meta["progress"]["tokens_committed"] == ext.n_tokens
    ds = xr.open_zarr(ext.location, group="activations")
    assert ds["layers.2.mlp"].dims == ("token", "feature")
    np.testing.assert_array_equal(ds["layers.2.mlp"].values, ext.activations("layers.2.mlp")[:])


def test_minilm_residual_matches_hidden_states(minilm_dir, workspace):
    texts = ms.sample_texts()[:24]
    ext = ms.extract(minilm_dir, texts, layers=[0, 5], hooks=["residual"], dtype="float32", batch_size=8,
                     workspace=workspace, progress=False, device="cpu")  # the reference below runs on the CPU
    model = AutoModel.from_pretrained(minilm_dir).eval()
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    for row in (0, 7, 23):
        enc = tok(texts[row], truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc, output_hidden_states=True).hidden_states
        sample = ext.sample(row)
        assert sample["tokens"][0] == "[CLS]" and sample["tokens"][-1] == "[SEP]"
        for layer in (0, 5):
            assert _close(sample["activations"][f"layers.{layer}.residual"], hidden[layer + 1][0].numpy())


def test_early_stop_runs_no_later_block(gpt2_dir, workspace):
    from mistudio.models import load_model
    from mistudio.specs import ModelSpec

    calls = []
    loaded = load_model(ModelSpec(name_or_path=gpt2_dir))
    loaded.blocks[2].register_forward_hook(lambda *a: calls.append(1))
    from mistudio.runner import ModelCache

    cache = ModelCache()
    cache._spec, cache._loaded = loaded.spec, loaded
    ws = ms.Workspace(workspace)
    ws.runner.models = cache
    job = ws.submit(gpt2_dir, TEXTS, layers=[0], hooks=["residual"], model_dtype="auto", device="auto")
    job.wait(60)
    assert job.status == "COMPLETED" and calls == []


def test_oov_policies(gpt2_dir, workspace):
    vocab = len(AutoTokenizer.from_pretrained(gpt2_dir))
    rows = [[1, 2, 3], [4, vocab + 5, 6, 7], [8, 9]]
    # ids from another tokenizer are refused by default: the activations of another text, stored silently, are worse
    with pytest.raises(ms.InputError, match=rf"row 1 has token id {vocab + 5}.*another tokenizer.*oov_policy='skip'"):
        ms.extract(gpt2_dir, rows, layers=[0], workspace=workspace, progress=False)
    assert ms.Workspace(workspace).extractions().empty  # refused: no store left
    clamped = ms.extract(gpt2_dir, rows, layers=[0], oov_policy="clamp", workspace=workspace, progress=False)
    report = clamped.metadata["dataset"]["report"]
    assert report["n_clamped_tokens"] == 1
    assert "1 token id outside the vocabulary clamped to the last id" in report_line(report)  # said wherever shown
    assert clamped.sample(1, tokens=False)["input_ids"].tolist() == [4, vocab - 1, 6, 7]
    skipped = ms.extract(gpt2_dir, rows, layers=[0], oov_policy="skip", workspace=workspace, progress=False)
    assert sorted(skipped.rows().tolist()) == [0, 2]
    assert skipped.metadata["dataset"]["report"]["n_skipped_oov"] == 1


def test_truncation_and_max_samples(gpt2_dir, workspace):
    ext = ms.extract(gpt2_dir, "sample", layers=[0], max_samples=30, max_length=8, workspace=workspace,
                     progress=False)
    assert ext.n_samples == 30
    lengths = np.diff(ext.sample_offsets)
    assert lengths.max() == 8
    assert list(lengths) == sorted(lengths, reverse=True)  # bucketed: longest first


def test_cudnn_attention_is_off_inside_job_forwards_and_restored_after_the_last():
    """cuDNN's attention builds a graph per batch shape and thread (15x slower on an H200 job thread): the engine
    turns it off around its forwards. The switch is process-wide, so it is counted: concurrent jobs leave it as
    they found it, and a user who had turned it off keeps it off. CPU-only machines test the bookkeeping."""
    import threading

    from mistudio.engine import without_cudnn_attention

    cuda, before = torch.device("cuda"), torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for was in (True, False):
            torch.backends.cuda.enable_cudnn_sdp(was)
            inside, other_entered, first_left = [], threading.Event(), threading.Event()

            def other_job():
                with without_cudnn_attention(cuda):
                    other_entered.set()
                    first_left.wait(10)
                    inside.append(torch.backends.cuda.cudnn_sdp_enabled())  # still off: the first job left first

            thread = threading.Thread(target=other_job)
            with without_cudnn_attention(cuda):
                inside.append(torch.backends.cuda.cudnn_sdp_enabled())
                thread.start()
                assert other_entered.wait(10)
            first_left.set()
            thread.join(10)
            assert inside == [False, False] and torch.backends.cuda.cudnn_sdp_enabled() is was
            with without_cudnn_attention(torch.device("cpu")):  # other devices: untouched
                assert torch.backends.cuda.cudnn_sdp_enabled() is was
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("batching", [{}, {"micro_batch_size": 2}, {"window": 6, "stride": 3}])
def test_statistics_of_every_hook_point_equal_its_stored_rows(gpt2_dir, workspace, batching):
    """The engine computes a batch's statistics for all its hook points at once (one stack): each hook point's
    must still be its own rows', whatever the batching (micro-batches and windows fill the stack in pieces)."""
    ext = _extract(gpt2_dir, workspace, batch_size=4, max_length=32, **batching)
    assert len(ext.hook_points) == 9
    edges = ms.storage.stats.HookStats.NORM_EDGES
    for hp in ext.hook_points:
        values = ext.activations(hp)[:]
        stats = ext.metadata["statistics"][hp]
        assert stats["count"] == values.size
        assert stats["mean"] == pytest.approx(values.mean(dtype=np.float64), rel=1e-5, abs=1e-7)
        assert stats["std"] == pytest.approx(values.std(dtype=np.float64), rel=1e-4)
        assert stats["max_abs"] == float(np.abs(values).max())  # float32 storage: the model's values exactly
        assert stats["zeros"] == int((values == 0).sum()) and stats["n_nan"] == stats["n_out_of_range"] == 0
        norms = np.linalg.norm(values.astype(np.float64), axis=1)
        reference = np.bincount(np.searchsorted(edges, norms), minlength=len(edges) + 1)
        assert np.abs(np.array(stats["norm_hist"]) - reference).sum() <= 2  # a norm on a bin edge may round over


def test_torch_calls_per_batch_hardly_grow_with_hook_points(gpt2_dir):
    """On a GPU every torch call is a kernel launch or more (about 10 us of CPU each): a small model's batch
    forwards in about as many calls as the engine used to add for 9 hook points (35 a hook point: statistics,
    casts, copies). Now a group of hook points of one width shares one stack, one cast and one statistics pass."""
    from torch.overrides import TorchFunctionMode

    from mistudio.data import plan_order, tokenize
    from mistudio.engine import forward_batches
    from mistudio.models import load_model
    from mistudio.request import Request
    from mistudio.specs import ModelSpec

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    loaded = load_model(ModelSpec(name_or_path=gpt2_dir, device="cpu"))
    data = tokenize(Request.build(model="m", dataset=TEXTS, max_length=32), loaded.tokenizer, loaded.vocab_size)
    order = plan_order(data.lengths)
    ids = np.concatenate([data.ids[i] for i in order])
    offsets = np.concatenate([[0], np.cumsum(data.lengths[order])]).astype(np.int64)

    def per_batch(hooks: list[str]) -> float:
        request = Request.build(model="m", layers=[1], hooks=hooks, batch_size=4)
        Count.calls = 0
        with Count():
            batches = sum(1 for _ in forward_batches(loaded, ids, offsets, request, 0, len(order)))
        return Count.calls / batches

    one, three = per_batch(["residual"]), per_batch(ALL_HOOKS)
    assert 0 < (three - one) / 2 <= 15  # per extra hook point: its row selection and a few views
