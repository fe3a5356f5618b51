"""Dataset tab: sample, file, saved `datasets` folder or Hub dataset; sizes; a paged preview with the row count,
token counts and a mark on rows that *Max length* will cut; chat records shown as role: content."""
from __future__ import annotations

import os
import time
from typing import Annotated, Any, Callable, Literal

import ipywidgets as W
from pydantic import BaseModel, ConfigDict, Field

from ..data import conversation, raw_values
from ..errors import InputError
from ..request import Request
from ..specs import HubDataset
from .common import busy, error_box, esc, for_ui, guard, stylesheet
from .sidefiles import SettingText, validate_lenient

SOURCES = [("Bundled sample", "sample"), ("File", "file"), ("Saved datasets folder", "folder"), ("Hub", "hub")]
COUNT_FOR_S = 2.0  # how long the preview counts rows past the page before it says "at least"
MAX_ROWS = 2 ** 53  # the largest count a number field shows exactly


class DatasetState(BaseModel):
    """The Dataset tab's form as ``studio.json`` remembers it (each field optional: absent keeps the form's)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    source: Literal["sample", "file", "folder", "hub"] | None = None
    path: SettingText | None = None
    hub_name: SettingText | None = None
    hub_config: SettingText | None = None
    hub_split: SettingText | None = None
    column: SettingText | None = None
    max_samples: Annotated[int, Field(ge=0, le=MAX_ROWS)] | None = None
    max_length: Annotated[int, Field(ge=1, le=MAX_ROWS)] | None = None


def read_rows(spec: Request, start: int, n: int, count_for_s: float = COUNT_FOR_S) -> tuple[list, int, bool]:
    """Rows ``start .. start+n-1`` of the dataset as ``(row, raw value)``, the number of rows counted, and whether
    that is all of them (counting past the page stops after ``count_for_s`` seconds)."""
    rows, counted, deadline = [], 0, time.monotonic() + count_for_s
    for i, value in enumerate(raw_values(spec)):
        if start <= i < start + n:
            rows.append((i, value))
        counted = i + 1
        if i >= start + n and time.monotonic() > deadline:
            return rows, counted, False
    return rows, counted, True


def _short(text: str, chars: int) -> str:
    return text[:chars] + ("…" if len(text) > chars else "")


class DatasetPicker(W.VBox):
    """The Dataset tab. ``dataset()`` and ``options()`` feed ``Workspace.submit``."""

    def __init__(self, dataset: Any = None, tokenizer_for: Callable[[], Any] | None = None):
        style = {"description_width": "100px"}
        self.source = W.ToggleButtons(options=SOURCES, value="sample",
                                      style={"button_width": "auto"})
        self.path = W.Text(description="Path", placeholder="/path/to/data.jsonl or saved folder", style=style,
                           layout=W.Layout(width="70%"))
        self.hub_name = W.Text(description="Hub name", placeholder="e.g. wikitext", style=style)
        self.hub_config = W.Text(description="Hub config", placeholder="optional", style=style)
        self.hub_split = W.Text(value="train", description="Split", style=style)
        self.column = W.Text(value="text", description="Text column", style=style)
        self.max_samples = W.IntText(value=1000, description="Max samples", style=style,
                                     tooltip="how many dataset rows to run; 0 = all rows",
                                     layout=W.Layout(width="240px"))
        self.max_length = W.IntText(value=128, description="Max length", style=style,
                                    tooltip="tokens per sample; longer samples are cut", layout=W.Layout(width="240px"))
        self.preview_button = W.Button(description="Preview", button_style="info", icon="eye",
                                       tooltip="rows with their token counts; rows longer than Max length are marked",
                                       layout=W.Layout(width="auto"))
        self.preview_rows = W.BoundedIntText(value=10, min=1, max=500, description="Rows shown", style=style,
                                             layout=W.Layout(width="200px"), tooltip="rows per preview page")
        self.prev_button = W.Button(description="Previous", icon="chevron-left", disabled=True,
                                    layout=W.Layout(width="auto"))
        self.next_button = W.Button(description="Next", icon="chevron-right", disabled=True,
                                    layout=W.Layout(width="auto"))
        self.page_start = 0
        self.preview = W.HTML()
        self._tokenizer_for = tokenizer_for
        self._hub_box = W.VBox([self.hub_name, self.hub_config, self.hub_split])
        self.source.observe(guard(self._say, lambda _: self._show_fields(clear=True)), "value")
        self.path.observe(guard(self._say, lambda _: self._clear_preview()), "value")
        self.preview_button.on_click(guard(self._say, lambda _: self.show_preview()))
        self.prev_button.on_click(guard(self._say, lambda _: self.page(-1)))
        self.next_button.on_click(guard(self._say, lambda _: self.page(1)))
        for widget in (self.column, self.hub_name, self.hub_config, self.hub_split):
            widget.observe(guard(self._say, lambda _: self._clear_preview()), "value")
        if isinstance(dataset, HubDataset):
            self.source.value = "hub"
            self.hub_name.value, self.hub_split.value, self.column.value = dataset.name, dataset.split, dataset.column
        elif isinstance(dataset, str) and dataset != "sample":
            from pathlib import Path

            self.source.value = "folder" if Path(dataset).is_dir() else "file"
            self.path.value = dataset
        super().__init__([stylesheet(), W.HTML("<b>Dataset</b>"), self.source, self.path, self._hub_box, self.column,
                          W.HBox([self.max_samples, self.max_length]),
                          W.HTML("<small>Max samples 0 = all rows. Max length: tokens per sample, longer ones "
                                 "are cut.</small>"),
                          W.HBox([self.preview_button, self.preview_rows, self.prev_button, self.next_button]),
                          self.preview])
        self.add_class("mistudio-panel")
        self._show_fields()

    def _say(self, text: str) -> None:
        self.preview.value = text

    def _clear_preview(self) -> None:
        """Another dataset: the preview (and its failure) was about the previous one."""
        self.preview.value = ""
        self.page_start = 0
        self.prev_button.disabled = self.next_button.disabled = True

    def describe(self) -> str:
        """One line for the Extract tab: which data, how many rows, how long."""
        kind = self.source.value
        what = {"sample": "the bundled sample", "hub": f"Hub {self.hub_name.value.strip() or '?'}"
                f":{self.hub_split.value.strip() or 'train'}"}.get(kind)
        if what is None:
            from pathlib import Path

            what = Path(self.path.value.strip()).name or "(no file chosen)"
        rows = f"up to {self.max_samples.value:,} rows" if self.max_samples.value else "all rows"
        return f"{what}, {rows}, max length {self.max_length.value:,} tokens"

    def _show_fields(self, clear: bool = False) -> None:
        if clear:
            self._clear_preview()
        kind = self.source.value
        self.path.layout.display = "" if kind in ("file", "folder") else "none"
        self._hub_box.layout.display = "" if kind == "hub" else "none"
        self.column.layout.display = "none" if kind == "sample" else ""

    def dataset(self) -> Any:
        kind = self.source.value
        if kind == "sample":
            return "sample"
        if kind == "hub":
            return HubDataset(name=self.hub_name.value.strip(), split=self.hub_split.value.strip() or "train",
                              column=self.column.value.strip() or "text", config=self.hub_config.value.strip() or None)
        return self.path.value.strip()

    def options(self) -> dict:
        return {"max_samples": self.max_samples.value or None, "max_length": self.max_length.value,
                "text_column": self.column.value.strip() or "text"}

    def set_dataset(self, dataset: Any) -> None:
        """Show a dataset argument: 'sample', a path, a HubDataset (or a preset's {"hub": {...}})."""
        if isinstance(dataset, dict) and "hub" in dataset:
            dataset = HubDataset(**dataset["hub"])
        if isinstance(dataset, HubDataset):
            self.source.value = "hub"
            self.hub_name.value, self.hub_split.value = dataset.name, dataset.split
            self.hub_config.value, self.column.value = dataset.config or "", dataset.column
        elif dataset is None or dataset == "sample":
            self.source.value = "sample"
        elif isinstance(dataset, (str, os.PathLike)):
            self.source.value = "folder" if os.path.isdir(dataset) else "file"
            self.path.value = os.fspath(dataset)
        else:
            raise InputError(f"the Dataset tab cannot show an in-memory {type(dataset).__name__}: save it to a file")

    def spec(self, chat: bool = False) -> Request:
        """The dataset part of a request (with the Model tab's model unknown here: the bundled sample's rules);
        ``chat``: whole records, as a chat template reads them."""
        opts = self.options()
        return Request.build(model="(dataset preview)", dataset=self.dataset(), text_column=opts["text_column"],
                             max_samples=opts["max_samples"], max_length=opts["max_length"],
                             chat_template="auto" if chat else None)

    def _is_chat(self) -> bool:
        """The first record is a conversation (messages, ShareGPT conversations, Alpaca instruction/output)."""
        if self.source.value == "sample":
            return False
        try:
            first = next(iter(raw_values(self.spec(chat=True))), None)
        except Exception:  # noqa: BLE001 - unreadable as records: the plain read says why
            return False
        return conversation(first) is not None

    def page(self, step: int) -> None:
        """Show the next (``step`` 1) or previous (-1) page of rows."""
        size = max(1, int(self.preview_rows.value))
        self.page_start = max(0, self.page_start + step * size)
        self.show_preview()

    def show_preview(self, n: int | None = None) -> list[dict]:
        """``n`` rows (default: *Rows shown*) from the current page, with the row count, token counts (with the
        Model tab's tokenizer when it is on this machine) and a mark on rows longer than *Max length* (they will be
        cut); chat records are shown as role: content. Errors show in the tab."""
        n = max(1, int(self.preview_rows.value if n is None else n))
        with busy(self.preview_button, "Reading…"):
            try:
                chat = self._is_chat()
                spec = self.spec(chat=chat)
                rows, counted, complete = read_rows(spec, self.page_start, n)
                if not rows and self.page_start:  # past the end: back to the last page
                    self.page_start = max(0, (counted - 1) // n * n)
                    rows, counted, complete = read_rows(spec, self.page_start, n)
            except InputError as exc:
                self.preview.value = error_box(for_ui(exc))
                return []
            tokenizer = None
            if self._tokenizer_for is not None:
                try:
                    tokenizer = self._tokenizer_for()
                except Exception:  # noqa: BLE001 - preview without counts rather than no preview
                    tokenizer = None
            out = [self._describe_row(row, value, chat, tokenizer, spec.max_length) for row, value in rows]
        self.preview.value = self._table(out, counted, complete, chat, tokenizer is not None, spec)
        self.prev_button.disabled = self.page_start == 0
        self.next_button.disabled = complete and self.page_start + n >= counted
        return out

    @staticmethod
    def _describe_row(row: int, value: Any, chat: bool, tokenizer, max_length: int) -> dict:
        out: dict = {"row": row, "text": value}
        messages = conversation(value) if chat else None
        if messages is not None:
            out["messages"] = messages
            if tokenizer is not None and getattr(tokenizer, "chat_template", None):
                try:
                    ids = tokenizer.apply_chat_template(messages, tokenize=True)
                    out["tokens"] = len(ids["input_ids"] if hasattr(ids, "keys") else ids)
                except Exception:  # noqa: BLE001 - a template that refuses this record: no count
                    pass
        elif tokenizer is not None and isinstance(value, str) and value.strip():
            out["tokens"] = len(tokenizer(value, add_special_tokens=True)["input_ids"])
        out["truncated"] = bool(out.get("tokens") and out["tokens"] > max_length)
        return out

    def _table(self, rows: list[dict], counted: int, complete: bool, chat: bool, counts: bool, spec: Request) -> str:
        total = f"{counted:,} rows" if complete else f"at least {counted:,} rows (counting stopped)"
        used = (f"; Max samples {spec.max_samples:,}: the first {min(spec.max_samples, counted):,} are used"
                if spec.max_samples else "; all of them are used")
        first, last = (rows[0]["row"], rows[-1]["row"]) if rows else (0, -1)
        cut = sum(r["truncated"] for r in rows)
        notes = [f"Rows {first:,}–{last:,} of {total}{used}."]
        if cut:
            notes.append(f"✂ {cut} of these {len(rows)} rows {'is' if cut == 1 else 'are'} longer than Max length "
                         f"({spec.max_length:,} tokens) and will be cut there (or set a Window in Extract ▸ "
                         "Advanced).")
        if not counts:
            notes.append("Token counts need the model's tokenizer on this machine: <i>Load / inspect</i> a local or "
                         "cached model in the Model tab.")
        if chat:
            notes.append("Chat records: shown as role: content; they are extracted with a chat template (tick "
                         "<i>Chat data</i> in Extract ▸ Advanced).")
        body = []
        for r in rows:
            if "messages" in r:
                shown = "<br>".join(f"<b>{esc(m['role'])}</b>: {esc(_short(m['content'], 120))}"
                                    for m in r["messages"][:6]) + ("<br>…" if len(r["messages"]) > 6 else "")
            else:
                text = r["text"] if isinstance(r["text"], str) else repr(r["text"])
                shown = esc(_short(text, 160))
            tokens = f"{r['tokens']:,}" if "tokens" in r else "–"
            if r["truncated"]:
                tokens = (f'<span class="mistudio-truncated" style="color:#dc3545;white-space:nowrap" title="longer '
                          f'than Max length: cut to {spec.max_length:,} tokens">✂ {tokens}</span>')
            body.append(f"<tr><td style='padding:2px 12px 2px 0;vertical-align:top'>{r['row']:,}</td>"
                        f"<td style='padding:2px 12px 2px 0;vertical-align:top'>{tokens}</td>"
                        f"<td style='padding:2px 0;overflow-wrap:anywhere'>{shown}</td></tr>")
        return (f"<div class='mistudio-line'><small>{' '.join(notes)}</small></div>"
                "<table class='mistudio-preview' style='text-align:left;border-collapse:collapse'>"
                "<tr><th style='padding-right:12px'>row</th><th style='padding-right:12px'>tokens</th>"
                "<th>text</th></tr>" + "".join(body) + "</table>")

    # -- remembered settings and prefill --------------------------------------------------------
    FIELDS = ("source", "path", "hub_name", "hub_config", "hub_split", "column", "max_samples", "max_length")

    def state(self) -> dict:
        """The form as a JSON-able dict (what ``studio.json`` remembers)."""
        return {name: getattr(self, name).value for name in self.FIELDS}

    def set_state(self, state: "dict | DatasetState") -> list[str]:
        """Fill the form from a remembered state (typed through :class:`DatasetState`); returns a line for each
        value left out (a wrong type, or one the form cannot show), whose field keeps what it shows."""
        if isinstance(state, DatasetState):
            problems: list[str] = []
        else:
            state, problems = validate_lenient(DatasetState, state, "the Dataset tab's state")
        for name, value in state.model_dump(exclude_none=True).items():
            try:
                getattr(self, name).value = value
            except Exception as exc:  # noqa: BLE001 - a value the widget refuses: keep the default
                problems.append(f"{name!r} = {value!r} cannot be shown in the Dataset tab ({type(exc).__name__})")
        return problems

    def set_from_description(self, desc: dict) -> None:
        """Fill the form from a job's recorded dataset (in-memory lists cannot be shown: left as is)."""
        from pathlib import Path

        src = desc.get("source", {})
        kind = src.get("kind")
        state: dict = {k: desc.get(k) for k in ("max_samples", "max_length")}
        state["max_samples"] = state["max_samples"] or 0
        if desc.get("text_column"):
            state["column"] = desc["text_column"]
        if kind == "sample":
            state["source"] = "sample"
        elif kind == "path":
            state.update(source="folder" if Path(src["path"]).is_dir() else "file", path=src["path"])
        elif kind == "hub":
            state.update(source="hub", hub_name=src.get("name", ""), hub_config=src.get("config") or "",
                         hub_split=src.get("split") or "train")
        self.set_state(state)
