"""Model tab: pick an offline model or type a Hub id / folder, choose dtype and device, inspect it.

Typing never looks anything up: the field sends its value when it is left (or on Enter), and a change clears the
previous model's facts. *Load / inspect* reads the config on a worker thread (the kernel stays free), with the
button disabled and a busy line meanwhile; a Hub id that is neither cached nor reachable fails within
``HUB_TIMEOUT_S`` (offline, ``HF_HUB_OFFLINE=1``: at once), without the download retries.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import ipywidgets as W
from pydantic import BaseModel, ConfigDict

from ..errors import InputError
from ..models import describe_model, packaged_minilm_path
from ..specs import DEVICES, MODEL_DTYPES, ModelSpec, build
from .common import answers_no_request, error_box, esc, guard, note_box, stylesheet
from .sidefiles import SettingText, SideFile

BUNDLED = "all-MiniLM-L6-v2 (bundled)"
HUB_TIMEOUT_S = 5.0
FOLDERS_FILE = "models.json"


class ModelFolders(BaseModel):
    """``models.json``: the local model folders *Remember folder* added (a JSON list of paths)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    folders: list[SettingText] = []


def _path(name: str) -> Path | None:
    """``name`` as an expanded path; None when it cannot be one ('~nobody/x', a NUL byte)."""
    try:
        return Path(name).expanduser()
    except (RuntimeError, ValueError, OSError):
        return None


def _exists(path: Path | None, kind: str = "any") -> bool:
    """Whether ``path`` exists (``kind`` 'file' or 'dir': is one); False for a name the system refuses (too long)."""
    if path is None:
        return False
    try:
        return path.is_file() if kind == "file" else path.is_dir() if kind == "dir" else path.exists()
    except (OSError, ValueError):
        return False


def cached_hub_models() -> list[str]:
    """Model repos in the local Hugging Face cache (usable offline)."""
    try:
        from huggingface_hub import scan_cache_dir

        return sorted(r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model")
    except Exception:  # no cache yet, or an unreadable one
        return []


def model_label(name_or_path: str) -> str:
    """What the panels show for a model: the bundled one by name, a folder by its last two parts."""
    bundled = packaged_minilm_path()
    if bundled and name_or_path and _same_folder(name_or_path, bundled):
        return BUNDLED
    path = Path(name_or_path)
    return "/".join(path.parts[-2:]) if path.is_absolute() else name_or_path


def _same_folder(name: str, folder: str | Path) -> bool:
    path = _path(name)
    try:
        return path is not None and path.resolve() == Path(folder).resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def looks_like_path(name: str) -> bool:
    """A folder, not a Hub id: absolute, relative to here or home, or existing."""
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
            or _exists(_path(name)))


def local_config_folder(name: str) -> str | None:
    """A folder holding the model's ``config.json`` that can be read without the network: the folder itself, or
    the Hugging Face cache's snapshot of a Hub id; None when reading it would need the Hub."""
    if not name:
        return None
    folder = _path(name)
    if folder is None:
        return None
    if _exists(folder / "config.json", "file"):
        return str(folder)
    if looks_like_path(name):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: the Hub lookup names the problem
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


def hub_problem(name: str, timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the Hub cannot give ``name`` (one request of at most ``timeout`` seconds, no retries), or None when it
    can (or answered something the model loader explains better, e.g. a gated repo)."""
    if hub_offline():
        return (f"{name!r} is not in the local Hugging Face cache and the Hub is off (HF_HUB_OFFLINE is set): type "
                "a local folder that holds config.json, weights and tokenizer files, or choose an offline model")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    except ImportError:  # noqa: BLE001 - no hub client: the loader says what it can
        return None
    try:
        HfApi().model_info(name, timeout=timeout)
    except RepositoryNotFoundError:
        return (f"the Hugging Face Hub has no model {name!r} (or it is private): check the spelling, or type a local "
                "folder")
    except HfHubHTTPError:
        return None
    except Exception as exc:  # noqa: BLE001 - DNS, connection, timeout: the network is the problem
        return (f"the Hugging Face Hub could not be reached within {timeout:g} s ({type(exc).__name__}: {exc}): check "
                "the network, or type a local folder that holds the model (set HF_HUB_OFFLINE=1 to work offline)")
    return None


def memory_words(gigabytes: float) -> str:
    """The weights' memory as the Model tab says it: MB below 1 GB (a tiny model is not '0.00 GB')."""
    return f"{gigabytes:.2f} GB" if gigabytes >= 1 else f"{gigabytes * 1000:.1f} MB"


class ModelPicker(W.VBox):
    """The Model tab. ``spec()`` is the chosen model; ``on_inspect(fn)`` gets ``describe_model``'s dict (called on
    the lookup's thread). ``workspace_root``: where ``models.json`` remembers folders; a bad one is set aside and
    said in :attr:`file_note` (or given to ``on_file_note(html)``, e.g. the Studio's note line)."""

    def __init__(self, model: str | None = None, workspace_root: str | Path | None = None,
                 on_file_note: Callable[[str], None] | None = None):
        self._folders_file = Path(workspace_root) / FOLDERS_FILE if workspace_root else None
        self.file_note = W.HTML()
        self.file_note.add_class("mistudio-file-note")
        self._on_file_note = on_file_note
        bundled = packaged_minilm_path()
        self._aliases = {BUNDLED: str(bundled)} if bundled else {}
        default = model or (BUNDLED if bundled else "")
        self.choice = W.Combobox(value=self._shown(default), options=self.offline_models(), description="Model",
                                 placeholder="Hugging Face id or local folder", ensure_option=False,
                                 continuous_update=False, layout=W.Layout(width="95%", max_width="640px"),
                                 style={"description_width": "80px"})
        self.dtype = W.Dropdown(options=MODEL_DTYPES, value="auto", description="dtype",
                                style={"description_width": "80px"}, layout=W.Layout(width="260px"))
        self.device = W.Dropdown(options=DEVICES, value="auto", description="device",
                                 style={"description_width": "80px"}, layout=W.Layout(width="260px"))
        self.add_button = W.Button(description="Remember folder", tooltip="add this local folder to the list",
                                   layout=W.Layout(width="auto"))
        self.inspect_button = W.Button(description="Load / inspect", button_style="info", icon="search",
                                       tooltip="read the model's config (no weights) and show its size",
                                       layout=W.Layout(width="auto"))
        self.info = W.HTML()
        self.details: dict | None = None
        self.lookups = 0  # config reads started (each Load / inspect: one)
        self._listeners: list[Callable[[dict], None]] = []
        self._lock = threading.RLock()  # busy reads under it, also from observers run inside
        self._thread: threading.Thread | None = None
        self._asked: str | None = None  # the model the running lookup is for
        self.inspect_button.on_click(guard(self._say, lambda _: self.inspect_async()))
        self.add_button.on_click(guard(self._say, lambda _: self.remember_folder()))
        self.choice.observe(lambda _: self._changed(), "value")
        super().__init__([stylesheet(), W.HTML("<b>Model</b>: offline models are listed; type any Hub id or local "
                                               "folder, then <i>Load / inspect</i>. The Extract tab uses the model "
                                               "chosen here."),
                          self.choice, W.HBox([self.dtype, self.device]),
                          W.HBox([self.inspect_button, self.add_button]), self.info, self.file_note])
        self.add_class("mistudio-panel")

    def _say(self, text: str) -> None:
        self.info.value = text

    def _changed(self) -> None:
        """Another model: the facts and error shown were about the previous one."""
        with self._lock:
            if self._asked is not None and self._asked != self.name_or_path():
                self._asked = None  # the running lookup's answer is for a model no longer chosen: dropped
            self.details = None
            self.info.value = ""

    def _shown(self, name_or_path: str) -> str:
        """The bundled model's path is shown by its name (no machine paths on screen)."""
        return BUNDLED if self._aliases and model_label(name_or_path) == BUNDLED else name_or_path

    def offline_models(self) -> list[str]:
        """The bundled model, the remembered folders that still exist, and the Hub models in the local cache."""
        found = list(self._aliases) + [f for f in self.remembered_folders() if _exists(_path(f), "dir")]
        return list(dict.fromkeys(found + cached_hub_models()))

    def remembered_folders(self) -> list[str]:
        """The folders in ``models.json`` (typed: a list of paths). A bad file is set aside and said, never raised:
        the folders that could be read are kept."""
        if self._folders_file is None:
            return []
        side = SideFile(self._folders_file)
        folders = side.load(ModelFolders, list_field="folders").folders
        if side.problems:
            side.set_aside_if_bad()
            self._show_file_note(side.note("the Model tab lists the folders it could read"))
        return folders

    def _show_file_note(self, text: str) -> None:
        if self._on_file_note is not None:
            self._on_file_note(text)
        else:
            self.file_note.value = text

    def set_model(self, name_or_path: str) -> None:
        self.choice.value = self._shown(name_or_path)

    def name_or_path(self) -> str:
        value = self.choice.value.strip()
        return self._aliases.get(value, value)

    def label(self) -> str:
        return model_label(self.name_or_path())

    def local_folder(self) -> str | None:
        """The chosen model's config folder when it can be read offline (see :func:`local_config_folder`)."""
        return local_config_folder(self.name_or_path())

    def remember_folder(self) -> None:
        folder = _path(self.name_or_path())
        if folder is None or not _exists(folder / "config.json", "file"):
            self.info.value = error_box(f"{esc(self.name_or_path())} is not a model folder (no config.json)")
            return
        if self._folders_file:
            side = SideFile(self._folders_file)
            if not side.save(sorted(set(self.remembered_folders() + [str(folder.resolve())]))):
                self._show_file_note(side.note("the folder is listed until the kernel restarts"))
        self.choice.options = list(dict.fromkeys(self.offline_models() + [str(folder.resolve())]))

    def spec(self) -> ModelSpec:
        return build(ModelSpec, name_or_path=self.name_or_path(), dtype=self.dtype.value, device=self.device.value)

    def on_inspect(self, listener: Callable[[dict], None]) -> None:
        self._listeners.append(listener)

    @property
    def busy(self) -> bool:
        """A lookup is running."""
        with self._lock:
            thread = self._thread
        return thread is not None and thread.is_alive()

    def inspect_async(self) -> threading.Thread | None:
        """*Load / inspect*: read the model's config on a worker thread; the button is disabled and a busy line
        shows until the facts (or the error) replace it. Returns the thread (None when one already runs)."""
        with self._lock:
            if self.busy:
                return None
            name = self.name_or_path()
            self._asked = name
            self.details = None
            self.inspect_button.disabled, self.inspect_button.icon = True, "spinner"
            self.inspect_button.add_class("mistudio-busy")
            where = "from its folder" if local_config_folder(name) else "from the Hugging Face Hub"
            self.info.value = note_box(f'<span class="mistudio-working">⏳ Reading the config of '
                                       f"<b>{esc(model_label(name) or '(no model)')}</b> {where}…</span>")
            self._thread = threading.Thread(target=self._lookup, args=(name,), daemon=True,
                                            name="mistudio-model-lookup")
            self._thread.start()
            return self._thread

    @answers_no_request
    def _lookup(self, name: str) -> None:
        try:
            self.inspect(name)
        except Exception as exc:  # noqa: BLE001 - shown in the tab, never lost on a thread
            with self._lock:
                if self._asked == name:
                    self.info.value = error_box(f"<b>{esc(type(exc).__name__)}</b>: {esc(str(exc))}")
        finally:
            with self._lock:
                self.inspect_button.disabled, self.inspect_button.icon = False, "search"
                self.inspect_button.remove_class("mistudio-busy")
                if self._asked == name:
                    self._asked = None
                self._thread = None  # not busy from here on (the button is reset): a click now is taken

    def inspect(self, name: str | None = None) -> dict | None:
        """Show the model's facts (config only, no weights) or a clear error; returns the facts. Blocking: the
        button runs it on a thread (:meth:`inspect_async`)."""
        name = self.name_or_path() if name is None else name
        self.lookups += 1
        problem = None
        if not local_config_folder(name) and name and not looks_like_path(name):
            problem = hub_problem(name)
        try:
            if problem is not None:
                raise InputError(problem)
            details = describe_model(build(ModelSpec, name_or_path=name, dtype=self.dtype.value,
                                           device=self.device.value))
        except InputError as exc:
            with self._lock:
                if name == self.name_or_path():
                    self.details = None
                    self.info.value = error_box(esc(str(exc)))
            return None
        with self._lock:
            if name != self.name_or_path():  # the field changed meanwhile: these facts are not its model's
                return None
            self.details = d = details
            self.info.value = (
                "<table class='mistudio-model-info'>"
                f"<tr><td>model</td><td>{esc(model_label(name))}</td></tr>"
                f"<tr><td>architecture</td><td>{esc(str(d['architecture']))} "
                f"({esc(str(d['model_type']))}{body_of(d)})</td></tr>"
                f"<tr><td>layers</td><td>{esc(d['n_layers'])}</td></tr>"
                f"<tr><td>hidden size</td><td>{d['hidden_size']:,}</td></tr>"
                f"<tr><td>parameters</td><td>{d['n_parameters']:,}</td></tr>"
                f"<tr><td>memory (weights, {esc(self.dtype.value)})</td><td>{memory_words(d['memory_gb'])}</td>"
                "</tr></table>")
        for listener in self._listeners:
            try:
                listener(d)
            except Exception:  # noqa: BLE001 - a broken observer must not hide the facts
                pass
        return d


def body_of(details: dict) -> str:
    """Why the architecture shown is not the one the folder's config names: extraction runs the model's body."""
    saved = details.get("saved_as")
    return f"; the body of the folder's {esc(saved)}, which extraction runs" if saved else ""
