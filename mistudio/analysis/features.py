"""Feature dashboards' data: a feature's page (:mod:`.feature_page`'s schema), the feature table, features found
from a token, and the explanation note saved per feature in the store.

Everything reads a store through :mod:`.feature_view`'s seam (:func:`~.feature_view.values_at`,
:func:`~.feature_view.rows_at`, :func:`~.feature_view.columns_blocks`) and its per-feature statistics
(:func:`load_statistics`: :class:`~mistudio.storage.featstats.FeatureStatistics`, saved by the extraction or computed
once and cached in the store, then kept in memory). A page reads, beyond the statistics, only the context windows
of its examples (a few storage chunks); its token means need one pass over the feature's values the first time,
cached in the store after.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import zarr

from ..errors import InputError, StoreCorrupted, render
from ..saes import SAE, load_sae
from ..storage.featstats import BANDS, FeatureStatistics, sample_keys
from ..storage.reads import DECODE_ERRORS
from ..storage.store import open_group
from .feature_view import (LATENT_SUFFIX, Memo, display_pieces, is_latent, row_token_ids, rows_at, store_key,
                           token_label, token_means, token_means_many, tokenizer_scheme, values_at)
from .logit_effects import ENCODER_TYPES, Unembedding, logit_effects, neuron_logit_effects

if TYPE_CHECKING:
    from ..extraction import Extraction

NOTES = "analysis/notes"
NOTE_LIMIT = 20_000  # characters in one note
TABLE_COLUMNS = ("feature", "density", "mean", "mean_active", "max")
_STATISTICS = Memo(2)  # a 16k-feature state is ~150 MB
_TOKENS = Memo(4)
_UNEMBEDDINGS = Memo(2)
_SAES = Memo(4)
_VOCABULARIES = Memo(4)
_COFIRING = Memo(2)
COFIRING_BYTES = 1 << 25  # the co-firing sample of a raw hook point: at most 32 MB of flags in memory
COFIRING_ROWS = 8192      # and at most this many rows
COFIRING_LATENT_ROWS = 65536  # an SAE's latents (sparse: ~12 bytes a firing latent): at most this many rows
COFIRING_MIN = 50         # a feature's firing tokens in the sample needed to give its co-firing shares


# -- hook points ---------------------------------------------------------------------------------------------
def base_hook_point(hook_point: str) -> str:
    """The raw hook point an SAE's latents were computed from (``layers.3.residual.latents`` ->
    ``layers.3.residual``); a raw hook point is its own."""
    return hook_point[:-len(LATENT_SUFFIX)] if is_latent(hook_point) else hook_point


def feature_hook_points(ext: "Extraction") -> list[str]:
    """The hook points a feature dashboard can show: the raw ones, then the SAE latents the extraction recorded
    (``<hook point>.latents`` for each of ``params.saes``)."""
    points = list(ext.hook_points)
    saes = ext.record.params.saes or {}
    return points + [f"{hp}{LATENT_SUFFIX}" for hp in sorted(saes) if f"{hp}{LATENT_SUFFIX}" not in points]


# -- what stays in memory per store ----------------------------------------------------------------------------
def load_statistics(ext: "Extraction", hook_point: str, one_per_document: bool = False) -> FeatureStatistics:
    """The hook point's per-feature statistics (``ext.feature_statistics``; with ``one_per_document`` the top
    examples are at most one per document, a second cached pass), kept in memory per store and commit mark."""
    options = {"one_per_document": True} if one_per_document else {}
    key = (store_key(ext), hook_point, bool(one_per_document))
    return _STATISTICS.get(key, lambda: ext.feature_statistics(hook_point, **options))


def _token_arrays(ext: "Extraction") -> tuple[np.ndarray, np.ndarray]:
    """Every stored token's id (int32) and special flag, kept in memory per store."""
    def compute() -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ext.store.tokens("input_ids")[:], dtype=np.int32)
        special = ext.special_flags()
        return ids, special

    return _TOKENS.get(store_key(ext)[:2], compute)


def _check_feature(d: int, hook_point: str, feature: Any) -> int:
    if isinstance(feature, (bool, np.bool_)) or not isinstance(feature, (int, np.integer)) or not 0 <= feature < d:
        raise InputError(f"«feature={feature!r}» is not a feature of {hook_point}: it has {d:,} features (0 to "
                         f"{d - 1}): «pass feature={d - 1}» or less")
    return int(feature)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"«{name}={value!r}» is not valid: «pass {name}={low}» or more (a whole number)")
    return int(value)


# -- notes ---------------------------------------------------------------------------------------------------
def _notes_group(ext: "Extraction", hook_point: str, mode: str) -> zarr.Group:
    """The group whose attributes hold ``hook_point``'s notes (Zarr v3: only its ``zarr.json`` is read, through the
    store's guard: a FIFO there is refused, never read)."""
    return open_group(ext.location, ext.store.storage_options, mode, f"{NOTES}/{hook_point}", zarr_format=3)


def notes_file(ext: "Extraction", hook_point: str) -> str:
    """Where ``hook_point``'s feature notes are saved: ``<store>/analysis/notes/<hook point>/zarr.json``."""
    return f"{ext.location.rstrip('/')}/{NOTES}/{hook_point}/zarr.json"


def _unreadable_notes(ext: "Extraction", hook_point: str, exc: Exception) -> InputError:
    """The error of a notes file that is there but cannot be read (a FIFO, a link out of the store, garbage)."""
    if isinstance(exc, StoreCorrupted) and exc.what:
        why = exc.what.removeprefix("its metadata ").removeprefix("its group metadata ")
    else:
        why = f"is not a notes file mistudio wrote ({type(exc).__name__}: {exc})"
    return InputError(f"the feature notes of {hook_point} in extraction {ext.id} cannot be read: their file "
                      f"{notes_file(ext, hook_point)} {why}. Remove that file (or put back a copy of it) to read and "
                      f"save notes of {hook_point} again; the extraction's activations are not affected")


def notes(ext: "Extraction", hook_point: str) -> dict[int, str]:
    """Every explanation note saved for ``hook_point``'s features: {feature: text} ({} when none was saved). A
    notes file that is there but cannot be read raises ``InputError`` naming it and the fix."""
    try:
        attrs = dict(_notes_group(ext, hook_point, "r").attrs)
    except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError):
        return {}  # no note saved yet
    except (StoreCorrupted, *DECODE_ERRORS) as exc:
        if isinstance(exc, StoreCorrupted) and exc.file not in (None, notes_file(ext, hook_point)):
            raise  # the store's own metadata, not the notes
        raise _unreadable_notes(ext, hook_point, exc) from exc
    return {int(k): str(v) for k, v in attrs.items() if k.isdigit() and isinstance(v, str)}


def get_note(ext: "Extraction", hook_point: str, feature: int) -> str:
    """The note saved for one feature ("" when none)."""
    return notes(ext, hook_point).get(int(feature), "")


def set_note(ext: "Extraction", hook_point: str, feature: int, text: str) -> None:
    """Save ``text`` as the explanation note of ``feature``, in the store under ``analysis/notes/<hook point>``
    (kept across resumes; an empty text deletes the note). Notes are shown escaped."""
    if hook_point not in feature_hook_points(ext):
        raise InputError(f"hook point {hook_point!r} is not in extraction {ext.id}: it has "
                         f"{feature_hook_points(ext)}")
    if not isinstance(text, str):
        raise InputError(f"«note={type(text).__name__}» is not text: «pass note=» a string")
    if len(text) > NOTE_LIMIT:
        raise InputError(f"the note is {len(text):,} characters long: keep it under {NOTE_LIMIT:,}")
    feature = _check_int("feature", feature, 0)
    notes(ext, hook_point)  # a notes file there that cannot be read is named, never replaced
    try:
        group = _notes_group(ext, hook_point, "a")
        saved = {k: v for k, v in dict(group.attrs).items() if k != str(feature)}
        if text.strip():
            saved[str(feature)] = text
        group.attrs.put(saved)
    except (StoreCorrupted, *DECODE_ERRORS) as exc:  # the file went bad since it was read
        raise _unreadable_notes(ext, hook_point, exc) from exc
    except (OSError, PermissionError) as exc:
        raise InputError(f"cannot save the note in {ext.location}: {exc}. Notes are written into the store, which "
                         "must be writable") from exc


# -- examples --------------------------------------------------------------------------------------------------
def examples(ext: "Extraction", hook_point: str, feature: int, rows: Sequence[int], values: Sequence[float],
             context: int = 8) -> list[dict]:
    """Examples in the page schema (:mod:`.feature_page`) for activation ``rows`` with their ``values``: each
    with its sample, dataset row, position and ``context`` tokens either side (within its sample), the feature's
    value at each of them (None where a token has no activation row) and their special flags. The context
    values are read in one go (:func:`~.feature_view.values_at`)."""
    context = _check_int("context", context, 0)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if not len(rows):
        return []
    ids, special = _token_arrays(ext)
    offsets, row_offsets = np.asarray(ext.sample_offsets), np.asarray(ext.activation_offsets)
    sample_index = np.asarray(ext.sample_index)
    tokens = np.asarray(ext.token_index(rows), dtype=np.int64).reshape(-1)
    samples = np.searchsorted(offsets, tokens, side="right") - 1
    windows, wanted = [], []
    for token, s in zip(tokens, samples):
        start, stop = int(offsets[s]), int(offsets[s + 1])
        lo, hi = max(start, int(token) - context), min(stop, int(token) + context + 1)
        a_start, a_stop = int(row_offsets[s]), int(row_offsets[s + 1])
        if a_stop - a_start == stop - start:  # a row per token
            token_rows = a_start + np.arange(lo - start, hi - start)
        else:  # special tokens have no row: a kept token's row counts the kept tokens before it in its sample
            kept = ~special[start:stop]
            before = np.cumsum(kept) - kept
            token_rows = np.where(kept[lo - start:hi - start], a_start + before[lo - start:hi - start], -1)
        windows.append((start, lo, hi, token_rows))
        wanted.append(token_rows[token_rows >= 0])
    found = values_at(ext, hook_point, feature, np.concatenate(wanted)) if wanted else np.zeros(0)
    tokenizer = ext.tokenizer
    out, at = [], 0
    for (start, lo, hi, token_rows), row, value, token, s in zip(windows, rows, values, tokens, samples):
        has = token_rows >= 0
        window_values: list[float | None] = [None] * (hi - lo)
        for i, v in zip(np.flatnonzero(has), found[at:at + int(has.sum())]):
            window_values[int(i)] = float(v)
        at += int(has.sum())
        out.append({"value": float(value), "row": int(row), "sample": int(s), "dataset_row": int(sample_index[s]),
                    "position": int(token) - start, "context_start": lo - start,
                    "tokens": [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids[lo:hi]])],
                    "values": window_values, "special": [bool(x) for x in special[lo:hi]],
                    "peak": int(token) - lo})
    return out


# -- logit effects ---------------------------------------------------------------------------------------------
def unembedding(ext: "Extraction") -> Unembedding:
    """The final norm and unembedding of the model the extraction was made with (loaded once per model; an
    encoder, or a model without an LM head, raises InputError saying why)."""
    model = ext.record.model
    if model.model_type in ENCODER_TYPES:
        raise InputError(f"{model.name_or_path} is an encoder (model type {model.model_type!r}): it has no "
                         "next-token unembedding, so there are no logit effects")

    def compute() -> Unembedding | InputError:
        try:
            return Unembedding.from_model(model.name_or_path)
        except InputError as exc:  # remembered: the next page does not load the model again to fail again
            return exc

    found = _UNEMBEDDINGS.get(model.name_or_path, compute)
    if isinstance(found, InputError):
        raise found
    return found


def sae_for(ext: "Extraction", hook_point: str) -> SAE:
    """The SAE whose latents ``hook_point`` (``<hook point>.latents``) names, from the folder the extraction
    recorded (``params.saes``), loaded once."""
    base = base_hook_point(hook_point)
    folder = (ext.record.params.saes or {}).get(base)
    if folder is None:
        raise InputError(f"extraction {ext.id} applied no SAE at {base}: its SAEs are "
                         f"{sorted(ext.record.params.saes or {})}")
    return _SAES.get(str(folder), lambda: load_sae(folder))


def feature_logits(ext: "Extraction", hook_point: str, feature: int, k: int = 10,
                   sae: SAE | None = None) -> dict:
    """The tokens the feature's direction promotes and suppresses (:mod:`.logit_effects`): a raw neuron's unit
    vector, or an SAE latent's decoder row (``sae``, else the extraction's). InputError for encoders and for
    hook points whose width is not the model's."""
    unemb = unembedding(ext)
    if is_latent(hook_point):
        sae = sae if sae is not None else sae_for(ext, hook_point)
        feature = _check_feature(sae.d_sae, hook_point, feature)
        return logit_effects(sae.W_dec[feature].detach().float(), unemb, k=k)
    d = int(ext.activations(hook_point).shape[1])
    if d != unemb.d_model:
        raise InputError(f"{hook_point} has {d} features but the residual stream has {unemb.d_model}: a neuron "
                         "there has no direction in the residual stream")
    return neuron_logit_effects([_check_feature(d, hook_point, feature)], unemb, k=k)[0]


# -- co-firing -----------------------------------------------------------------------------------------------
def cofiring_sample(ext: "Extraction", hook_point: str):
    """Where each feature fires on a sample of a hook point's rows: whole storage chunks, chosen by
    :func:`~mistudio.storage.featstats.sample_keys` of their index (so spread over the store, and the same every
    time); every row of a smaller store. A raw hook point's: ``(rows, d)`` bool (value > 0), up to
    :data:`COFIRING_ROWS` rows and :data:`COFIRING_BYTES` flags. An SAE's latents: a ``(rows, d_sae)`` bool
    ``scipy.sparse`` CSR matrix of the stored latents, up to :data:`COFIRING_LATENT_ROWS` rows. Read once per store
    and commit mark."""
    def compute():
        from scipy import sparse

        latent = is_latent(hook_point)
        arr = ext.latent_arrays(hook_point)[0] if latent else ext.activations(hook_point)
        d = ext.latent_info(hook_point).d_sae if latent else int(arr.shape[1])
        unit, mark = int(arr.chunks[0]), int(ext.committed_tokens())
        target = _cofiring_rows(ext, hook_point, mark)
        chunks = np.arange(-(-mark // unit))
        parts, n = [], 0
        for c in chunks[np.argsort(sample_keys(chunks, 1), kind="stable")]:
            lo = int(c) * unit
            hi = min(lo + unit, mark, lo + target - n)
            parts.append(sparse.csr_matrix(ext.latents(hook_point, slice(lo, hi)) > 0) if latent
                         else np.asarray(arr[lo:hi]) > 0)
            n += hi - lo
            if n >= target:
                break
        if latent:
            return sparse.vstack(parts, format="csr") if parts else sparse.csr_matrix((0, d), dtype=bool)
        return np.concatenate(parts) if parts else np.zeros((0, d), bool)

    return _COFIRING.get((*store_key(ext), hook_point), compute)


def _cofiring_rows(ext: "Extraction", hook_point: str, mark: int) -> int:
    """Rows in :func:`cofiring_sample` of a hook point with ``mark`` committed rows."""
    if is_latent(hook_point):
        return max(1, min(COFIRING_LATENT_ROWS, COFIRING_BYTES // (12 * ext.latent_info(hook_point).width), mark))
    return max(1, min(COFIRING_ROWS, COFIRING_BYTES // int(ext.activations(hook_point).shape[1]), mark))


def cofiring(ext: "Extraction", hook_point: str, stats: FeatureStatistics, feature: int, n: int = 10,
             sample: bool = True) -> tuple[list[dict], dict]:
    """The ``n`` features firing most often with ``feature``: ``([{"feature", "count", "fraction", "density"}],
    basis)``; ``fraction`` is the share of the feature's firing tokens where the other also fires, ``density``
    the other's share of all tokens (what ``fraction`` is when the two are unrelated).

    ``basis["kind"]``: ``"sample"`` for a hook point whose tokens fire on more features than the statistics pair
    up per token (``per_token``: each token's most active firing features; raw neurons of the residual stream fire
    by the hundred, a top-k SAE's latents by k), or for a feature whose counts the statistics cut short (it fired
    with more others than they keep counters for: ``co_error``), counted exactly on :func:`cofiring_sample`
    (``basis["tokens"]`` of the feature's firing tokens among ``basis["rows"]`` sampled rows, at least
    :data:`COFIRING_MIN`); else ``"top"``: the statistics' co-occurrence counts, which count a pair only when both
    are among the token's ``per_token`` most active firing features, each low by at most ``basis["error"]`` when
    that is there. The sample is read (once per store) only for a feature expected to fire on enough of its rows,
    and not at all with ``sample=False``."""
    per_token = int(stats.cooccurrence_per_token)
    density, error = stats.density, int(stats.co_error[feature])
    if sample and (float(density.sum()) > per_token or error) and \
            density[feature] * _cofiring_rows(ext, hook_point, int(ext.committed_tokens())) >= COFIRING_MIN:
        fires = cofiring_sample(ext, hook_point)
        mine = fires[:, [feature]].toarray().ravel() if is_latent(hook_point) else fires[:, feature]
        count = int(mine.sum())
        if count >= COFIRING_MIN:
            together = np.asarray(fires[mine].sum(axis=0, dtype=np.int64)).ravel()
            together[feature] = -1
            order = np.lexsort((np.arange(len(together)), -together))[:n]
            return ([{"feature": int(g), "count": int(together[g]), "fraction": float(together[g]) / count,
                      "density": float(density[g])} for g in order if together[g] > 0],
                    {"kind": "sample", "tokens": count, "rows": int(fires.shape[0]), "per_token": per_token})
    fire_count = int(stats.fire_count[feature])
    return ([{"feature": g, "count": c, "fraction": c / fire_count if fire_count else 0.0,
              "density": float(density[g])} for g, c in stats.cooccurring(feature, n)],
            {"kind": "top", "tokens": fire_count, "rows": int(stats.n_tokens), "per_token": per_token,
             **({"error": error} if error else {})})


# -- the page ------------------------------------------------------------------------------------------------
def _histogram(stats: FeatureStatistics, feature: int) -> dict:
    """The feature's signed log-binned histogram with the open under/overflow ends as ±inf edges, and the smallest
    sampled firing value (``floor``: where the lowest firing bin's values start, as the quantiles read it)."""
    edges = [-math.inf] + [float(e) for e in stats.edges] + [math.inf]
    return {"edges": edges, "counts": [int(c) for c in stats.hist[feature]], "floor": stats.firing_floor(feature)}


def _float(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def feature_page(ext: "Extraction", hook_point: str, feature: int, *, k: int = 20, context: int = 8,
                 one_per_document: bool = False, bands: Sequence[tuple[float, float]] = BANDS, per_band: int = 3,
                 n_token_means: int = 15, min_count: int = 2, n_logits: int = 10, n_correlated: int = 10,
                 logits: bool = True, statistics: FeatureStatistics | None = None) -> dict:
    """One feature's page (the schema of :mod:`.feature_page`; render it with ``feature_page_html``).

    From the statistics: density, mean, max, histogram, top examples (``k`` at most the statistics' k; with
    ``one_per_document`` at most one per document), ``per_band`` examples from each quantile band of ``bands``,
    the ``n_correlated`` features firing with it most often (:func:`cofiring`: counted exactly on a sample of
    rows for a raw hook point's dense features, else among each token's most active firing features, as
    ``correlated_basis`` says). Read for it: the examples' context windows (``context`` tokens either side), the
    ``n_token_means`` highest mean activations per token seen at least ``min_count`` times (one pass over the
    feature the first time, cached in the store; ``n_token_means=0`` leaves them out), and the note. ``logits``:
    the ``n_logits`` tokens the feature promotes and suppresses for a decoder model (``None`` for an encoder,
    with the reason in ``logits_note``). ``statistics`` replaces the store's statistics (benchmarks, or
    statistics computed elsewhere); the co-firing shares then come from them alone."""
    stats = statistics if statistics is not None else load_statistics(ext, hook_point, one_per_document)
    feature = _check_feature(stats.d, hook_point, feature)
    k, context = _check_int("k", k, 1), _check_int("context", context, 0)
    n_token_means, min_count = _check_int("n_token_means", n_token_means, 0), _check_int("min_count", min_count, 1)
    stored = stats.sample_rows.shape[2]
    drawn = stats.quantile_examples(feature, bands, min(_check_int("per_band", per_band, 1), stored)) \
        if stored and per_band else []
    groups = [(stats.top_rows(feature)[:k], stats.top_values(feature)[:k])] + \
        [(band["rows"], band["activations"]) for band in drawn]
    described = examples(ext, hook_point, feature, np.concatenate([r for r, _ in groups]),  # one read for all
                         np.concatenate([v for _, v in groups]), context)
    starts = np.cumsum([0] + [len(r) for r, _ in groups])
    top, *in_bands = [described[a:b] for a, b in zip(starts[:-1], starts[1:])]
    out_bands = [{"quantiles": [float(q) for q in band["quantiles"]], "values": [_float(v) for v in band["values"]],
                  "examples": part} for band, part in zip(drawn, in_bands)]
    means = token_means(ext, hook_point, feature, n=n_token_means, min_count=min_count) if n_token_means else []
    logit_table, logits_note = None, None
    if logits:
        try:
            logit_table = feature_logits(ext, hook_point, feature, k=n_logits)
        except InputError as exc:
            logits_note = str(exc)
    else:
        logits_note = "not computed (logits=False)"
    fire_count = int(stats.fire_count[feature])
    correlated, basis = cofiring(ext, hook_point, stats, feature, n_correlated, sample=statistics is None) \
        if n_correlated else ([], None)
    return {"extraction": ext.id, "hook_point": hook_point, "feature": feature,
            "kind": "latent" if is_latent(hook_point) else "neuron", "d": int(stats.d),
            "n_tokens": int(stats.n_tokens), "fire_count": fire_count, "density": float(stats.density[feature]),
            "mean": float(stats.mean[feature]), "mean_active": float(stats.fire_mean[feature]),
            "max": _float(stats.max[feature]) if stats.n_tokens else None, "histogram": _histogram(stats, feature),
            "top": top, "bands": out_bands, "token_means": means, "min_count": min_count, "logits": logit_table,
            "logits_note": logits_note, "correlated": correlated, "correlated_basis": basis,
            "note": get_note(ext, hook_point, feature),
            "prev": feature - 1 if feature > 0 else None, "next": feature + 1 if feature + 1 < stats.d else None,
            "one_per_document": bool(one_per_document), "scheme": tokenizer_scheme(ext.tokenizer),
            "n_layers": ext.record.model.n_layers, "caveats": page_caveats(ext, hook_point),
            "dropped_latents": dropped_latents_of(ext, hook_point)}


def dropped_latents_of(ext: "Extraction", hook_point: str) -> int:
    """Firing latents of ``<hp>.latents`` the store left out for want of width (0 for raw hook points)."""
    stats = ext.record.latent_statistics.get(base_hook_point(hook_point)) if is_latent(hook_point) else None
    return int(stats.dropped) if stats is not None else 0


def page_caveats(ext: "Extraction", hook_point: str) -> list[str]:
    """What the store's warnings say about ``hook_point`` (latents dropped for want of width, values past the
    storage dtype's range: :meth:`Extraction.range_warnings`, :meth:`Extraction.latent_warnings`), worded for
    Python, for the page to show."""
    lines = ext.range_warnings() + ext.latent_warnings()
    return [render(line) for line in lines if line.startswith(f"{hook_point}:")]


# -- the feature table -----------------------------------------------------------------------------------------
class FeatureTable:
    """Every feature of a hook point as table rows, sorted and filtered in numpy (100k features in milliseconds),
    read a page at a time: ``arrange(...)`` then ``page(i, size)``. Only the statistics are read, plus the token
    ids of the shown features' top examples."""

    def __init__(self, ext: "Extraction", hook_point: str, statistics: FeatureStatistics | None = None):
        self.ext, self.hook_point = ext, hook_point
        self.stats = statistics if statistics is not None else load_statistics(ext, hook_point)
        self.order = np.arange(self.stats.d)
        self.sort, self.descending, self.density_range, self.noted_only = "feature", False, (0.0, 1.0), False

    def column(self, name: str) -> np.ndarray:
        if name not in TABLE_COLUMNS:
            raise InputError(f"«sort={name!r}» is not a column: sort by one of {TABLE_COLUMNS}")
        s = self.stats
        return {"feature": lambda: np.arange(s.d), "density": lambda: s.density, "mean": lambda: s.mean,
                "mean_active": lambda: s.fire_mean, "max": lambda: s.max}[name]()

    def arrange(self, sort: str = "density", descending: bool = True, density_range: tuple[float, float] = (0.0, 1.0),
                noted_only: bool = False) -> int:
        """Sort by ``sort`` (one of :data:`TABLE_COLUMNS`; ties by feature), keep the features whose density
        (fraction of tokens where they fire) is within ``density_range`` (inclusive), and with ``noted_only``
        only those with a note. Returns how many features are listed."""
        lo, hi = (float(x) for x in density_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise InputError(f"«density_range=({lo:g}, {hi:g})» is not a range of fractions: «pass "
                             "density_range=(low, high)» with 0 <= low <= high <= 1")
        key = np.nan_to_num(np.asarray(self.column(sort), np.float64), nan=-np.inf)
        ids = np.arange(self.stats.d)
        order = np.lexsort((ids, -key)) if descending else np.lexsort((ids, key))
        density = self.stats.density[order]
        order = order[(density >= lo) & (density <= hi)]
        if noted_only:
            noted = np.fromiter(notes(self.ext, self.hook_point), np.int64)
            order = order[np.isin(order, noted)]
        self.order, self.sort, self.descending = order, sort, bool(descending)
        self.density_range, self.noted_only = (lo, hi), bool(noted_only)
        return len(order)

    def __len__(self) -> int:
        return len(self.order)

    def n_pages(self, size: int) -> int:
        return max(1, -(-len(self.order) // size))

    def page(self, index: int, size: int = 50, n_tokens: int = 3) -> list[dict]:
        """Rows ``index * size`` to ``(index + 1) * size`` of the arranged table: ``feature``, ``density``,
        ``fire_count``, ``mean``, ``mean_active``, ``max``, ``top_tokens`` (the distinct tokens of the top
        examples, as text, at most ``n_tokens``), ``top_token_ids`` and ``top_token_labels`` (their ids, and
        names as every tab spells a token: :func:`token_labels`) and ``note`` (whether one is saved)."""
        chosen = self.order[index * size:(index + 1) * size]
        s = self.stats
        top_rows = s.topk_rows[chosen][:, :max(8, n_tokens)] if len(chosen) else np.zeros((0, 0), np.int64)
        row_ids = row_token_ids(self.ext)
        usable = (top_rows >= 0) & (top_rows < len(row_ids))
        ids = np.where(usable, row_ids[np.where(usable, top_rows, 0)], -1) if len(row_ids) else \
            np.full(top_rows.shape, -1)
        vocab, labels = token_texts(self.ext), token_labels(self.ext)
        noted = notes(self.ext, self.hook_point)
        rows = []
        for f, feature_ids in zip(chosen, ids):
            shown: list[str] = []
            shown_ids: list[int] = []
            for i in feature_ids:
                text = vocab[int(i)] if 0 <= i < len(vocab) else None
                if text is not None and text not in shown:
                    shown.append(text)
                    shown_ids.append(int(i))
                if len(shown) == n_tokens:
                    break
            rows.append({"feature": int(f), "density": float(s.density[f]), "fire_count": int(s.fire_count[f]),
                         "mean": float(s.mean[f]), "mean_active": float(s.fire_mean[f]), "max": float(s.max[f]),
                         "top_tokens": shown, "top_token_ids": shown_ids,
                         "top_token_labels": [labels[i] for i in shown_ids], "note": int(f) in noted})
        return rows


# -- from a token to features ----------------------------------------------------------------------------------
def token_texts(ext: "Extraction") -> list[str]:
    """Each token id's text as it reads in running text, whatever precedes it: a word-initial piece with its
    leading space (GPT-2's ``'ĠParis'`` and BERT's ``'paris'`` both read ``' paris'``-like), a continuation without
    (``'##ing'`` reads ``'ing'``); kept in memory per model."""
    tokenizer = ext.tokenizer

    def compute() -> list[str]:
        names = [str(n) for n in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
        scheme = tokenizer_scheme(tokenizer)
        if scheme == "wordpiece":
            special = set(getattr(tokenizer, "all_special_tokens", []) or [])
            return [n[2:] if n.startswith("##") else (n if n in special else " " + n) for n in names]
        added = _added_tokens(tokenizer)  # text as written, not pieces
        return [n if n in added else display_pieces([n], scheme)[0] for n in names]

    return _VOCABULARIES.get(("texts", *_vocabulary_key(ext, tokenizer)), compute)


def token_labels(ext: "Extraction") -> list[str]:
    """Each token id named as every tab names a token (:func:`~.feature_view.token_label`: the tokenizer's piece,
    whitespace visible: ``'##uming'``, ``'␣the'``, ``'[SEP]'``); kept in memory per model."""
    tokenizer = ext.tokenizer

    def compute() -> list[str]:
        scheme, added = tokenizer_scheme(tokenizer), _added_tokens(tokenizer)
        return [token_label(n, "text" if n in added else scheme)
                for n in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]

    return _VOCABULARIES.get(("labels", *_vocabulary_key(ext, tokenizer)), compute)


def _vocabulary_key(ext: "Extraction", tokenizer) -> tuple:
    """What tells one vocabulary from another, cheaply: the digest of the tokenizer files the store recorded, its
    size (tokens added since make a new one) and a sample of its pieces (a tokenizer assigned to ``ext.tokenizer``,
    or another of the same size under the same folder, has others)."""
    n = len(tokenizer)
    probe = sorted({*range(0, n, max(1, n // 97)), *range(max(0, n - 8), n)})
    model = ext.record.model
    return ((model.fingerprint or {}).get("tokenizer"), model.name_or_path, model.revision, n,
            tuple(tokenizer.convert_ids_to_tokens(probe)))


def _added_tokens(tokenizer) -> set[str]:
    """The tokens added to a tokenizer as text (``tok.add_tokens``), not learned pieces."""
    try:
        return set(tokenizer.get_added_vocab())
    except (AttributeError, NotImplementedError):
        return set()


def match_tokens(ext: "Extraction", text: str) -> list[int]:
    """The token ids a typed token means (:func:`token_texts`): with a leading space (``' Paris'``) exactly the
    word-initial token(s) with that text; without (``'Paris'``), every token that reads ``Paris`` with or without
    its space; for a WordPiece tokenizer, ``'##ing'`` (its own spelling, as the Browse tab shows it) the
    continuation piece alone; when none does, the same ignoring case. A token as the tabs name it
    (:func:`~.feature_view.token_label`: ``'␣Paris'``, ``'↵'``, a byte of a cut character ``'<0xE6>'``) reads as
    its text, or is that token."""
    if isinstance(text, str) and "<0x" in text.lower():  # a label naming bytes: the piece(s) of that name
        spelled = re.sub(r"<0x([0-9a-f]{2})>", lambda m: f"<0x{m[1].upper()}>", text.replace(" ", "␣"), flags=re.I)
        named = [i for i, label in enumerate(token_labels(ext)) if label == spelled]
        if named:
            return named
    if not isinstance(text, str) or not text.strip():  # typed blank; '␣', '↵', '⇥' (the tabs' labels) name some
        raise InputError(f"«token={text!r}» names no token: «pass token=» the token's text, e.g. ' Paris'")
    text = text.replace("␣", " ").replace("\n", "↵").replace("\t", "⇥")  # as token_texts reads them
    vocab = token_texts(ext)
    if text.startswith("##") and len(text.strip()) > 2 and tokenizer_scheme(ext.tokenizer) == "wordpiece":
        names = [str(n) for n in ext.tokenizer.convert_ids_to_tokens(list(range(len(vocab))))]
        found = [i for i, n in enumerate(names) if n == text]
        return found or [i for i, n in enumerate(names) if n.startswith("##") and n.casefold() == text.casefold()]
    if text[0].isspace():
        found = [i for i, t in enumerate(vocab) if t == text]
    else:
        found = [i for i, t in enumerate(vocab) if t.strip() == text.strip()]
    if not found and text.strip():
        loose = text.strip().casefold()
        found = [i for i, t in enumerate(vocab) if t.strip().casefold() == loose]
    return found


def _pieces(ext: "Extraction", text: str) -> list[int]:
    """The ids of the pieces the tokenizer splits ``text`` into, when it is more than one."""
    try:
        ids = ext.tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - a hint only: a tokenizer that cannot read it gives none
        return []
    return [int(i) for i in ids] if len(ids) > 1 else []


def features_for_token(ext: "Extraction", hook_point: str, text: str, n: int = 20, max_rows: int = 256,
                       seed: int = 0, statistics: FeatureStatistics | None = None) -> dict:
    """The features that fire most on a token: the activation rows whose token is ``text``
    (:func:`match_tokens`), at most ``max_rows`` of them (a uniform sample, by
    :func:`~mistudio.storage.featstats.sample_keys`), read and averaged per feature; the ``n`` highest means.

    Returns ``{"query", "token_ids", "tokens", "n_rows" (all rows with that token), "n_read", "features":
    [{"feature", "mean", "fire_fraction", "density"}, ...], "pieces"}`` (``fire_fraction``: share of the read rows
    where the feature is > 0; ``density``: its share over the store, when the statistics are in memory or given;
    ``pieces``: when no token reads ``text`` but the tokenizer splits it (a rare word, a character held only as
    bytes), the ids of the pieces it reads as, to find by one of them; else ``[]``)."""
    n, max_rows = _check_int("n", n, 1), _check_int("max_rows", max_rows, 1)
    ids = match_tokens(ext, text)
    vocab = token_texts(ext)
    result = {"query": text, "token_ids": ids, "tokens": [vocab[i] for i in ids], "n_rows": 0, "n_read": 0,
              "features": [], "pieces": [] if ids else _pieces(ext, text)}
    if not ids:
        return result
    rows = np.flatnonzero(np.isin(row_token_ids(ext), np.asarray(ids, np.int32)))
    result["n_rows"] = int(len(rows))
    if len(rows) > max_rows:
        rows = np.sort(rows[np.argsort(sample_keys(rows, seed), kind="stable")[:max_rows]])
    if not len(rows):
        return result
    values = rows_at(ext, hook_point, rows)
    means = values.mean(axis=0, dtype=np.float64)
    fires = (values > 0).mean(axis=0)
    order = np.lexsort((np.arange(len(means)), -np.nan_to_num(means, nan=-np.inf)))[:n]
    density = statistics.density if statistics is not None else None
    result.update(n_read=int(len(rows)), features=[
        {"feature": int(f), "mean": float(means[f]), "fire_fraction": float(fires[f]),
         "density": float(density[f]) if density is not None else None} for f in order])
    return result


def parse_features(text: str, d: int) -> list[int]:
    """Feature numbers typed as ``"3, 17, 40-45"`` (ranges inclusive), each in ``0..d-1``, in the order given,
    without repeats."""
    out: list[int] = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        match = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if not match:
            raise InputError(f"«features={part!r}» is not a feature number or range: «pass features=» e.g. "
                             "'3, 17, 40-45'")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if lo > hi or hi >= d:
            raise InputError(f"«features={part!r}» is outside 0..{d - 1} (or a backwards range): «pass features=» "
                             f"numbers from 0 to {d - 1}")
        out += [f for f in range(lo, hi + 1) if f not in out]
    if not out:
        raise InputError("«features=''» names no feature: «pass features=» e.g. '3, 17, 40-45'")
    return out


def export_pages(ext: "Extraction", hook_point: str, features: Sequence[int], **options: Any) -> Iterator[dict]:
    """The pages of ``features`` (``options`` as :func:`feature_page`'s), in order and without repeats, one at a
    time (for the exports); every feature is checked first, as :func:`feature_page` checks one. Their token means
    are computed first, in shared passes over the store (:func:`~.feature_view.token_means_many`: one pass serves
    many raw neurons)."""
    d = load_statistics(ext, hook_point).d
    chosen = list(dict.fromkeys(_check_feature(d, hook_point, f) for f in features))  # checked, without repeats
    n, min_count = options.get("n_token_means", 15), options.get("min_count", 2)
    if n:
        token_means_many(ext, hook_point, chosen, n=n, min_count=min_count)
    for f in chosen:
        yield feature_page(ext, hook_point, f, **options)


def drop_cached() -> None:
    """Forget what is kept in memory (statistics, token arrays, unembeddings, SAEs, co-firing samples); the store
    caches stay."""
    for memo in (_STATISTICS, _TOKENS, _UNEMBEDDINGS, _SAES, _VOCABULARIES, _COFIRING):
        memo.clear()
