"""Extract tab: layers, hooks, batch size, dtype, advanced options, presets; Estimate, Launch (refused when the
disk is short unless confirmed), live progress, Cancel, Retry/Resume."""
from __future__ import annotations

import threading
import time
from typing import Annotated, Any, Callable, Optional

import ipywidgets as W
from pydantic import BaseModel, ConfigDict, create_model

from ..errors import InputError, human_bytes
from ..jobs import Job
from ..models import load_config, model_source, n_layers_of
from ..plan import estimate
from ..request import ParamInfo, Request, params, sae_pair_list
from ..specs import BATCH_SIZES, HOOK_KINDS, STORAGE_DTYPES, ModelSpec, build, parse_layers, short
from ..storage.metadata import can_resume
from ..storage.store import ExtractionStore
from ..workspace import Workspace
from .common import (PLAIN_ERRORS, RateMeter, answers_no_request, badge, busy, error_box, esc, for_ui, guard,
                     note_box, progress_text, sae_label, store_notes, stylesheet)
from .model_picker import looks_like_path
from .sidefiles import validate_lenient

THROTTLE_S = 0.25
TABS_OWN = ("model", "model_dtype", "device", "dataset", "text_column", "max_samples", "max_length")


def _extract_state_model() -> type[BaseModel]:
    """The Extract tab's options as ``studio.json`` remembers them: each Request field the Model and Dataset tabs
    do not show, with the Request's type, strictly ('8' is not 8, 'false' is not False), each optional; and
    ``auto_retry``, the name ``auto_retry_on_oom`` had in earlier files."""
    fields: dict[str, Any] = {}
    for name, info in Request.model_fields.items():
        if name not in TABS_OWN:
            kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            fields[name] = (Optional[kind], None)
    fields["auto_retry"] = (Optional[bool], None)
    return create_model("ExtractState", __config__=ConfigDict(extra="forbid", strict=True,
                                                              arbitrary_types_allowed=True), **fields)


ExtractState = _extract_state_model()
RETRY_HELP = ("<small><b>Retry</b> starts a new extraction with the form as it is now (fix the model, dataset or "
              "batch size first). <b>Resume</b> continues the same extraction from its last saved sample.</small>")


def resumable(job: Job | None) -> bool:
    """Resume can succeed: a cancelled job, or a failure whose record offers it."""
    return job is not None and can_resume(job.status, job.error)


def store_kept(job: Job) -> bool:
    """The job's store exists (a request refused while the job prepared its input leaves none)."""
    if not job.ended_in_memory:
        return True
    try:
        ExtractionStore.open(job.store.location, job.store.storage_options)
        return True
    except Exception:  # noqa: BLE001 - gone (or unreadable): no extraction to name
        return False


def disk_short(result: dict) -> bool:
    """The estimate says the store will not fit on the workspace's disk."""
    free = result.get("free_disk_bytes")
    return free is not None and result["bytes_on_disk"] > free


def option_widget(info: ParamInfo) -> W.Widget:
    """A widget for a Request field the tabs do not place themselves (the Extract tab's "More options"): its
    label, its type, its default; nullable numbers read 0 as "none", JSON fields take JSON text."""
    style, layout = {"description_width": "190px"}, W.Layout(width="420px", max_width="100%")
    tip = info.description
    if info.kind == "bool":
        return W.Checkbox(value=bool(info.default), description=info.label, indent=False, tooltip=tip,
                          layout=W.Layout(width="auto"))
    if info.kind == "choice":
        options = [("(none)", None)] * (info.default is None) + [(str(c), c) for c in info.choices]
        return W.Dropdown(options=options, value=info.default, description=info.label, style=style, layout=layout,
                          tooltip=tip)
    if info.kind == "int":
        return W.IntText(value=info.default or 0, description=info.label, style=style, layout=layout, tooltip=tip)
    if info.kind == "float":
        return W.FloatText(value=info.default or 0.0, description=info.label, style=style, layout=layout, tooltip=tip)
    if info.name == "saes":  # one hook point a line: a folder path is long, and several SAEs are usual
        return W.Textarea(value="", description=info.label, style=style, tooltip=tip, rows=2,
                          placeholder="one a line: layers.3.residual=/path/to/sae (or JSON)",
                          layout=W.Layout(width="95%", max_width="900px"))
    return W.Text(value="" if info.default is None else str(info.default), description=info.label, style=style,
                  layout=layout, tooltip=tip, placeholder="JSON" if info.kind == "json" else "")


class _Pairs(list):
    """A JSON object as its (key, value) pairs, in order, a key named twice kept twice."""


def saes_pairs(text: str) -> list[tuple[str, str]] | None:
    """The (hook point, SAE folder) pairs of the SAEs field as typed (JSON ``{point: folder}`` or
    ``point=folder,...``, read as ``Request`` reads it); None when it is neither (Launch says why)."""
    text = text.strip()
    if text.startswith("{"):
        import json

        try:  # each key as written: one named twice is kept twice, for the request to refuse by name
            value = json.loads(text, object_pairs_hook=_Pairs)
        except ValueError:
            return None
        pairs = list(value) if isinstance(value, _Pairs) else None
    else:
        pairs = sae_pair_list(text.replace("\n", ","))
    if not pairs or any(not str(k).strip() or not str(v).strip() for k, v in pairs):
        return None
    return [(str(k), str(v)) for k, v in pairs]


def _option_value(info: ParamInfo, widget: W.Widget):
    value = widget.value
    if info.kind in ("int", "float") and info.default is None and not value:
        return None  # 0 = none
    if info.name == "saes" and saes_pairs(value) is not None:
        pairs = saes_pairs(value)
        if len({point for point, _ in pairs}) < len(pairs):  # as pairs: the request refuses the point named twice
            return ",".join(f"{point}={folder}" for point, folder in pairs)
        return dict(pairs)
    if info.kind == "json":
        text = value.strip()
        if not text:
            return None
        if text.startswith("{"):
            import json

            try:
                return json.loads(text)
            except ValueError as exc:
                raise InputError(f"«{info.name}={text!r}» is not valid JSON ({exc})", param=info.name) from None
        return text
    if info.kind == "str" and info.default is None:
        return value.strip() or None
    return value


def _put(widget: W.Widget, value) -> None:
    """Show ``value`` in ``widget``; a number outside a bounded box's range raises ValueError (the box would
    clamp it silently: a remembered window of 10**18 must be said, not shown as 10,000,000)."""
    low, high = getattr(widget, "min", None), getattr(widget, "max", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and low is not None and high is not None \
            and not low <= value <= high:
        raise ValueError(f"{value!r} is outside {widget.description or 'the box'}'s {low:,}..{high:,}")
    widget.value = value


def _show_option(info: ParamInfo, widget: W.Widget, value) -> None:
    if info.name == "saes" and isinstance(value, dict) and not any(
            set(",\n=") & set(str(k)) or set(",\n") & set(str(v)) for k, v in value.items()):
        widget.value = "\n".join(f"{point}={folder}" for point, folder in value.items())
    elif info.kind == "json":
        import json

        widget.value = "" if value is None else value if isinstance(value, str) else json.dumps(value)
    elif info.kind in ("int", "float"):
        widget.value = value or 0
    elif info.kind == "str":
        widget.value = "" if value is None else str(value)
    else:
        widget.value = value


class ExtractionPanel(W.VBox):
    """The Extract tab. Job events arrive on the worker thread; updates are throttled and lock-guarded."""

    def __init__(self, workspace: Workspace, model_picker, dataset_picker, **extra_options: Any):
        self.workspace = workspace
        self.model_picker = model_picker
        self.dataset_picker = dataset_picker
        self.extra_options = extra_options  # passed to submit (e.g. timeout_s, before_batch in tests)
        self.job: Job | None = None
        self._lock = threading.RLock()
        self._last_draw = 0.0
        self._pending: dict | None = None
        self._finished: list[Callable[[Job], None]] = []
        self._submitted: list[Callable[[Job], None]] = []
        self._filling_form = False  # a preset or a job's request is being shown: not a user's change
        self._rate = RateMeter()
        style = {"description_width": "90px"}
        self.summary = W.HTML()
        self.layers = W.SelectMultiple(options=[], description="Layers", rows=6, style=style)
        self.hooks = {k: W.Checkbox(value=k == "residual", description=k, indent=False,
                                    layout=W.Layout(width="auto")) for k in HOOK_KINDS}
        self.batch_size = W.Dropdown(options=("auto",) + BATCH_SIZES, value=8, description="Batch size", style=style,
                                     tooltip="auto: trial forwards of the longest samples choose it after loading",
                                     layout=W.Layout(width="220px"))
        self.dtype = W.Dropdown(options=STORAGE_DTYPES, value="float16", description="Store as", style=style,
                                layout=W.Layout(width="220px"))
        self.auto_retry = W.Checkbox(value=False, description="On out-of-memory, retry with half the batch size",
                                     indent=False, layout=W.Layout(width="auto"))
        self._build_advanced(style)
        self._build_presets(style)
        self._build_estimate()
        self.launch_button = W.Button(description="Launch", button_style="primary", icon="play",
                                      tooltip="start a new extraction with the model, dataset and options shown")
        self.cancel_button = W.Button(description="Cancel", button_style="warning", icon="stop", disabled=True,
                                      tooltip="stop after the current batch; what was saved is kept")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="0%", bar_style="info", style=style,
                                      layout=W.Layout(width="95%", max_width="640px"),
                                      tooltip="samples computed (the line below also says how many are saved)")
        self.status = W.HTML()
        self.alert = W.HTML()
        self.retry_button = W.Button(description="Retry", icon="redo", button_style="info",
                                     tooltip="new extraction with the form as it is now")
        self.resume_button = W.Button(description="Resume", button_style="success", icon="forward",
                                      tooltip="continue this extraction from its last saved sample")
        self.failure_actions = W.VBox([W.HTML(RETRY_HELP), W.HBox([self.retry_button, self.resume_button])])
        self.failure_box = W.VBox([self.alert, self.failure_actions], layout=W.Layout(display="none"))
        self.launch_button.on_click(guard(self._say, lambda _: self.launch()))
        self.cancel_button.on_click(guard(self._say, lambda _: self.cancel()))
        self.retry_button.on_click(guard(self._say, lambda _: self.retry()))
        self.resume_button.on_click(guard(self._say, lambda _: self.resume()))
        self.model_picker.choice.observe(guard(self._say, lambda _: self.refresh_layers()), "value")
        self.model_picker.on_inspect(lambda d: self.set_layer_count(d["n_layers"]))
        for widget in (self.dataset_picker.source, self.dataset_picker.path, self.dataset_picker.hub_name,
                       self.dataset_picker.hub_split, self.dataset_picker.max_samples, self.dataset_picker.max_length):
            widget.observe(guard(self._say, lambda _: self.update_summary()), "value")
        if "saes" in self.options:
            self.options["saes"][1].observe(guard(self._say, lambda _: self.update_summary()), "value")
        form = (self.model_picker.choice, self.dataset_picker.source, self.dataset_picker.path,
                self.dataset_picker.max_samples, self.dataset_picker.max_length, self.layers, self.batch_size,
                self.dtype, self.max_batch_tokens, self.micro_batch_size, self.window, self.stride, self.chat_auto,
                self.chat_template, self.exclude_special, *self.hooks.values())
        for widget in form:  # an estimate of another form is stale: say so (Estimate or Launch makes a new one)
            widget.observe(lambda _: self._estimate_stale(), "value")
        super().__init__([
            stylesheet(), W.HTML("<b>Extract</b>"), self.presets_box, self.summary, self.layers,
            W.HBox([W.Label("Hooks:")] + list(self.hooks.values())),
            W.HBox([self.batch_size, self.dtype]), self.auto_retry, self.advanced,
            W.HBox([self.estimate_button, self.probe, self.launch_button, self.cancel_button]),
            self.estimate_line, self.confirm_disk, self.progress, self.status, self.failure_box])
        self.add_class("mistudio-panel")
        self.refresh_layers()

    # -- building blocks --------------------------------------------------------------------------
    def _build_advanced(self, style: dict) -> None:
        """Token budget, micro-batches, long documents, chat data, special tokens: folded away by default."""
        wide = {"description_width": "130px"}
        self.max_batch_tokens = W.BoundedIntText(value=0, min=0, max=10**9, description="Max batch tokens",
                                                 style=wide, tooltip="cut batches by padded tokens; 0 = off")
        self.micro_batch_size = W.BoundedIntText(value=0, min=0, max=512, description="Micro-batch size",
                                                 style=wide, tooltip="forward each batch in pieces; 0 = off")
        self.window = W.BoundedIntText(value=0, min=0, max=10**7, description="Window", style=wide,
                                       tooltip="long documents in overlapping windows; 0 = truncate at max length")
        self.stride = W.BoundedIntText(value=0, min=0, max=10**7, description="Stride", style=wide,
                                       tooltip="step between windows; 0 = window // 2")
        self.chat_auto = W.Checkbox(value=False, description="Chat data: the tokenizer's chat template",
                                    indent=False, layout=W.Layout(width="auto"))
        self.chat_template = W.Textarea(placeholder="or a Jinja chat template (empty: plain text rows)",
                                        layout=W.Layout(width="95%", height="60px"))
        self.exclude_special = W.Checkbox(value=False, description="Exclude special tokens (no activation rows)",
                                          indent=False, layout=W.Layout(width="auto"))
        placed = {"model", "model_dtype", "device", "dataset", "text_column", "max_samples", "max_length", "layers",
                  "hooks", "batch_size", "dtype", "auto_retry_on_oom", "max_batch_tokens", "micro_batch_size",
                  "window", "stride", "chat_template", "exclude_special"}
        self.options = {p.name: (p, option_widget(p)) for p in params() if p.name not in placed}
        self.advanced = W.Accordion(children=[W.VBox([
            W.HBox([self.max_batch_tokens, self.micro_batch_size]), W.HBox([self.window, self.stride]),
            self.chat_auto, self.chat_template, self.exclude_special]),
            W.VBox([W.HTML("<small>Every other argument of <code>ms.extract</code>, with its default.</small>")]
                   + [w for _, w in self.options.values()])], selected_index=None)
        self.advanced.set_title(0, "Advanced: token budget, micro-batches, long documents, chat, special tokens")
        self.advanced.set_title(1, "More options: SAEs, model placement, reading, storage, time limit")

    def _build_presets(self, style: dict) -> None:
        self.preset = W.Dropdown(options=[("(none)", "")], value="", description="Preset", style=style,
                                 tooltip="fill the form from a saved preset (<workspace>/presets)")
        self.preset_name = W.Text(placeholder="name", layout=W.Layout(width="140px"))
        self.save_preset_button = W.Button(description="Save as preset", icon="save", layout=W.Layout(width="auto"),
                                           tooltip="save the form (validated) under the name")
        self.delete_preset_button = W.Button(description="Delete preset", icon="trash", layout=W.Layout(width="auto"),
                                             tooltip="delete the chosen preset (asks first)")
        self.preset_status = W.HTML()
        self._delete_armed: str | None = None
        self.preset.observe(guard(self._say_preset, lambda _: self.apply_preset()), "value")
        self.save_preset_button.on_click(guard(self._say_preset, lambda _: self.save_preset()))
        self.delete_preset_button.on_click(guard(self._say_preset, lambda _: self.delete_preset()))
        self.presets_box = W.VBox([W.HBox([self.preset, self.preset_name, self.save_preset_button,
                                           self.delete_preset_button]), self.preset_status])
        self.refresh_presets()

    def _build_estimate(self) -> None:
        self.estimate_button = W.Button(description="Estimate", icon="calculator", layout=W.Layout(width="auto"),
                                        tooltip="disk, device memory (and time, with probe) before launching")
        self.probe = W.Checkbox(value=False, description="probe (time a few batches)", indent=False,
                                layout=W.Layout(width="auto"))
        self.estimate_line = W.HTML()
        self.confirm_disk = W.Checkbox(value=False, description="Launch anyway: the disk looks too small",
                                       indent=False, layout=W.Layout(width="auto", display="none"))
        self.last_estimate: dict | None = None
        self.estimate_button.on_click(guard(self._say_estimate, lambda _: self.estimate()))

    def _say_preset(self, text: str) -> None:
        self.preset_status.value = text

    def _say_estimate(self, text: str) -> None:
        self.estimate_line.value = text

    def _say(self, text: str) -> None:
        """Where a callback's unexpected error shows: the failure box of this panel."""
        self.alert.value = text
        self.failure_box.layout.display = ""

    # -- form -------------------------------------------------------------------------------------
    def on_finished(self, listener: Callable[[Job], None]) -> None:
        """Call ``listener(job)`` when a job launched here ends (any end state)."""
        self._finished.append(listener)

    def on_submitted(self, listener: Callable[[Job], None]) -> None:
        """Call ``listener(job)`` after Launch or Retry started a job (the Studio saves the form then)."""
        self._submitted.append(listener)

    def update_summary(self) -> None:
        """The line that says which model and dataset Launch will use (and how its layers get listed)."""
        line = (f"Runs <b>{esc(self.model_picker.label() or '(no model)')}</b> on "
                f"<b>{esc(self.dataset_picker.describe())}</b> "
                f"<small>(set in the Model and Dataset tabs)</small>{self._saes_words()}")
        if self.layers_known is False and self.model_picker.name_or_path():
            line += ("<br><small>Its layers are listed once its config is read: <i>Load / inspect</i> in the Model "
                     "tab (opening this tab starts it).</small>")
        self.summary.value = line

    def _saes_words(self) -> str:
        """The SAEs the extraction applies, for the summary line: ', with the SAE <folder> at <hook point>' (their
        latents stored too), or '' when the *More options* field is empty."""
        text = str(self.options["saes"][1].value).strip() if "saes" in self.options else ""
        if not text:
            return ""
        pairs = saes_pairs(text)
        if pairs is None:
            return (f"<br>with SAEs <code>{esc(short(text, 80))}</code> <small>(More options; not a {{hook point: "
                    "folder} mapping yet)</small>")
        named = ", ".join(f"<b title='{esc(folder)}'>{esc(sae_label(folder))}</b> at <b>{esc(point)}</b>"
                          for point, folder in pairs)
        return (f"<br>with the SAE{'s' if len(pairs) > 1 else ''} {named} <small>(latents stored as "
                f"{esc(', '.join(point + '.latents' for point, _ in pairs))}; set in More options)</small>")

    def show_saes(self) -> None:
        """Unfold the section that holds the SAEs field (the Train tab's "Extract with this SAE" filled it)."""
        self.advanced.selected_index = 1

    layers_known: bool | None = None  # None: no model; False: its config was not read yet (a Hub id)

    def set_layer_count(self, n_layers: int) -> None:
        """The model has ``n_layers`` layers (from its config; also called on the Model tab's lookup thread)."""
        with self._lock:
            chosen = [i for i in self.layers.value if i < n_layers]
            filling, self._filling_form = self._filling_form, True
            try:
                self.layers.options = [(f"layer {i}", i) for i in range(n_layers)]
                self.layers.value = tuple(chosen) or (n_layers - 1,)
            finally:
                self._filling_form = filling
            known, self.layers_known = self.layers_known, True
        if not known:
            self.update_summary()

    def refresh_layers(self) -> None:
        """The chosen model's layers, from its config when that is on this machine (a folder, or the Hugging Face
        cache): fast, no weights, no network. A Hub id that is not cached is not looked up here (this runs as the
        model field changes): its layers come with *Load / inspect*."""
        name, folder = self.model_picker.name_or_path(), self.model_picker.local_folder()
        if folder is not None:
            try:
                self.set_layer_count(n_layers_of(load_config(build(ModelSpec, name_or_path=folder))))
            except Exception:  # an unreadable config: keep the old list (Launch names the problem)
                pass
        elif name and not looks_like_path(name):  # a Hub id, not cached
            with self._lock:
                chosen = list(self.layers.value)
                self.layers_known = False
                # the layers chosen so far stay selectable until the config says how many there are
                self.layers.options = [(f"layer {i}", i) for i in chosen]
                self.layers.value = tuple(chosen)
        else:  # no model, or a folder being typed: keep the list (Launch names the problem)
            self.layers_known = None
        self.update_summary()

    # -- the form as a Request, both ways -------------------------------------------------------------
    TABS_OWN = TABS_OWN

    def form_fields(self) -> dict[str, tuple[Callable[[], Any], Callable[[Any], None]]]:
        """Every Request field: (read it from the form, show a value in the form). One widget per field, in the
        Model tab (model, dtype, device), the Dataset tab (dataset, text column, max samples, max length) or here."""
        mp, dp = self.model_picker, self.dataset_picker

        def plain(widget):
            return (lambda: widget.value), (lambda v: _put(widget, v))

        def zero_is_none(widget):
            return (lambda: widget.value or None), (lambda v: _put(widget, v or 0))

        return {
            "model": (mp.name_or_path, mp.set_model), "model_dtype": plain(mp.dtype), "device": plain(mp.device),
            "dataset": (dp.dataset, dp.set_dataset),
            "text_column": (lambda: dp.column.value.strip() or "text", lambda v: setattr(dp.column, "value", v)),
            "max_samples": zero_is_none(dp.max_samples), "max_length": plain(dp.max_length),
            "layers": (lambda: list(self.layers.value), self._show_layers),
            "hooks": (lambda: [k for k, box in self.hooks.items() if box.value], self._show_hooks),
            "batch_size": plain(self.batch_size), "dtype": plain(self.dtype),
            "auto_retry_on_oom": plain(self.auto_retry), "max_batch_tokens": zero_is_none(self.max_batch_tokens),
            "micro_batch_size": zero_is_none(self.micro_batch_size),
            "window": zero_is_none(self.window),
            "stride": (lambda: (self.stride.value or None) if self.window.value else None,
                       lambda v: _put(self.stride, v or 0)),
            "chat_template": (self._chat_value, self._show_chat), "exclude_special": plain(self.exclude_special),
            **{name: ((lambda i=info, w=widget: _option_value(i, w)),
                      (lambda v, i=info, w=widget: _show_option(i, w, v)))
               for name, (info, widget) in self.options.items()},
        }

    def _chat_value(self) -> str | None:
        return "auto" if self.chat_auto.value else (self.chat_template.value.strip() or None)

    def _show_chat(self, template: str | None) -> None:
        self.chat_auto.value = template == "auto"
        self.chat_template.value = template if template and template != "auto" else ""

    def _show_layers(self, layers) -> None:
        if isinstance(layers, str) and layers != "all":
            layers = parse_layers(layers)
        if self.layers_known is False and layers != "all":  # the model's layer count is not known yet
            self.layers.options = [(f"layer {i}", i) for i in sorted(set(layers))]
        known = [v for _, v in self.layers.options]
        chosen = known if layers == "all" else [i for i in layers if i in known]
        if chosen:
            self.layers.value = tuple(chosen)

    def _show_hooks(self, hooks) -> None:
        hooks = [h.strip() for h in hooks.split(",")] if isinstance(hooks, str) else list(hooks)
        for kind, box in self.hooks.items():
            box.value = kind in hooks

    def form_arguments(self) -> dict:
        """The form as Request fields (what Launch submits, presets save and Estimate reads); 0 / empty = none."""
        return {name: read() for name, (read, _) in self.form_fields().items()}

    def show_arguments(self, arguments: dict) -> list[str]:
        """Show Request fields in the form (a preset, a job's request, remembered settings); returns the names it
        could not show (a stale or hand-edited value keeps the form's)."""
        fields, skipped = self.form_fields(), []
        if "auto_retry" in arguments and "auto_retry_on_oom" not in arguments:  # studio.json from before
            arguments = {**arguments, "auto_retry_on_oom": arguments["auto_retry"]}
        filling, self._filling_form = self._filling_form, True
        try:
            if arguments.get("model") and arguments["model"] != self.model_picker.name_or_path():
                fields["model"][1](arguments["model"])
                self.refresh_layers()
            for name, value in arguments.items():
                if name in fields and name != "model":
                    try:
                        fields[name][1](value)
                    except Exception:  # noqa: BLE001 - a value this form cannot show
                        skipped.append(name)
        finally:
            self._filling_form = filling
        self.update_summary()
        return skipped

    def state(self) -> dict:
        """The extract options as a JSON-able dict (what ``studio.json`` remembers; the Model and Dataset tabs
        remember their own)."""
        values = self.form_arguments()
        return {k: v for k, v in Request.model_construct(**values).model_dump(mode="json").items()
                if k in values and k not in self.TABS_OWN}

    def set_state(self, state: "dict | BaseModel") -> list[str]:
        """Fill the options from a remembered state (typed through :data:`ExtractState`); returns a line for each
        value left out (a wrong type, an unknown name, or a value the form cannot show), whose field keeps what it
        shows."""
        if isinstance(state, ExtractState):
            problems: list[str] = []
        else:
            state, problems = validate_lenient(ExtractState, state, "the Extract tab's state")
        values = state.model_dump(exclude_unset=True)
        skipped = self.show_arguments(values)
        return problems + [f"{name!r} = {short(values[name], 60)} cannot be shown in the Extract tab"
                           for name in skipped]

    def prefill(self, meta: dict, suggested: dict | None = None) -> None:
        """Show a job's request in the form (model, dataset, every option), then the suggested retry parameters."""
        arguments = {k: v for k, v in (meta.get("params") or {}).items() if k in Request.model_fields}
        if (meta.get("model") or {}).get("name_or_path"):
            arguments["model"] = meta["model"]["name_or_path"]
        if meta.get("dataset"):
            filling, self._filling_form = self._filling_form, True
            try:
                self.dataset_picker.set_from_description(meta["dataset"])
            finally:
                self._filling_form = filling
        arguments.pop("dataset", None)
        self.show_arguments({**arguments, **(suggested or {})})

    def submit_arguments(self) -> dict:
        """What Launch and Retry pass to the workspace: the form as it is now (every Request field; a chosen
        preset filled the form, so its arguments are the form's)."""
        return {**self.form_arguments(), **self.extra_options}

    def _check_model_first(self) -> None:
        """No layers to choose usually means the model cannot be read: say that, not 'layers is empty'."""
        if not self.layers.value:
            if self.layers_known is False:
                raise InputError(f"the layers of {self.model_picker.label()!r} are not known yet: Load / inspect it "
                                 "in the Model tab (its config is read from the Hub), then choose layers here")
            self.set_layer_count(n_layers_of(load_config(self.model_picker.spec())))  # raises the model problem
            raise InputError("choose at least one layer")

    # -- actions ----------------------------------------------------------------------------------
    def estimate(self, probe: bool | None = None) -> dict | None:
        """``ms.estimate`` of the form: the summary line and warnings under the buttons (errors there too).
        ``probe``: time a few batches (default: the checkbox)."""
        probe = self.probe.value if probe is None else probe
        doing = "Timing a few batches…" if probe else "Estimating…"
        try:
            with busy(self.estimate_button, doing, self._say_estimate):
                self.estimate_line.value = (f'<span class="mistudio-working">⏳ {doing} (tokenizing the dataset'
                                            f'{", loading the model" if probe else ""})</span>')
                arguments = {k: v for k, v in self.submit_arguments().items() if k not in self.extra_options}
                result = estimate(workspace=self.workspace.root, probe=probe, **arguments)
        except Exception as exc:  # noqa: BLE001 - a bad form: say it here
            self.last_estimate = None
            self.estimate_line.value = error_box(f"<b>No estimate</b>: {for_ui(exc)}")
            return None
        self.last_estimate = result
        self._clear_form_failure()
        short = disk_short(result)
        self.confirm_disk.layout.display = "" if short else "none"
        if not short:
            self.confirm_disk.value = False
        warnings = "".join(f"<li>{for_ui(w)}</li>" for w in result["warning_templates"])
        text = (f"<b>Estimate</b>: {esc(result['summary'])} <small>({result['samples']:,} samples, "
                f"{result['tokens']:,} tokens)</small>")
        text += f"<ul style='margin:2px 0'>{warnings}</ul>" if warnings else ""
        self.estimate_line.value = (note_box(text, "#fd7e14", "#fff3e0") if result["warnings"] else note_box(text))
        return result

    def _estimate_stale(self) -> None:
        """The form changed: the estimate, a failure of the form before any job, and the preset's note are about
        the form as it was (a preset or a job's request filling the form is not such a change)."""
        if self._filling_form:
            return
        self._forget_estimate()
        self._clear_form_failure()
        self.preset_status.value = ""
        self._delete_armed = None
        if self.preset.value:  # the form is no longer the preset's: choosing it again fills it back
            self._filling = True
            try:
                self.preset.value = ""
            finally:
                self._filling = False

    def _forget_estimate(self) -> None:
        """The estimate (or "No estimate") is of a form that is no longer shown."""
        if self.last_estimate is not None:
            self.last_estimate = None
            self.estimate_line.value = "<small><i>The form changed: Estimate again (Launch does).</i></small>"
        elif "mistudio-error" in self.estimate_line.value:  # "No estimate" of the form as it was
            self.estimate_line.value = ""

    def show_new_form(self, arguments: dict) -> list[str]:
        """Fill the form for another run (the Train tab's "Extract with this SAE"): like :meth:`show_arguments`,
        and the estimate and a finished job's lines, about the form before, go (a running job stays shown)."""
        skipped = self.show_arguments(arguments)
        self._forget_estimate()
        with self._lock:
            if self.job is not None and not self._running():
                self.job.unsubscribe(self._on_event)
                self.job = None
                self.status.value = self.alert.value = ""
                self.progress.value, self.progress.bar_style, self.progress.description = 0, "info", "0%"
                self.failure_box.layout.display = "none"
        return skipped

    def _clear_form_failure(self) -> None:
        """Hide the failure box when it is about a form that never became a job (a job's failure stays: it names
        the job, and its Retry/Resume still apply)."""
        if self.job is None and self.failure_box.layout.display != "none":
            self.failure_box.layout.display = "none"
            self.alert.value = ""
            if "FAILED" in self.status.value or "NOT STARTED" in self.status.value:
                self.status.value = ""

    def _disk_refused(self) -> bool:
        """Estimate (without probe) right before launching; True (and say why) when the disk is short and not
        confirmed."""
        result = self.estimate(probe=False)
        if result is None or not disk_short(result) or self.confirm_disk.value:
            return False  # no estimate (a bad form): submit names the problem
        self.status.value = f"{badge('NOT STARTED')} not enough free disk"
        self.estimate_line.value += error_box(
            f"<b>Not launched</b>: the store needs {human_bytes(result['bytes_on_disk'])} but the workspace's disk "
            f"has {human_bytes(result['free_disk_bytes'])} free. Free space, capture fewer hook points or samples, "
            "or tick <i>Launch anyway</i> and Launch again (a full disk stops the job, resumable).")
        return True

    def launch(self) -> Job | None:
        """Estimate, validate the form and submit; errors show in the panel, never as a traceback."""
        try:
            with busy(self.launch_button, "Launching…"):
                self._check_model_first()
                if self._disk_refused():
                    return None
                job = self.workspace.submit(**self.submit_arguments())
        except Exception as exc:  # InputError, DiskFull, ...: no job exists, so Retry/Resume target nothing
            self._failed_before_job(exc)
            return None
        self.confirm_disk.value = False  # a confirmation is for one launch
        self._started(job)
        return job

    def _running(self) -> bool:
        job = self.job
        try:
            return job is not None and not job.done
        except Exception:  # noqa: BLE001 - its store is gone: not running
            return False

    # -- presets ----------------------------------------------------------------------------------
    def refresh_presets(self, select: str | None = None) -> None:
        """The dropdown lists ``<workspace>/presets``; ``select`` chooses one (without filling the form)."""
        names = sorted(self.workspace.presets())
        current = select if select is not None else self.preset.value
        self._filling = True
        try:
            self.preset.options = [("(none)", "")] + [(n, n) for n in names]
            self.preset.value = current if current in names else ""
        finally:
            self._filling = False

    def apply_preset(self, name: str | None = None) -> None:
        """Fill the form from a preset (model, dataset and every option the form shows)."""
        if getattr(self, "_filling", False):
            return
        name = self.preset.value if name is None else name
        self._delete_armed = None
        if not name:
            self.preset_status.value = ""
            return
        arguments = self.workspace.preset(name)
        filling, self._filling_form = self._filling_form, True
        try:
            if "dataset" in arguments:
                self.dataset_picker.set_dataset(arguments["dataset"])
            skipped = self.show_arguments({k: v for k, v in arguments.items() if k != "dataset"})
        finally:
            self._filling_form = filling
        self.preset_name.value = name
        self._forget_estimate()
        self.preset_status.value = note_box(
            f"Form filled from preset <b>{esc(name)}</b>."
            + (f" Not shown (stale values): {esc(', '.join(skipped))}." if skipped else ""))

    def save_preset(self) -> str | None:
        """Save the form under the name field (validated by ``ws.save_preset``; errors show here)."""
        name = self.preset_name.value.strip()
        if not name:
            self.preset_status.value = error_box("Type a name for the preset (letters, digits, _ - .).")
            return None
        try:
            self.workspace.save_preset(name, **self.form_arguments())
        except Exception as exc:  # noqa: BLE001 - InputError: the usual message, in this panel
            self.preset_status.value = error_box(f"<b>Preset not saved</b>: {for_ui(exc)}")
            return None
        self.refresh_presets(select=name)
        self.preset_status.value = note_box(f"Saved preset <b>{esc(name)}</b> "
                                            f"(<code>presets/{esc(name)}.json</code> in the workspace).")
        return name

    def delete_preset(self) -> bool:
        """First click asks, the second (on the same preset) deletes it."""
        name = self.preset.value
        if not name:
            self.preset_status.value = error_box("Choose a preset to delete.")
            return False
        if self._delete_armed != name:
            self._delete_armed = name
            self.preset_status.value = error_box(f"Delete preset <b>{esc(name)}</b>? Click "
                                                 "<i>Delete preset</i> again to confirm.")
            return False
        self._delete_armed = None
        self.workspace.delete_preset(name)
        self.refresh_presets(select="")
        self.preset_status.value = note_box(f"Deleted preset <b>{esc(name)}</b>.")
        return True

    def _failed_before_job(self, exc: Exception) -> None:
        kind = "VALIDATION" if isinstance(exc, InputError) else type(exc).__name__
        self._show_refusal(kind, getattr(exc, "template", None) or str(exc))

    def _show_refusal(self, error_type: str, message: str) -> None:
        """A request refused before anything ran (no store): an error of the form, not a failed job; no Retry, as
        Launch of the corrected form is the way on."""
        with self._lock:
            if self.job is not None:
                self.job.unsubscribe(self._on_event)
            self.job = None
            self.progress.value, self.progress.bar_style, self.progress.description = 0, "info", "0%"
        plain = PLAIN_ERRORS.get(error_type, error_type)
        self.alert.value = error_box(f"<b>{esc(plain)}</b> ({esc(error_type)}): {for_ui(message)}"
                                     "<br>No extraction was created. Correct the form, then Launch.")
        self.status.value = f"{badge('NOT STARTED')} {esc(plain)}"
        self.failure_actions.layout.display = self.resume_button.layout.display = "none"
        self.failure_box.layout.display = ""

    def _started(self, job: Job) -> None:
        self.watch(job)
        for listener in self._submitted:
            try:
                listener(job)
            except Exception:  # saving settings must never stop a job from showing
                pass

    def watch(self, job: Job) -> None:
        with self._lock:
            if self.job is not None:
                self.job.unsubscribe(self._on_event)
            self.job = job
            self._rate = RateMeter()
            self.failure_box.layout.display = "none"
            self.progress.value, self.progress.max, self.progress.bar_style = 0, 1, "info"
            self.progress.description = "0%"
            self.status.value = f"{badge(job.status)} {esc(job.id)}"
            self.cancel_button.disabled = False
            self.launch_button.disabled = True
        job.subscribe(self._on_event)
        if job.done:  # it may have ended before we subscribed
            self._on_event({"event": "state", "status": job.status, "job_id": job.id})

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.status.value = f"{badge('CANCELLING')} stopping after the current batch…"

    def retry(self) -> Job | None:
        """A new job from the form as it is now, linked to the failed one (if a job failed; else a fresh Launch)."""
        if self.job is None:
            return self.launch()
        try:
            with busy(self.retry_button, "Retrying…"):
                self._check_model_first()
                if self._disk_refused():
                    return None
                job = self.workspace.retry(self.job.id, **self.form_arguments(), **self.extra_options)
        except Exception as exc:  # the corrected form may still be wrong: say it, keep the target
            self.alert.value = error_box(f"<b>Retry failed</b>: {for_ui(exc)}")
            return None
        self._started(job)
        return job

    def resume(self) -> Job | None:
        if not resumable(self.job):
            self.alert.value = error_box("Nothing to resume: use Retry (with the form corrected) instead.")
            return None
        try:
            size = self.batch_size.value
            job = self.job.resume(batch_size=None if size == "auto" else size, model=self._moved_model())
        except Exception as exc:  # StoreBusy, InputError: say it in the panel
            self.alert.value = error_box(for_ui(exc))
            return None
        self.watch(job)
        return job

    def _moved_model(self) -> str | None:
        """Where the Model tab says the model is, for a store whose recorded model folder is gone (it moved): the
        resume reads it there (its files must be the store's). None while the recorded one is found."""
        recorded = self.job.record.model.name_or_path
        try:
            model_source(ModelSpec(name_or_path=recorded))
            return None
        except InputError:
            chosen = self.model_picker.name_or_path()
            return chosen if chosen and chosen != recorded else None

    # -- events (worker thread) -------------------------------------------------------------------
    @answers_no_request
    def _on_event(self, event: dict) -> None:
        kind = event["event"]
        with self._lock:
            if self.job is None or event.get("job_id") != self.job.id:
                return
            if kind == "progress":
                total = event.get("samples_total") or 0
                final = total and event["samples_done"] >= total
                wait = THROTTLE_S - (time.monotonic() - self._last_draw)
                if not final and wait > 0:  # throttled: the latest event is drawn when the wait is over
                    if self._pending is None:
                        timer = threading.Timer(wait, self._flush)
                        timer.daemon = True
                        timer.start()
                    self._pending = event
                    return
                self._pending = None
                self._draw_progress(event)
            elif kind == "retry":
                self.status.value = (f"{badge('RETRYING')} out of memory at batch {esc(event['previous_batch_size'])}: "
                                     f"continuing with batch_size={esc(event['batch_size'])}")
            elif kind == "state":
                try:
                    self._on_state(event["status"])
                except Exception as exc:  # noqa: BLE001 - e.g. the store was deleted meanwhile
                    self._say(error_box(f"<b>{esc(type(exc).__name__)}</b>: {esc(exc)}"))

    def _draw_progress(self, event: dict) -> None:
        """The bar counts samples computed; the line says how many of them are saved (the commit mark: what a
        crash keeps), and the ETA comes from a smoothed rate."""
        self._last_draw = time.monotonic()
        total = event.get("samples_total") or 0
        self.progress.max = max(1, total)
        self.progress.value = event["samples_done"]
        self.progress.description = f"{100 * event['samples_done'] / max(1, total):.0f}%"
        try:
            saved = int(self.job.record.progress.samples_committed)  # a live job's record is in memory
        except Exception:  # noqa: BLE001 - its store went away: the state event says what happened
            saved = None
        rate = self._rate.update(event.get("tokens_done", 0), first_rate=event.get("tokens_per_s"))
        left = (event.get("tokens_total") or 0) - event.get("tokens_done", 0)
        self.status.value = progress_text("EXTRACTING", event, saved=saved, eta_s=self._rate.eta(left), rate=rate)

    @answers_no_request
    def _flush(self) -> None:
        """The throttled latest event (timer thread); skipped when the job moved on meanwhile."""
        with self._lock:
            event, self._pending = self._pending, None
            job = self.job
            if event is None or job is None or event.get("job_id") != job.id:
                return
            try:
                if job.status == "EXTRACTING":
                    self._draw_progress(event)
            except Exception:  # noqa: BLE001 - its store went away: the state event says what happened
                pass

    def _on_state(self, status: str) -> None:
        job = self.job
        if status in ("QUEUED", "LOADING", "SAVING"):
            self.status.value = f"{badge(status)} {esc(job.id)}"
            return
        if status == "EXTRACTING":
            return
        self.cancel_button.disabled = True
        self.launch_button.disabled = False
        progress = job.progress
        if status == "COMPLETED":
            self.progress.max = max(1, progress.get("samples_total") or 1)
            self.progress.value = self.progress.max
            self.progress.bar_style = "success"
            self.progress.description = "100%"
            meta = job.meta
            auto = meta.get("params", {}).get("batch_size_auto") or {}
            chosen = f", batch size {esc(auto.get('chosen'))} (auto: {esc(auto.get('reason', ''))})" if auto else ""
            self.status.value = (f"{badge('COMPLETED')} {esc(job.id)}: {meta['progress']['samples_total']:,} "
                                 f"samples, {meta['progress']['tokens_total']:,} tokens, "
                                 f"{meta['timings'].get('tokens_per_s') or 0:,.0f} tokens/s{chosen}"
                                 + store_notes(job.extraction()))
        elif status == "CANCELLED":
            self.progress.bar_style = "warning"
            self.status.value = (f"{badge('CANCELLED')} {esc(job.id)}: {progress.get('samples_done', 0):,} "
                                 "samples kept. Resume continues from there.")
            self.alert.value = ""
            self._show_failure_actions()
        elif status == "FAILED" and not store_kept(job):  # refused while preparing its input: no store
            error = job.error or {}
            self._show_refusal(error.get("error_type", "UNKNOWN"),
                               error.get("error_template") or error.get("error_message", ""))
        elif status == "FAILED":
            self.progress.bar_style = "danger"
            error = job.error or {}
            suggested = error.get("suggested_retry_params", {}) or {}
            self.prefill(job.meta, suggested)
            self._show_error(error.get("error_type", "UNKNOWN"),
                             error.get("error_template") or error.get("error_message", ""), suggested, job)
        for listener in self._finished:
            try:
                listener(job)
            except Exception:  # a broken observer must not break the panel
                pass

    def _show_error(self, error_type: str, message: str, suggested: dict, job: Job) -> None:
        """A job that failed: its store stands (Retry makes a new one, Resume continues it where it can)."""
        plain = PLAIN_ERRORS.get(error_type, error_type)
        hint = ""
        if suggested:
            hint = ("<br>Suggested for the retry (already set in the form): "
                    + ", ".join(f"{esc(k)}={esc(str(v))}" for k, v in suggested.items()))
        self.alert.value = error_box(f"Extraction {esc(job.id)}: <b>{esc(plain)}</b> ({esc(error_type)}): "
                                     f"{for_ui(message)}{hint}")
        self.status.value = f"{badge('FAILED')} {esc(plain)}"
        self._show_failure_actions()

    def _show_failure_actions(self) -> None:
        can_resume = resumable(self.job)
        self.resume_button.layout.display = "" if can_resume else "none"
        self.resume_button.disabled = not can_resume
        self.retry_button.disabled = False
        self.failure_actions.layout.display = ""
        self.failure_box.layout.display = ""
