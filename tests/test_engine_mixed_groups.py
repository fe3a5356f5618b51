"""Hostile checks of the engine's grouping by (stored, width, dtype): a real model whose hook points come out in
two dtypes (a forward hook casts one MLP's output to bfloat16, as a mixed-precision module would), and stacks of
different widths through batch_outputs/host_stats against each hook point computed alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mistudio as ms
from mistudio.data import plan_order, tokenize
from mistudio.engine import Latents, batch_outputs, forward_batches, host_rows, host_stats
from mistudio.models import load_model
from mistudio.request import Request
from mistudio.specs import ModelSpec
from mistudio.storage.stats import HookStats

TEXTS = ms.sample_texts()[:16]


def _data(loaded):
    data = tokenize(Request.build(model="m", dataset=TEXTS, max_length=24), loaded.tokenizer, loaded.vocab_size)
    order = plan_order(data.lengths)
    ids = np.concatenate([data.ids[i] for i in order])
    offsets = np.concatenate([[0], np.cumsum(data.lengths[order])]).astype(np.int64)
    return ids, offsets


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("batching", [dict(batch_size=4), dict(batch_size=8, micro_batch_size=3)])
def test_hook_points_of_two_dtypes_in_one_batch(gpt2_dir, storage, batching):
    loaded = load_model(ModelSpec(name_or_path=gpt2_dir, device="cpu"))
    cast = loaded.module(1, "mlp").register_forward_hook(lambda _m, _i, out: out.to(torch.bfloat16))
    try:
        ids, offsets = _data(loaded)
        request = Request.build(model="m", layers=[0, 1, 2], hooks=["residual", "mlp", "attention"], dtype=storage,
                                **batching)
        n = len(offsets) - 1
        got = {hp: [] for hp in request.hook_points}
        stats = {hp: [] for hp in request.hook_points}
        for first, stop, rows, batch_stats in forward_batches(loaded, ids, offsets, request, 0, n):
            for hp in request.hook_points:
                got[hp].append(np.array(rows[f"activations/{hp}"]))
                stats[hp].append(batch_stats[hp])
        # the reference: each sample alone, same model (the cast hook included), captured by plain hooks
        captured, handles = {}, []
        for hp in request.hook_points:
            _, layer, kind = hp.split(".")

            def grab(_m, _i, out, hp=hp):
                captured[hp] = out[0] if isinstance(out, tuple) else out
            handles.append(loaded.module(int(layer), kind).register_forward_hook(grab))
        want = {hp: [] for hp in request.hook_points}
        with torch.inference_mode():
            for s in range(n):
                x = torch.as_tensor(ids[offsets[s]:offsets[s + 1]], dtype=torch.long)[None]
                loaded.model(input_ids=x, attention_mask=torch.ones_like(x))
                for hp in request.hook_points:
                    want[hp].append(captured[hp][0])
        for h in handles:
            h.remove()
    finally:
        cast.remove()
    storage_dtype = getattr(torch, storage)
    limit = torch.finfo(storage_dtype).max
    assert want["layers.1.mlp"][0].dtype == torch.bfloat16 and want["layers.1.residual"][0].dtype == torch.float32
    for hp in request.hook_points:
        values = torch.cat(want[hp])
        stored = np.concatenate(got[hp])
        expect = values.to(storage_dtype)
        expect = expect.view(torch.int16).numpy().view(np.uint16) if storage == "bfloat16" else expect.numpy()
        assert stored.dtype == expect.dtype, hp
        if hp == "layers.1.mlp" or storage != "float32":
            tol = dict(rtol=2e-2, atol=2e-2)
        else:
            tol = dict(rtol=1e-4, atol=1e-5)
        a = stored.view(np.uint16) if storage == "bfloat16" else stored
        a = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float().numpy() if storage == "bfloat16" else a
        np.testing.assert_allclose(a, values.float().numpy(), err_msg=hp, **tol)
        # statistics per batch: the total equals the whole column's, whichever group it sat in
        count = sum(s["count"] for s in stats[hp])
        assert count == values.numel(), hp
        total = sum(s["sum"] for s in stats[hp])
        assert total == pytest.approx(float(values.double().sum()), rel=1e-3, abs=1e-3), hp
        assert max(s["max_abs"] for s in stats[hp]) == pytest.approx(float(values.float().abs().max()), rel=1e-2)
        assert sum(s["n_out_of_range"] for s in stats[hp]) == int((values.float().abs() > limit).sum())


def test_stacks_of_different_widths_equal_each_hook_point_alone():
    """batch_outputs + host_stats over groups of widths 8 and 5 (and an SAE-only group): each hook point's
    accumulators equal HookStats.of_tensor on its rows alone, the rows are its own."""
    g = torch.Generator().manual_seed(0)
    rows = 37
    wide = torch.randn((2, rows, 8), generator=g) * torch.tensor([1.0, 1e3])[:, None, None]
    wide[1, 3] *= 1e5  # an outlier row in the second hook point only
    wide[0, 5, 2] = float("nan")
    narrow = torch.randn((3, rows, 5), generator=g)
    narrow[2] = 0.0
    groups = [(["layers.0.residual", "layers.0.mlp"], wide),
              (["layers.1.residual", "layers.1.mlp", "layers.1.attention"], narrow)]
    request = Request.build(model="m", layers=[0, 1], hooks=["residual", "mlp", "attention"], dtype="float16")
    stored = set(request.hook_points)
    groups = [(p, t) for p, t in groups if all(h in stored for h in p)]
    outputs, stats = batch_outputs(groups, request, {}, torch.float16)
    host = host_rows(outputs, {})
    acc = host_stats(stats, host, torch.float16)
    for points, stack in groups:
        for i, hp in enumerate(points):
            stored = host[f"activations/{hp}"]
            np.testing.assert_array_equal(stored, stack[i].to(torch.float16).numpy())
            alone = HookStats.of_tensor(stack[i])
            for key in ("count", "zeros", "norm_hist", "candidates"):
                assert acc[hp][key] == alone[key], (hp, key)
            assert acc[hp]["n_nan"] == int(np.isnan(stored).sum()) and acc[hp]["n_out_of_range"] == int(
                np.isinf(stored).sum())
            for key in ("sum", "sum_sq", "max_abs"):
                assert acc[hp][key] == pytest.approx(alone[key], rel=1e-6, nan_ok=True), (hp, key)
    assert acc["layers.0.mlp"]["candidates"] and acc["layers.0.mlp"]["candidates"][0][0] == 3
    assert not acc["layers.0.residual"]["candidates"]  # NaN median: none (as before)
    assert acc["layers.1.attention"]["zeros"] == rows * 5
    assert acc["layers.0.mlp"]["n_out_of_range"] == 8 and acc["layers.0.residual"]["n_nan"] == 1
