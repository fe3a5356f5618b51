"""Property-based tests (hypothesis) of what users type (issue 16 part 6): ``layers`` strings and values, every
``Request`` keyword, preset files and the workspace's preset folder. Every generated input gives a correct answer
or an ``InputError`` naming the parameter, fast and within a memory bound; never another exception."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import bounded_call
from hypothesis import HealthCheck, given, settings, strategies as st

import mistudio as ms
from mistudio.errors import InputError
from mistudio.presets import PresetFile, read_preset_file
from mistudio.request import Request
from mistudio.specs import MAX_LAYER_INDEX, parse_layers

FAST = settings(max_examples=300, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
MEMORY_BOUND = 8 << 20  # bytes any one call may allocate at its peak (a layer list of MAX_LAYER_INDEX ints is ~0.5 MB)


def bounded(call):
    """``call``'s result or the InputError it raised; its peak allocation stays under MEMORY_BOUND."""
    return bounded_call(call, MEMORY_BOUND, InputError)


# -- layers -----------------------------------------------------------------------------------------------------
DIGITS = st.one_of(st.integers(0, 40), st.integers(0, 10**30), st.sampled_from([MAX_LAYER_INDEX, MAX_LAYER_INDEX + 1]))
UNICODE_DIGITS = st.sampled_from(["٣", "३", "３", "①", "²", "⁴", "𝟙", "-", "−", "–"])
SPACE = st.sampled_from(["", " ", "\t", "\n", "\u00a0", "\u2003"])


@st.composite
def layer_parts(draw):
    """(text, the indices it names or None when it is not a well-formed index/range list)."""
    parts, names, ok = [], set(), True
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["index", "range", "noise"]))
        a, b = draw(DIGITS), draw(DIGITS)
        pad = draw(SPACE)
        if kind == "index":
            parts.append(f"{pad}{a}{pad}")
            ok = ok and len(str(a)) <= 12
            names.add((a, a))
        elif kind == "range":
            parts.append(f"{pad}{a}{draw(SPACE)}-{draw(SPACE)}{b}{pad}")
            ok = ok and len(str(a)) <= 12 and len(str(b)) <= 12 and a <= b
            names.add((a, b))
        else:
            parts.append(draw(st.one_of(UNICODE_DIGITS, st.text(max_size=6))))
            ok = None  # no oracle: only the contract
    return ",".join(parts), (names if ok else None), ok


@FAST
@given(layer_parts(), st.one_of(st.none(), st.integers(1, 64)))
def test_layer_strings_give_the_layers_or_an_error_naming_layers(case, n_layers):
    text, names, ok = case
    result = bounded(lambda: parse_layers(text, n_layers))
    limit = n_layers if n_layers is not None else MAX_LAYER_INDEX + 1
    if isinstance(result, InputError):
        assert result.param == "layers" and "layers" in str(result)
        if ok:  # well formed: refused only for an index past the limit
            assert max(b for _, b in names) >= limit
        return
    assert result == sorted(set(result)) and all(0 <= i < limit for i in result)
    if ok:
        assert result == sorted({i for a, b in names for i in range(a, b + 1)})
    assert ok is not False, f"{text!r} is malformed but gave {result}"


@FAST
@given(st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.integers(-5, 10**20), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3)),
             max_size=6),
    st.integers(-10**20, 10**20), st.floats(), st.booleans(), st.none(),
    st.builds(range, st.integers(-10**12, 10**12), st.integers(-10**12, 10**12), st.integers(1, 10**6)),
    st.lists(st.integers(0, 50), min_size=1, max_size=5).map(np.array)))
def test_any_layers_value_gives_indices_or_an_error_naming_layers(value):
    result = bounded(lambda: parse_layers(value, 48))
    if isinstance(result, InputError):
        assert result.param == "layers"
    else:
        assert result and result == sorted(set(result)) and all(0 <= i < 48 for i in result)


# -- Request.build ---------------------------------------------------------------------------------------------
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=5), st.floats()), max_size=4),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
    st.just("all"), st.just("0-3000000000"), st.just(float("nan")), st.just(2**63), st.just(-1), st.just(0))
FIELDS = [f for f in Request.model_fields if f not in ("model", "dataset")]


@FAST
@given(st.dictionaries(st.sampled_from(FIELDS), ANY, min_size=1, max_size=3))
def test_request_build_gives_a_request_or_an_error_naming_a_given_parameter(values):
    result = bounded(lambda: Request.build(model="gpt2", dataset=["a text"], **values))
    if isinstance(result, InputError):
        assert result.param in values, (result.param, str(result))
        return
    assert isinstance(result, Request)
    for name in ("batch_size", "max_length", "chunk_mb", "shard_mb"):
        value = getattr(result, name)
        assert value is None or (not isinstance(value, bool) and math.isfinite(value) and value >= 0), (name, value)


@FAST
@given(st.text(min_size=1, max_size=20).filter(lambda k: k not in Request.model_fields and k.isidentifier()), ANY)
def test_unknown_keywords_are_refused_by_name(name, value):
    result = bounded(lambda: Request.build(model="gpt2", dataset=["a text"], **{name: value}))
    assert isinstance(result, InputError) and result.param == name


# -- presets ---------------------------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False)
                    | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
PRESET_LIKE = st.fixed_dictionaries(
    {"arguments": st.dictionaries(st.sampled_from([*Request.model_fields, "nope", "workspace"]), JSON, max_size=4)},
    optional={"name": JSON, "saved": JSON})
FILE_BYTES = st.one_of(st.binary(max_size=200), JSON.map(lambda d: json.dumps(d).encode()),
                       PRESET_LIKE.map(lambda d: json.dumps(d).encode()),
                       st.just(b"\xef\xbb\xbf{}"), st.just(b'{"arguments": {"layers": "0-3"}}' + b" " * 10))


@FAST
@given(FILE_BYTES)
def test_preset_files_parse_or_are_refused_naming_the_path(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("preset") / "p.json"
    path.write_bytes(data)
    result = bounded(lambda: read_preset_file(path))
    if isinstance(result, InputError):
        assert result.param == "path" and str(path) in str(result)
        return
    assert isinstance(result, PresetFile) and set(result.arguments) <= set(Request.model_fields)
    assert json.loads(data)["arguments"] == result.arguments


@settings(max_examples=40, deadline=30000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(FILE_BYTES, min_size=1, max_size=4))
def test_a_preset_folder_of_anything_lists_the_good_and_reports_the_bad(tmp_path_factory, files):
    ws = ms.Workspace(str(tmp_path_factory.mktemp("ws")))
    folder = Path(ws.root) / "presets"
    folder.mkdir(parents=True)
    for i, data in enumerate(files):
        (folder / f"p{i}.json").write_bytes(data)
    good, bad = ws.presets(), ws.preset_problems()
    assert set(good) | set(bad) == {f"p{i}" for i in range(len(files))} and not set(good) & set(bad)
    for name, problem in bad.items():
        assert f"{name}.json" in problem
    for name in good:
        assert isinstance(ws.preset(name), dict)
    for i in range(len(files)):  # importing a file checks it as a submit would: a name, or an error naming why
        result = bounded(lambda: ws.import_preset(folder / f"p{i}.json", name=f"imported{i}", overwrite=True))
        if isinstance(result, InputError):
            assert result.param, str(result)
        else:
            assert result == f"imported{i}" and f"imported{i}" in ws.presets()
