"""The feature page's HTML: sections, the peak outlined, special tokens hidden, every data string escaped."""
from __future__ import annotations

import math
import re
from html import unescape
from html.parser import HTMLParser

import pytest

from mistudio.errors import InputError
from mistudio.analysis.feature_page import PAGE_KEYS, escape, feature_page_html

EVIL = "<img src=x onerror=alert(1)>"
QUOTE = '" onmouseover="alert(2)'


def example(value: float, tokens: list[str], values: list, peak: int, special=None, row: int = 0) -> dict:
    return {"value": value, "row": 100 + row, "sample": row, "dataset_row": 7 * row, "position": 3 + peak,
            "context_start": 3, "tokens": tokens, "values": values,
            "special": special if special is not None else [False] * len(tokens), "peak": peak}


def make_page(**changes) -> dict:
    edges = [-math.inf, -10.0, -1.0, -0.1, 0.0, 0.0, 0.1, 1.0, 10.0, math.inf]  # signed log bins, zero bin, overflow
    page = {
        "extraction": "ext-1", "hook_point": "layers.2.residual", "feature": 17, "kind": "latent", "d": 512,
        "n_tokens": 8000, "fire_count": 40, "density": 40 / 8000, "mean": 0.02, "mean_active": 3.25, "max": 9.5,
        "histogram": {"edges": edges, "counts": [0, 0, 3, 20, 7900, 0, 10, 100, 0]},
        "top": [example(9.5, ["<|endoftext|>", "Ġthe", "Ġquick", "Ġfox", "Ġjumps"], [None, 0.0, 1.5, 9.5, 0.25],
                        3, [True, False, False, False, False], row=1),
                example(8.0, ["ĠA", "Ġbrown", "Ġfox"], [0.0, 2.0, 8.0], 2, row=2)],
        "bands": [{"quantiles": [0.5, 0.9], "values": [0.1, 1.2],
                   "examples": [example(1.0, ["Ġsmall", "Ġdog"], [0.0, 1.0], 1, row=3)]},
                  {"quantiles": [0.99, 1.0], "values": [5.0, 9.5],
                   "examples": [example(6.0, ["Ġred", "<|endoftext|>"], [0.5, 6.0], 1, [False, True], row=4)]}],
        "token_means": [{"token_id": 5, "token": "Ġfox", "mean": 7.5, "count": 12},
                        {"token_id": 9, "token": "Ġrare", "mean": 6.0, "count": 1},
                        {"token_id": 0, "token": "<|endoftext|>", "mean": 2.0, "count": 30, "special": True}],
        "min_count": 2,
        "logits": {"promoted": [{"token_id": 5, "token": "Ġfoxes", "value": 0.8},
                                {"token_id": 6, "token": "Ġwolf", "value": 0.4}],
                   "suppressed": [{"token_id": 8, "token": "Ġcat", "value": -0.6}]},
        "correlated": [{"feature": 3, "count": 30, "fraction": 0.75}, {"feature": 99, "count": 4, "fraction": 0.1}],
        "note": "fires on the word fox", "prev": 16, "next": 18,
    }
    page.update(changes)
    return page


class Tree(HTMLParser):
    """Every start tag with its attributes, and the text inside each token span."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.spans: list[tuple[set, str]] = []
        self._open: list[list] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "span":
            classes = set((attrs.get("class") or "").split())
            self._open.append([classes, ""])

    def handle_endtag(self, tag):
        if tag == "span" and self._open:
            classes, text = self._open.pop()
            if "msfp-tok" in classes:
                self.spans.append((classes, text))

    def handle_data(self, data):
        if self._open:
            self._open[-1][1] += data


def parse(text: str) -> Tree:
    tree = Tree()
    tree.feed(text)
    return tree


def section(text: str, name: str) -> str:
    m = re.search(rf'<section class="{name}">(.*?)</section>', text, re.S)
    assert m, f"section {name} missing"
    return m.group(1)


def test_sections_and_header():
    out = feature_page_html(make_page())
    for name in ("msfp-hist", "msfp-logits", "msfp-token-means", "msfp-correlated", "msfp-top", "msfp-bands"):
        section(out, name)
    head = re.search(r'<div class="msfp-header">(.*?)</div></div>', out, re.S).group(1)
    assert "layers.2.residual · latent 17" in head and "ext-1" in head and "← 16" in head and "18 →" in head
    assert "0.5%" in head and "1 in 200" in head  # 40 of 8000 tokens
    dense = feature_page_html(make_page(fire_count=6160, density=0.77))
    assert "77%" in dense and "1 in" not in dense  # "1 in 1" says nothing
    assert "40 of 8,000 tokens" in head and "fires on the word fox" in head
    hist = section(out, "msfp-hist")
    # each side from its first to its last non-empty bin (the empty (0, 0.1) bin left out): 5 bars, and the
    # tallest is the 7900-count zero bin
    heights = [float(h) for h in re.findall(r'<rect x="[^"]+" y="[^"]+" width="[^"]+" height="([^"]+)"', hist)]
    assert len(heights) == 5 and max(heights) == heights[2] and min(heights) > 0
    ratio = heights[4] / heights[2]  # log axis: log10(101) / log10(7901), not 100 / 7900
    assert ratio == pytest.approx(math.log10(101) / math.log10(7901), rel=1e-3)
    assert "(-1, -0.1]: 3" in hist and ">−∞<" not in hist  # empty underflow bin trimmed
    bands = section(out, "msfp-bands")
    assert "Quantiles 50–90%" in bands and "Quantiles 99–100%" in bands


def test_examples_shade_join_and_outline_the_peak():
    page = make_page()
    out = feature_page_html(page)
    tree = parse(section(out, "msfp-top"))
    peaks = [text for classes, text in tree.spans if "msfp-peak" in classes]
    # one outlined peak on each folded line and one in each full context: 2 examples -> 4, each the token ' fox'
    assert peaks == [" fox"] * 4
    texts = [text for _, text in tree.spans]
    assert " quick" in texts and " brown" in texts  # word pieces joined ('Ġ' -> space)
    shaded = re.findall(r'style="background:rgba\(220,70,30,([0-9.]+)\)" title="␣fox = 9\.5"', out)
    assert shaded and float(shaded[0]) == pytest.approx(0.85)  # the page's maximum gets the full shade
    assert 'title="&lt;|endoftext|&gt; = no activation"' in out  # a token with no activation row says so
    assert "<details" in out and "<summary>" in out


def test_hide_special_hides_tokens_examples_and_rows():
    page = make_page()
    shown = feature_page_html(page)
    assert any("msfp-special" in c for c, _ in parse(shown).spans)
    hidden = feature_page_html(page, hide_special=True)
    tree = parse(hidden)
    assert not any("msfp-special" in c for c, _ in tree.spans)
    assert not any("endoftext" in t for _, t in tree.spans)
    # the last band's example peaks on a special token: it is left out and counted
    assert "1 example(s) at special tokens hidden" in section(hidden, "msfp-bands")
    assert "endoftext" in section(shown, "msfp-token-means") and "endoftext" not in section(hidden, "msfp-token-means")


def test_token_means_honour_min_count_and_logits_table():
    out = feature_page_html(make_page())
    means = section(out, "msfp-token-means")
    assert "␣fox" in means and "␣rare" not in means and "seen ≥ 2 times" in means  # named as in every tab
    assert "␣rare" in section(feature_page_html(make_page(min_count=1)), "msfp-token-means")
    logits = section(out, "msfp-logits")
    assert logits.index("␣foxes") < logits.index("␣wolf") and ">+0.8<" in logits and ">-0.6<" in logits
    assert "not computed" in section(feature_page_html(make_page(logits=None)), "msfp-logits")
    corr = section(out, "msfp-correlated")
    assert "75%" in corr and ">99<" in corr


def test_every_data_string_is_escaped():
    bad_example = example(2.0, [EVIL, QUOTE, "ok"], [0.5, 2.0, 0.1], 1, row=5)
    page = make_page(extraction=EVIL, hook_point=EVIL, note=EVIL + QUOTE, top=[bad_example],
                     bands=[{"quantiles": [0.0, 1.0], "values": [0.0, 2.0], "examples": [bad_example]}],
                     token_means=[{"token_id": 1, "token": EVIL, "mean": 1.0, "count": 5}],
                     logits={"promoted": [{"token_id": 1, "token": EVIL, "value": 1.0}],
                             "suppressed": [{"token_id": 2, "token": QUOTE, "value": -1.0}]})
    for hide in (False, True):
        out = feature_page_html(page, hide_special=hide)
        assert "<img" not in out.lower()
        assert escape(EVIL) in out
        tree = parse(out)
        assert {tag for tag, _ in tree.tags} <= {"div", "style", "h4", "h5", "h6", "span", "b", "section", "svg",
                                                 "line", "text", "rect", "title", "table", "tr", "th", "td", "code",
                                                 "details", "summary", "i"}
        for tag, attrs in tree.tags:  # a quote in a token never opens an attribute
            assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        assert EVIL in [t for _, t in tree.spans]  # shown as text, exactly


def test_no_scripts_and_nothing_external():
    out = feature_page_html(make_page())
    assert "<script" not in out.lower()
    assert not re.search(r"\b(src|href)\s*=", out, re.I)
    assert not re.search(r"url\(|@import|https?://", out, re.I)


def test_incomplete_pages_are_refused_by_name():
    page = make_page()
    del page["density"]
    with pytest.raises(InputError, match="density"):
        feature_page_html(page)
    bad = make_page(top=[dict(example(1.0, ["a", "b"], [0.1], 0))])
    with pytest.raises(InputError, match=r"top\[0\].*2 tokens, 1 values"):
        feature_page_html(bad)
    with pytest.raises(InputError, match="kind='feature' is neither"):
        feature_page_html(make_page(kind="feature"))
    assert len(PAGE_KEYS) == 20


def histogram_page(counts_at: dict[float, int]) -> dict:
    """A page whose histogram is mistudio's own (float16's 2**-24 upward, 4 bins an octave): ``counts_at`` maps a
    value to its bin's count (0.0: the exact-zero bin)."""
    from mistudio.storage.featstats import histogram_edges

    edges = [-math.inf] + [float(e) for e in histogram_edges()] + [math.inf]
    counts = [0] * (len(edges) - 1)
    for value, count in counts_at.items():
        i = next(i for i in range(len(counts)) if (edges[i] == edges[i + 1] == value == 0)
                 or (value > 0 and edges[i] <= value < edges[i + 1])
                 or (value < 0 and edges[i] < value <= edges[i + 1]))
        counts[i] = count
    return make_page(histogram={"edges": edges, "counts": counts})


def test_histogram_axis_starts_at_the_data_and_says_the_zero_bin():
    """An SAE latent that fires from 0.5 to 3.4 on 1 token in 10: the bars are the zero bin and 0.5..3.5 (not 105
    bins from float16's 6e-8 up, 90% of them empty), a few bin edges labelled, the zero bin said in words."""
    values = {0.0: 11979, 0.55: 30, 0.7: 20, 1.1: 12, 1.6: 5, 2.2: 3, 3.4: 1}
    hist = section(feature_page_html(histogram_page(values)), "msfp-hist")
    titles = re.findall(r"<title>(.*?)</title>", hist)
    assert titles[0] == "0 (not firing): 11,979" and "[0, 0)" not in hist
    assert titles[1].startswith("[0.5, 0.625)") and titles[-1] == "[3, 3.5): 1"
    assert len(titles) == 1 + 11  # the zero bin, then 0.5..1, 1..2 (4 bins each) and 2..3.5 (3)
    xs = [float(x) for x in re.findall(r'<rect x="([^"]+)"', hist)]
    assert xs[1] - xs[0] < 0.2 * (xs[-1] - xs[0])  # the data takes the axis, not empty bins
    ticks = re.findall(r'<text x="[^"]+" y="([^"]+)"[^>]*text-anchor="(?:start|middle|end)"[^>]*>([^<]+)</text>', hist)
    bottom = max(float(y) for y, _ in ticks)
    x_labels = [label for y, label in ticks if float(y) == bottom]
    assert x_labels[0] == "0" and {"0.5", "1", "2", "3.5"} <= set(x_labels) and len(x_labels) >= 5
    y_labels = [(float(y), label) for y, label in ticks if float(y) != bottom]
    assert ("10,000" in dict((b, a) for a, b in y_labels)) and min(y for y, _ in y_labels) >= 9  # top tick visible
    assert "0 (not firing): 11,979 tokens" in hist and "skips the empty bins" in hist
    positions = sorted(float(x) for x in re.findall(r'<text x="([^"]+)" y="' + str(bottom), hist))
    assert all(b - a >= 10 for a, b in zip(positions, positions[1:]))  # labels do not run into each other


def test_histogram_of_a_signed_neuron_keeps_both_sides():
    hist = section(feature_page_html(histogram_page({-2.0: 40, -0.3: 100, 0.0: 5, 0.3: 120, 1.5: 60})), "msfp-hist")
    titles = re.findall(r"<title>(.*?)</title>", hist)
    assert titles[0] == "(-2.5, -2]: 40" and titles[-1].startswith("[1.5, 1.75)")
    assert "0 (not firing): 5" in titles
    assert hist.count('fill="#3b74d0"') and hist.count('fill="#e0702a"')


def test_logit_tokens_that_read_alike_show_their_ids():
    """Byte pieces of a cut character read as their bytes (and carry no id); tokens that read alike (two tokens
    that share a label, a piece that reads '�') carry their ids; clear ones do not."""
    logits = {"promoted": [{"token_id": 140, "token": "\u00e2", "value": 0.9},
                           {"token_id": 141, "token": "\u00e3", "value": 0.8},
                           {"token_id": 6, "token": "Ġwolf", "value": 0.4},
                           {"token_id": 7, "token": "\ufffd", "value": 0.3},
                           {"token_id": 9, "token": "\ufffd", "value": 0.2}],
              "suppressed": [{"token_id": 8, "token": "Ġcat", "value": -0.6}]}
    out = unescape(section(feature_page_html(make_page(logits=logits, scheme="bytelevel")), "msfp-logits"))
    assert "<0xE2>" in out and "<0xE3>" in out and "#140" not in out and "#141" not in out
    assert out.count("�") == 2 and "#7" in out and "#9" in out
    assert "#6" not in out and "#8" not in out


def test_a_share_under_one_never_reads_100_percent():
    """A feature firing on 2,995 of 2,996 tokens read "100%" in the table and the co-firing tooltips: as often as an
    always-on one. Shares under 1 keep the digits that tell them apart; the table's cell still fits its column."""
    from mistudio.analysis.feature_page import percent
    from mistudio.widgets.features_panel import NUMBER_WIDTH, percent_cell

    assert percent(2995 / 2996) == "99.97%" and percent(1.0) == "100%" and percent(0.5) == "50%"
    assert percent(0.999999) == "99.9999%" and percent(None) == "–" and percent(0) == "0%"
    assert all(len(percent_cell(s)) == NUMBER_WIDTH for s in (2995 / 2996, 1.0, 0.5, 3.34e-7, 0.0, 0.9999999))
    assert percent_cell(0.9999999).strip() == "<100%"
    assert percent_cell(2995 / 2996).strip() == "99.97%"
