"""Dataset tab: sample, file, saved `datasets` folder or Hub dataset; sizes; a preview with token counts."""
from __future__ import annotations

import html
import os
from typing import Any, Callable

import ipywidgets as W

from ..data import raw_values
from ..errors import InputError
from ..request import Request
from ..specs import HubDataset
from .common import error_box, for_ui, guard

SOURCES = [("Bundled sample", "sample"), ("File", "file"), ("Saved datasets folder", "folder"), ("Hub", "hub")]


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
                                     tooltip="how many dataset rows to run; 0 = all rows")
        self.max_length = W.IntText(value=128, description="Max length", style=style,
                                    tooltip="tokens per sample; longer samples are cut")
        self.preview_button = W.Button(description="Preview", button_style="info",
                                       tooltip="the first rows and their token counts")
        self.preview = W.HTML()
        self._tokenizer_for = tokenizer_for
        self._hub_box = W.VBox([self.hub_name, self.hub_config, self.hub_split])
        self.source.observe(guard(self._say, lambda _: self._show_fields(clear=True)), "value")
        self.path.observe(guard(self._say, lambda _: self._clear_preview()), "value")
        self.preview_button.on_click(guard(self._say, lambda _: self.show_preview()))
        if isinstance(dataset, HubDataset):
            self.source.value = "hub"
            self.hub_name.value, self.hub_split.value, self.column.value = dataset.name, dataset.split, dataset.column
        elif isinstance(dataset, str) and dataset != "sample":
            from pathlib import Path

            self.source.value = "folder" if Path(dataset).is_dir() else "file"
            self.path.value = dataset
        super().__init__([W.HTML("<b>Dataset</b>"), self.source, self.path, self._hub_box, self.column,
                          W.HBox([self.max_samples, self.max_length]),
                          W.HTML("<small>Max samples 0 = all rows. Max length: tokens per sample, longer ones "
                                 "are cut.</small>"), self.preview_button, self.preview])
        self._show_fields()

    def _say(self, text: str) -> None:
        self.preview.value = text

    def _clear_preview(self) -> None:
        self.preview.value = ""

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

    def spec(self) -> Request:
        """The dataset part of a request (with the Model tab's model unknown here: the bundled sample's rules)."""
        opts = self.options()
        return Request.build(model="(dataset preview)", dataset=self.dataset(), text_column=opts["text_column"],
                             max_samples=opts["max_samples"], max_length=opts["max_length"])

    def show_preview(self, n: int = 5) -> list[dict]:
        """The first ``n`` rows with their token counts (with the Model tab's tokenizer), or a clear error."""
        try:
            spec = self.spec()
            rows = []
            for row, value in enumerate(raw_values(spec)):
                rows.append({"row": row, "text": value})
                if len(rows) >= n:
                    break
        except InputError as exc:
            self.preview.value = error_box(for_ui(exc))
            return []
        tokenizer = None
        if self._tokenizer_for is not None:
            try:
                tokenizer = self._tokenizer_for()
            except Exception:  # preview without counts rather than no preview
                tokenizer = None
        body = []
        for r in rows:
            text = r["text"] if isinstance(r["text"], str) else repr(r["text"])
            if tokenizer is not None and isinstance(r["text"], str) and r["text"].strip():
                r["tokens"] = len(tokenizer(r["text"], truncation=True, max_length=spec.max_length)["input_ids"])
            body.append(f"<tr><td>{r['row']}</td><td>{r.get('tokens', '–')}</td>"
                        f"<td>{html.escape(text[:160])}{'…' if len(text) > 160 else ''}</td></tr>")
        self.preview.value = ("<table class='mistudio-preview' style='text-align:left'>"
                              "<tr><th style='padding-right:12px'>row</th>"
                              "<th style='padding-right:12px'>tokens</th><th>text</th></tr>"
                              + "".join(body) + "</table>")
        return rows

    # -- remembered settings and prefill --------------------------------------------------------
    FIELDS = ("source", "path", "hub_name", "hub_config", "hub_split", "column", "max_samples", "max_length")

    def state(self) -> dict:
        """The form as a JSON-able dict (what ``studio.json`` remembers)."""
        return {name: getattr(self, name).value for name in self.FIELDS}

    def set_state(self, state: dict) -> None:
        for name in self.FIELDS:
            if name in state and state[name] is not None:
                try:
                    getattr(self, name).value = state[name]
                except Exception:  # a stale or hand-edited value: keep the default
                    pass

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
