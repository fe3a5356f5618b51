"""What a model *is*, as a fingerprint: sha256 of its weight files, its config and its tokenizer files (those at
the top of its folder: what ``from_pretrained`` loads; a ``checkpoint-100/`` inside is not the model).

A store records its model's fingerprint; a resume with other weights (a folder re-saved after more training, a
config or a tokenizer edited) is refused, and the in-process model cache is keyed by it, so a folder re-saved in
place is loaded again. Hashing reads every weight byte once: file digests are kept (in memory and in
``~/.cache/mistudio/file-digests.json``) under the file's identity (path, size, modification and change times,
inode), so a file is hashed again only when it changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from .errors import EXTRACT_AGAIN, InputError, retry_words
from .specs import ModelSpec

WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
CONFIGS = ("config.json", "generation_config.json")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
             "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
             "chat_template.jinja", "chat_template.json")
_LOCK = threading.Lock()
_DIGESTS: dict[str, str] = {}  # file identity -> sha256
_LOADED_DISK = False


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mistudio" / "file-digests.json"


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def _load_disk() -> None:
    global _LOADED_DISK
    if _LOADED_DISK:
        return
    _LOADED_DISK = True
    try:
        saved = json.loads(_cache_file().read_text())
        if isinstance(saved, dict):
            _DIGESTS.update({k: v for k, v in saved.items() if isinstance(k, str) and isinstance(v, str)
                             and len(v) == 64})
    except (OSError, ValueError):
        pass  # no cache yet, or a damaged one: files are hashed again


def _save_disk() -> None:
    file = _cache_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        kept = dict(list(_DIGESTS.items())[-4096:])
        with tempfile.NamedTemporaryFile("w", dir=file.parent, delete=False, suffix=".tmp") as f:
            json.dump(kept, f)
        os.replace(f.name, file)
    except OSError:
        pass  # a read-only home: digests stay in memory


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, computed once per version of the file."""
    path = Path(path)
    key = _identity(path)
    with _LOCK:
        _load_disk()
        if key in _DIGESTS:
            return _DIGESTS[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _LOCK:
        _DIGESTS[key] = digest
        _save_disk()
    return digest


def model_folder(spec: ModelSpec) -> Path | None:
    """The folder holding the model's files: a local folder, or a Hub model's snapshot in the local cache (None
    when it is not downloaded yet)."""
    path = Path(spec.name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.name_or_path, revision=spec.revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (or not a Hub id): nothing to hash yet
        return None


def file_kind(name: str) -> str | None:
    base = name.rsplit("/", 1)[-1]
    if base in CONFIGS:
        return "config"
    if base in TOKENIZER:
        return "tokenizer"
    if base.endswith(WEIGHTS) and not base.startswith("training_args"):
        return "weights"
    return None


def fingerprint(spec: ModelSpec) -> dict[str, Any] | None:
    """``{"weights", "config", "tokenizer": sha256, "files": {name: sha256}}`` of the model's files, or None
    when they are not on this machine (a Hub model not downloaded yet)."""
    folder = model_folder(spec)
    if folder is None:
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and file_kind(p.name))
    digests = {p.name: file_digest(p) for p in files}
    return {**_parts(digests), "files": digests}


def _ignored_weights(names) -> set[str]:
    """Weight files ``from_pretrained`` does not load: ``pytorch_model*.bin`` where the model's own safetensors
    (``model.safetensors``, or its shards ``model-*.safetensors``) are there. Other files stay counted (an
    ``adapter_model.safetensors`` beside a ``pytorch_model.bin`` does not make the .bin unseen)."""
    names = list(names)
    if not any(n == "model.safetensors" or (n.startswith("model-") and n.endswith(".safetensors")) for n in names):
        return set()
    return {n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")}


def _parts(digests: dict[str, str]) -> dict[str, str]:
    """The weights', config's and tokenizer's hashes of a folder's file digests (less the weights that
    ``from_pretrained`` ignores: see :func:`_ignored_weights`)."""
    ignored = _ignored_weights(digests)
    parts = {}
    for kind in ("weights", "config", "tokenizer"):
        h = hashlib.sha256()
        for name, digest in sorted(digests.items()):
            if file_kind(name) == kind and name not in ignored:
                h.update(f"{name}\0{digest}\n".encode())
        parts[kind] = h.hexdigest()
    return parts


def _loaded_parts(fp: dict) -> dict:
    """A fingerprint's hashes over the files a model loads, computed again from its file list, so that stores
    recorded under older rules compare alike: they hashed subfolders too (an unrelated ``checkpoint-100/``
    refused their resume) and every weights file (a ``pytorch_model.bin`` beside the safetensors did)."""
    files = fp.get("files")
    if isinstance(files, dict):
        return {**fp, **_parts({str(k): str(v) for k, v in files.items() if "/" not in str(k)})}
    return fp


def differences(recorded: dict, current: dict) -> list[str]:
    """What changed between two fingerprints, in words (``weights``, ``config``, ``tokenizer``)."""
    return _changed(_loaded_parts(recorded), _loaded_parts(current))


def _changed(recorded: dict, current: dict) -> list[str]:
    """The parts that differ between two fingerprints whose parts are already loaded (:func:`_loaded_parts`)."""
    return [kind for kind in ("weights", "config", "tokenizer") if recorded.get(kind) != current.get(kind)]


def short(fp: dict | None) -> str:
    """A fingerprint as people compare them: the first 12 hex digits of its weights' hash."""
    return "unknown" if not fp else str(fp.get("weights", ""))[:12]


RESUME_RISK = ("resuming would mix rows of two models: " + retry_words("«retry» into a new extraction", EXTRACT_AGAIN)
               + ", or put the original files back to resume")


def check_same_model(name: str, recorded: dict | None, current: dict | None, risk: str = RESUME_RISK) -> None:
    """Raise InputError when a store made with the model ``recorded`` would be continued (or read, ``risk``
    says what would go wrong and the fix) with ``current``; nothing to compare when either is unknown."""
    if not (recorded and current):
        return
    recorded, current = _loaded_parts(recorded), _loaded_parts(current)
    changed = _changed(recorded, current)
    if changed:
        first = changed[0]
        then, now = recorded.get(first, ""), current.get(first, "")
        raise InputError(
            f"the model at {name} is not the one this store was made with: its {' and '.join(changed)} changed "
            f"({first} {str(then)[:12]} when the store was made, {str(now)[:12]} now); {risk}", param="model")


TOKENS_RISK = ("its token strings would be wrong. Put back the tokenizer files the store was made with, or set "
               "«ext.tokenizer = AutoTokenizer.from_pretrained(<the original>)»")


def check_same_tokenizer(spec: ModelSpec, recorded: dict | None) -> None:
    """Raise InputError when the tokenizer files at the model's folder are not those a store recorded (a folder
    re-saved with another tokenizer, another folder of the same name): only the small tokenizer files are read."""
    folder = model_folder(spec)
    if folder is None or not recorded:
        return
    digests = {p.name: file_digest(p) for p in sorted(folder.iterdir())
               if p.is_file() and file_kind(p.name) == "tokenizer"}
    then, now = _loaded_parts(recorded).get("tokenizer"), _parts(digests)["tokenizer"]
    if then and then != now:
        raise InputError(f"the tokenizer at {spec.name_or_path} is not the one this store was made with (tokenizer "
                         f"{str(then)[:12]} when the store was made, {now[:12]} now): {TOKENS_RISK}", param="model")
