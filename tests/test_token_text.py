"""Tokens read as text in every view and export, whatever the tokenizer family: a byte-level BPE (GPT-2, Llama 3,
Qwen) spells non-ASCII text in a stand-in alphabet ('Ã©' for 'é'), SentencePiece (Llama 2, Mistral) marks a word's
space with '▁' and its decoder drops a decode's leading space."""
from __future__ import annotations

import glob
import gzip
import json
import re
from html import unescape
from pathlib import Path

import pytest
import torch

import mistudio as ms
from mistudio.analysis.exports import export_html, export_neuronpedia
from mistudio.analysis.feature_page import feature_page_html
from mistudio.analysis.feature_view import (display_pieces, feature_view, feature_view_html, token_label,
                                            tokenizer_scheme)
from mistudio.analysis.features import export_pages, feature_page, match_tokens
from mistudio.errors import InputError

HP = "layers.1.residual"
ACCENTED = ["café résumé naïve 😀 déjà vu"] * 40


@pytest.fixture(scope="module")
def bytelevel_store(tmp_path_factory):
    """A tiny GPT-2 whose byte-level BPE holds 'é', 'ï' and '😀' inside whole tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("bytelevel")
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(ACCENTED + ms.sample_texts()[:40], vocab_size=600,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=trained._tokenizer, eos_token="<|endoftext|>")
    tok.save_pretrained(folder / "model")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64)) \
        .save_pretrained(folder / "model")
    return ms.extract(model=str(folder / "model"), dataset=ACCENTED[:6], layers=[1], max_length=32,
                      workspace=str(folder / "ws"), progress=False)


def test_byte_level_pieces_read_as_their_text(bytelevel_store, tmp_path):
    ext = bytelevel_store
    pieces = ext.sample(0)["tokens"]
    assert tokenizer_scheme(ext.tokenizer) == "bytelevel" and any("Ã" in p for p in pieces)
    assert "".join(display_pieces(pieces, "bytelevel")) == ACCENTED[0]
    assert "".join(display_pieces(pieces)) == ACCENTED[0]  # told from the pieces alone ('Ġ')
    labels = [token_label(p, "bytelevel") for p in pieces]
    assert all("Ã" not in label and "Ġ" not in label for label in labels), labels
    odd = ("ĠðŁĺ", "Ã©jÃ", "Ċ", "<|endoftext|>", "über", "ĠParis")  # a character cut at an end; text added
    assert [token_label(p, "bytelevel") for p in odd] == ["␣<0xF0><0x9F><0x98>", "éj<0xC3>", "↵", "<|endoftext|>",
                                                          "über", "␣Paris"]
    page = feature_page(ext, HP, 0, n_token_means=5, logits=False)
    html = unescape(feature_page_html(page))
    assert "Ã" not in html and ("é" in html or "😀" in html)
    exported = Path(export_html(export_pages(ext, HP, [0, 1]), tmp_path / "pages.html")).read_text(encoding="utf-8")
    assert "Ã©" not in unescape(exported) and "é" in unescape(exported)


@pytest.fixture(scope="module")
def sentencepiece_store(tmp_path_factory):
    """A tiny Llama whose tokenizer is built the way transformers builds LlamaTokenizer(vocab, merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    folder = tmp_path_factory.mktemp("sentencepiece")
    raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.train_from_iterator(ms.sample_texts(), trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)],
        show_progress=False))
    spec = json.loads(raw.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in spec["merges"]]
    tok = LlamaTokenizer(vocab=spec["vocab"], merges=merges, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                         add_bos_token=True)
    tok.save_pretrained(folder / "model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder / "model")
    return ms.extract(model=str(folder / "model"), dataset=ms.sample_texts()[:12], layers=[1], max_length=24,
                      workspace=str(folder / "ws"), progress=False)


def test_neuronpedia_export_keeps_sentencepiece_spaces(sentencepiece_store, tmp_path):
    ext = sentencepiece_store
    root = export_neuronpedia(export_pages(ext, HP, [0, 1, 1, 2]), tmp_path / "np", model_id="tiny",
                              source_set="res", tokenizer=ext.tokenizer)
    records = [json.loads(line) for f in glob.glob(str(root / "activations" / "*.gz"))
               for line in gzip.open(f, "rt", encoding="utf-8")]
    assert records
    for record in records:
        row = ext.sample(int(record["dataIndex"]))
        ids = [int(i) for i in row["input_ids"]]
        text = ext.tokenizer.decode(ids)  # '<s> These equivalences ...'
        joined = "".join(record["tokens"])
        assert joined.strip() in text, (joined, text)
        assert "" not in record["tokens"]
    features = [json.loads(line) for f in glob.glob(str(root / "features" / "*.gz"))
                for line in gzip.open(f, "rt", encoding="utf-8")]
    assert sorted(int(f["index"]) for f in features) == [0, 1, 2]  # feature 1 asked twice: exported once
    model = json.loads((root / "model.jsonl").read_text())
    assert model["layers"] == 2  # the store's model, without n_layers passed


@pytest.mark.parametrize("bad", [3.7, True, -1])
def test_export_pages_checks_each_feature_as_a_page_does(sentencepiece_store, bad):
    with pytest.raises(InputError, match="feature"):
        list(export_pages(sentencepiece_store, HP, [0, bad]))


def test_tokens_added_as_text_read_and_are_found_as_written(bytelevel_store, tmp_path):
    """tok.add_tokens(['café']) adds text, not byte-alphabet pieces: it must not read as 'caf' and a broken byte,
    and Find by token must find it, typed as text or as the tabs spell a token ('␣')."""
    from transformers import AutoTokenizer


    tok = AutoTokenizer.from_pretrained(bytelevel_store.tokenizer.name_or_path)
    tok.add_tokens(["naïveté", "über"])
    ext = ms.open_extraction(bytelevel_store.id, workspace=str(Path(bytelevel_store.location).parents[1]))
    ext.tokenizer = tok
    added = tok.convert_tokens_to_ids(["naïveté", "über"])
    assert display_pieces(["naïveté", "über"], "bytelevel") == ["naïveté", "über"]
    assert match_tokens(ext, "naïveté") == [added[0]] and match_tokens(ext, "über") == [added[1]]
    word = [i for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))) if t == "Ġvu"]
    assert word and match_tokens(ext, "␣vu") == match_tokens(ext, " vu") == word


def test_plots_label_tokens_added_as_text_as_written(bytelevel_store, tmp_path):
    """A store made with a tokenizer that has tokens added as text: the heatmap, the norms and the top tokens label
    them as written, as the tables do, not as byte-alphabet pieces ('naÃ¯vetÃ©' or a broken byte)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from mistudio.analysis import plots

    tok = AutoTokenizer.from_pretrained(bytelevel_store.tokenizer.name_or_path)
    tok.add_tokens(["naïveté"])
    tok.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64)) \
        .save_pretrained(tmp_path / "model")
    ext = ms.extract(model=str(tmp_path / "model"), dataset=["a naïveté test"] * 3, layers=[1], max_length=16,
                     workspace=str(tmp_path / "ws"), progress=False)
    assert "naïveté" in [t.get_text() for t in plots.heatmap(ext, 0, HP).axes[0].get_yticklabels()]
    assert "naïveté" in [t.get_text() for t in plots.layer_norms(ext, 0).axes[0].get_xticklabels()]
    assert any("naïveté" in hit["context"] for hit in plots.top_tokens(ext, HP, 0, k=12))


def test_labels_follow_the_stores_own_tokenizer_when_a_folder_gets_another_of_the_same_size(tmp_path):
    """One process, one model folder, its tokenizer replaced by another of the same size between two extractions:
    each store's plots and tables name its own tokenizer's pieces (a memo keyed by folder and size gave the first's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from mistudio.analysis import plots
    from mistudio.analysis.features import token_labels

    def bpe(texts):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")

    folder, text = tmp_path / "model", ["the quick brown fox jumps over the lazy dog"]
    first, second = bpe(ms.sample_texts()[:300]), bpe([s[::-1] for s in ms.sample_texts()[:300]])
    assert len(first) == len(second)
    first.save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(first), n_layer=2, n_embd=32, n_head=2, n_positions=64)) \
        .save_pretrained(folder)
    stores = []
    for tok in (first, second):
        tok.save_pretrained(folder)
        stores.append(ms.extract(model=str(folder), dataset=text, layers=[1], max_length=32,
                                 workspace=str(tmp_path / "ws"), progress=False))
        labels = [t.get_text() for t in plots.heatmap(stores[-1], 0, HP).axes[0].get_yticklabels()]
        assert labels == [token_label(t, "bytelevel") for t in stores[-1].sample(0)["tokens"]]
    a, b = stores
    assert token_labels(a) != token_labels(b)
    a.tokenizer = second  # read a store with a tokenizer given by hand: its pieces, not the memo's
    assert token_labels(a) == token_labels(b)


# -- characters split over several byte-level pieces ('é' as 'Ã' '©', an emoji, a CJK character) --------------------
SPLIT = "café au lait, naïve 😀 日本 " * 3
SPLIT_WORDS = ("café", "naïve", "😀", "日本")


@pytest.fixture(scope="module")
def split_store(gpt2_dir, tmp_path_factory):
    """The shared tiny GPT-2, whose 400-piece byte-level BPE (trained on English text) splits é, ï, 😀 and 日本 into
    pieces of one byte each."""
    ext = ms.extract(model=gpt2_dir, dataset=[SPLIT] * 4, layers=[1], max_length=40,
                     workspace=str(tmp_path_factory.mktemp("split") / "ws"), progress=False)
    tokens = ext.sample(0)["tokens"]
    assert "Ã" in tokens and "©" in tokens and "ðŁĺ" not in tokens  # é, and the emoji, really are split
    return ext


def _plain(html_text: str) -> str:
    return unescape(re.sub(r"<[^>]+>", "", html_text))


def _summaries_and_contexts(html_text: str, full: str) -> list[tuple[str, str]]:
    """Each example's summary line and expanded context, as plain text (row/value meta and '…' left out)."""
    pairs = re.findall(r"<summary>(.*?)</summary>\s*<div[^>]*" + full + r"[^>]*>(.*?)</div>\s*</details>", html_text)
    return [(_plain(re.sub(r'<span class="(ms-meta|msfp-meta)".*?</span>', "", s)).strip(" …"), _plain(c))
            for s, c in pairs]


def test_running_text_joins_a_character_split_over_pieces(split_store):
    from mistudio.analysis.feature_view import pieces_and_titles

    tokens, ids = split_store.sample(0)["tokens"], split_store.sample(0)["input_ids"]
    pieces = display_pieces(tokens)
    assert "".join(pieces) == split_store.tokenizer.decode(ids)  # as the tokenizer decodes it
    first = tokens.index("Ã")
    assert tokens[first:first + 2] == ["Ã", "©"] and pieces[first:first + 2] == ["", "é"]  # shown where it ends
    assert display_pieces(["Ã"], "bytelevel") == ["\ufffd"]  # alone in running text: as the tokenizer decodes it
    assert token_label("Ã", "bytelevel") == "<0xC3>"  # named on its own: its byte, told apart from the others'
    assert match_tokens(split_store, "<0xC3>") == [split_store.tokenizer.convert_tokens_to_ids("Ã")]
    newline = split_store.tokenizer.convert_tokens_to_ids("Ċ")  # the tabs label it '↵': Find by token takes that
    assert newline in match_tokens(split_store, "↵") and split_store.tokenizer.convert_tokens_to_ids("ĉ") in \
        match_tokens(split_store, "⇥")
    assert display_pieces(["©", "Ġa", "Ã"], "bytelevel") == ["\ufffd", " a", "\ufffd"]  # cut at a window's edges
    assert display_pieces(["ðŁ", "ĺ", "Ģ", "Ġæ", "Ĺ"], "bytelevel") == ["", "", "😀", " ", "\ufffd"]  # 4 bytes; cut
    assert display_pieces(["▁caf", "<0xC3>", "<0xA9>", "<0x0A>"], "bpe") == [" caf", "", "é", "↵"]  # byte fallback
    titles = pieces_and_titles(["Ġcaf", "Ã", "©"], "bytelevel")[1]
    assert titles == ["␣caf", "<0xC3> (part of 'é')", "<0xA9> (part of 'é')"]
    cut_end = pieces_and_titles(["Ġcaf", "æ", "Ŀ"], "bytelevel")  # 東's first two bytes, its third cut off
    assert cut_end == ([" caf", "", "\ufffd"], ["␣caf", "<0xE6>", "<0x9D>"])  # as decoding reads; no "part of '�'"


def test_top_tokens_read_a_character_cut_by_their_window_as_the_whole_text_does(split_store):
    """Browse's top tokens show a few pieces around each token: a character whose bytes straddle the window's edge
    reads as in the whole text (its rest outside, or nothing), never as '�'; one per document keeps each row once."""
    from mistudio.analysis import plots

    every = plots.top_tokens(split_store, HP, 0, k=40, context=1)
    assert len(every) == 40 and len({t["row"] for t in every}) < 40  # 4 copies of one text: rows repeat
    assert not [t["pieces"] for t in every if "\ufffd" in "".join(t["pieces"])]
    once = plots.top_tokens(split_store, HP, 0, k=40, context=1, one_per_document=True)
    assert [t["row"] for t in once] == sorted({t["row"] for t in once}, key=[t["row"] for t in once].index)
    assert len({t["row"] for t in once}) == len(once) and once[0] == every[0]


def test_feature_view_reads_split_characters_as_decoded(split_store):
    view = feature_view(split_store, HP, 0, context=40)  # whole rows: each holds every split word
    html_text = feature_view_html(view).split("Highest mean activation")[0]  # the examples (running text)
    assert all(word in _plain(html_text) for word in SPLIT_WORDS) and "Ã" not in _plain(html_text)
    examples = view["top"] + [e for band in view["bands"] for e in band["examples"]]
    decoded = [split_store.tokenizer.convert_tokens_to_string(e["context_tokens"]) for e in examples]
    pairs = _summaries_and_contexts(html_text, "margin")
    assert [context for _, context in pairs] == decoded  # every example's context as the tokenizer decodes it
    assert all(summary in context for summary, context in pairs), pairs  # and its line spelled the same way
    peaks = [(int(e["position"]) - int(e["context_start"]), len(e["context_tokens"])) for e in examples]
    spans = sum(n + min(n, peak + 4) - max(0, peak - 3) for peak, n in peaks)
    assert html_text.count('class="ms-tok') == spans  # every token keeps its own span, in the line and in the context


def test_feature_page_reads_split_characters_as_decoded(split_store):
    page = feature_page(split_store, HP, 0, context=40, n_token_means=5, logits=False)
    html_text = feature_page_html(page)
    assert all(word in _plain(html_text) for word in SPLIT_WORDS) and "Ã" not in _plain(html_text)
    examples = page["top"] + [e for band in page["bands"] for e in band["examples"]]
    decoded = [split_store.tokenizer.convert_tokens_to_string(e["tokens"]) for e in examples]
    pairs = _summaries_and_contexts(html_text, "msfp-full")
    assert [context for _, context in pairs] == decoded
    assert all(summary in context for summary, context in pairs), pairs


def test_from_text_reads_split_characters_as_decoded(split_store):
    from mistudio.widgets.features_panel import FeaturesPanel

    panel = FeaturesPanel(ms.Workspace(str(Path(split_store.location).parents[1])), page_size=10)
    assert panel.wait(120)
    panel.prompt.value = "The café, naïve 😀 日本."
    panel.run_prompt()
    assert panel.wait(120)
    shown = _plain(panel.prompt_html.value.split("</small>", 1)[1])
    assert shown == "The café, naïve 😀 日本.", shown
    assert panel.prompt_html.value.count('class="msfp-tok"') == len(panel.prompt_result["tokens"])
    assert "part of &#x27;é&#x27;" in panel.prompt_html.value  # a piece of é says so on hover


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_neuronpedia_export_keeps_each_piece_alone(split_store, tmp_path, with_tokenizer):
    """Neuronpedia's records hold each token decoded alone (TransformerLens's to_str_tokens): a piece of 'é' is
    '\ufffd' there, never '' (the running text of the pages joins them; the export does not)."""
    root = export_neuronpedia(export_pages(split_store, HP, [0]), tmp_path / "np", model_id="tiny", source_set="res",
                              tokenizer=split_store.tokenizer if with_tokenizer else None)
    records = [json.loads(line) for f in glob.glob(str(root / "activations" / "*.gz"))
               for line in gzip.open(f, "rt", encoding="utf-8")]
    assert records and all("" not in r["tokens"] and "Ã" not in r["tokens"] for r in records)
    assert any("\ufffd" in r["tokens"] for r in records)


def test_find_by_a_byte_name_ignores_the_case_of_its_hex(split_store):
    byte = split_store.tokenizer.convert_tokens_to_ids("Ã")
    assert match_tokens(split_store, "<0xc3>") == match_tokens(split_store, "<0xC3>") == [byte]
