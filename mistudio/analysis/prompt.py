"""From text to features: run the model an extraction was made with (and its SAE, for latents) live on a prompt,
and list each token's most active features.

The model is loaded as the extraction loaded it (its stored request: model, revision, dtype, device, placement)
and kept for the next prompt; the prompt is tokenized the way the dataset was (``add_special_tokens``, cut at
``max_length``) and captured with the extraction's own forward (:func:`mistudio.engine.forward_batches`), so a
token's values are those the store would hold for the same text.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data import special_ids
from ..engine import check_ids, forward_batches
from ..errors import InputError
from ..fingerprints import check_same_model, fingerprint
from ..models import LoadedModel, load_model
from ..request import Request
from ..saes import SAE, check_applies
from .feature_view import Memo, is_latent
from .features import base_hook_point, feature_hook_points, sae_for

if TYPE_CHECKING:
    from ..extraction import Extraction

_MODELS = Memo(1)  # a model is large: the last one used is kept
_FORWARD = threading.Lock()  # one forward at a time on a cached model (forward hooks are per model)
MAX_TOP = 64


def prompt_request(ext: "Extraction", hook_point: str) -> Request:
    """The extraction's stored request, capturing only ``hook_point`` (the raw one under latents), one sequence,
    float32, no windows, every token kept."""
    if hook_point not in feature_hook_points(ext):
        raise InputError(f"hook point {hook_point!r} is not in extraction {ext.id}: it has {feature_hook_points(ext)}")
    _, layer, kind = base_hook_point(hook_point).split(".")
    stored = ext.record.request(dataset="sample", saes=None)
    return stored.replace(layers=[int(layer)], hooks=[kind], batch_size=1, max_batch_tokens=None,
                          micro_batch_size=None, window=None, stride=None, exclude_special=False, dtype="float32",
                          chat_template=None)


def prompt_model(ext: "Extraction", hook_point: str) -> tuple[LoadedModel, Request]:
    """The loaded model for prompts on ``ext`` (loaded on first use, then kept) and the prompt request."""
    request = prompt_request(ext, hook_point)
    spec = request.model_spec
    current = fingerprint(spec)  # the model of the store, or a clear error: never another model's features
    check_same_model(spec.name_or_path, ext.record.model.fingerprint, current,
                     "a prompt's features would come from another model than the stored ones: put the original "
                     "files back, or extract again with this model")
    key = (spec.model_dump_json(), None if current is None else current["weights"])
    return _MODELS.get(key, lambda: load_model(spec)), request


def prompt_features(ext: "Extraction", hook_point: str, text: str, k: int = 5, sae: SAE | None = None) -> dict:
    """Each token of ``text`` with its ``k`` most active features at ``hook_point`` (raw neurons, or an SAE's
    latents for ``<hook point>.latents``: ``sae``, else the one the extraction recorded).

    Returns ``{"text", "hook_point", "token_ids", "tokens" (the tokenizer's pieces), "special" (bool per token),
    "values" ((n_tokens, d) float32 numpy array), "top" ([[{"feature", "value"}, ...] per token, largest first]),
    "n_cut" (tokens past ``max_length`` left out)}``."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("«prompt=''» is empty: «pass prompt=» some text to run the model on")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_TOP:
        raise InputError(f"«k={k!r}» is not valid: «pass k=» a whole number from 1 to {MAX_TOP}")
    loaded, request = prompt_model(ext, hook_point)
    tokenizer = loaded.tokenizer
    whole = tokenizer([text], add_special_tokens=request.add_special_tokens, verbose=False)["input_ids"][0]
    ids = np.asarray(tokenizer([text], add_special_tokens=request.add_special_tokens, truncation=True,
                               max_length=request.max_length, verbose=False)["input_ids"][0], dtype=np.int64)
    if not len(ids):
        raise InputError(f"«prompt={text[:40]!r}» gives no tokens: type some words")
    check_ids(ids, loaded)
    base = base_hook_point(hook_point)
    with _FORWARD:
        batches = forward_batches(loaded, ids, np.array([0, len(ids)]), request, 0, 1)
        try:
            _, _, rows, _ = next(batches)
        finally:
            batches.close()  # removes the forward hooks now, not when the generator is collected
    values = np.asarray(rows[f"activations/{base}"], dtype=np.float32)
    if is_latent(hook_point):
        sae = sae if sae is not None else sae_for(ext, hook_point)
        check_applies(sae, base, values.shape[1])
        with torch.no_grad():
            latents = sae.encode(torch.from_numpy(values).to(device=sae.device, dtype=sae.dtype))
        values = latents.float().cpu().numpy()
    return {"text": text, "hook_point": hook_point, "token_ids": [int(i) for i in ids],
            "tokens": [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])],
            "special": np.isin(np.asarray(ids, dtype=np.int64), special_ids(tokenizer)).tolist(), "values": values,
            "top": top_features(values, k), "n_cut": len(whole) - len(ids)}


def top_features(values: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
    """Per row of ``values`` (tokens × features), its ``k`` largest features, largest first (ties: lower feature)."""
    k = min(k, values.shape[1])
    out = []
    for row in values:
        best = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
        best = best[np.lexsort((best, -row[best]))]
        out.append([{"feature": int(f), "value": float(row[f])} for f in best])
    return out
