"""One feature, seen across the whole store: top examples, examples from activation quantiles, the
histogram and the mean activation per token string, plus a pure HTML builder that shows them.

The top examples and the histogram come from :mod:`mistudio.analysis` (cached there). What it lacks,
quantile samples and per-token-string means, is computed here in one streaming pass (one chunk of one
column at a time; memory: the chunk, the vocabulary-sized sums and a few examples per band) and cached
in the store next to it, under ``analysis/feature_view/`` (token means alone: ``analysis/token_means/``).

**Where a feature's values are read** (the one seam between feature views and the store's layout): every view
and page reads activations through :func:`values_at` (one feature at some rows), :func:`rows_at` (every feature
at some rows) and :func:`columns_blocks` (every value of some features that is not zero, block by block). They read
raw hook points from ``ext.activations(hp)``; SAE latents (``<hook point>.latents``, stored sparsely) switch here.
"""
from __future__ import annotations

import codecs
import html
import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterator, Sequence

import numpy as np

from ..data import special_ids
from ..errors import InputError
from ..storage.featstats import sample_keys
from . import stats as analysis

if TYPE_CHECKING:
    from ..extraction import Extraction

BANDS = ((0.0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 1.0))
BLOCK_BYTES = 32 << 20  # columns_blocks reads about this many stored bytes at a time
SUMS_BYTES = 64 << 20  # token_means_many holds at most this many bytes of per-token sums in one pass
LATENT_SUFFIX = ".latents"


# -- in-memory answers, keyed by the store's identity and commit mark --------------------------------------
class Memo:
    """A small thread-safe LRU of computed values: ``get(key, compute)`` computes once per key."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()  # outside the lock: a slow computation does not hold up other keys
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_ROW_TOKENS = Memo(4)


def store_key(ext: "Extraction") -> tuple[str, str | None, int]:
    """What identifies a store's committed content: its location, its nonce (a store made again at the same place
    has another) and its commit mark."""
    return ext.location, ext.store.record.nonce, int(ext.committed_tokens())


def is_latent(hook_point: str) -> bool:
    """Whether ``hook_point`` names an SAE's latents (``<hook point>.latents``) rather than a raw hook point."""
    return str(hook_point).endswith(LATENT_SUFFIX)


def row_token_ids(ext: "Extraction") -> np.ndarray:
    """The token id of every committed activation row, int32 (kept in memory per store and commit mark)."""
    def compute() -> np.ndarray:
        mark = int(ext.committed_tokens())
        if not mark:
            return np.zeros(0, np.int32)
        tokens = np.asarray(ext.token_index(np.arange(mark)))
        ids = np.asarray(ext.store.tokens("input_ids")[0:int(tokens[-1]) + 1], dtype=np.int32)
        return ids if len(ids) == mark else ids[tokens]

    return _ROW_TOKENS.get(store_key(ext), compute)


def token_counts(ext: "Extraction") -> np.ndarray:
    """How many committed activation rows each token id has (the denominators of token means)."""
    return np.bincount(row_token_ids(ext))


# -- the seam: where a feature's values are read --------------------------------------------------------------
def _feature_in(d: int, hook_point: str, feature: Any) -> int:
    if isinstance(feature, (bool, np.bool_)) or not isinstance(feature, (int, np.integer)) or not 0 <= feature < d:
        raise InputError(f"«feature={feature!r}» is not a feature of {hook_point}: it has {d:,} features (0 to "
                         f"{d - 1}): «pass feature={d - 1}» or less")
    return int(feature)


def feature_count(ext: "Extraction", hook_point: str) -> int:
    """Features of ``hook_point``: a raw hook point's width, or an SAE's d_sae for its latents."""
    if is_latent(hook_point):
        return int(ext.latent_info(hook_point).d_sae)
    return int(ext.activations(hook_point).shape[1])


def _check_feature(ext: "Extraction", hook_point: str, feature: Any) -> int:
    return _feature_in(feature_count(ext, hook_point), hook_point, feature)


def _latent_rows(ext: "Extraction", hook_point: str, rows: Any):
    """The latents at ``rows`` (any order, repeats allowed) as a CSR matrix in the order given."""
    rows = _rows_in(int(ext.committed_tokens()), ext, rows)
    distinct, where = np.unique(rows, return_inverse=True)
    return ext.latents(hook_point, distinct)[where.reshape(-1)]


def _rows_in(mark: int, ext: "Extraction", rows: Any) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= mark):
        bad = int(rows.min()) if int(rows.min()) < 0 else int(rows.max())
        raise InputError(f"activation row {bad} is outside the {mark:,} committed rows of {ext.id}")
    return rows


def _chunk_groups(rows: np.ndarray, step: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """The rows (as positions into ``rows``) that share a storage chunk, with the row span they need."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    cuts = np.flatnonzero(np.diff(ordered // step)) + 1
    for part in np.split(np.arange(len(rows)), cuts):
        if len(part):
            yield order[part], int(ordered[part[0]]), int(ordered[part[-1]]) + 1


def values_at(ext: "Extraction", hook_point: str, feature: int, rows: Any) -> np.ndarray:
    """The values of ``feature`` at activation ``rows`` (any order, repeats allowed), float32: each storage
    chunk the rows touch is read once."""
    if is_latent(hook_point):
        feature = _check_feature(ext, hook_point, feature)
        return _latent_rows(ext, hook_point, rows)[:, feature].toarray().ravel().astype(np.float32)
    arr = ext.activations(hook_point)  # one metadata read: its width and commit mark serve the checks
    feature = _feature_in(int(arr.shape[1]), hook_point, feature)
    rows = _rows_in(arr.mark, ext, rows)
    out = np.zeros(len(rows), np.float32)
    for where, lo, hi in _chunk_groups(rows, int(arr.chunks[0])):
        out[where] = np.asarray(arr[lo:hi, feature], np.float32)[rows[where] - lo]
    return out


def rows_at(ext: "Extraction", hook_point: str, rows: Any) -> np.ndarray:
    """Every feature at activation ``rows`` (any order), ``(len(rows), d)`` float32: each storage chunk the rows
    touch is read once."""
    if is_latent(hook_point):
        return _latent_rows(ext, hook_point, rows).toarray().astype(np.float32)
    arr = ext.activations(hook_point)
    rows = _rows_in(arr.mark, ext, rows)
    out = np.zeros((len(rows), int(arr.shape[1])), np.float32)
    for where, lo, hi in _chunk_groups(rows, int(arr.chunks[0])):
        out[where] = np.asarray(arr[lo:hi], np.float32)[rows[where] - lo]
    return out


def columns_blocks(ext: "Extraction", hook_point: str,
                   features: Sequence[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every committed value of ``features``, as ``(rows, values (len(rows), len(features)))`` blocks in row
    order, about :data:`BLOCK_BYTES` of the store read at a time (reading several features costs one pass, as
    one does); values that are exactly 0 may be left out (sparse latents list only their non-zero values), so
    sum over the blocks, never count them. SAE latents: one block per feature, its non-zero values (from the
    by-feature index)."""
    if is_latent(hook_point):
        features = [_check_feature(ext, hook_point, f) for f in features]
        for j, f in enumerate(features):
            rows, values = ext.feature(hook_point, f)
            block = np.zeros((len(rows), len(features)))
            block[:, j] = values
            yield rows, block
        return
    arr = ext.activations(hook_point)
    features = [_feature_in(int(arr.shape[1]), hook_point, f) for f in features]
    unit = int(arr.chunks[0])
    step = unit * max(1, BLOCK_BYTES // max(1, unit * int(arr.shape[1]) * np.dtype(arr.dtype).itemsize))
    mark = arr.mark
    for a in range(0, mark, step):
        b = min(a + step, mark)
        yield np.arange(a, b), np.asarray(arr[a:b, features], np.float64).reshape(b - a, len(features))


def column_blocks(ext: "Extraction", hook_point: str, feature: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`columns_blocks` of one feature: ``(rows, values)`` blocks."""
    for rows, values in columns_blocks(ext, hook_point, [feature]):
        yield rows, values[:, 0]


def quantile_thresholds(hist: np.ndarray, edges: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Activation values at quantiles ``qs``, interpolated within the histogram's bins."""
    cdf = np.concatenate([[0.0], np.cumsum(hist, dtype=np.float64)])
    cdf /= max(cdf[-1], 1.0)
    return np.interp(qs, cdf, edges)


def _scan(ext: "Extraction", hook_point: str, feature: int, cuts: np.ndarray | None, per_band: int,
          seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """One pass over the feature's values (:func:`column_blocks`): a uniform sample of ``per_band`` rows per band
    between ``cuts`` (smallest :func:`~mistudio.storage.featstats.sample_keys`; none without ``cuts``) and the
    sum of its values per token id."""
    tokens = row_token_ids(ext)
    n_bands = 0 if cuts is None else len(cuts) - 1
    keep = [np.zeros((0, 3)) for _ in range(n_bands)]  # (key, value, activation row)
    sums = np.zeros(int(tokens.max()) + 1 if len(tokens) else 0)
    for rows, col in column_blocks(ext, hook_point, feature):
        sums += np.bincount(tokens[rows], weights=col, minlength=len(sums))
        if not n_bands:
            continue
        band = np.clip(np.searchsorted(cuts, col, side="right") - 1, 0, n_bands - 1)
        keys = sample_keys(rows, seed).astype(np.float64)
        for j in range(n_bands):
            at = np.flatnonzero(band == j)
            if at.size:
                cand = np.concatenate([keep[j], np.stack([keys[at], col[at], rows[at]], axis=1)])
                keep[j] = cand[np.argsort(cand[:, 0], kind="stable")[:per_band]]
    return keep, sums


def rank_token_means(ext: "Extraction", sums: np.ndarray, counts: np.ndarray, n: int, min_count: int) -> list[dict]:
    """The ``n`` token ids with the highest mean (``sums / counts``) among those seen at least ``min_count`` times,
    highest first: ``{"token_id", "token", "mean", "count", "special"}`` (``special``: a special token of the
    tokenizer)."""
    counts = counts[:len(sums)]
    seen = np.flatnonzero(counts >= max(1, min_count))
    means = sums[seen] / counts[seen]
    order = seen[np.lexsort((seen, -means))][:n]
    tokenizer = ext.tokenizer
    names = tokenizer.convert_ids_to_tokens([int(i) for i in order]) if len(order) else []
    special = set(special_ids(tokenizer).tolist())
    return [{"token_id": int(i), "token": str(name), "mean": float(sums[i] / counts[i]), "count": int(counts[i]),
             "special": int(i) in special} for i, name in zip(order, names)]


def _check_count(name: str, value: Any, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"«{name}={value!r}» is not valid: «pass {name}={low}» or more (a whole number)")
    return int(value)


def token_means(ext: "Extraction", hook_point: str, feature: int, n: int = 15, min_count: int = 2) -> list[dict]:
    """The mean of ``feature`` per token id over every committed row (tokens seen at least ``min_count`` times),
    the ``n`` highest (:func:`rank_token_means`); one pass over the feature's values, cached in the store under
    ``analysis/token_means/``."""
    return token_means_many(ext, hook_point, [feature], n, min_count)[_check_feature(ext, hook_point, feature)]


def token_means_many(ext: "Extraction", hook_point: str, features: Sequence[int], n: int = 15,
                     min_count: int = 2) -> dict[int, list[dict]]:
    """:func:`token_means` of several features: those not cached yet in shared passes over the store (each pass
    reads the store once for up to :data:`SUMS_BYTES` of per-token sums), each answer cached."""
    features = [_check_feature(ext, hook_point, f) for f in features]
    n, min_count = _check_count("n", n, 1), _check_count("min_count", min_count, 1)
    mark = int(ext.committed_tokens())
    paths = {f: analysis.cache_path("token_means", hook_point, f"feature={f},n={n},min={min_count}") for f in features}
    out: dict[int, list[dict]] = {}
    for f in features:
        group = analysis.cache_read(ext, paths[f], mark)
        if group is not None:
            out[f] = json.loads(group.attrs["means"])
    todo = [f for f in dict.fromkeys(features) if f not in out]
    if not todo:
        return out
    tokens, counts = row_token_ids(ext), token_counts(ext)
    vocab = len(counts)
    per_pass = max(1, SUMS_BYTES // max(1, vocab * 8))
    for first in range(0, len(todo), per_pass):
        group_features = todo[first:first + per_pass]
        sums = np.zeros((len(group_features), vocab))
        for rows, values in columns_blocks(ext, hook_point, group_features):
            ids = tokens[rows]
            for j in range(len(group_features)):
                sums[j] += np.bincount(ids, weights=values[:, j], minlength=vocab)
        for j, f in enumerate(group_features):
            out[f] = rank_token_means(ext, sums[j], counts, n, min_count)
            analysis.cache_write(ext, paths[f], mark, {"means": json.dumps(out[f])}, {})
    return out


def feature_view(ext: "Extraction", hook_point: str, feature: int, k: int = 20, context: int = 8,
                 per_band: int = 3, bands: Sequence[tuple[float, float]] = BANDS, n_token_means: int = 15,
                 min_count: int = 2, seed: int = 0) -> dict:
    """Everything the feature view shows, as plain data (JSON-able): ``top`` (analysis.top_examples),
    ``bands`` (quantile range, value range, a few examples each), ``hist``/``edges`` and ``token_means``."""
    top = analysis.top_examples(ext, hook_point, feature, k=k, context=context)
    stats = analysis.feature_stats(ext, hook_point)
    hist, edges = np.asarray(stats.hist[feature], np.float64), np.asarray(stats.edges[feature], np.float64)
    mark = int(ext.committed_tokens())
    key = f"{analysis.EXAMPLES_KEY},feature={feature},bands={json.dumps([list(b) for b in bands])}," \
          f"per_band={per_band},context={context},seed={seed},means={n_token_means},min={min_count}"
    path = analysis.cache_path("feature_view", hook_point, key.replace("/", "_"))
    group = analysis.cache_read(ext, path, mark)
    if group is not None:
        rest = json.loads(group.attrs["view"])
        cached = True
    else:
        qs = sorted({q for band in bands for q in band})
        values = quantile_thresholds(hist, edges, qs)
        cuts = np.array([values[qs.index(lo)] for lo, _ in bands] + [np.inf])
        cuts[0] = -np.inf
        keep, sums = _scan(ext, hook_point, feature, cuts, per_band, seed)
        out_bands = []
        for (lo, hi), sample in zip(bands, keep):
            best = sample[np.argsort(-sample[:, 1], kind="stable")][:, 1:]
            out_bands.append({"quantiles": [lo, hi], "values": [float(values[qs.index(lo)]),
                                                                  float(values[qs.index(hi)])],
                              "examples": analysis.describe_examples(ext, hook_point, feature, best, context)})
        rest = {"bands": out_bands, "token_means": rank_token_means(ext, sums, token_counts(ext), n_token_means,
                                                                    min_count)}
        cached = False
        analysis.cache_write(ext, path, mark, {"view": json.dumps(rest)}, {})
    return {"hook_point": hook_point, "feature": int(feature), "n_tokens": int(stats.n_tokens), "top": list(top),
            "hist": hist.tolist(), "edges": edges.tolist(), "cached": cached, **rest}


# -- display (pure functions: data in, HTML out) -----------------------------------------------------
def tokenizer_scheme(tokenizer: Any) -> str:
    """'wordpiece' (BERT's '##' continuations, spaces between words), 'bytelevel' (GPT-2, Llama 3, Qwen: each piece
    spells bytes in a stand-in alphabet, 'Ġ' a space, 'Ã©' the two bytes of 'é') or 'bpe' (SentencePiece '▁')."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "model", None)).__name__ == "WordPiece":
        return "wordpiece"
    return "bytelevel" if "ByteLevel" in repr(getattr(backend, "decoder", None)) else "bpe"


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's stand-in characters (GPT-2's ``bytes_to_unicode``), each mapped back to its byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(moved)}}


_BYTES = _byte_alphabet()


def byte_level_text(piece: str) -> str | None:
    """The text a byte-level BPE piece's bytes spell (``'Ã©'`` -> ``'é'``, ``'Ġthe'`` -> ``' the'``), with ``'�'``
    for a character cut at either end of the piece (an emoji's first bytes); None when a character is not of that
    alphabet or the bytes are not UTF-8 (``' <x>'``, ``'über'``: a token added as text, which reads as written)."""
    try:
        raw = bytes(_BYTES[c] for c in piece)
    except KeyError:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    start = 0
    while start < len(raw) and 0x80 <= raw[start] < 0xC0:  # the end of a character begun in the piece before
        start += 1
    stop = len(raw)
    for back in range(1, min(4, len(raw) - start) + 1):  # the start of a character ended in the piece after
        lead = raw[len(raw) - back]
        if lead < 0x80:  # a whole character: no cut one after it
            break
        if lead >= 0xC0:
            if back < (2 if lead < 0xE0 else 3 if lead < 0xF0 else 4):
                stop = len(raw) - back
            break
    try:
        raw[start:stop].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return raw.decode("utf-8", errors="replace")


def byte_level_label(piece: str) -> str | None:
    """A byte-level piece named on its own: :func:`byte_level_text`, but each byte of a character cut at either
    end written as SentencePiece writes a byte token, ``'<0xE6>'`` (``'Ã©jÃ'`` -> ``'éj<0xC3>'``), so the pieces
    of one character, and of different characters, read apart instead of all as ``'�'``. None as for
    :func:`byte_level_text`."""
    text = byte_level_text(piece)
    if text is None or "\ufffd" not in text:
        return text
    raw = bytes(_BYTES[c] for c in piece)
    return raw.decode("utf-8", errors="mistudio-hex")


def _hex_bytes(error: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(f"<0x{b:02X}>" for b in error.object[error.start:error.end]), error.end


codecs.register_error("mistudio-hex", _hex_bytes)


def resolve_scheme(tokens: Sequence[str], scheme: str) -> str:
    """``scheme``, or for ``"auto"`` the one the pieces show ('▁': SentencePiece, 'Ġ': byte-level, '##':
    WordPiece)."""
    if scheme != "auto":
        return scheme
    if any("▁" in t for t in tokens):
        return "bpe"
    if any("Ġ" in t for t in tokens):
        return "bytelevel"
    return "wordpiece" if any(t.startswith("##") for t in tokens) else "bpe"


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback
_CONTROL = {"\n": "↵", "\t": "⇥"}


def _piece_bytes(token: str, scheme: str) -> bytes | None:
    """The bytes a piece spells when it is made of bytes (a byte-level piece whose bytes read as text:
    :func:`byte_level_text`; a SentencePiece byte ``'<0xC3>'``), else None: the piece is text."""
    if scheme == "bytelevel" and byte_level_text(token) is not None:
        return bytes(_BYTES[c] for c in token)
    if scheme == "bpe" and (byte := _BYTE_PIECE.fullmatch(token)):
        return bytes([int(byte.group(1), 16)])
    return None


def _text_piece(token: str, i: int, scheme: str) -> str:
    if scheme == "wordpiece":
        return token[2:] if token.startswith("##") else (token if i == 0 else " " + token)
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "↵").replace("ĉ", "⇥")


def _running(tokens: Sequence[str], scheme: str) -> list[tuple[str, str]]:
    """Each token's text in running text and the character it shares with the pieces beside it ('' if none).
    The bytes of consecutive byte pieces decode together: a character split over pieces is shown on the piece that
    completes it, the pieces before add no text; a character the tokens never complete reads '�' (as decoding
    them reads), on its last piece, and is no character its pieces are part of."""
    out = [["", ""] for _ in tokens]
    pending, owners = bytearray(), []  # the bytes of a character begun, and the tokens they came from

    def close(char: str, whole: bool = False) -> None:
        out[owners[-1]][0] += char
        if whole and len(owners) > 1:
            for owner in owners:
                out[owner][1] = char
        pending.clear()
        owners.clear()

    for i, token in enumerate(tokens):
        raw = _piece_bytes(token, scheme)
        if raw is None:
            if pending:
                close(pending.decode("utf-8", errors="replace"))
            out[i][0] = _text_piece(token, i, scheme)
            continue
        if not pending and (text := _whole(raw)) is not None:  # the common case: whole characters
            out[i][0] = text
            continue
        for byte in raw:
            if pending and not 0x80 <= byte < 0xC0:  # not a continuation: the character begun is cut
                close(pending.decode("utf-8", errors="replace"))
            if pending or 0xC2 <= byte <= 0xF4:  # a continuation, or a character's first byte
                pending.append(byte)
                if not owners or owners[-1] != i:
                    owners.append(i)
                if len(pending) == (2 if pending[0] < 0xE0 else 3 if pending[0] < 0xF0 else 4):
                    close(pending.decode("utf-8", errors="replace"), whole=True)
            else:
                out[i][0] += _CONTROL.get(chr(byte), chr(byte)) if byte < 0x80 else "\ufffd"
    if pending:
        close(pending.decode("utf-8", errors="replace"))
    return [(text, joined) for text, joined in out]


def _whole(raw: bytes) -> str | None:
    """``raw`` as text when it is whole characters."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "".join(_CONTROL.get(c, c) for c in text)


def display_pieces(tokens: Sequence[str], scheme: str = "auto") -> list[str]:
    """Running text: the text each token adds when the pieces are joined, so that they read as the tokenizer
    decodes them: 'Ġthe' -> ' the', '##ing' -> 'ing', 'Ċ' -> '↵', a byte-level piece as the text its bytes spell
    ('Ã©' -> 'é'), and a character split over pieces ('Ã' '©', an emoji's four bytes) on the piece that completes it,
    the pieces before it adding '' (:func:`piece_html` draws them as a thin mark). One token alone reads as
    :func:`byte_level_text` reads it ('Ã' -> '�'). Every view draws an example's tokens from one call on the whole
    example, so a line cut from it reads as the whole does."""
    return [text for text, _ in _running(tokens, resolve_scheme(tokens, scheme))]


def pieces_and_titles(tokens: Sequence[str], scheme: str = "auto") -> tuple[list[str], list[str]]:
    """Running text (:func:`display_pieces`) and what hovering each token says, from one pass: its
    :func:`token_label`, and for a piece of a character split over pieces, that character
    (``"� (part of 'é')"``)."""
    scheme = resolve_scheme(tokens, scheme)
    running = _running(tokens, scheme)
    return ([text for text, _ in running],
            [token_label(token, scheme) + (f" (part of '{joined}')" if joined else "")
             for token, (_, joined) in zip(tokens, running)])


def piece_html(piece: str) -> str:
    """A piece of running text as HTML inside its token's span: escaped, or for a piece that adds no text (the first
    bytes of a character shown on the piece after it) a thin mark, so that the token still shows its shade and
    value."""
    return escape(piece) if piece else ('<span class="ms-part" style="display:inline-block;width:3px;height:1em;'
                                        'vertical-align:text-bottom"></span>')


# A token's whitespace as a label shows it: the byte-level BPE / SentencePiece markers and plain whitespace alike.
_MARKERS = {"Ġ": "␣", "▁": "␣", "Ċ": "↵", "ĉ": "⇥", "č": "␍"}
_WHITESPACE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def token_label(token: Any, scheme: str = "auto") -> str:
    """A token named on its own (a table cell, a list entry, a plot's tick label), the one spelling every tab uses
    (``scheme="text"``: a token added to the tokenizer as text, shown as written with its whitespace visible):
    the tokenizer's own piece with its whitespace made visible. WordPiece pieces and special tokens stay as the
    tokenizer writes them (``'##uming'``, ``'paris'``, ``'[SEP]'``, ``'<|endoftext|>'``); GPT-2's ``'Ġthe'`` and
    SentencePiece's ``'▁the'`` read ``'␣the'``, a newline ``'↵'``, a tab ``'⇥'``; other control characters by
    their byte, ``'<0x18>'``, as SentencePiece names a byte token and a cut character's bytes read (others
    unprintable as ``\\u200b``); an empty piece ``'∅'``. With ``scheme="bytelevel"`` (GPT-2's tokenizers;
    :func:`tokenizer_scheme` tells), a piece reads as the text its bytes spell (``'Ã©'`` -> ``'é'``; a character
    cut at an end as its bytes, ``'<0xC3>'``: :func:`byte_level_label`); any other scheme, ``"auto"`` included,
    keeps ``'Ã©'`` as written, since there it may be the text itself. Plain text: escape it (:func:`escape`) for
    HTML. Running text (pieces joined) is :func:`display_pieces`' job."""
    text = str(token)
    if scheme == "bytelevel":
        text = byte_level_label(text) or text
    marks = {**_WHITESPACE, **_MARKERS} if scheme in ("bpe", "auto") else _WHITESPACE
    out = "".join(marks.get(c, c if c.isprintable() else f"<0x{ord(c):02X}>" if ord(c) < 0x80 else repr(c)[1:-1])
                  for c in text)
    return out or "∅"


def escape(value: Any) -> str:
    """The one way a string from data (a token, a hook point, a feature's name, a note; in the widgets, as
    ``mistudio.widgets.common.esc``: a job id, a model or dataset name, an error, a path) reaches HTML:
    ``html.escape(str(value), quote=True)``, safe as text and inside a quoted attribute."""
    return html.escape(str(value), quote=True)


def _shade(value: float | None, scale: float) -> str:
    if value is None:  # a token with no activation row (an excluded special token)
        return "background:none"
    alpha = min(1.0, abs(value) / scale) * 0.85 if scale > 0 else 0.0
    rgb = "220,70,30" if value >= 0 else "40,100,220"
    return f"background:rgba({rgb},{alpha:.2f})"


def _tokens_html(tokens: Sequence[str], values: Sequence[float | None], peak: int | None, scale: float,
                 special: set[str], scheme: str, span: range | None = None) -> str:
    """Tokens ``span`` (all by default) of one example, each its own shaded span; the text is drawn from the whole
    example (:func:`display_pieces`), so a line cut from it reads as the whole does."""
    parts = []
    pieces, titles = pieces_and_titles(tokens, scheme)
    for i in span if span is not None else range(len(tokens)):
        value = values[i]
        style = [_shade(value, scale), "border-radius:2px", "white-space:pre"]
        cls = "ms-tok"
        if tokens[i] in special or value is None:
            style += ["opacity:0.45", "font-size:85%"]
            cls += " ms-special"
        if i == peak:
            style.append("outline:2px solid #111")
            cls += " ms-peak"
        shown = "no activation" if value is None else f"{float(value):.4g}"
        parts.append(f'<span class="{cls}" style="{";".join(style)}" '
                     f'title="{escape(titles[i])} = {shown}">{piece_html(pieces[i])}</span>')
    return "".join(parts)


def examples_html(examples: Sequence[dict], special_tokens: Sequence[str] = (), scheme: str = "auto",
                  scale: float | None = None, narrow: int = 3) -> str:
    """Examples (analysis.top_examples' dicts) as HTML: every token shaded by its activation, word pieces
    joined, special tokens dimmed, the peak token outlined, row and value shown; the summary line shows
    ``narrow`` tokens either side and ``<details>`` opens the whole context window."""
    special = set(special_tokens)
    if scale is None:
        scale = max([abs(v) for e in examples for v in e.get("context_values", []) if v is not None] + [1e-12])
    rows = []
    for e in examples:
        toks, vals = list(e["context_tokens"]), list(e["context_values"])
        peak = int(e["position"]) - int(e["context_start"])
        lo, hi = max(0, peak - narrow), min(len(toks), peak + narrow + 1)
        short = _tokens_html(toks, vals, peak, scale, special, scheme, range(lo, hi))
        full = _tokens_html(toks, vals, peak, scale, special, scheme)
        rows.append(f'<details class="ms-example"><summary><span class="ms-meta" style="color:#555;'
                    f'font-size:90%;display:inline-block;min-width:150px">row {int(e["row"]):,} · pos '
                    f'{int(e["position"])} · <b>{float(e["value"]):.3g}</b></span> {"…" if lo else ""}{short}'
                    f'{"…" if hi < len(toks) else ""}</summary><div style="margin:2px 0 6px 158px">{full}</div>'
                    "</details>")
    return "".join(rows) or "<i>no examples</i>"


def feature_view_html(view: dict, special_tokens: Sequence[str] = (), scheme: str = "auto") -> str:
    """The whole feature view (top examples, quantile samples, token means) as one HTML block."""
    top = view["top"]
    scale = max([abs(v) for e in top for v in e.get("context_values", []) if v is not None] + [1e-12])
    parts = [f'<div class="mistudio-feature-view" style="font-family:var(--jp-code-font-family,monospace);'
             f'font-size:12px;line-height:1.7"><h4 style="margin:4px 0">{escape(view["hook_point"])} · '
             f'feature {escape(view["feature"])} · top {len(top)} of {int(view["n_tokens"]):,} tokens</h4>',
             examples_html(top, special_tokens, scheme, scale)]
    for band in view.get("bands", []):
        (q0, q1), (v0, v1) = band["quantiles"], band["values"]
        parts.append(f'<h4 style="margin:8px 0 2px">Quantiles {100 * float(q0):g}–{100 * float(q1):g}% '
                     f'<small>(activation {float(v0):.3g} to {float(v1):.3g}; a random sample)</small></h4>')
        parts.append(examples_html(band["examples"], special_tokens, scheme, scale))
    means = view.get("token_means", [])
    if means:
        pieces = [token_label(m["token"], scheme) for m in means]
        cells = "".join(f"<tr><td style='white-space:pre'>{escape(p)}</td>"
                        f"<td>{float(m['mean']):.3g}</td><td>{int(m['count']):,}</td></tr>"
                        for p, m in zip(pieces, means))
        parts.append("<h4 style='margin:8px 0 2px'>Highest mean activation per token string</h4>"
                     "<table class='ms-token-means'><tr><th>token</th><th>mean</th><th>count</th></tr>"
                     f"{cells}</table>")
    parts.append("</div>")
    return "".join(parts)
