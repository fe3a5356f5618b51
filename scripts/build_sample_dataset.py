"""Rebuild mistudio/resources/sample_text.jsonl.gz: real English prose, no download.

The rows are paragraphs of the Python Language Reference (``pydoc_data.topics``) and of the
standard library's docstrings, as shipped with CPython (PSF licence). Run from the repo root:
``python scripts/build_sample_dataset.py``.
"""
import gzip
import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path

import pydoc_data.topics

OUT = Path(__file__).resolve().parents[1] / "mistudio" / "resources" / "sample_text.jsonl.gz"
MODULES = ["collections", "functools", "itertools", "json", "pathlib", "re", "threading", "queue",
           "subprocess", "argparse", "logging", "datetime", "decimal", "fractions", "statistics",
           "random", "string", "textwrap", "unittest", "email", "http.client", "urllib.request",
           "sqlite3", "csv", "zipfile", "tarfile", "shutil", "os", "io", "asyncio", "concurrent.futures",
           "dataclasses", "enum", "typing", "inspect", "heapq", "bisect", "socket", "ssl", "hashlib"]


def paragraphs(text: str):
    for para in re.split(r"\n\s*\n", text):
        p = " ".join(para.split())
        if not 60 <= len(p) <= 600 or not p[0].isupper() or not p.rstrip().endswith((".", ":")):
            continue
        if sum(c.isalpha() or c == " " for c in p) / len(p) < 0.88:
            continue
        if ">>>" in p or "::" in p or p.count("(") > 3 or p.count("=") > 1:
            continue
        yield p


def main() -> None:
    rows, seen = [], set()

    def add(text: str, source: str) -> None:
        for p in paragraphs(text):
            if p not in seen:
                seen.add(p)
                rows.append({"text": p, "source": source})

    for key in sorted(pydoc_data.topics.topics):
        add(pydoc_data.topics.topics[key], f"python-reference:{key}")
    for name in MODULES:
        module = importlib.import_module(name)
        add(inspect.getdoc(module) or "", f"stdlib:{name}")
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or str(getattr(obj, "__module__", None) or name).split(".")[0] != name.split(".")[0]:
                continue
            add(inspect.getdoc(obj) or "", f"stdlib:{name}.{attr}")
            for meth, fn in sorted(vars(obj).items()) if inspect.isclass(obj) else []:
                if not meth.startswith("_"):
                    add(inspect.getdoc(fn) or "", f"stdlib:{name}.{attr}.{meth}")
    with gzip.open(OUT, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} rows -> {OUT}")


if __name__ == "__main__":
    main()
