"""Logit effects: the tokens a feature's direction promotes and suppresses when written to the residual stream.

What is computed, for a direction ``v`` (an SAE decoder row, or the unit vector ``e_j`` of neuron ``j`` at a
residual, MLP-out or attention-out hook point: all of them live in the residual stream's width ``d``)::

    effect[t] = sum_i v[i] * gain[i] * W_U[i, t]        for every token id t of the tokenizer

``W_U`` (d, vocab) is the unembedding: the LM head's weight transposed, or the input embedding when the model ties
them. ``gain`` (d,) is the final norm's per-dimension scale: LayerNorm's ``weight``, RMSNorm's ``weight``, and
``1 + weight`` for the norms that add one in their forward (Gemma's ``GemmaRMSNorm``; which convention a model
uses is measured on its own norm module, not guessed from its name). Left out, on purpose: the norm's centring
and its division by the norm of the whole residual vector (they depend on the token's full residual, not on
the direction), the norm's bias and the LM head's bias (they add the same amount whatever the feature).

This is SAEDashboard's convention: it multiplies the decoder direction by TransformerLens's ``W_U``
(``sae_dashboard/sae_vis_runner.py``: ``einsum(feature_resid_dir, W_U)``), and a ``HookedTransformer`` loaded
with ``from_pretrained`` has the final norm's weights folded into ``W_U``
(``transformer_lens/weight_processing.py`` ``_fold_unembed_layer_norm``: ``W_U * ln_final.w``, with ``1 + w``
where ``rmsnorm_uses_offset``), i.e. ``diag(gain) @ W_U`` as here. TransformerLens also centres ``W_U`` over
the vocabulary by default (``center_unembed``), which subtracts the same number from every token's effect:
``center=True`` does that too, and the ranking of tokens is the same either way.

Token ids at or above the tokenizer's length (padding columns some LM heads have, e.g. Pythia's) are left out.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..models import FAMILIES
from .stats import as_index

# the module names of the final norm in transformers' base models (GPT-2, GPT-NeoX, Phi, LLaMA-likes ...)
FINAL_NORM_NAMES = ("ln_f", "final_layer_norm", "final_layernorm", "norm", "final_norm", "ln_final")
ENCODER_TYPES = frozenset(t for t, paths in FAMILIES.items() if paths == FAMILIES["bert"])
_CHUNK_FLOATS = 1 << 24  # logits computed for at most this many (feature, token) pairs at a time (64 MB)


@dataclass
class Unembedding:
    """The final norm's gain and the unembedding of a causal language model, with its tokenizer.

    ``W_U`` is (d, n_tokens) float32 on the CPU and ``gain`` (d,); ``convention`` says how ``gain`` was read
    from the norm (``"weight"``, ``"1 + weight"`` or ``"none"`` for a norm without a scale)."""

    W_U: torch.Tensor
    gain: torch.Tensor
    tokenizer: Any
    model_type: str
    norm: str
    convention: str
    tied: bool
    _folded: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def d_model(self) -> int:
        return int(self.W_U.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.W_U.shape[1])

    @property
    def folded(self) -> torch.Tensor:
        """``diag(gain) @ W_U``, (d, n_tokens): what a direction is multiplied by."""
        if self._folded is None:
            self._folded = self.W_U * self.gain[:, None]
        return self._folded

    @classmethod
    def from_model(cls, model_or_folder: Any, tokenizer: Any = None) -> "Unembedding":
        """Read the gain and ``W_U`` from a local model folder (loaded with ``AutoModelForCausalLM``), an
        already loaded transformers model (with or without its LM head: a base model works when its
        embeddings are tied), or a :class:`mistudio.models.LoadedModel`. Encoders (BERT-style) have no
        next-token unembedding and are refused."""
        if isinstance(model_or_folder, (str, os.PathLike)):
            return cls._from_folder(str(model_or_folder), tokenizer)
        model = model_or_folder if isinstance(model_or_folder, nn.Module) else getattr(model_or_folder, "model", None)
        if not isinstance(model, nn.Module):
            raise InputError(f"Unembedding.from_model takes a model folder, a transformers model or a mistudio "
                             f"LoadedModel, not {type(model_or_folder).__name__}")
        tokenizer = tokenizer if tokenizer is not None else getattr(model_or_folder, "tokenizer", None)
        if tokenizer is None:
            raise InputError("Unembedding.from_model(model) needs the tokenizer too: pass tokenizer=... "
                             "(or pass the model's folder, whose tokenizer is loaded with it)")
        return cls._from_loaded(model, tokenizer, missing=set())

    @classmethod
    def _from_folder(cls, folder: str, tokenizer: Any) -> "Unembedding":
        from transformers import AutoModelForCausalLM

        from ..models import load_config, load_tokenizer
        from ..specs import ModelSpec

        spec = ModelSpec(name_or_path=folder)
        config = load_config(spec)  # checks the folder and names a bad path or Hub id
        _refuse_encoder(config.model_type, folder)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(spec.name_or_path, output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise InputError(f"could not load {folder!r} as a causal language model (AutoModelForCausalLM), "
                             f"which logit effects need: {exc}") from exc
        if tokenizer is None:
            tokenizer = load_tokenizer(spec)
        return cls._from_loaded(model, tokenizer, missing=set(info.get("missing_keys", ())), where=folder)

    @classmethod
    def _from_loaded(cls, model: nn.Module, tokenizer: Any, missing: set[str], where: str = "the model") \
            -> "Unembedding":
        config = model.config
        _refuse_encoder(config.model_type, where)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if head is None:  # a base model (AutoModel, as mistudio.models.load_model loads): only tied embeddings help
            if not tied:
                raise InputError(f"{where} was loaded without its LM head and does not tie it to the input embedding "
                                 f"(model type {config.model_type!r}): pass the model's folder, or a model loaded "
                                 "with transformers.AutoModelForCausalLM")
            weight = model.get_input_embeddings().weight
        else:
            name = next(n for n, m in model.named_modules() if m is head)
            if f"{name}.weight" in missing:
                raise InputError(f"{where} has no LM head weights ({name}.weight is not in its checkpoint: it was "
                                 "saved as a base model, e.g. with AutoModel.save_pretrained) and its model type "
                                 f"{config.model_type!r} does not tie the head to the embedding: save it with "
                                 "AutoModelForCausalLM, or point at the full checkpoint")
            weight = head.weight
            tied = weight is model.get_input_embeddings().weight
        if weight.device.type == "meta":
            raise InputError(f"the unembedding of {where} is on the meta device (offloaded): load the model on one "
                             "device, or pass its folder")
        norm_name, norm = _final_norm(model, where)
        gain, convention = _norm_gain(norm, where)
        n_tokens = min(int(weight.shape[0]), len(tokenizer))
        W_U = weight.detach()[:n_tokens].to("cpu", torch.float32).T.contiguous()
        return cls(W_U=W_U, gain=gain, tokenizer=tokenizer, model_type=str(config.model_type),
                   norm=f"{norm_name} ({type(norm).__name__})", convention=convention, tied=tied)


def _refuse_encoder(model_type: str, where: str) -> None:
    if model_type in ENCODER_TYPES:
        raise InputError(f"{where} is an encoder (model type {model_type!r}): it has no next-token unembedding, so "
                         "there are no logit effects to compute. Use a decoder model (GPT-2, LLaMA, ...), or leave "
                         "the page's logits out (logits=None)")


def _final_norm(model: nn.Module, where: str) -> tuple[str, nn.Module]:
    base = getattr(model, "base_model", model)
    children = dict(base.named_children())
    for name in FINAL_NORM_NAMES:
        if name in children and children[name] is not None:
            return name, children[name]
    raise InputError(f"cannot find the final norm of {where}: expected one of {FINAL_NORM_NAMES} in "
                     f"{type(base).__name__}, found {sorted(children)}")


def _norm_gain(norm: nn.Module, where: str) -> tuple[torch.Tensor, str]:
    """The norm's per-dimension scale, read from its parameter after measuring which convention it uses.

    The probe ``v`` has mean 0 and root-mean-square 1, so LayerNorm and RMSNorm both normalise it to itself
    (up to ``eps``) and ``(norm(v) - norm(-v)) / 2v`` is the scale, the bias cancelling out."""
    weight = getattr(norm, "weight", None)
    d = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None
    if d is None:
        d = int(getattr(norm, "normalized_shape", (0,))[0] or 0)
    if not d:
        raise InputError(f"the final norm of {where} ({type(norm).__name__}) has no weight and no normalized_shape: "
                         "cannot tell its width")
    probe = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(d)])
    if d % 2:
        probe[-1] = 0.0
    probe = probe / probe.pow(2).mean().sqrt()
    local = copy.deepcopy(norm).to("cpu", torch.float32)
    with torch.no_grad():
        measured = (local(probe[None]) - local(-probe[None]))[0] / 2
    on = probe != 0
    measured = measured[on] / probe[on]
    candidates = {"none": torch.ones(d)}
    if isinstance(weight, torch.Tensor):
        w = weight.detach().to("cpu", torch.float32)
        candidates = {"weight": w, "1 + weight": 1.0 + w}
    for convention, gain in candidates.items():
        if torch.allclose(measured, gain[on], rtol=1e-3, atol=1e-4):
            return gain.clone(), convention
    raise InputError(f"cannot tell how the final norm of {where} ({type(norm).__name__}) scales its output: it is "
                     f"neither {' nor '.join(candidates)} times the normalised input")


def _as_directions(directions: Any, d: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(directions, dtype=np.float32) if not isinstance(directions, torch.Tensor)
                        else directions.detach()).to("cpu", torch.float32)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != d:
        raise InputError(f"directions of shape {tuple(t.shape)} do not match the model's residual width {d}: pass "
                         f"(n, {d}) decoder rows (or one ({d},) row) of an SAE trained on this model")
    if not torch.isfinite(t).all():
        raise InputError("directions hold NaN or infinite values: pass finite decoder rows")
    return t


def _check_k(k: Any, n_tokens: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k={k!r} is not a positive integer: pass how many tokens to list, e.g. k=10")
    return min(int(k), n_tokens)


def logit_effects_many(directions: Any, unembedding: Unembedding, k: int = 10, center: bool = False) -> list[dict]:
    """:func:`logit_effects` of each row of ``directions`` (n, d), computed in chunks of features (memory: a
    chunk's (features, vocabulary) logits, about 64 MB)."""
    dirs = _as_directions(directions, unembedding.d_model)
    k = _check_k(k, unembedding.n_tokens)
    folded = unembedding.folded
    step = max(1, _CHUNK_FLOATS // max(1, unembedding.n_tokens))
    out: list[dict] = []
    for a in range(0, len(dirs), step):
        logits = dirs[a:a + step] @ folded
        if center:
            logits -= logits.mean(dim=1, keepdim=True)
        top, bottom = torch.topk(logits, k, dim=1), torch.topk(logits, k, dim=1, largest=False)
        for i in range(len(logits)):
            out.append({"promoted": _entries(top.indices[i], top.values[i], unembedding.tokenizer),
                        "suppressed": _entries(bottom.indices[i], bottom.values[i], unembedding.tokenizer)})
    return out


def _entries(ids: torch.Tensor, values: torch.Tensor, tokenizer: Any) -> list[dict]:
    id_list = [int(i) for i in ids]
    names = tokenizer.convert_ids_to_tokens(id_list)
    return [{"token_id": i, "token": str(name), "value": float(v)} for i, name, v in zip(id_list, names, values)]


def logit_effects(direction: Any, unembedding: Unembedding, k: int = 10, center: bool = False) -> dict:
    """The ``k`` tokens one direction (d,) promotes most and suppresses most:
    ``{"promoted": [{"token_id", "token", "value"}, ...], "suppressed": [...]}``, largest effect first in
    ``promoted`` and most negative first in ``suppressed``. ``value`` is ``direction @ diag(gain) @ W_U``
    (see the module docstring); ``center=True`` subtracts its mean over the vocabulary."""
    dirs = _as_directions(direction, unembedding.d_model)
    if len(dirs) != 1:
        raise InputError(f"logit_effects takes one direction, got {len(dirs)}: use logit_effects_many for several")
    return logit_effects_many(dirs, unembedding, k=k, center=center)[0]


def neuron_logit_effects(features: Sequence[int], unembedding: Unembedding, k: int = 10,
                         center: bool = False) -> list[dict]:
    """Logit effects of raw neurons (unit vectors ``e_j``) of a residual, MLP-out or attention-out hook point:
    row ``j`` of ``diag(gain) @ W_U``."""
    d = unembedding.d_model
    idx = [as_index(f, "features", "a neuron index") for f in features]
    bad = [f for f in idx if not 0 <= f < d]
    if bad:
        raise InputError(f"neurons {bad[:5]} are outside 0..{d - 1}: the residual width of this model is {d}")
    return logit_effects_many(torch.eye(d)[idx] if idx else torch.zeros(0, d), unembedding, k=k, center=center)
