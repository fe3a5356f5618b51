"""tokens/special in every store, exclude_special, and per-hook norm quantiles and outliers."""
from __future__ import annotations

import numpy as np
import torch
from transformers import AutoTokenizer

import mistudio as ms
from conftest import TEXTS
from mistudio.storage.stats import HookStats

ARGS = dict(layers=[0, 1], hooks=["residual"], dtype="float32", max_length=32, progress=False)


def _special_of(ext, tok) -> np.ndarray:
    return np.isin(ext.store.input_ids(), tok.all_special_ids)


def test_wordpiece_special_tokens_and_exclusion(minilm_dir, workspace):
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    full = ms.extract(minilm_dir, TEXTS, workspace=workspace, **ARGS)
    special = full.store.tokens("special")[:]
    assert special.dtype == bool and special.sum() == 2 * full.n_samples  # [CLS] ... [SEP] per sample
    assert np.array_equal(special, _special_of(full, tok))
    s = full.sample(0)
    assert s["tokens"][0] == "[CLS]" and s["tokens"][-1] == "[SEP]"
    assert list(s["special"]) == [t in ("[CLS]", "[SEP]") for t in s["tokens"]] and s["kept"].all()

    ext = ms.extract(minilm_dir, TEXTS, workspace=workspace, exclude_special=True, **ARGS)
    assert ext.metadata["storage"]["exclude_special"] is True
    assert ext.metadata["params"]["exclude_special"] is True
    assert ext.n_tokens == full.n_tokens - 2 * ext.n_samples  # progress counts activation rows
    assert ext.metadata["progress"]["tokens_committed"] == ext.n_tokens
    assert len(ext.store.input_ids()) == len(full.store.input_ids())  # every token kept in tokens/*
    keep = ~ext.store.tokens("special")[:]
    for hp in ext.hook_points:
        rows = ext.activations(hp)[:]
        assert rows.shape[0] == ext.n_tokens
        # no row belongs to a special token: the rows are exactly the full store's non-special rows
        np.testing.assert_array_equal(rows, full.activations(hp)[:][keep])
    s = ext.sample(0)
    assert list(s["kept"]) == list(~s["special"])
    acts = s["activations"]["layers.1.residual"]
    assert acts.shape[0] == len(s["input_ids"]) and np.isnan(acts[~s["kept"]]).all()
    np.testing.assert_array_equal(acts[s["kept"]], full.sample(0)["activations"]["layers.1.residual"][s["kept"]])
    assert ext.activation_range(0)[1] - ext.activation_range(0)[0] == s["kept"].sum()
    assert ext.verify().ok, ext.verify()
    # activation rows map back to their (non-special) tokens, for the Browse plots too
    assert np.array_equal(ext.token_index(np.arange(ext.n_tokens)), np.flatnonzero(keep))
    from mistudio import plots

    assert all(t["token"] not in ("[CLS]", "[SEP]") for t in plots.top_tokens(ext, "layers.1.residual", 3, k=20))
    plots.heatmap(ext, 0, "layers.1.residual")
    plots.layer_norms(ext, 0)
    out = ext.outliers("layers.1.residual")
    assert set(out) == {"n", "rows", "norms", "threshold", "median", "quantiles"} and out["n"] == len(out["rows"])


def test_unknown_tokens_are_text_not_markup(minilm_dir, workspace):
    """[UNK] stands for a word the tokenizer could not spell (an emoji, a rare character): exclude_special keeps its
    rows and views do not hide it; [CLS]/[SEP] go. GPT-2's unknown token is also its <|endoftext|>: still markup."""
    from mistudio.data import special_ids

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    text = "i love 🙂 and ☕ every morning"
    ids = tok(text)["input_ids"]
    assert ids.count(tok.unk_token_id) == 2
    assert tok.unk_token_id not in special_ids(tok).tolist() and tok.cls_token_id in special_ids(tok).tolist()
    ext = ms.extract(minilm_dir, [text], workspace=workspace, exclude_special=True, **ARGS)
    s = ext.sample(0)
    assert [t for t, kept in zip(s["tokens"], s["kept"]) if not kept] == ["[CLS]", "[SEP]"]
    assert s["kept"].sum() == len(ids) - 2 == ext.n_tokens
    assert not any(s["special"][i] for i, t in enumerate(s["tokens"]) if t == "[UNK]")


def test_byte_level_bpe_special_tokens(gpt2_dir, workspace):
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    eos = tok.eos_token_id
    assert tok.all_special_ids == [eos]
    from mistudio.data import special_ids

    assert special_ids(tok).tolist() == [eos]
    tok.unk_token = tok.eos_token  # as the real GPT-2's: <|endoftext|> is its unknown token too, and stays markup
    assert special_ids(tok).tolist() == [eos]
    body = tok("The quick brown fox jumps over the lazy dog.")["input_ids"]
    data = [[eos] + body, body + [eos] + body, body]  # a BOS (GPT-2 uses its eos), an eos inside, none
    ext = ms.extract(gpt2_dir, data, workspace=workspace, exclude_special=True, **{**ARGS, "max_length": 128})
    for row, ids in enumerate(data):
        s = ext.sample(row)
        assert list(s["input_ids"]) == ids
        assert list(s["special"]) == [i == eos for i in ids]
        assert s["kept"].sum() == len(ids) - ids.count(eos)
    assert ext.n_tokens == sum(len(ids) for ids in data) - 2
    stats = ext.metadata["statistics"]["layers.0.residual"]
    q = stats["norm_quantiles"]
    assert 0 < q["0.5"] <= q["0.9"] <= q["0.99"] <= q["0.999"]
    assert ext.verify().ok


def test_norm_quantiles_and_outliers_merge_across_batches():
    torch.manual_seed(0)
    acc = HookStats.empty()
    first = 0
    outlier_rows = []
    for batch in range(4):
        values = torch.randn(50, 16)  # norms about 4
        if batch in (1, 3):
            values[7] *= 1000.0
            outlier_rows.append(first + 7)
        HookStats.merge(acc, HookStats.of_tensor(values), first)
        first += 50
    summary = HookStats.summary(acc)
    assert summary["n_outliers"] == 2 and [r for r, _ in summary["outliers"]] == outlier_rows
    norms = torch.linalg.vector_norm(torch.randn(100000, 16), dim=-1).numpy()
    ref = HookStats.empty()
    HookStats.merge(ref, HookStats.of_tensor(torch.from_numpy(norms[:, None].astype(np.float32))))
    for q, got in HookStats.summary(ref)["norm_quantiles"].items():
        assert abs(got / np.quantile(norms, float(q)) - 1) < 0.06, (q, got)
    assert summary["outlier_threshold"] == 100 * summary["norm_quantiles"]["0.5"]


def test_verify_checks_the_new_token_arrays(gpt2_dir, workspace):
    import shutil
    from pathlib import Path

    ext = ms.extract(gpt2_dir, TEXTS, workspace=workspace, exclude_special=True, window=8, **ARGS)
    assert ext.verify().ok
    tokens = Path(ext.location) / "tokens"
    shutil.rmtree(tokens / "activation_offsets")
    shutil.rmtree(tokens / "special")
    problems = {p.array for p in ext.verify().problems}
    assert {"tokens/activation_offsets", "tokens/special"} <= problems, problems


def _as_before_tokens_special(ext) -> None:
    """Make ``ext`` look like a store from before tokens/special (and before storage.n_input_tokens), as the
    current code writes such a store's metadata back: the array gone, the field null."""
    import json
    import shutil
    from pathlib import Path

    shutil.rmtree(Path(ext.location) / "tokens" / "special")
    group = Path(ext.location) / "zarr.json"
    meta = json.loads(group.read_text())
    meta["attributes"]["mistudio"]["storage"]["n_input_tokens"] = None
    group.write_text(json.dumps(meta))


def test_a_store_from_before_tokens_special_reads_its_markup_from_the_tokenizer(minilm_dir, workspace):
    """Old stores verify (every chunk decoded), and every view that hides markup finds [CLS]/[SEP] through the
    tokenizer, as the loader does: no 'damaged, re-extract' for an intact store, one answer to 'is it special'."""
    from mistudio.analysis import plots
    from mistudio.analysis.features import feature_page
    from mistudio.analysis.sae_training import _kept_rows

    ext = ms.extract(minilm_dir, TEXTS, workspace=workspace, **ARGS)
    want = np.asarray(ext.store.tokens("special")[:], bool)
    _as_before_tokens_special(ext)
    old = ms.open_extraction(ext.id, workspace=workspace)
    report = old.verify()
    assert report.ok, report.problems
    assert report.chunks_checked > 0
    np.testing.assert_array_equal(old.special_flags(), want)
    sample = old.sample(0)
    assert list(sample["special"]) == [t in ("[CLS]", "[SEP]") for t in sample["tokens"]]
    hp = old.hook_points[0]
    page = feature_page(old, hp, 3, n_token_means=0, logits=False)
    assert page["top"] and all(e["special"][e["peak"]] == want[old.token_index(e["row"])] for e in page["top"])
    top = plots.top_rows(old, hp, 3, k=5, skip_special=True)
    assert not want[old.token_index(top[:, 1].astype(int))].any()
    assert _kept_rows(old, exclude_special=True) == int((~want).sum())
