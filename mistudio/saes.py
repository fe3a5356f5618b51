"""Sparse autoencoders: load them (SAELens and EleutherAI sparsify folders), apply them, save them for SAELens.

One class, :class:`SAE`, holds the four architectures SAELens 6 runs at inference (``standard`` = ReLU,
``topk``, ``jumprelu``, ``gated``) and sparsify's top-k coders. Whatever a folder stores that only changes
how the weights are laid out (SAELens's ``rescale_acts_by_decoder_norm``, an ``expected_average_only_in``
scaling factor or a ``covariance_whitening`` map saved next to a training checkpoint, an old
``scaling_factor`` or ``log_threshold``) is folded into the weights at load, exactly as SAELens folds it
when it saves an inference model; what must run per input (``constant_norm_rescale``, ``layer_norm``)
runs in :meth:`SAE.encode` / :meth:`SAE.forward`.

The package never imports ``sae_lens``: this module reads and writes its file format directly.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError
from .specs import HOOK_KINDS

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SCALER = "activation_scaler.json"  # written next to a SAELens training checkpoint
SAELENS_WHITENING = "activation_whitening.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
RUNTIME_NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
SAELENS_FORMAT = "6.0.0"  # the SAELens config layout save() writes (metadata.sae_lens_version when not loaded)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_WEIGHT_NAMES = {
    "standard": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "topk": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "jumprelu": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"),
    "gated": ("W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"),
}
_REFUSED_ARCHITECTURES = {
    "batchtopk": "a SAELens BatchTopK training checkpoint: save its inference model with "
                 "sae.save_inference_model(dir) (SAELens writes it as a jumprelu SAE) and load that",
    "matryoshka_batchtopk": "a SAELens Matryoshka BatchTopK training checkpoint: save its inference model with "
                            "sae.save_inference_model(dir) (a jumprelu SAE) and load that",
    "transcoder": "a transcoder (it predicts a module's output from its input, not one hook point's activations)",
    "skip_transcoder": "a transcoder with a skip connection (it predicts a module's output from its input)",
    "jumprelu_transcoder": "a transcoder (it predicts a module's output from its input)",
    "jumprelu_skip_transcoder": "a transcoder (it predicts a module's output from its input)",
}


# -- hook names ---------------------------------------------------------------------------------------
_MISTUDIO_NAME = re.compile(r"layers\.(\d+)\.(residual|mlp|attention)")
_TL_NAME = re.compile(r"blocks\.(\d+)\.hook_(resid_post|resid_pre|mlp_out|attn_out)")
_MODULE_NAME = re.compile(r"(?:[A-Za-z_][\w]*\.)*?(?:layers|layer|h)\.(\d+)"
                          r"(?:\.(mlp|feed_forward|self_attn|attn|attention|self_attention))?")
_EMBEDDING_NAME = re.compile(r"(?:.*\.)?(?:hook_embed|hook_pos_embed|embed_tokens|embed_in|wte|embeddings)")
_KIND_OF_MODULE = {None: "residual", "mlp": "mlp", "feed_forward": "mlp", "self_attn": "attention",
                   "attn": "attention", "attention": "attention", "self_attention": "attention"}
_KIND_OF_TL = {"resid_post": "residual", "mlp_out": "mlp", "attn_out": "attention"}
TL_NAME_OF_KIND = {"residual": "hook_resid_post", "mlp": "hook_mlp_out", "attention": "hook_attn_out"}


def hook_point_of(name: str | None) -> str | None:
    """mistudio's hook point for a TransformerLens hook name (as SAELens stores it) or a sparsify module name.

    ``blocks.N.hook_resid_post`` and sparsify's ``layers.N`` -> ``layers.N.residual``; ``blocks.N.hook_resid_pre``
    -> ``layers.{N-1}.residual``; ``blocks.N.hook_mlp_out`` / ``layers.N.mlp`` -> ``layers.N.mlp``;
    ``blocks.N.hook_attn_out`` / ``layers.N.self_attn|attn|attention`` -> ``layers.N.attention``. A name that
    reads the embeddings (``blocks.0.hook_resid_pre``, ``hook_embed``, ``embed_tokens``) raises InputError:
    mistudio does not capture them. Any other name gives None.
    """
    if name is None:
        return None
    name = str(name).strip()
    if m := _MISTUDIO_NAME.fullmatch(name):
        return name
    if m := _TL_NAME.fullmatch(name):
        layer, what = int(m[1]), m[2]
        if what == "resid_pre":
            if layer == 0:
                raise InputError(f"hook {name!r} is the input of block 0, i.e. the token embeddings, which mistudio "
                                 "does not capture: apply this SAE with TransformerLens, or use an SAE trained on "
                                 "a block's output (blocks.N.hook_resid_post = layers.N.residual)")
            return f"layers.{layer - 1}.residual"
        return f"layers.{layer}.{_KIND_OF_TL[what]}"
    if _EMBEDDING_NAME.fullmatch(name):
        raise InputError(f"hook {name!r} is the token embeddings, which mistudio does not capture: use an SAE "
                         "trained on a block's output, MLP or attention")
    if m := _MODULE_NAME.fullmatch(name):
        return f"layers.{int(m[1])}.{_KIND_OF_MODULE[m[2]]}"
    return None


def tl_hook_name(hook_point: str) -> str:
    """The TransformerLens name of a mistudio hook point (``layers.3.mlp`` -> ``blocks.3.hook_mlp_out``)."""
    m = _MISTUDIO_NAME.fullmatch(str(hook_point))
    if m is None:
        raise InputError(f"hook point {hook_point!r} is not a mistudio hook point: use layers.N.<kind>, kind one "
                         f"of {HOOK_KINDS}")
    return f"blocks.{m[1]}.{TL_NAME_OF_KIND[m[2]]}"


_INSIDE_TL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_INSIDE_MODULE = re.compile(r"(?:[A-Za-z_][\w]*\.)*?(?:layers|layer|h)\.(\d+)\.(.+)")
_TL_INSIDE = {"hook_resid_mid": "the residual stream between block {n}'s attention and its MLP",
              "attn.hook_z": "block {n}'s attention heads' outputs before W_O (mistudio's layers.{n}.attention is "
                             "after W_O)"}


def _uncaptured(name: str | None, reshape: str = "none", head: int | None = None) -> str | None:
    """Why an SAE trained on ``name`` applies at no mistudio hook point, when the name says it reads a vector
    inside a block that mistudio does not capture (TransformerLens's ``blocks.N.hook_resid_mid``,
    ``attn.hook_z``, ``ln2.hook_normalized`` ..., a module inside a layer, one attention head); None otherwise
    (a captured hook, or a name mistudio cannot read: that SAE applies where the caller says)."""
    text = str(name or "").strip()
    tl, module = _INSIDE_TL_BLOCK.fullmatch(text), _INSIDE_MODULE.fullmatch(text)
    if head is not None:
        what = f"one attention head (hook_head_index={head}) of {text or 'its hook'}"
    elif reshape == "hook_z" or text.endswith("hook_z"):
        n = tl[1] if tl else "N"
        what = _TL_INSIDE["attn.hook_z"].format(n=n)
    elif tl and not _TL_NAME.fullmatch(text):
        what = _TL_INSIDE.get(tl[2], "a hook inside block {n} ({hook})").format(n=tl[1], hook=tl[2])
    elif module and not _MODULE_NAME.fullmatch(text) and not _TL_NAME.fullmatch(text):
        what = f"a module inside layer {module[1]} ({module[2]})"
    else:
        return None
    return (f"it was trained on {text!r}, {what}, which mistudio does not capture (it captures each block's output, "
            "blocks.N.hook_resid_post = layers.N.residual, its MLP's output, hook_mlp_out = layers.N.mlp, and its "
            "attention's output, hook_attn_out = layers.N.attention): apply this SAE with TransformerLens, or, if "
            "its config names the wrong hook, set sae.hook_point = 'layers.N.<kind>' and save it to a folder of "
            "its own (sae.save(<folder>)) to apply from there")


def _hook_point_or_error(name: str | None, reshape: str = "none") -> tuple[str | None, str | None]:
    try:
        point = hook_point_of(name)
    except InputError as exc:
        return None, str(exc)
    return point, (_uncaptured(name, reshape) if point is None else None)


# -- sparse latents -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseLatents:
    """The latents of ``n`` rows in CSR layout: row ``i`` has ``indices[offsets[i]:offsets[i+1]]`` with
    ``values[offsets[i]:offsets[i+1]]`` (latent ids ascending for non-fixed width).

    Rows are the input's leading dimensions flattened (``x.reshape(-1, d_in)``). For a top-k SAE every row
    holds exactly ``width == k`` entries (``offsets[i] = i * k``, and :meth:`fixed` gives ``(n, k)`` views);
    an entry among them may be 0 (a top-k pre-activation that ReLU zeroed). Otherwise ``width`` is None and
    the entries are exactly the non-zero latents. ``indices`` are int64 (cast them to int32 to store them).
    """

    offsets: Tensor  # (n + 1,) int64
    indices: Tensor  # (nnz,) int64
    values: Tensor  # (nnz,) the SAE's dtype
    d_sae: int
    width: int | None = None

    @property
    def n_rows(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def fixed(self) -> tuple[Tensor, Tensor]:
        """``(indices, values)`` as ``(n, width)`` views (fixed-width latents only)."""
        if self.width is None:
            raise InputError("these latents have a variable number of entries per row: use offsets/indices/values")
        return self.indices.view(-1, self.width), self.values.view(-1, self.width)

    def to_dense(self) -> Tensor:
        """The ``(n, d_sae)`` dense latents."""
        out = torch.zeros(self.n_rows, self.d_sae, dtype=self.values.dtype, device=self.values.device)
        out[self._rows(), self.indices] = self.values
        return out

    # -- as the dense latents answer (an entry not stored is a 0) ------------------------------------------------
    def _rows(self) -> Tensor:
        """Each entry's row."""
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.offsets.device), self.offsets.diff())

    def _along(self, dim: int) -> tuple[Tensor, int, int]:
        """(each entry's position in the result, the result's length, the dense entries per result) of a
        reduction over ``dim`` (0: per latent, over the rows; 1: per row, over the latents)."""
        if dim not in (0, 1, -1, -2):
            raise InputError(f"«dim={dim!r}» is not a dimension of the (rows, d_sae) latents: «pass dim=0» (per "
                             "latent) or «dim=1» (per row)")
        if dim % 2 == 0:
            return self.indices, self.d_sae, self.n_rows
        return self._rows(), self.n_rows, self.d_sae

    def sum(self, dim: int | None = None) -> Tensor:
        """``to_dense().sum(dim)`` without the dense matrix."""
        if dim is None:
            return self.values.sum()
        where, length, _ = self._along(dim)
        return torch.zeros(length, dtype=self.values.dtype, device=self.values.device).index_add_(0, where,
                                                                                                 self.values)

    def mean(self, dim: int | None = None) -> Tensor:
        """``to_dense().mean(dim)`` without the dense matrix."""
        count = self.n_rows * self.d_sae if dim is None else self._along(dim)[2]
        return self.sum(dim) / count

    def _extreme(self, reduce: str, dim: int | None) -> Tensor:
        values = self.values
        keep = torch.maximum if reduce == "amax" else torch.minimum  # of a stored extreme and a 0 not stored
        if dim is None:
            found = getattr(values, reduce)() if values.numel() else values.new_zeros(())
            if self.nnz < self.n_rows * self.d_sae:  # a 0 not stored
                found = keep(found, values.new_zeros(()))
            return found
        where, length, per = self._along(dim)
        out = values.new_zeros(length)  # a result with fewer stored entries than `per` has a 0 among them
        full = torch.bincount(where, minlength=length) >= per
        start = values.new_full((length,), -math.inf if reduce == "amax" else math.inf)
        stored = start.scatter_reduce(0, where, values, reduce, include_self=True)
        return torch.where(full, stored, keep(stored, out))

    def amax(self, dim: int | None = None) -> Tensor:
        """``to_dense().amax(dim)`` without the dense matrix (exact)."""
        return self._extreme("amax", dim)

    def amin(self, dim: int | None = None) -> Tensor:
        """``to_dense().amin(dim)`` without the dense matrix (exact)."""
        return self._extreme("amin", dim)

    def max(self, dim: int | None = None) -> Tensor:
        """The largest latent of all (``to_dense().max()``); per dimension, see :meth:`amax`."""
        if dim is not None:
            raise InputError("SparseLatents.max(dim) would owe torch's argmax too: use .amax(dim) for the values "
                             "(exactly to_dense().amax(dim)), or .to_dense() first (n x d_sae in memory)")
        return self._extreme("amax", None)

    def min(self, dim: int | None = None) -> Tensor:
        """The smallest latent of all (``to_dense().min()``); per dimension, see :meth:`amin`."""
        if dim is not None:
            raise InputError("SparseLatents.min(dim) would owe torch's argmin too: use .amin(dim) for the values "
                             "(exactly to_dense().amin(dim)), or .to_dense() first (n x d_sae in memory)")
        return self._extreme("amin", None)

    def __matmul__(self, other: Tensor) -> Tensor:
        """``to_dense() @ other`` for ``other`` (d_sae,) or (d_sae, m), in ``other``'s dtype (a decoder's
        ``W_dec`` gives the reconstruction less ``b_dec``)."""
        if not isinstance(other, Tensor) or other.ndim not in (1, 2) or other.shape[0] != self.d_sae:
            shape = tuple(other.shape) if isinstance(other, Tensor) else type(other).__name__
            raise InputError(f"SparseLatents @ w needs w of shape ({self.d_sae},) or ({self.d_sae}, m), a tensor: "
                             f"got {shape}")
        matrix = other if other.ndim == 2 else other[:, None]
        out = F.embedding_bag(self.indices, matrix, self.offsets, mode="sum",
                              per_sample_weights=self.values.to(matrix.dtype), include_last_offset=True)
        return out if other.ndim == 2 else out[:, 0]


# -- the module ---------------------------------------------------------------------------------------
class SAE(nn.Module):
    """A sparse autoencoder in eval mode without gradients.

    ``encode(x)`` -> dense latents ``(..., d_sae)``; ``encode_sparse(x)`` -> :class:`SparseLatents`;
    ``decode(z)`` -> ``z @ W_dec + b_dec``; ``forward(x)`` -> the reconstruction of ``x``. With
    ``constant_norm_rescale`` or ``layer_norm`` the input is normalized per row before encoding and
    ``forward`` maps the reconstruction back; ``decode`` alone cannot (it never saw the row) and returns
    the reconstruction in the normalized space. A sparsify skip connection (``W_skip``) is added in
    ``forward`` only, for the same reason.

    ``hook_name`` is the name the SAE was trained on (TransformerLens's for SAELens, the module name for
    sparsify), ``hook_point`` mistudio's equivalent (None when there is none; set it when you know it).
    An SAE on attention heads' ``hook_z`` (``reshape_activations="hook_z"``) takes the heads flattened,
    ``(..., n_heads * d_head)``, and gives its reconstruction flattened too.
    """

    def __init__(self, architecture: str, d_in: int, d_sae: int, *, k: int | None = None, activation: str = "topk",
                 apply_b_dec_to_input: bool = True, normalize_activations: str = "none",
                 skip_connection: bool = False, hook_name: str | None = None, hook_point: str | None = None,
                 metadata: dict[str, Any] | None = None, reshape_activations: str = "none",
                 dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise InputError(f"architecture={architecture!r} is not supported: use one of {ARCHITECTURES}")
        for name, value in (("d_in", d_in), ("d_sae", d_sae)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}={value!r} must be a positive whole number")
        if architecture == "topk":
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
                raise InputError(f"k={k!r}: a top-k SAE needs 1 <= k <= d_sae ({d_sae})")
            if activation not in ("topk", "groupmax"):
                raise InputError(f"activation={activation!r} must be 'topk' or 'groupmax' (sparsify's)")
            if activation == "groupmax" and d_sae % k:
                raise InputError(f"activation='groupmax' splits the {d_sae} latents into k={k} equal groups: "
                                 "d_sae must be a multiple of k")
        elif k is not None:
            raise InputError(f"k={k!r} applies to top-k SAEs only (this one is {architecture!r}): leave it None")
        if normalize_activations not in RUNTIME_NORMALIZATIONS:
            raise InputError(f"normalize_activations={normalize_activations!r} is not applied at run time: use one "
                             f"of {RUNTIME_NORMALIZATIONS} (load_sae folds the others into the weights)")
        self.architecture, self.d_in, self.d_sae = architecture, d_in, d_sae
        self.k = k if architecture == "topk" else None
        self.activation = activation if architecture == "topk" else None
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.normalize_activations = normalize_activations
        self.reshape_activations = reshape_activations
        self.hook_name = hook_name
        derived, self._hook_error = _hook_point_or_error(hook_name, reshape_activations)
        if hook_point is not None and not _MISTUDIO_NAME.fullmatch(str(hook_point)):
            raise InputError(f"hook_point={hook_point!r} is not a mistudio hook point: use "
                             "layers.N.residual|mlp|attention")
        self.hook_point = hook_point if hook_point is not None else derived
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.path: Path | None = None
        self.source = "memory"
        self._fingerprint: str | None = None
        dtype = _torch_dtype(dtype)
        spec = dict(dtype=dtype, device=device)
        zeros = lambda *shape: nn.Parameter(torch.zeros(*shape, **spec), requires_grad=False)  # noqa: E731
        self.W_enc = zeros(d_in, d_sae)
        self.W_dec = zeros(d_sae, d_in)
        self.b_dec = zeros(d_in)
        if architecture != "gated":
            self.b_enc = zeros(d_sae)
        if architecture == "jumprelu":
            self.threshold = zeros(d_sae)
        if architecture == "gated":
            self.b_gate, self.r_mag, self.b_mag = zeros(d_sae), zeros(d_sae), zeros(d_sae)
        self.W_skip = zeros(d_in, d_in) if skip_connection else None
        self.eval()

    # -- facts ----------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def name(self) -> str:
        """How messages name this SAE: its folder, else its shape."""
        return str(self.path) if self.path is not None else f"SAE({self.architecture}, {self.d_in}->{self.d_sae})"

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (f"SAE({self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{k}, hook_point={self.hook_point!r}, "
                f"hook_name={self.hook_name!r}, dtype={str(self.dtype).removeprefix('torch.')}, device={self.device})")

    @property
    def fingerprint(self) -> str:
        """sha256 over the weight file's bytes and the config (and any scaling folded in at load).

        For an SAE built in memory: over the bytes :meth:`save` would write. It names the SAE's source,
        whatever dtype or device it was moved to since."""
        if self._fingerprint is None:
            import safetensors.torch

            try:
                state, cfg = self.saelens_state_dict(), self.saelens_config()
            except InputError:  # not expressible in SAELens's format (groupmax, skip connection): every weight
                state = {n: p.detach().cpu().contiguous() for n, p in self.named_parameters()}
                cfg = {**self.saelens_config(), "activation": self.activation}
            self._fingerprint = _digest(safetensors.torch.save(state), cfg)
        return self._fingerprint

    @property
    def trained_model(self) -> tuple[str | None, str | None]:
        """The model it was trained on, as its config says: (name, sha256 of its weights). SAELens records the
        name (``metadata.model_name``, TransformerLens's: ``gpt2-small``); sparsify its ``config.json``'s
        ``model``; an SAE mistudio trained records both."""
        name = self.metadata.get("model_name")
        weights = (self.metadata.get("mistudio") or {}).get("model_weights")
        return (str(name) if name else None), (str(weights) if weights else None)

    # -- applying it ----------------------------------------------------------------------------------
    def _check_width(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise InputError(f"{self.name} reads vectors of width d_in={self.d_in}, got a tensor of shape "
                             f"{tuple(x.shape)}: give (..., {self.d_in})")

    def _prepare(self, x: Tensor) -> tuple[Tensor, tuple | None]:
        """The encoder's input: cast, normalized per row if the SAE says so, less b_dec; and what undoes it."""
        self._check_width(x)
        x = x.to(device=self.device, dtype=self.dtype)
        undo = None
        if self.normalize_activations == "constant_norm_rescale":
            coeff = (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
            x, undo = x * coeff, ("rescale", coeff)
        elif self.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            x, undo = x / (std + 1e-5), ("layer_norm", mu, std)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x, undo

    @staticmethod
    def _undo(y: Tensor, undo: tuple | None) -> Tensor:
        if undo is None:
            return y
        if undo[0] == "rescale":
            return y / undo[1]
        return y * undo[2] + undo[1]

    def _pre(self, sae_in: Tensor) -> Tensor:
        """Pre-activations (the magnitude path's for a gated SAE)."""
        if self.architecture == "gated":
            return sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return sae_in @ self.W_enc + self.b_enc

    def _top(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices), k per row, of a top-k SAE."""
        if self.activation == "groupmax":  # sparsify: the largest of each of k equal groups
            values, within = F.relu(pre).unflatten(-1, (self.k, -1)).max(dim=-1)
            offsets = torch.arange(0, self.d_sae, self.d_sae // self.k, device=pre.device)
            return values, within + offsets
        values, indices = torch.topk(pre, self.k, dim=-1, sorted=False)
        return values.relu(), indices

    def _activate(self, sae_in: Tensor) -> Tensor:
        pre = self._pre(sae_in)
        if self.architecture == "topk":
            values, indices = self._top(pre)
            return torch.zeros_like(pre).scatter_(-1, indices, values)
        if self.architecture == "standard":
            return F.relu(pre)
        if self.architecture == "jumprelu":
            return F.relu(pre) * (pre > self.threshold).to(pre.dtype)
        gate = (sae_in @ self.W_enc + self.b_gate) > 0
        return gate.to(pre.dtype) * F.relu(pre)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Dense latents ``(..., d_sae)`` of ``x`` ``(..., d_in)``, in the SAE's dtype and on its device."""
        sae_in, _ = self._prepare(x)
        return self._activate(sae_in)

    @torch.no_grad()
    def encode_sparse(self, x: Tensor) -> SparseLatents:
        """The latents of ``x.reshape(-1, d_in)`` as :class:`SparseLatents` (top-k: k per row, fixed width)."""
        sae_in, _ = self._prepare(x)
        sae_in = sae_in.reshape(-1, self.d_in)
        n = sae_in.shape[0]
        if self.architecture == "topk":
            values, indices = self._top(self._pre(sae_in))
            offsets = torch.arange(0, n * self.k + 1, self.k, device=sae_in.device)
            return SparseLatents(offsets, indices.reshape(-1), values.reshape(-1), self.d_sae, self.k)
        dense = self._activate(sae_in)
        rows, cols = dense.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=n)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return SparseLatents(offsets, cols, dense[rows, cols], self.d_sae, None)

    @torch.no_grad()
    def decode(self, z: Tensor | SparseLatents) -> Tensor:
        """``z @ W_dec + b_dec`` for dense ``(..., d_sae)`` latents or :class:`SparseLatents` (then ``(n, d_in)``)."""
        if isinstance(z, SparseLatents):
            out = F.embedding_bag(z.indices, self.W_dec, z.offsets, mode="sum",
                                  per_sample_weights=z.values.to(self.dtype), include_last_offset=True)
            return out + self.b_dec
        if z.shape[-1] != self.d_sae:
            raise InputError(f"{self.name} has d_sae={self.d_sae} latents, got a tensor of shape {tuple(z.shape)}")
        return z.to(device=self.device, dtype=self.dtype) @ self.W_dec + self.b_dec

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of ``x`` in its own space (per-row normalization undone, skip connection added)."""
        sae_in, undo = self._prepare(x)
        out = self._undo(self._activate(sae_in) @ self.W_dec + self.b_dec, undo)
        if self.W_skip is not None:
            out = out + x.to(device=self.device, dtype=self.dtype) @ self.W_skip.T
        return out

    # -- saving ---------------------------------------------------------------------------------------
    def _check_saelens_expressible(self) -> None:
        if self.activation == "groupmax":
            raise InputError(f"{self.name} uses sparsify's groupmax activation, which SAELens does not have: it "
                             "cannot be saved in SAELens's format")
        if self.W_skip is not None:
            raise InputError(f"{self.name} has a skip connection (W_skip), which SAELens SAEs do not have: it cannot "
                             "be saved in SAELens's format")

    def saelens_config(self) -> dict[str, Any]:
        """The ``cfg.json`` SAELens 6 writes for this SAE."""
        metadata = {**self.metadata, "hook_name": self.hook_name}
        metadata.pop("hook_point", None)
        for key in ("sae_lens_version", "sae_lens_training_version"):  # SAELens reads < 6 as its old layout
            major = re.match(r"\s*(\d+)", str(metadata.get(key) or ""))
            if major is None or int(major[1]) < 6:
                metadata[key] = SAELENS_FORMAT
        if self.hook_point is not None:
            metadata["hook_point"] = self.hook_point
        cfg: dict[str, Any] = {"d_in": self.d_in, "d_sae": self.d_sae, "dtype": str(self.dtype).removeprefix("torch."),
                               "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
                               "normalize_activations": self.normalize_activations,
                               "reshape_activations": self.reshape_activations, "metadata": metadata}
        if self.architecture == "topk":
            cfg.update(k=self.k, rescale_acts_by_decoder_norm=False)
        cfg["architecture"] = self.architecture
        return cfg

    def saelens_state_dict(self) -> dict[str, Tensor]:
        """The weights under SAELens's names, contiguous, on the CPU."""
        self._check_saelens_expressible()
        return {name: getattr(self, name).detach().to("cpu").contiguous().clone()
                for name in _WEIGHT_NAMES[self.architecture]}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` (SAELens 6's layout, which
        ``sae_lens.SAE.load_from_disk`` loads) into the folder ``path``; each file is replaced atomically."""
        import safetensors.torch

        folder = Path(path).expanduser()
        cfg = self.saelens_config()
        weights = safetensors.torch.save(self.saelens_state_dict())
        if folder.exists() and not folder.is_dir():
            raise InputError(f"cannot save the SAE into {folder}: it is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / SAELENS_WEIGHTS, weights)
        _write_atomic(folder / SAELENS_CFG, json.dumps(cfg, indent=1).encode())
        self.path, self._fingerprint = folder, _digest(weights, cfg)
        return folder


def check_applies(sae: SAE, hook_point: str, width: int) -> None:
    """Raise InputError unless ``sae`` reads ``hook_point`` vectors of ``width``: the widths must match, and an
    SAE that names its own hook point must name this one; one trained on a hook mistudio knows it does not
    capture (the embeddings, ``blocks.N.hook_resid_mid``, ``attn.hook_z``, one head ...) is refused, saying why
    (an SAE whose hook name mistudio cannot read at all applies wherever the caller says)."""
    if sae.d_in != int(width):
        raise InputError(f"{sae.name} reads vectors of width {sae.d_in}, but {hook_point} has width {int(width)}: "
                         "use an SAE trained on this model's hook point")
    if sae.hook_point is not None and sae.hook_point != hook_point:
        raise InputError(f"{sae.name} was trained on {sae.hook_name or sae.hook_point} (mistudio hook point "
                         f"{sae.hook_point}), not on {hook_point}: apply it at {sae.hook_point}, or, if you know "
                         f"better, set sae.hook_point = {hook_point!r} and save it to a folder of its own "
                         "(sae.save(<folder>)) to apply from there")
    if sae.hook_point is None and sae._hook_error is not None:
        raise InputError(f"{sae.name} cannot be applied at {hook_point}: {sae._hook_error}")


_HUB_CACHE = re.compile(r"models--([^/]+)/snapshots/[^/]+$")  # huggingface_hub's folder of org--name (or name)


@functools.lru_cache(maxsize=1)
def _transformer_lens_names() -> dict[str, str]:
    """TransformerLens's model names and aliases, lower case, to the Hub name (what SAELens records: ``mistral-7b``
    is ``mistralai/Mistral-7B-v0.1``), from the table ``scripts/build_model_aliases.py`` writes: importing
    transformer_lens takes 10 s, and it is not a dependency."""
    from importlib import resources

    table = json.loads(resources.files("mistudio.resources").joinpath("transformer_lens_models.json").read_text())
    names = {}
    for official, aliases in table["models"].items():
        names.update({alias.lower(): official for alias in aliases})
        names[official.lower()] = official
    return names


def _model_keys(name: str) -> set[str]:
    """A model's names without organisation or folder, lower case: as given, a Hub-cache snapshot folder's model,
    a link's target, and the Hub name of a TransformerLens name or alias."""
    text = str(name).replace("\\", "/").rstrip("/")
    found = [text]
    hub = _HUB_CACHE.search(text)
    if hub:
        found.append(hub[1].replace("--", "/"))
    if os.path.islink(text):
        found.append(os.path.realpath(text))
    official = _transformer_lens_names()
    found += [official[t.lower()] for t in found if t.lower() in official]
    return {t.rstrip("/").rsplit("/", 1)[-1].lower() for t in found}


def _same_model(trained_on: str, model: str) -> bool:
    return bool(_model_keys(trained_on) & _model_keys(model))


def other_model_warning(sae_name: str, trained: tuple[str | None, str | None], model_name: str,
                        model_weights: str | None) -> str | None:
    """A warning when an SAE was trained on another model than ``model_name`` (whose weights' sha256 is
    ``model_weights``, if known), else None. By weights when both sides know them (an SAE mistudio trained), else
    by name, ignoring an organisation or folder (``EleutherAI/pythia-70m`` is ``pythia-70m``; a Hub-cache snapshot
    folder is its model, a link its target; TransformerLens's names and aliases resolved); an SAE that
    names no model gets no warning. Widths that differ are refused before this (:func:`check_applies`)."""
    name, weights = trained
    if weights and model_weights:
        if weights == model_weights:
            return None
        return (f"{sae_name} was trained on a model whose weight files differ from this one's ({name or 'a model'}, "
                f"weights {weights[:12]}; this model {model_name}, weights {model_weights[:12]}): unless it is the "
                "same model saved another way (other shards, another head), its latents may mean nothing here. "
                "Apply an SAE trained on this model, or train one on an extraction of it")
    if not name or _same_model(name, model_name):
        return None
    return (f"{sae_name} says it was trained on {name}, and this model is {model_name}: if that is another model, "
            "its latents mean nothing here. Apply an SAE trained on this model, or train one on an extraction of it")


# -- loading ------------------------------------------------------------------------------------------
def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
             scaling_factor: float | None = None) -> SAE:
    """Load an SAE folder: SAELens's (``cfg.json`` + ``sae_weights.safetensors``) or EleutherAI sparsify's
    (``cfg.json`` + ``sae.safetensors``; a folder of hook-point subfolders needs the subfolder).

    ``dtype`` (``"float32"``, ``"bfloat16"`` ...) defaults to the one the folder names. ``scaling_factor``
    is for an SAE trained on inputs scaled by SAELens's ``expected_average_only_in`` whose factor is not saved
    with it (SAELens's pretrained list calls it ``norm_scaling_factor``): it is folded into the weights.
    """
    target = _torch_dtype(dtype) if dtype is not None else None
    folder = Path(path).expanduser()
    if not folder.exists():
        raise InputError(f"SAE path {str(path)!r} does not exist: give the folder that holds cfg.json and "
                         f"{SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} (EleutherAI sparsify)")
    if folder.is_file():
        if folder.name not in (SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS):
            raise InputError(f"SAE path {str(path)!r} is a file: give the folder that holds cfg.json and the weights")
        folder = folder.parent
    names = {p.name for p in folder.iterdir()}
    if SAELENS_CFG in names and SAELENS_WEIGHTS in names:
        sae = _load_saelens(folder, scaling_factor)
    elif SAELENS_CFG in names and SPARSIFY_WEIGHTS in names:
        if scaling_factor is not None:
            raise InputError(f"scaling_factor={scaling_factor!r} applies to SAELens SAEs; {folder} is a sparsify "
                             "SAE, which reads raw activations: leave it None")
        sae = _load_sparsify(folder)
    else:
        subfolders = _natural_sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / SAELENS_CFG).exists())
        if subfolders:
            raise InputError(f"{folder} holds SAEs for {len(subfolders)} hook points ({', '.join(subfolders)}): "
                             f"load one, e.g. load_sae({str(folder / subfolders[0])!r})")
        found = ", ".join(sorted(names)[:12]) + (" ..." if len(names) > 12 else "") if names else "nothing"
        raise InputError(f"{folder} is not an SAE folder (found: {found}): expected cfg.json with "
                         f"{SAELENS_WEIGHTS} (SAELens) or with {SPARSIFY_WEIGHTS} (EleutherAI sparsify)")
    return sae.to(device=torch.device(device), dtype=target or sae.dtype)


def _load_saelens(folder: Path, scaling_factor: float | None) -> SAE:
    cfg = _read_json(folder / SAELENS_CFG)
    raw = (folder / SAELENS_WEIGHTS).read_bytes()
    tensors = _load_tensors(raw, folder / SAELENS_WEIGHTS)
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    major = re.match(r"\s*(\d+)", str(version or ""))
    legacy = major is None or int(major[1]) < 6  # SAELens < 6 kept everything at the top level
    where = folder / SAELENS_CFG
    if legacy:
        metadata = {key: cfg[key] for key in ("model_name", "hook_name", "hook_point", "hook_head_index",
                                              "context_size", "prepend_bos", "dataset_path", "neuronpedia_id",
                                              "model_from_pretrained_kwargs", "sae_lens_version") if key in cfg}
        if "hook_point" in metadata:
            metadata.setdefault("hook_name", metadata.pop("hook_point"))
        activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu")) or "relu"
        kwargs = cfg.get("activation_fn_kwargs") or {}
        architecture = cfg.get("architecture", "standard")
        k = cfg.get("k")
        if activation == "topk" and kwargs.get("k") is not None:
            architecture, k = "topk", kwargs["k"]
        elif activation not in ("relu", "topk"):
            raise InputError(f"{where} uses activation_fn={activation!r}, which mistudio does not run (SAELens 6 "
                             "dropped it too): ReLU, top-k, JumpReLU and gated SAEs are supported")
        normalize = cfg.get("normalize_activations")
        normalize = "none" if normalize in (None, False) else "expected_average_only_in" if normalize is True \
            else normalize
    else:
        metadata = dict(cfg.get("metadata") or {})
        architecture, k = cfg.get("architecture"), cfg.get("k")
        normalize = cfg.get("normalize_activations", "none")
    hook_name = metadata.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if architecture in _REFUSED_ARCHITECTURES:
        raise InputError(f"{where} holds architecture {architecture!r}, {_REFUSED_ARCHITECTURES[architecture]}; "
                         f"mistudio runs {', '.join(ARCHITECTURES)} SAEs")
    if architecture not in ARCHITECTURES:
        raise InputError(f"{where} holds architecture {architecture!r}, which mistudio does not run: it runs "
                         f"{', '.join(ARCHITECTURES)} SAEs (SAELens's inference architectures)")
    d_in, d_sae = _cfg_int(cfg, "d_in", where), _cfg_int(cfg, "d_sae", where)
    if architecture == "topk" and k is None:
        raise InputError(f"{where} is a top-k SAE without k: add \"k\" to it")
    file_dtype = _cfg_dtype(cfg.get("dtype"), tensors, where)

    state = {name: t.to(torch.float32) for name, t in tensors.items()}
    folded: dict[str, Any] = {}
    if "log_threshold" in state and "threshold" not in state:  # older JumpReLU checkpoints
        state["threshold"] = state.pop("log_threshold").exp()
    if "scaling_factor" in state:  # SAELens < 6's finetuning scale of the latents: fold it into W_dec
        factor = state.pop("scaling_factor")
        if not torch.all(factor == 1):
            state["W_dec"] = state["W_dec"] * factor[:, None]
            folded["finetuning_scaling_factor"] = True
    _check_weights(state, architecture, d_in, d_sae, folder / SAELENS_WEIGHTS)
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = state["W_dec"].norm(dim=-1)  # SAELens's _fold_norm_topk: the same latents and reconstruction
        state["b_enc"], state["W_enc"] = state["b_enc"] * norms, state["W_enc"] * norms
        state["W_dec"] = state["W_dec"] / norms[:, None]
        folded["rescale_acts_by_decoder_norm"] = True
    if normalize == "expected_average_only_in":
        factor = scaling_factor if scaling_factor is not None else _saved_scaling_factor(folder)
        if factor is None:
            raise InputError(
                f"{where} says normalize_activations='expected_average_only_in': the SAE reads activations scaled by "
                f"a factor that is not saved with it (no {SAELENS_SCALER} in the folder). Pass load_sae(..., "
                "scaling_factor=f) (SAELens's pretrained list calls it norm_scaling_factor; sqrt(d_in) / mean "
                "norm of the activations), or scaling_factor=1.0 to read raw activations as "
                "sae_lens.SAE.load_from_disk does")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            raise InputError(f"scaling_factor={factor!r} must be a positive number")
        state["W_enc"], state["W_dec"], state["b_dec"] = (state["W_enc"] * factor, state["W_dec"] / factor,
                                                          state["b_dec"] / factor)
        folded["scaling_factor"] = float(factor)
        normalize = "none"
    elif scaling_factor is not None:
        raise InputError(f"scaling_factor={scaling_factor!r} applies to SAEs with normalize_activations="
                         f"'expected_average_only_in'; {where} says {normalize!r}: leave it None")
    if normalize == "covariance_whitening":
        _fold_whitening(state, folder, architecture, cfg.get("apply_b_dec_to_input", True))
        folded["covariance_whitening"] = True
        normalize = "none"
    if normalize not in RUNTIME_NORMALIZATIONS:
        raise InputError(f"{where} says normalize_activations={normalize!r}, which mistudio does not know: it runs "
                         f"{', '.join(RUNTIME_NORMALIZATIONS)}, expected_average_only_in and covariance_whitening")
    if folded:
        metadata["mistudio_folded"] = folded
    head = metadata.get("hook_head_index")
    own = metadata.get("hook_point")  # written by SAE.save: mistudio's hook point, also for unknown hook names
    sae = SAE(architecture, d_in, d_sae, k=int(k) if architecture == "topk" else None,
              apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), normalize_activations=normalize,
              hook_name=hook_name, metadata=metadata,
              hook_point=own if isinstance(own, str) and _MISTUDIO_NAME.fullmatch(own) else None,
              reshape_activations=cfg.get("reshape_activations")
              or ("hook_z" if "hook_z" in str(hook_name) else "none"))
    if head is not None or sae.reshape_activations != "none":
        sae.hook_point = None  # one attention head, or the heads' z: no mistudio hook point holds that
        sae._hook_error = _uncaptured(hook_name, sae.reshape_activations, head)
    with torch.no_grad():
        for name in _WEIGHT_NAMES[architecture]:
            getattr(sae, name).copy_(state[name])
    sae = sae.to(file_dtype)
    sae.path, sae.source = folder, "saelens"
    sae._fingerprint = _digest(raw, cfg, folded)
    return sae


def _load_sparsify(folder: Path) -> SAE:
    cfg = _read_json(folder / SAELENS_CFG)
    where = folder / SAELENS_CFG
    raw = (folder / SPARSIFY_WEIGHTS).read_bytes()
    tensors = _load_tensors(raw, folder / SPARSIFY_WEIGHTS)
    if cfg.get("transcode"):
        raise InputError(f"{where} is a sparsify transcoder (transcode=true): it predicts a module's output from its "
                         "input, so it does not reconstruct one hook point's activations; mistudio loads sparse "
                         "autoencoders only")
    if cfg.get("signed"):
        raise InputError(f"{where} is a signed sparsify SAE (signed=true, top-k by absolute value), a legacy "
                         "variant mistudio does not run")
    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax"):
        raise InputError(f"{where} uses activation {activation!r}: sparsify SAEs with 'topk' or 'groupmax' are "
                         "supported")
    d_in = _cfg_int(cfg, "d_in", where)
    d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    k = _cfg_int(cfg, "k", where)
    required = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if cfg.get("skip_connection"):
        required["W_skip"] = (d_in, d_in)
    _check_shapes(tensors, required, folder / SPARSIFY_WEIGHTS)
    metadata: dict[str, Any] = {"sparsify_cfg": cfg}
    parent_cfg = folder.parent / "config.json"  # sparsify's TrainConfig, next to the hook-point folders
    if parent_cfg.is_file():
        try:
            train_cfg = json.loads(parent_cfg.read_text())
            if isinstance(train_cfg, dict) and train_cfg.get("model"):
                metadata["model_name"] = train_cfg["model"]
        except (OSError, ValueError):
            pass
    sae = SAE("topk", d_in, d_sae, k=k, activation=activation, apply_b_dec_to_input=True,
              skip_connection=bool(cfg.get("skip_connection")), hook_name=folder.name, metadata=metadata,
              dtype=tensors["encoder.weight"].dtype)
    with torch.no_grad():
        sae.W_enc.copy_(tensors["encoder.weight"].T)
        sae.b_enc.copy_(tensors["encoder.bias"])
        sae.W_dec.copy_(tensors["W_dec"])
        sae.b_dec.copy_(tensors["b_dec"])
        if sae.W_skip is not None:
            sae.W_skip.copy_(tensors["W_skip"])
    sae.path, sae.source = folder, "sparsify"
    sae._fingerprint = _digest(raw, cfg)
    return sae


# -- helpers ------------------------------------------------------------------------------------------
def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise InputError(f"dtype={dtype!r} is not an SAE dtype: use one of {tuple(DTYPES)}")
    return DTYPES[name]


def _cfg_dtype(value: Any, tensors: dict[str, Tensor], where: Path) -> torch.dtype:
    if value is None:
        return next(iter(tensors.values())).dtype
    try:
        return _torch_dtype(value)
    except InputError:
        raise InputError(f"{where} names dtype {value!r}, which is not one of {tuple(DTYPES)}") from None


def _cfg_int(cfg: dict, key: str, where: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{where} has {key}={value!r}: it needs a positive whole number")
    return value


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} cannot be read as JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path} holds a {type(cfg).__name__}, not an SAE config (a JSON object)")
    return cfg


def _load_tensors(raw: bytes, path: Path) -> dict[str, Tensor]:
    import safetensors.torch

    try:
        return safetensors.torch.load(raw)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def _check_shapes(tensors: dict[str, Tensor], required: dict[str, tuple], path: Path) -> None:
    missing = [name for name in required if name not in tensors]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)} (it holds {', '.join(sorted(tensors)) or 'nothing'})")
    for name, shape in required.items():
        if tuple(tensors[name].shape) != shape:
            raise InputError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the config says {shape}")


def _check_weights(state: dict[str, Tensor], architecture: str, d_in: int, d_sae: int, path: Path) -> None:
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    _check_shapes(state, {name: shapes.get(name, (d_sae,)) for name in _WEIGHT_NAMES[architecture]}, path)


def _saved_scaling_factor(folder: Path) -> float | None:
    path = folder / SAELENS_SCALER
    if not path.is_file():
        return None
    value = _read_json(path).get("scaling_factor")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fold_whitening(state: dict[str, Tensor], folder: Path, architecture: str, apply_b_dec: bool) -> None:
    """SAELens's fold_activation_whitening: the SAE then reads raw activations (z = (x - mean) @ M)."""
    path = folder / SAELENS_WHITENING
    if not path.is_file():
        raise InputError(f"{folder / SAELENS_CFG} says normalize_activations='covariance_whitening' but the folder "
                         f"has no {SAELENS_WHITENING} with the whitening map: load the SAELens training checkpoint "
                         "folder that has it, or save the final SAE (SAELens folds the map in at the end)")
    white = _load_tensors(path.read_bytes(), path)
    _check_shapes(white, {"mean": (state["b_dec"].numel(),), "matrix": (state["b_dec"].numel(),) * 2,
                          "inverse_matrix": (state["b_dec"].numel(),) * 2}, path)
    mean, matrix, inverse = (white[n].to(torch.float64) for n in ("mean", "matrix", "inverse_matrix"))
    W_enc = matrix @ state["W_enc"].to(torch.float64)
    if not apply_b_dec:
        shift = mean @ W_enc
        if architecture == "gated":
            state["b_gate"] = state["b_gate"] - shift.float()
            state["b_mag"] = state["b_mag"] - (shift * state["r_mag"].double().exp()).float()
        else:
            state["b_enc"] = state["b_enc"] - shift.float()
    state["W_enc"] = W_enc.float()
    state["W_dec"] = (state["W_dec"].double() @ inverse).float()
    state["b_dec"] = (state["b_dec"].double() @ inverse + mean).float()


def _digest(weights: bytes, cfg: dict, folded: dict | None = None) -> str:
    """sha256 of the weight file's bytes, then the config as canonical JSON, then what load folded in (if any)."""
    h = hashlib.sha256(weights)
    for part in (cfg, folded) if folded else (cfg,):
        h.update(b"\n")
        h.update(json.dumps(part, sort_keys=True, separators=(",", ":"), default=str).encode())
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _natural_sorted(names) -> list[str]:
    return sorted(names, key=lambda s: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)])
