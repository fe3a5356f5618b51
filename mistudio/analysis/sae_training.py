"""Train a sparse autoencoder on an extraction's stored activations, resumably; evaluate one.

The recipe is SAELens 6's, in plain torch (``sae_lens/training/sae_trainer.py`` and the training SAE
classes): Adam, gradient norm clipped to 1, a linear learning-rate warm-up and a linear decay to 0 at the
end, a linear warm-up of the sparsity coefficient; decoder rows initialised at norm 0.1 with the encoder
their transpose; top-k with ``rescale_acts_by_decoder_norm`` and the AuxK loss on dead latents; ReLU with
an L1 penalty weighted by the decoder norms; JumpReLU with the straight-through estimator (rectangle kernel
of width ``jumprelu_bandwidth``) and an L0 penalty. Two choices from older recipes: ``b_dec`` starts at the
data mean (``b_dec_init="mean"``, as sparsify does), and the inputs are scaled so that their mean norm is
``sqrt(d_in)`` (SAELens's ``expected_average_only_in``), the factor folded into the saved weights at the end.

``train_sae`` reads batches from the extraction's shuffled loader; its checkpoint (``out_dir/checkpoint/state.pt``,
replaced atomically) holds the weights, the optimizer, the loader's position inside its epoch, the dead-latent
counters, the RNG states and the metric history, so that a second call with the same ``out_dir`` continues
exactly where the first stopped (bit for bit on the CPU).
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..saes import SAE, check_applies, load_sae, tl_hook_name
from ..specs import device_problem

if TYPE_CHECKING:
    from ..extraction import Extraction
    from ..models import LoadedModel

TRAIN_ARCHITECTURES = ("topk", "standard", "jumprelu")
CHECKPOINT_DIR, CHECKPOINT_FILE, SAE_DIR = "checkpoint", "state.pt", "sae"
RATE_WINDOW_S = 10.0  # tokens/s (and the ETA) over the last 10 s of training: one slow step a report moves neither
CHECKPOINT_FORMAT = 1
# fields that may change between a run and its resumption: they do not change what is computed
RUNTIME_FIELDS = ("checkpoint_every_steps", "progress_every_steps", "device")
_NORMALIZE = ("expected_average_only_in", "none")
FIELD_HELP = {  # one line per TrainConfig field: the command line's --help (tests check every field has one)
    "architecture": "topk (k latents a token), standard (ReLU with an L1 penalty; alias relu) or jumprelu",
    "d_sae": "latents of the SAE (or expansion_factor)",
    "expansion_factor": "latents = this x the hook point's width (default 8; or d_sae)",
    "k": "top-k: latents kept per token",
    "l1_coefficient": "standard: the L1 penalty's weight",
    "l1_warm_up_steps": "standard: steps over which the L1 weight rises linearly from 0",
    "l0_coefficient": "jumprelu: the L0 penalty's weight",
    "l0_warm_up_steps": "jumprelu: steps over which the L0 weight rises linearly from 0",
    "jumprelu_bandwidth": "jumprelu: width of the straight-through estimator's kernel",
    "jumprelu_init_threshold": "jumprelu: the thresholds' starting value",
    "aux_loss_coefficient": "topk: weight of the AuxK loss that revives dead latents",
    "rescale_acts_by_decoder_norm": "topk: rank latents by value x decoder norm",
    "decoder_init_norm": "norm of the decoder's rows at the start",
    "normalize_activations": "expected_average_only_in (scale inputs to mean norm sqrt(d_in), folded in at the end) "
                             "or none",
    "b_dec_init": "the decoder bias's start: mean (of the data) or zeros",
    "lr": "Adam's learning rate",
    "lr_warm_up_steps": "steps of linear learning-rate warm-up",
    "lr_decay_steps": "steps of linear decay to 0 at the end",
    "adam_beta1": "Adam's beta1",
    "adam_beta2": "Adam's beta2",
    "max_grad_norm": "gradients are clipped to this norm",
    "batch_size": "tokens a step",
    "n_tokens": "tokens to train on, exactly (or epochs)",
    "epochs": "passes over the stored tokens (default 1; or n_tokens)",
    "exclude_special": "leave the tokenizer's special tokens out",
    "seed": "the shuffle's and the initialisation's seed",
    "dead_window_tokens": "a latent is dead when it has not fired in this many tokens (default: a quarter of the "
                          "run, at most 1,000,000; no latent is counted dead, or revived by AuxK, before that many)",
    "norm_estimate_tokens": "tokens read to estimate the scaling and the data mean",
    "checkpoint_every_steps": "write a checkpoint every this many steps (0: only when stopped)",
    "progress_every_steps": "report figures every this many steps (default: about 20 reports a short run)",
    "device": "cpu, cuda, cuda:1, mps or auto",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(float(v))


DEAD_WINDOW_TOKENS = 1_000_000  # the dead window of a run of 4,000,000 tokens or more (SAELens: 1,000 steps)
CLASS_MARK, CLASS_SAYS_MARK = "«py:TrainConfig.»", "«py:TrainConfig: »"  # in messages: the class, for Python only


@dataclass(frozen=True, init=False)
class TrainConfig:
    """How to train an SAE. Every bad value raises InputError naming the field.

    Size: ``d_sae``, or ``expansion_factor`` x the hook point's width (default 8). Length: ``n_tokens``,
    or ``epochs`` over the stored tokens (default 1), exactly: the last step takes the tokens left, not a whole
    batch. ``architecture``: ``"topk"`` (``k``, ``aux_loss_coefficient``),
    ``"standard"`` = ReLU (alias ``"relu"``; ``l1_coefficient``, ``l1_warm_up_steps``) or ``"jumprelu"``
    (``l0_coefficient``, ``l0_warm_up_steps``, ``jumprelu_bandwidth``, ``jumprelu_init_threshold``).
    A latent is dead when it has not fired in the last ``dead_window_tokens`` tokens (None: a quarter of the run,
    at most 1,000,000 tokens; :attr:`TrainingPlan.dead_window`). ``progress_every_steps``:
    None reports about every 1/20 of a short run, every 10 steps of a long one (:meth:`progress_interval`).
    """

    architecture: str = "topk"
    d_sae: int | None = None
    expansion_factor: int | None = None
    k: int = 32
    l1_coefficient: float = 5.0
    l1_warm_up_steps: int = 0
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    aux_loss_coefficient: float = 1.0
    rescale_acts_by_decoder_norm: bool = True
    decoder_init_norm: float | None = 0.1
    normalize_activations: str = "expected_average_only_in"
    b_dec_init: str = "mean"
    lr: float = 3e-4
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    batch_size: int = 4096
    n_tokens: int | None = None
    epochs: float | None = None
    exclude_special: bool = True
    seed: int = 0
    dead_window_tokens: int | None = None
    norm_estimate_tokens: int = 65_536
    checkpoint_every_steps: int = 1000
    progress_every_steps: int | None = None
    device: str = "cpu"

    def __init__(self, **settings: Any) -> None:
        """Settings by name; a name that is not a field is named, with the one probably meant."""
        check_setting_names(settings)
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, settings.get(f.name, f.default))
        self.__post_init__()

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []  # (field, message): every wrong field is named at once

        def bad(name: str, why: str) -> None:
            problems.append((name, f"{CLASS_MARK}«{name}={getattr(self, name)!r}» {why}"))

        arch = "standard" if self.architecture == "relu" else self.architecture
        if arch not in TRAIN_ARCHITECTURES:
            close = difflib.get_close_matches(str(self.architecture).lower().replace("-", ""), TRAIN_ARCHITECTURES, 1)
            bad("architecture", f"is not one of {TRAIN_ARCHITECTURES} (or 'relu' for 'standard')"
                + (f": did you mean «architecture={close[0]!r}»?" if close else ""))
        else:
            object.__setattr__(self, "architecture", arch)
        positive_ints = ["k", "batch_size", "norm_estimate_tokens"]
        for name in positive_ints + ["d_sae", "expansion_factor", "n_tokens", "progress_every_steps",
                                     "dead_window_tokens"]:
            value = getattr(self, name)
            if value is None and name not in positive_ints:
                continue
            if not _is_int(value) or value < 1:
                bad(name, "must be a positive whole number")
            else:
                object.__setattr__(self, name, int(value))
        for name in ("l1_warm_up_steps", "l0_warm_up_steps", "lr_warm_up_steps", "lr_decay_steps", "seed",
                     "checkpoint_every_steps"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "must be a whole number >= 0")
            else:
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("lr", "jumprelu_bandwidth", "max_grad_norm"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                bad(name, "must be a positive number")
        for name in ("l1_coefficient", "l0_coefficient", "aux_loss_coefficient", "jumprelu_init_threshold"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "must be a number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                bad(name, "must be in [0, 1)")
        norm = self.decoder_init_norm
        if norm is not None and (not _is_number(norm) or norm <= 0):
            bad("decoder_init_norm", "must be a positive number, or None to keep kaiming's")
        if self.epochs is not None and (not _is_number(self.epochs) or self.epochs <= 0):
            bad("epochs", "must be a positive number")
        if self.n_tokens is not None and self.epochs is not None:
            problems.append(("epochs", f"{CLASS_SAYS_MARK}give «n_tokens={self.n_tokens}» or «epochs={self.epochs}», "
                                       "not both"))
        if self.d_sae is not None and self.expansion_factor is not None:
            problems.append(("expansion_factor", f"{CLASS_SAYS_MARK}give «d_sae={self.d_sae}» or «expansion_factor="
                                                 f"{self.expansion_factor}», not both"))
        for name in ("rescale_acts_by_decoder_norm", "exclude_special"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        if self.normalize_activations not in _NORMALIZE:
            bad("normalize_activations", f"is not one of {_NORMALIZE}")
        if self.b_dec_init not in ("mean", "zeros"):
            bad("b_dec_init", "is not 'mean' or 'zeros'")
        if not isinstance(self.device, str) or not self.device.strip():
            bad("device", "must name a torch device: 'cpu', 'cuda', 'cuda:1', 'mps' or 'auto'")
        elif problem := device_problem(self.device):
            bad("device", f"{problem}: «pass device='auto'»")
        else:
            try:
                _device(self.device)
            except (RuntimeError, ValueError) as exc:
                bad("device", f"cannot be used here ({exc}): «pass device='auto'»")
        raise_all(problems)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def progress_interval(self, total_steps: int) -> int:
        """Report progress every this many steps: ``progress_every_steps`` if set, else about every 1/20 of a
        short run (a run of 11 steps reports every step, so its bar and curve move from the start), every 10
        steps of a longer one, and at most about 5,000 reports in all (each costs a device sync, a history line
        and a place in every checkpoint)."""
        if self.progress_every_steps is not None:
            return self.progress_every_steps
        return max(1, min(math.ceil(total_steps / 20), max(10, total_steps // 5000)))

    def trajectory(self) -> dict[str, Any]:
        """The fields that decide what is computed (a resumed run must have the same)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


@dataclass
class TrainResult:
    """What ``train_sae`` made: the SAE (as saved, folded, eval mode) and how it got there."""

    sae: SAE
    path: Path
    steps: int
    tokens: int
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    resumed_from_step: int | None = None
    elapsed_s: float = 0.0
    scaling_factor: float | None = None


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available here")
    return device


# -- JumpReLU's straight-through estimators (SAELens's Step and JumpReLU, ste_to_input=False) ----------------
def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        ste = (threshold / bw) * _rectangle((x - threshold) / bw) * grad
        return (x > threshold).to(x) * grad, torch.sum(-ste, dim=0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        ste = (1.0 / bw) * _rectangle((x - threshold) / bw) * grad
        return None, torch.sum(-ste, dim=0), None


# -- schedules ------------------------------------------------------------------------------------------
def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """SAELens's constant schedule: linear warm-up over the first steps, linear decay to 0 over the last."""
    factor = 1.0
    if step < config.lr_warm_up_steps:
        factor = (step + 1) / config.lr_warm_up_steps
    decay_from = total_steps - config.lr_decay_steps
    if config.lr_decay_steps and step >= decay_from:
        factor = min(factor, 1.0 - (step - decay_from) / config.lr_decay_steps)
    return config.lr * factor


def coefficient_at(step: int, final: float, warm_up_steps: int) -> float:
    """SAELens's CoefficientScheduler as the training loop reads it: 0 at step 0, ``final`` after the warm-up."""
    return final * min(step / warm_up_steps, 1.0) if warm_up_steps else final


# -- the training forward pass --------------------------------------------------------------------------
@dataclass
class _StepOut:
    loss: Tensor
    mse_loss: Tensor
    sparsity_loss: Tensor
    acts: Tensor
    out: Tensor


def _train_forward(sae: SAE, x: Tensor, config: TrainConfig, coefficient: float, dead: Tensor | None) -> _StepOut:
    """One training forward pass of SAELens's training SAE of the same architecture (inputs already scaled)."""
    sae_in = x - sae.b_dec
    pre = sae_in @ sae.W_enc + sae.b_enc
    W_dec = sae.W_dec
    if config.architecture == "topk":
        norms = W_dec.norm(dim=-1) if config.rescale_acts_by_decoder_norm else None
        if norms is not None:
            pre = pre * norms
        values, indices = torch.topk(pre, config.k, dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        out = (acts / norms if norms is not None else acts) @ W_dec + sae.b_dec
    elif config.architecture == "standard":
        acts = F.relu(pre)
        out = acts @ W_dec + sae.b_dec
    else:
        acts = _JumpReLU.apply(pre, sae.threshold, config.jumprelu_bandwidth)
        out = acts @ W_dec + sae.b_dec
    mse_loss = (out - x).pow(2).sum(dim=-1).mean()
    if config.architecture == "standard":
        sparsity = coefficient * (acts * W_dec.norm(dim=1)).norm(p=1, dim=-1).mean()
    elif config.architecture == "jumprelu":
        sparsity = coefficient * _Step.apply(pre, sae.threshold, config.jumprelu_bandwidth).sum(dim=-1).mean()
    else:
        sparsity = _auxk_loss(sae, x, out, pre, dead, config)
    return _StepOut(mse_loss + sparsity, mse_loss, sparsity, acts, out)


def _auxk_loss(sae: SAE, x: Tensor, out: Tensor, pre: Tensor, dead: Tensor | None, config: TrainConfig) -> Tensor:
    """SAELens's (and Gao et al.'s) AuxK: the top dead latents reconstruct what the live ones missed."""
    n_dead = int(dead.sum()) if dead is not None else 0
    if n_dead == 0 or config.aux_loss_coefficient == 0:
        return out.new_tensor(0.0)
    residual = (x - out).detach()
    k_aux = x.shape[-1] // 2
    scale = min(n_dead / k_aux, 1.0)
    k_aux = min(k_aux, n_dead)
    top = torch.where(dead[None], pre, -torch.inf).topk(k_aux, sorted=False)
    aux_acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    if config.rescale_acts_by_decoder_norm:
        aux_acts = aux_acts / sae.W_dec.norm(dim=-1)
    recons = aux_acts @ sae.W_dec
    return config.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()


# -- data helpers ---------------------------------------------------------------------------------------
def _blocks(total: int, n: int, pieces: int = 16) -> list[tuple[int, int]]:
    """``pieces`` evenly spaced row ranges of ``[0, total)`` holding ``min(n, total)`` rows together."""
    if n >= total:
        return [(0, total)] if total else []
    per = max(1, n // pieces)
    starts = np.linspace(0, total - per, num=min(pieces, max(1, n // per)), dtype=np.int64)
    return [(int(a), int(a) + per) for a in starts]


def _sample_rows(loader, n: int, device: torch.device) -> Tensor:
    """Up to ``n`` rows read from evenly spaced places of the store (specials dropped as the loader drops them)."""
    parts = [loader.read(0, a, b)[1][loader.hook_points[0]] for a, b in _blocks(loader.limits[0], n)]
    rows = np.concatenate(parts) if parts else np.zeros((0, loader.widths[loader.hook_points[0]]), np.float32)
    return torch.from_numpy(rows.astype(np.float32)).to(device)


def _kept_rows(ext: "Extraction", exclude_special: bool) -> int:
    """Rows an epoch of the loader yields (committed rows, less special tokens when they are dropped)."""
    committed = ext.committed_tokens()
    tokens = ext.store.group["tokens"]
    if not exclude_special or "activation_offsets" in tokens:
        return committed
    return committed - int(np.count_nonzero(ext.special_flags(0, committed)))


# -- checkpoint -----------------------------------------------------------------------------------------
def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own file: numpy arrays inside
    except Exception as exc:  # noqa: BLE001 - a damaged file, whatever torch raises
        raise InputError(f"the checkpoint {path} cannot be read ({type(exc).__name__}: {exc}): delete the folder "
                         f"{path.parent} to start over") from None


def _describe_mismatch(saved: dict, now: dict) -> str:
    return ", ".join(f"{k}={saved.get(k)!r} then, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
                     if saved.get(k) != now.get(k))


# -- training -------------------------------------------------------------------------------------------
def _init_sae(config: TrainConfig, d_in: int, d_sae: int, hook_point: str, device: torch.device) -> SAE:
    """SAELens's TrainingSAE initialisation, seeded: kaiming-uniform decoder rows scaled to decoder_init_norm,
    encoder = decoder transpose, zero biases, JumpReLU thresholds at jumprelu_init_threshold."""
    sae = SAE(config.architecture, d_in, d_sae, k=config.k if config.architecture == "topk" else None,
              hook_name=tl_hook_name(hook_point), hook_point=hook_point, device=device)
    g = torch.Generator().manual_seed(config.seed)
    w_dec = torch.nn.init.kaiming_uniform_(torch.empty(d_sae, d_in), generator=g)
    if config.decoder_init_norm is not None:
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * config.decoder_init_norm
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        if config.architecture == "jumprelu":
            sae.threshold.fill_(config.jumprelu_init_threshold)
    return sae


def _final_sae(trained: SAE, config: TrainConfig, scale: float | None, metadata: dict) -> SAE:
    """The inference SAE: decoder norms folded (top-k rescaling), input scaling folded, on the CPU side of nothing."""
    sae = SAE(trained.architecture, trained.d_in, trained.d_sae, k=trained.k, hook_name=trained.hook_name,
              hook_point=trained.hook_point, metadata=metadata, device=trained.device)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            getattr(sae, name).copy_(p)
        if config.architecture == "topk" and config.rescale_acts_by_decoder_norm:
            norms = sae.W_dec.norm(dim=-1)
            sae.W_enc.mul_(norms)
            sae.b_enc.mul_(norms)
            sae.W_dec.div_(norms[:, None])
        if scale is not None:
            sae.W_enc.mul_(scale)
            sae.W_dec.div_(scale)
            sae.b_dec.div_(scale)
    return sae


@dataclass(frozen=True)
class TrainingPlan:
    """What a training run will do, known before it starts: sizes, rows per epoch, length."""

    config: TrainConfig
    hook_point: str
    d_in: int
    d_sae: int
    rows: int  # rows one epoch of the loader yields
    total_tokens: int
    total_steps: int
    dead_window: int  # tokens without firing that make a latent dead (dead_window_tokens, or a quarter of the run)


def plan_training(ext: "Extraction", hook_point: str, config: TrainConfig | None = None) -> TrainingPlan:
    """Check ``config`` against ``ext`` at ``hook_point`` without training (InputError naming what is wrong)."""
    config = config if config is not None else TrainConfig()
    if not isinstance(config, TrainConfig):
        raise InputError(f"config must be a TrainConfig, got {type(config).__name__}: TrainConfig(architecture=...)")
    if hook_point not in ext.hook_points:
        raise InputError(f"hook point {hook_point!r} is not in extraction {ext.id}: it stores "
                         f"{', '.join(ext.hook_points) or 'no hook point'}", param="hook_point")
    tl_hook_name(hook_point)
    width = int(ext.activations(hook_point).shape[1])
    d_sae = config.d_sae or width * (config.expansion_factor or 8)
    problems: list[tuple[str, str]] = []  # (param, message): every one is said at once
    if config.architecture == "topk" and config.k > d_sae:
        problems.append(("k", f"{CLASS_MARK}«k={config.k}» is larger than «d_sae={d_sae}»: «pass k={d_sae}» or a "
                              "smaller k"))
    kept = _kept_rows(ext, config.exclude_special)
    if kept < config.batch_size:
        problems.append(("batch_size", f"{CLASS_MARK}«batch_size={config.batch_size}» is more than the {kept} rows "
                                       f"extraction {ext.id} holds at {hook_point}: use a smaller batch, e.g. "
                                       f"«pass batch_size={_smaller_batch(kept)}»"))
    need, free = training_bytes(width, d_sae, min(config.batch_size, max(kept, 1))), free_memory(config.device)
    if free is not None and need > free:
        name = "d_sae" if config.d_sae else "expansion_factor"
        problems.append((name, f"{CLASS_MARK}«{name}={getattr(config, name) or 8}» makes an SAE of d_sae={d_sae:,} "
                               f"that needs about {need / 2**30:,.1f} GiB to train (weights, gradients, Adam's state "
                               f"and a batch) on {config.device}, which has {free / 2**30:,.1f} GiB free: use a "
                               f"smaller d_sae, e.g. «pass d_sae={_smaller_batch(max(1, d_sae * free // need))}»"))
    total_tokens = config.n_tokens if config.n_tokens is not None else int(round((config.epochs or 1.0) * kept))
    if total_tokens < 1 and kept:
        problems.append(("epochs", f"{CLASS_MARK}«epochs={config.epochs}» of the {kept:,} rows extraction {ext.id} "
                                   f"holds at {hook_point} is less than one token: «pass epochs="
                                   f"{1 / kept:.2g}» or more, or «pass n_tokens»"))
    raise_all(problems)
    window = config.dead_window_tokens or min(DEAD_WINDOW_TOKENS, max(config.batch_size, total_tokens // 4))
    return TrainingPlan(config, hook_point, width, d_sae, kept, total_tokens,
                        max(1, math.ceil(total_tokens / config.batch_size)), window)


_ALIASES = {"learning_rate": "lr", "l1": "l1_coefficient", "l0": "l0_coefficient", "expansion": "expansion_factor",
            "arch": "architecture", "tokens": "n_tokens", "n_epochs": "epochs", "top_k": "k", "topk": "k"}


def _closest_field(name: str, fields: list[str]) -> str | None:
    """The TrainConfig field the user probably meant: a known alias, a near spelling, or a field ``name`` starts
    with (``lr_rate`` -> ``lr``)."""
    if name in _ALIASES:
        return _ALIASES[name]
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.7)
    if close:
        return close[0]
    prefixed = [f for f in fields if name.startswith(f + "_")]
    return max(prefixed, key=len) if prefixed else None


def check_setting_names(names) -> None:
    """InputError for the first of ``names`` that is not a TrainConfig field, naming the one probably meant."""
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    for name in names:
        if name not in fields:
            close = _closest_field(str(name), fields)
            hint = f"did you mean «{close}»? " if close else ""
            raise InputError(f"«{name}» is not a training setting: {hint}the settings are TrainConfig's fields "
                             f"({', '.join(fields)})", param=str(name))


def raise_all(problems: list[tuple[str, str]]) -> None:
    """One InputError naming every ``(field, message)`` of ``problems`` (about the first field); none: nothing."""
    if len(problems) == 1:
        raise InputError(problems[0][1], param=problems[0][0])
    if problems:
        raise InputError(f"{len(problems)} settings are wrong: " + "; ".join(f"({i}) {m}" for i, (_, m) in
                                                                          enumerate(problems, 1)),
                         param=problems[0][0])


def training_bytes(d_in: int, d_sae: int, batch_size: int) -> int:
    """About the memory training an SAE takes: encoder and decoder (2·d_in·d_sae floats) with their gradients
    and Adam's two moments, four times over, and a batch's pre-activations, activations and their gradients."""
    return 4 * (4 * 2 * d_in * d_sae + 3 * batch_size * d_sae)


def free_memory(device: str) -> int | None:
    """Bytes free on ``device`` (a CUDA device's free memory, else the machine's available RAM); None when it
    cannot be told."""
    try:
        if str(device).startswith("cuda") and torch.cuda.is_available():
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def _smaller_batch(rows: int) -> int:
    """The largest power of two at most ``rows`` (at least 1)."""
    return 1 << max(0, rows.bit_length() - 1)


def train_sae(ext: "Extraction", hook_point: str, config: TrainConfig | None = None, out_dir: str | os.PathLike = ".",
              check: Callable[[], None] | None = None, progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Train an SAE on ``ext``'s activations at ``hook_point``; resume from ``out_dir/checkpoint`` if there.

    ``check()`` runs before every step and may raise (cancel, timeout): the trainer writes a checkpoint of
    the last finished step first, then lets the exception through. ``progress(dict)`` gets live figures every
    ``config.progress_interval(total_steps)`` steps and at the end: step, total_steps, tokens, total_tokens,
    epoch, loss, mse (per element, in the activations' units), l0, explained_variance, dead_fraction,
    coefficient, lr, tokens_per_s, eta_s, elapsed_s. The final SAE is saved in SAELens's format in ``out_dir/sae``, with
    ``hook_name`` the TransformerLens name of the hook point and ``metadata.hook_point`` mistudio's.
    A finished ``out_dir`` returns its result without training again.
    """
    plan = plan_training(ext, hook_point, config)
    config, width, d_sae, kept, total_steps = plan.config, plan.d_in, plan.d_sae, plan.rows, plan.total_steps
    device = _device(config.device)
    out = Path(out_dir).expanduser()
    state_path = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    identity = {"extraction": ext.id, "hook_point": hook_point, "d_in": width, "d_sae": d_sae, "rows": kept}

    saved = _load_checkpoint(state_path) if state_path.is_file() else None
    if saved is not None:
        if saved.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{state_path} was written by another checkpoint format ({saved.get('format')!r}): "
                             "use another out_dir")
        if saved["identity"] != identity or saved["config"] != config.trajectory():
            diff = _describe_mismatch({**saved["identity"], **saved["config"]}, {**identity, **config.trajectory()})
            raise InputError(f"{out} holds a training run with other settings ({diff}): resume it with the same "
                             "extraction, hook point and TrainConfig, or give another out_dir")
        if saved["finished"] and (out / SAE_DIR / "cfg.json").is_file():
            sae = load_sae(out / SAE_DIR, device=device)
            return TrainResult(sae, out / SAE_DIR, saved["step"], saved["tokens"], saved["history"],
                               saved["history"][-1] if saved["history"] else {}, saved["step"],
                               saved["elapsed_s"], saved["scaling_factor"])

    loader = ext.loader(hook_point, batch_size=config.batch_size, shuffle=True, seed=config.seed, drop_last=True,
                        exclude_special=config.exclude_special, device=str(device), dtype="float32")
    if saved is None:
        sample = _sample_rows(loader, config.norm_estimate_tokens, device)
        scale = None
        if config.normalize_activations == "expected_average_only_in":
            mean_norm = float(sample.norm(dim=-1).mean())
            scale = math.sqrt(width) / mean_norm if mean_norm > 0 else 1.0
        sae = _init_sae(config, width, d_sae, hook_point, device)
        if config.b_dec_init == "mean":
            with torch.no_grad():
                sae.b_dec.copy_(sample.mean(0) * (scale or 1.0))
        del sample
        step, tokens, history, elapsed, epoch_state = 0, 0, [], 0.0, None
        since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
    else:
        scale = saved["scaling_factor"]
        sae = _init_sae(config, width, d_sae, hook_point, device)
        sae.load_state_dict(saved["sae"])
        step, tokens, history, elapsed = saved["step"], saved["tokens"], list(saved["history"]), saved["elapsed_s"]
        epoch_state, since_fired = saved["epoch_state"], saved["since_fired"].to(device)
        torch.set_rng_state(saved["rng"]["torch"])
        if saved["rng"].get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    resumed_from = step if saved is not None else None
    sae.requires_grad_(True)
    sae.train()
    params = list(sae.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    it = iter(loader)
    if epoch_state is not None:
        it.load_state_dict(epoch_state)

    final, warm = ((config.l1_coefficient, config.l1_warm_up_steps) if config.architecture == "standard" else
                   (config.l0_coefficient, config.l0_warm_up_steps) if config.architecture == "jumprelu" else (0.0, 0))

    def snapshot(finished: bool = False) -> dict:
        return {"format": CHECKPOINT_FORMAT, "identity": identity, "config": config.trajectory(),
                "step": step, "tokens": tokens, "finished": finished, "scaling_factor": scale,
                "sae": {k: v.detach().cpu().clone() for k, v in sae.state_dict().items()},
                "optimizer": optimizer.state_dict(), "epoch_state": it.state_dict(),
                "since_fired": since_fired.cpu().clone(), "history": history, "elapsed_s": elapsed,
                "step_sums": previous.cpu().clone() if previous is not None else None,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}}

    started = time.monotonic()
    marks = collections.deque([(started, tokens)])  # (time, tokens) at each report of the last RATE_WINDOW_S
    elapsed_before = elapsed
    previous = None if saved is None or saved.get("step_sums") is None else saved["step_sums"].to(device)
    # previous: the last step's reconstruction sums (_step_sums); a short last step is scored with them
    report_every = config.progress_interval(total_steps)
    while step < total_steps:
        try:
            if check is not None:
                check()
        except BaseException:
            elapsed = elapsed_before + time.monotonic() - started
            _save_checkpoint(state_path, snapshot())
            raise
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = batch[:plan.total_tokens - tokens]  # the last step takes what n_tokens leaves: no more
        x = batch * scale if scale is not None else batch
        if config.architecture == "jumprelu":
            with torch.no_grad():
                sae.threshold.clamp_(min=0.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config, total_steps)
        coefficient = coefficient_at(step, final, warm)
        dead = since_fired > plan.dead_window
        result = _train_forward(sae, x, config, coefficient, dead if config.architecture == "topk" else None)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            fired = (result.acts > 0).any(dim=0)
            since_fired += x.shape[0]
            since_fired[fired] = 0
        step += 1
        tokens += x.shape[0]
        sums = _step_sums(result, x)
        if step % report_every == 0 or step == total_steps:
            now = time.monotonic()
            while len(marks) > 1 and now - marks[1][0] >= RATE_WINDOW_S:
                marks.popleft()  # the oldest mark kept is at least RATE_WINDOW_S old, once the run is that old
            rate = (tokens - marks[0][1]) / max(now - marks[0][0], 1e-9)
            marks.append((now, tokens))
            elapsed = elapsed_before + now - started
            if x.shape[0] < config.batch_size and previous is not None:  # the short last step: not alone
                sums = sums + previous
            figures = _figures(result, sums, scale, since_fired, plan, step, tokens, coefficient, optimizer, rate,
                               elapsed, it.epoch)
            history.append(figures)
            if progress is not None:
                progress(figures)
        previous = sums
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 and step < total_steps:
            elapsed = elapsed_before + time.monotonic() - started
            _save_checkpoint(state_path, snapshot())
    elapsed = elapsed_before + time.monotonic() - started
    sae.requires_grad_(False)
    sae.eval()
    metadata = {"model_name": ext.record.model.name_or_path, "hook_point": hook_point,
                "mistudio": {"extraction_id": ext.id, "extraction_location": ext.location,
                             "model_weights": (ext.record.model.fingerprint or {}).get("weights"),
                             "trained_steps": step,
                             "trained_tokens": tokens, "scaling_factor_folded": scale,
                             "train_config": config.to_dict(), "final": history[-1] if history else {}}}
    if history:
        metadata.update(l0=history[-1]["l0"])
        if history[-1]["dead_fraction"] is not None:  # None: the run was shorter than its dead window
            metadata.update(num_dead_features=round(history[-1]["dead_fraction"] * d_sae))
    final_sae = _final_sae(sae, config, scale, metadata)
    final_sae.save(out / SAE_DIR)
    _save_checkpoint(state_path, snapshot(finished=True))
    return TrainResult(final_sae, out / SAE_DIR, step, tokens, history, history[-1] if history else {},
                       resumed_from, elapsed, scale)


@torch.no_grad()
def _step_sums(result: _StepOut, x: Tensor) -> Tensor:
    """A step's reconstruction sums, where they are (no host sync): squared error, squared deviation from the
    batch's mean, latents fired, rows."""
    with torch.no_grad():
        return torch.stack([(result.out - x).pow(2).sum(), (x - x.mean(0)).pow(2).sum(),
                            (result.acts > 0).sum().to(x.dtype), torch.tensor(float(x.shape[0]), device=x.device,
                                                                               dtype=x.dtype)]).double()


def _figures(result: _StepOut, sums: Tensor, scale: float | None, since_fired: Tensor, plan: TrainingPlan,
             step: int, tokens: int, coefficient: float, optimizer, rate: float, elapsed: float, epoch: int) -> dict:
    """A step's live figures; mse, l0 and explained variance from ``sums`` (:func:`_step_sums`: the step's, or
    for a last step shorter than a batch, its and the step before's together, so a leftover of a few rows is not
    scored alone; explained variance None where the rows do not vary, as one row does not).
    ``dead_fraction`` is None until the run has trained on ``dead_window`` tokens: before that no latent can be
    counted dead, and 0 would read as "none are"."""
    total_steps, total_tokens = plan.total_steps, plan.total_tokens
    err, variance, fired, rows = (float(v) for v in sums.cpu())
    width = result.out.shape[-1]
    factor = (scale or 1.0) ** 2
    return {"step": step, "total_steps": total_steps, "tokens": tokens, "total_tokens": total_tokens,
            "epoch": int(epoch), "loss": float(result.loss.detach()),
            "mse_loss": float(result.mse_loss.detach()), "sparsity_loss": float(result.sparsity_loss.detach()),
            "mse": err / rows / width / factor, "l0": fired / rows,
            "explained_variance": 1.0 - err / variance if variance > 1e-30 * rows else None,
            "dead_fraction": float((since_fired > plan.dead_window).float().mean()) if tokens > plan.dead_window
            else None, "dead_window": plan.dead_window,
            "coefficient": coefficient, "lr": float(optimizer.param_groups[0]["lr"]), "tokens_per_s": rate,
            "eta_s": (total_tokens - tokens) / rate if rate > 0 else None, "elapsed_s": elapsed}


# -- evaluation -----------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_sae(sae: SAE, ext: "Extraction", hook_point: str, max_tokens: int = 100_000,
                 model: "str | os.PathLike | LoadedModel | torch.nn.Module | None" = None, n_samples: int = 8,
                 batch_size: int = 4096, exclude_special: bool = True,
                 check: Callable[[], None] | None = None) -> dict:
    """How well ``sae`` reconstructs ``hook_point`` of ``ext``.

    Over up to ``max_tokens`` stored rows (evenly spaced blocks of the store; with ``exclude_special``, as the
    figures' ``exclude_special`` says, less the special tokens' rows: a training job passes its own setting, so
    that a run is scored on the rows it trained on): ``explained_variance``
    (1 - squared error / variance around the mean), ``mse`` (per element), ``l0`` and ``dead_fraction`` (latents
    that never fired there). With ``model`` (the model folder, a ``mistudio.models.load_model`` result, or a
    loaded ``transformers`` causal LM) also the next-token cross-entropy over ``n_samples`` stored samples:
    ``ce_clean``, ``ce_spliced`` (the SAE's reconstruction replaces the hook point's output), ``ce_zero_ablation``
    (zeros replace it), ``ce_loss_score`` = (zero - spliced) / (zero - clean) ("loss recovered"; None, with a
    ``ce_loss_note`` saying why, when zeroing does not raise the loss) and ``kl_div`` (clean || spliced).
    ``check()`` runs before every batch and sample and may raise (a training job's cancel).
    """
    check = check or (lambda: None)
    for name, value in (("max_tokens", max_tokens), ("n_samples", n_samples), ("batch_size", batch_size)):
        if not _is_int(value) or value < 1:
            raise InputError(f"{name}={value!r} must be a positive whole number")
    width = int(ext.activations(hook_point).shape[1])
    check_applies(sae, hook_point, width)
    loader = ext.loader(hook_point, batch_size=batch_size, shuffle=False, exclude_special=exclude_special)
    n, sse, sum_x, sum_sq, l0_sum = 0, 0.0, torch.zeros(width, dtype=torch.float64), 0.0, 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.device)
    for a, b in _blocks(loader.limits[0], max_tokens):
        for start in range(a, b, batch_size):
            check()
            rows = loader.read(0, start, min(b, start + batch_size))[1][hook_point]
            if not len(rows):
                continue
            x = torch.from_numpy(rows.astype(np.float32)).to(sae.device)
            z = sae.encode(x)
            recon = sae(x).float()
            sse += float((recon - x).double().pow(2).sum())
            sum_x += x.double().sum(0).cpu()
            sum_sq += float(x.double().pow(2).sum())
            l0_sum += float((z != 0).sum())
            fired |= (z != 0).any(dim=0)
            n += x.shape[0]
    if n == 0:
        raise InputError(f"extraction {ext.id} has no committed rows at {hook_point} to evaluate on")
    sst = sum_sq - float(sum_x.pow(2).sum()) / n
    figures = {"hook_point": hook_point, "n_tokens": n, "exclude_special": bool(exclude_special),
               "explained_variance": 1.0 - sse / sst if sst > 0 else float("nan"),
               "mse": sse / (n * width), "l0": l0_sum / n, "dead_fraction": float((~fired).float().mean())}
    if model is not None:
        figures.update(_spliced_losses(sae, ext, hook_point, model, n_samples, check))
    return figures


def _causal_lm(model, device: torch.device) -> torch.nn.Module:
    """A causal LM with its head: the module given, or loaded from a folder / a LoadedModel's source."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import FAMILIES, LoadedModel

    encoders = {t for t, paths in FAMILIES.items() if paths[0] == "encoder.layer"}

    def refuse_encoder(config, what: str) -> None:
        if getattr(config, "model_type", None) in encoders:
            raise InputError(f"model={what} is a {config.model_type} encoder: the spliced cross-entropy needs a "
                             "decoder (next-token) model; leave model=None for an encoder")

    if isinstance(model, torch.nn.Module):
        refuse_encoder(getattr(model, "config", None), type(model).__name__)
        if getattr(model, "get_output_embeddings", lambda: None)() is None:
            raise InputError(f"model={type(model).__name__} has no language-model head: pass the model folder, or "
                             "a transformers AutoModelForCausalLM")
        return model.eval()
    if isinstance(model, LoadedModel):
        source, revision = model.spec.name_or_path, model.spec.revision
        dtype, device = next(model.model.parameters()).dtype, model.input_device
        refuse_encoder(model.model.config, repr(source))
    else:
        source, revision, dtype = str(model), None, torch.float32
    try:
        refuse_encoder(AutoConfig.from_pretrained(source, revision=revision), repr(source))
        lm = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype)
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"model={source!r} has no causal language-model head ({str(exc).splitlines()[0]}): the "
                         "spliced cross-entropy needs a decoder model; leave model=None for an encoder") from None
    except OSError as exc:
        raise InputError(f"model={source!r} cannot be loaded ({str(exc).splitlines()[0]}): give the model's "
                         "local folder") from None
    return lm.to(device).eval()


def _hidden(output) -> Tensor:
    """The hidden-state tensor of a sub-module's output (blocks and attention return tuples)."""
    return output if isinstance(output, Tensor) else output[0]


def _replace_output(output, new: Tensor):
    if isinstance(output, Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    output[0] = new  # a ModelOutput
    return output


ABLATION_RISE = 1e-3  # "loss recovered" needs zero-ablation to raise the loss by more than this share of it


def _spliced_losses(sae: SAE, ext: "Extraction", hook_point: str, model, n_samples: int,
                    check: Callable[[], None]) -> dict:
    from ..models import find_blocks, max_positions_of, n_layers_of

    lm = _causal_lm(model, sae.device)
    device = next(lm.parameters()).device
    blocks, attn, mlp = find_blocks(lm, lm.config.model_type, n_layers_of(lm.config))
    layer, kind = int(hook_point.split(".")[1]), hook_point.split(".")[2]
    if layer >= len(blocks):
        raise InputError(f"hook point {hook_point} is past the model's {len(blocks)} layers: pass the model the "
                         f"extraction {ext.id} was made with")
    module = blocks[layer] if kind == "residual" else blocks[layer].get_submodule(attn if kind == "attention" else mlp)
    limit = max_positions_of(lm.config) or 1024
    offsets = ext.sample_offsets
    ids = ext.store.tokens("input_ids")
    spans = [(int(a), int(min(b, a + limit))) for a, b in zip(offsets[:-1], offsets[1:]) if b - a >= 2][:n_samples]
    if not spans:
        raise InputError(f"extraction {ext.id} has no stored sample of 2 tokens or more to measure a loss on")
    mode: dict[str, str] = {"now": "clean"}

    def hook(_module, _inputs, output):
        if mode["now"] == "clean":
            return None
        hidden = _hidden(output)
        new = torch.zeros_like(hidden) if mode["now"] == "zero" else sae(hidden).to(hidden.dtype)
        return _replace_output(output, new)

    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    handle = module.register_forward_hook(hook)
    try:
        for a, b in spans:
            check()
            tokens = torch.as_tensor(np.asarray(ids[a:b], dtype=np.int64), device=device)[None]
            target = tokens[0, 1:]
            logps = {}
            for name in ("clean", "spliced", "zero"):
                mode["now"] = name
                logits = lm(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits[0, :-1].float()
                logps[name] = logits.log_softmax(-1)
                totals[name] += float(F.nll_loss(logps[name], target, reduction="sum"))
            totals["kl"] += float((logps["clean"].exp() * (logps["clean"] - logps["spliced"])).sum())
            count += len(target)
    finally:
        handle.remove()
    clean, spliced, zero = (totals[k] / count for k in ("clean", "spliced", "zero"))
    return {"ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablation": zero, "ce_delta": spliced - clean,
            **loss_recovered(clean, spliced, zero), "kl_div": totals["kl"] / count, "ce_tokens": count,
            "ce_samples": len(spans)}


def loss_recovered(clean: float, spliced: float, zero: float) -> dict:
    """``{"ce_loss_score": (zero - spliced) / (zero - clean)}``, or None with ``ce_loss_note`` saying why where
    zero-ablation raises the loss by less than :data:`ABLATION_RISE` of it: a ratio over a rise of about nothing
    (an untrained model's 0.0005 nats gave 1,016% "recovered") would mislead, whatever its value."""
    if zero - clean > ABLATION_RISE * clean:
        return {"ce_loss_score": (zero - spliced) / (zero - clean)}
    return {"ce_loss_score": None,
            "ce_loss_note": f"zeroing the hook point does not raise the loss here, or by less than "
                            f"{ABLATION_RISE:.1%} of it ({zero:.4g} against {clean:.4g} clean; an untrained model, or "
                            "a hook point the model does not need): loss recovered is undefined. Judge the SAE by the "
                            "spliced loss against the clean one"}
