"""Model tab: pick an offline model or type a Hub id / folder, choose dtype and device, inspect it."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Callable

import ipywidgets as W

from ..specs import DEVICES, MODEL_DTYPES, ModelSpec, build
from ..errors import InputError
from ..models import describe_model, packaged_minilm_path
from .common import error_box, guard

BUNDLED = "all-MiniLM-L6-v2 (bundled)"


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
    if bundled and name_or_path and Path(name_or_path).expanduser().resolve() == Path(bundled).resolve():
        return BUNDLED
    path = Path(name_or_path)
    return "/".join(path.parts[-2:]) if path.is_absolute() else name_or_path


class ModelPicker(W.VBox):
    """The Model tab. ``spec()`` is the chosen model; ``on_inspect(fn)`` gets ``describe_model``'s dict."""

    def __init__(self, model: str | None = None, workspace_root: str | Path | None = None):
        self._folders_file = Path(workspace_root) / "models.json" if workspace_root else None
        bundled = packaged_minilm_path()
        self._aliases = {BUNDLED: str(bundled)} if bundled else {}
        default = model or (BUNDLED if bundled else "")
        self.choice = W.Combobox(value=self._shown(default), options=self.offline_models(), description="Model",
                                 placeholder="Hugging Face id or local folder", ensure_option=False,
                                 layout=W.Layout(width="70%"), style={"description_width": "80px"})
        self.dtype = W.Dropdown(options=MODEL_DTYPES, value="auto", description="dtype",
                                style={"description_width": "80px"})
        self.device = W.Dropdown(options=DEVICES, value="auto", description="device",
                                 style={"description_width": "80px"})
        self.add_button = W.Button(description="Remember folder", tooltip="add this local folder to the list",
                                   layout=W.Layout(width="auto"))
        self.inspect_button = W.Button(description="Load / inspect", button_style="info",
                                       tooltip="read the model's config (no weights) and show its size",
                                       layout=W.Layout(width="auto"))
        self.info = W.HTML()
        self.details: dict | None = None
        self._listeners: list[Callable[[dict], None]] = []
        self.inspect_button.on_click(guard(self._say, lambda _: self.inspect()))
        self.add_button.on_click(guard(self._say, lambda _: self.remember_folder()))
        super().__init__([W.HTML("<b>Model</b>: offline models are listed; type any Hub id or local folder, then "
                                 "<i>Load / inspect</i>. The Extract tab uses the model chosen here."),
                          self.choice, W.HBox([self.dtype, self.device]),
                          W.HBox([self.inspect_button, self.add_button]), self.info])

    def _say(self, text: str) -> None:
        self.info.value = text

    def _shown(self, name_or_path: str) -> str:
        """The bundled model's path is shown by its name (no machine paths on screen)."""
        return BUNDLED if self._aliases and model_label(name_or_path) == BUNDLED else name_or_path

    def offline_models(self) -> list[str]:
        found = list(self._aliases)
        if self._folders_file and self._folders_file.exists():
            found += [f for f in json.loads(self._folders_file.read_text()) if Path(f).exists()]
        return list(dict.fromkeys(found + cached_hub_models()))

    def set_model(self, name_or_path: str) -> None:
        self.choice.value = self._shown(name_or_path)

    def name_or_path(self) -> str:
        value = self.choice.value.strip()
        return self._aliases.get(value, value)

    def label(self) -> str:
        return model_label(self.name_or_path())

    def remember_folder(self) -> None:
        folder = Path(self.name_or_path()).expanduser()
        if not (folder / "config.json").exists():
            self.info.value = error_box(f"{html.escape(str(folder))} is not a model folder (no config.json)")
            return
        if self._folders_file:
            saved = json.loads(self._folders_file.read_text()) if self._folders_file.exists() else []
            self._folders_file.parent.mkdir(parents=True, exist_ok=True)
            self._folders_file.write_text(json.dumps(sorted(set(saved + [str(folder.resolve())]))))
        self.choice.options = self.offline_models()

    def spec(self) -> ModelSpec:
        return build(ModelSpec, name_or_path=self.name_or_path(), dtype=self.dtype.value, device=self.device.value)

    def on_inspect(self, listener: Callable[[dict], None]) -> None:
        self._listeners.append(listener)

    def inspect(self) -> dict | None:
        """Show the model's facts (config only, no weights) or a clear error."""
        try:
            self.details = describe_model(self.spec())
        except InputError as exc:
            self.details = None
            self.info.value = error_box(html.escape(str(exc)))
            return None
        d = self.details
        self.info.value = (
            "<table class='mistudio-model-info'>"
            f"<tr><td>model</td><td>{html.escape(self.label())}</td></tr>"
            f"<tr><td>architecture</td><td>{d['architecture']} ({d['model_type']})</td></tr>"
            f"<tr><td>layers</td><td>{d['n_layers']}</td></tr>"
            f"<tr><td>hidden size</td><td>{d['hidden_size']:,}</td></tr>"
            f"<tr><td>parameters</td><td>{d['n_parameters']:,}</td></tr>"
            f"<tr><td>memory (weights, {self.dtype.value})</td><td>{d['memory_gb']:.2f} GB</td></tr></table>")
        for listener in self._listeners:
            listener(d)
        return d
