"""Studio leftovers a new user met, driven through the real widgets: Retry of a COMPLETED row asks first (a full
rerun); Browse draws the feature histogram once (in the feature view, with the hide options applied); a token is
spelled the same way in Browse, the Features table and From text."""
from __future__ import annotations

import numpy as np
import pytest

import mistudio as ms
from conftest import cancelled_at
from mistudio.analysis.feature_view import token_label
from mistudio.widgets.browser import WRAP, ActivationBrowser
from mistudio.widgets.features_panel import FeaturesPanel
from mistudio.widgets.jobs_panel import JobsPanel

HP = "layers.5.residual"


# -- 1. Retry of a COMPLETED row asks first ------------------------------------------------------------------
def test_retry_of_a_completed_row_asks_first_and_a_cancelled_one_does_not(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    done = ws.submit(gpt2_dir, "sample", layers=[0], max_samples=6)
    assert done.wait(60).status == "COMPLETED"
    stopped = cancelled_at(ws, gpt2_dir, "sample", layers=[0], max_samples=12, batch_size=2, at_batch=1)
    started = []
    jobs = JobsPanel(ws, on_job=started.append)
    retry = jobs.cells[done.id]["buttons"]["Retry"]
    assert "asks first" in retry.tooltip

    retry.click()  # a question, no job
    assert started == [] and len(jobs.rows) == 2
    assert jobs.retry_box.layout.display == "" and jobs.pending_retry == done.id
    text = jobs.retry_text.value
    assert done.id in text and "new extraction" in text and "6 samples" in text and "kept" in text
    jobs.keep_retry_button.click()
    assert started == [] and jobs.retry_box.layout.display == "none" and "Nothing was started" in jobs.message.value
    assert len(ws.extractions()) == 2

    jobs.cells[done.id]["buttons"]["Delete"].click()  # one question at a time: a Retry question closes Delete's
    jobs.cells[done.id]["buttons"]["Retry"].click()
    assert jobs.confirm_box.layout.display == "none" and jobs.pending_delete is None
    jobs.confirm_retry_button.click()
    assert len(started) == 1 and started[0].meta["retry_of"] == done.id
    assert started[0].wait(60).status == "COMPLETED"
    assert ws.job(done.id).status == "COMPLETED"  # the completed store is kept

    jobs.refresh()
    jobs.cells[stopped.id]["buttons"]["Retry"].click()  # the usual recovery: one click
    assert len(started) == 2 and started[1].meta["retry_of"] == stopped.id
    assert jobs.retry_box.layout.display == "none"
    started[1].wait(60)


# -- a small WordPiece store (MiniLM): '##' pieces and [CLS]/[SEP] --------------------------------------------
@pytest.fixture(scope="module")
def minilm_workspace(tmp_path_factory, minilm_dir):
    root = str(tmp_path_factory.mktemp("leftovers_ws"))
    ms.extract(minilm_dir, "sample", layers=[5], max_samples=60, workspace=root, progress=False)
    return root


@pytest.fixture(scope="module")
def browser(minilm_workspace):
    browser = ActivationBrowser(ms.Workspace(minilm_workspace))
    browser.hook_point.value = HP
    return browser


# -- 2. one feature histogram in Browse ---------------------------------------------------------------------------
def test_browse_draws_the_feature_histogram_once_with_the_hide_options(browser):
    assert "histogram" not in browser.images and "histogram" not in browser._boxes
    assert "histogram" not in browser.plot_button.tooltip and "histogram" in browser.view_button.tooltip
    browser.feature.value = 3
    assert browser.plot()
    assert "histogram" not in browser.info.value
    assert browser.show_feature()
    everything = browser.feature_hist.value
    assert everything[:4] == b"\x89PNG" and browser.feature_hist.layout.display == ""
    browser.hide_special.value = True
    try:
        assert browser.show_feature()
        assert browser.feature_hist.value[:4] == b"\x89PNG" and browser.feature_hist.value != everything
        figure = browser._histogram(HP, 3, {})
        n_special = int(np.asarray(browser.ext.store.tokens("special")[:], bool).sum())
        assert f"over {int(browser.ext.committed_tokens()) - n_special:,} tokens" in figure.axes[0].get_title()
    finally:
        browser.hide_special.value = False


# -- 3. one spelling of a token in every tab --------------------------------------------------------------------
def test_token_label_spellings():
    assert [token_label(t, "wordpiece") for t in ("##uming", "paris", "[SEP]")] == ["##uming", "paris", "[SEP]"]
    assert [token_label(t, "bpe") for t in ("Ġthe", "▁the", "Ċ", "ĠĠ", "<|endoftext|>")] == [
        "␣the", "␣the", "↵", "␣␣", "<|endoftext|>"]
    assert token_label("a\tb\x00", "bpe") == "a⇥b<0x00>" and token_label("", "bpe") == "∅"
    assert token_label("\x18", "bpe") == "<0x18>" == token_label("Ę", "bytelevel")  # one notation for bytes
    assert token_label("a\u200b", "bpe") == "a\\u200b"


def test_a_token_reads_the_same_in_browse_the_features_table_and_from_text(minilm_workspace, browser):
    panel = FeaturesPanel(ms.Workspace(minilm_workspace), page_size=400)
    assert panel.wait(120)
    panel.hook_point.value = HP
    assert panel.wait(120)
    tokenizer = panel.ext.tokenizer
    rows = {r["feature"]: r for r in panel.table.page(0, 400)}
    options = dict((value, label) for label, value in panel.table_list.options)
    # features whose strongest token is a continuation piece and a special token
    firsts = {f: tokenizer.convert_ids_to_tokens(r["top_token_ids"][0]) for f, r in rows.items() if r["top_token_ids"]}
    piece = next(f for f, t in firsts.items() if t.startswith("##"))
    special = next(f for f, t in firsts.items() if t in ("[CLS]", "[SEP]"))
    for feature in (piece, special):
        label = token_label(firsts[feature], "wordpiece")
        assert label == firsts[feature]  # WordPiece: the tokenizer's own piece ('##ite', '[CLS]'), no quotes
        assert label in options[feature].split()  # the Features table
        browser.feature.value = feature
        assert browser.plot()
        assert f'title="{label}"' in browser.top_table.value  # Browse's top tokens: the peak named on hover
        top = browser.top_table.value
        assert f'title="{label}"' in top.split(f"<td style='{WRAP}'>")[1], top  # the strongest one first
        assert "[[" not in top  # running text, as the feature view's examples, not pieces in brackets

    # From text: a prompt holding the piece, and [CLS]/[SEP]
    row = int(panel.ext.store.tokens("input_ids")[:].tolist().index(rows[piece]["top_token_ids"][0]))
    ids = np.asarray(panel.ext.store.tokens("input_ids")[max(0, row - 6):row + 6])
    panel.prompt.value = tokenizer.decode(ids, skip_special_tokens=True)
    panel.run_prompt()
    assert panel.wait(120)
    listed = [label.split()[1] for label, _ in panel.prompt_tokens.options]
    assert listed[0] == "[CLS]" and listed[-1] == "[SEP]"  # not "' [SEP]'"
    assert firsts[piece] in listed
    assert listed == [token_label(t, "wordpiece") for t in panel.prompt_result["tokens"]]
    # Find by token names the tokens it matched the same way
    panel.token.value = firsts[piece]
    panel.find()
    assert panel.wait(120)
    assert firsts[piece] in panel.found_info.value and f"'{firsts[piece][2:]}'" not in panel.found_info.value
