"""Loader states it can trust: every state, real or mutated, either resumes exactly where it says or raises
InputError naming the field; quickly (no hang) and without memory blow-up (issue 16)."""
from __future__ import annotations

import copy
import io
import pickle
import resource
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

import mistudio as ms
from mistudio.analysis.loader import STATE_FORMAT
from mistudio.errors import _MARK

HP = "layers.0.residual"
EOS = "<|endoftext|>"
ARGS = dict(layers=[0], hooks=["residual"], dtype="float32", chunk_mb=0.02, max_length=64, progress=False)
KW = dict(batch_size=128, seed=11, exclude_special=True, with_index=True, buffer_tokens=700, rank=1, world_size=2)
SECONDS = 10  # the most one example may take (it resumes and drains a whole epoch at worst)
RSS_MB = 300  # the most the peak RSS may grow over all examples


@pytest.fixture(scope="module")
def fuzz_store(gpt2_dir, tmp_path_factory):
    """A sharded store (format 2) with special tokens to skip, and the batches of epochs of rank 1 of 2."""
    texts = [f"{t} {EOS} x" if i % 4 == 0 else t for i, t in enumerate(ms.sample_texts()[:80])]
    ext = ms.extract(gpt2_dir, texts, workspace=str(tmp_path_factory.mktemp("fuzz")), shard_mb=0.1, **ARGS)
    assert ext.activations(HP).shards is not None
    return ext, Reference(ext)


class Reference:
    """Each epoch's full batch list (token indices), computed once per epoch asked."""

    def __init__(self, ext):
        self.ext, self.epochs = ext, {}

    def __call__(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self.epochs:
            loader = ms.loader(self.ext, HP, **KW)
            loader.set_epoch(epoch)
            self.epochs[epoch] = [b["token_index"].numpy() for b in loader]
        return self.epochs[epoch]


def real_state(ext, batches: int) -> dict:
    it = iter(ms.loader(ext, HP, **KW))
    for _ in range(batches):
        next(it)
    state = it.state_dict()
    it.close()
    return state


def resume_or_refuse(ext, reference: Reference, state) -> str:
    """'refused' (InputError) or 'resumed' (and then the rest of the epoch is exactly the reference's)."""
    it = iter(ms.loader(ext, HP, **KW))
    try:
        it.load_state_dict(state)
    except ms.InputError as exc:
        assert str(exc).startswith("this loader state cannot be resumed here: ") and not _MARK.search(str(exc)), \
            str(exc)  # every parameter mark rendered (a '«' of the state's own values may be quoted)
        return "refused"
    tail = [b["token_index"].numpy() for b in it]
    full = reference(state["epoch"])
    assert len(tail) == len(full) - state["batches"]
    for got, want in zip(tail, full[state["batches"]:]):
        np.testing.assert_array_equal(got, want)
    return "resumed"


def test_real_states_resume_exactly(fuzz_store):
    ext, reference = fuzz_store
    n = len(reference(0))
    for batches in (0, 1, n // 2, n - 1, n):
        state = real_state(ext, batches)
        for trip in (lambda s: pickle.loads(pickle.dumps(s)), torch_roundtrip):
            assert resume_or_refuse(ext, reference, trip(state)) == "resumed"
    assert len(pickle.dumps(state)) < 2000  # small: no buffer contents, no row ids


def torch_roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True): a state is plain Python values."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_issue_16_garbage_is_refused(fuzz_store):
    ext, reference = fuzz_store
    good = real_state(ext, 3)
    old_style = {"epoch": 0, "worker": 0, "n_workers": 1, "seed": 11, "limits": [ext.n_tokens], "next_chunk": 10**12,
                 "batches": -1, "buffer_ids": np.arange(10**6), "rng": {"bit_generator": "PCG64"}}
    garbage = [None, [], "state", 3, {}, old_style, {**good, "batches": 10**30}, {**good, "batches": -1},
               {**good, "epoch": -1}, {**good, "epoch": 2**70}, {**good, "batches": 3.0}, {**good, "batches": True},
               {**good, "format": "mistudio.loader/1"}, {**good, "stores": []}, {**good, "stores": "x"},
               {**good, "settings": None}, {**good, "extra": 1}]
    for state in garbage:
        started = time.perf_counter()
        assert resume_or_refuse(ext, reference, state) == "refused", state
        assert time.perf_counter() - started < SECONDS


def test_other_store_or_mark_is_refused(fuzz_store, gpt2_dir, tmp_path):
    ext, reference = fuzz_store
    state = real_state(ext, 2)
    for key, value, needle in [("id", "ext_other", "another store"), ("nonce", "n0", "replaced"),
                               ("committed", ext.n_tokens - 1, "commit mark")]:
        bad = copy.deepcopy(state)
        bad["stores"][0][key] = value
        with pytest.raises(ms.InputError, match=needle):
            iter(ms.loader(ext, HP, **KW)).load_state_dict(bad)
    for key, value, needle in [("seed", 12, "loader with seed=12"), ("batch_size", 64, "loader with batch_size=64"),
                               ("exclude_special", False, "loader with exclude_special=False"),
                               ("rank", 0, "loader with rank=0"),
                               ("lanes", 3, "buffer_tokens and run_mb"), ("seed", "11", "'settings'.*'seed'")]:
        bad = copy.deepcopy(state)
        bad["settings"][key] = value
        with pytest.raises(ms.InputError, match=needle) as exc:
            iter(ms.loader(ext, HP, **KW)).load_state_dict(bad)
        assert exc.value.param == "state" and "«" not in str(exc.value)
    with pytest.raises(ms.InputError, match="loader with seed=11") as exc:  # made otherwise than the state's
        iter(ms.loader(ext, HP, **{**KW, "seed": 12})).load_state_dict(state)
    assert "--seed 11" in exc.value.render("cli")


# -- property-based: mutations of real states ------------------------------------------------------------
GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=20), st.lists(st.integers(), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.builds(lambda n, k: np.full(n, k, np.int64), st.integers(0, 1000), st.integers(-5, 5)),
    st.sampled_from([np.int64(3), np.float32(1.5), (1, 2), STATE_FORMAT, 2**63, 10**100, float("inf")]))


def paths(state, prefix=()):
    """Every (path) into the nested dicts and lists of a state."""
    yield prefix
    if isinstance(state, dict):
        for k, v in state.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(state, list):
        for i, v in enumerate(state):
            yield from paths(v, prefix + (i,))


def mutate(state: dict, path: tuple, op: str, value, delta: int) -> dict:
    """A copy of ``state`` with one change at ``path``: replace, delete, add a key, nudge a number, retype."""
    state = copy.deepcopy(state)
    if not path:
        return value if op == "replace" else {**state, "unexpected": value}
    parent = state
    for key in path[:-1]:
        parent = parent[key]
    key, old = path[-1], parent[path[-1]]
    if op == "replace":
        parent[key] = value
    elif op == "delete":
        del parent[key]
    elif op == "add":
        if isinstance(parent, dict):
            parent[f"{key}_extra"] = value
        else:
            parent.append(value)
    elif op == "nudge" and isinstance(old, int) and not isinstance(old, bool):
        parent[key] = old + delta
    elif op == "retype":
        parent[key] = (np.int64(old) if isinstance(old, int) and not isinstance(old, bool) and abs(old) < 2**62
                       else tuple(old) if isinstance(old, list) else str(old))
    else:
        parent[key] = value
    return state


@pytest.fixture(scope="module")
def states(fuzz_store):
    ext, reference = fuzz_store
    n = len(reference(0))
    return [real_state(ext, b) for b in (0, 2, n - 1)]


@pytest.mark.timeout(600)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_states_resume_exactly_or_are_refused(fuzz_store, states, data):
    ext, reference = fuzz_store
    state = data.draw(st.sampled_from(states))
    path = data.draw(st.sampled_from(list(paths(state))))
    op = data.draw(st.sampled_from(["replace", "delete", "add", "nudge", "retype"]))
    value, delta = data.draw(GARBAGE), data.draw(st.sampled_from([-1, 1, 2, -2**40, 2**62]))
    mutated = mutate(state, path, op, value, delta)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    outcome = resume_or_refuse(ext, reference, mutated)
    event(f"{outcome}: {'/'.join(map(str, path[:1])) or 'state'} {op}")
    assert time.perf_counter() - started < SECONDS, (path, op, value)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024 < RSS_MB, (path, op, value)
    if outcome == "resumed" and path[:1] in (("stores",), ("settings",), ("format",)):
        assert pickle.dumps(mutated) == pickle.dumps(state), (path, op, value)  # only an unchanged field passes


@pytest.mark.timeout(300)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(epoch=st.integers(0, 4), batches=st.integers(-2, 60), use_numpy=st.booleans())
def test_any_position_resumes_exactly_or_is_refused(fuzz_store, states, epoch, batches, use_numpy):
    """Positions a real run could hold resume there exactly; others are refused (never a silent clamp)."""
    ext, reference = fuzz_store
    state = {**states[1], "epoch": np.int64(epoch) if use_numpy else epoch, "batches": batches}
    outcome = resume_or_refuse(ext, reference, state)
    assert outcome == ("resumed" if 0 <= batches <= len(reference(epoch)) else "refused")
