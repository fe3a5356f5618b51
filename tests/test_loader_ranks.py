"""The loader split over ranks and DataLoader workers: every row once per epoch across all of them, equal batch
counts with even_batches, exact resume per rank; on both layouts (one file per chunk, and shards)."""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mistudio as ms
from mistudio.analysis.loader import LoaderIterator

HP = "layers.0.residual"
EOS = "<|endoftext|>"
ARGS = dict(layers=[0], hooks=["residual"], dtype="float32", chunk_mb=0.02, max_length=64, progress=False)
# 128-row chunks of d=32 float32; format 2: shards of 6 chunks (768 rows), runs of 2 chunks (run_mb=0.04)
LAYOUTS = {"v1": dict(shard_mb=0), "v2": dict(shard_mb=0.1)}
RUN_MB = {"v1": 8.0, "v2": 0.04}
WORLD, WORKERS = 3, 2


def texts(start: int, stop: int) -> list[str]:
    return [f"{t} {EOS} more" if i % 3 == 0 else t for i, t in enumerate(ms.sample_texts()[start:stop])]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def store(request, gpt2_dir, tmp_path_factory):
    """(layout, extraction, its rows, special mask): about 12k rows."""
    ws = str(tmp_path_factory.mktemp(f"ranks-{request.param}"))
    ext = ms.extract(gpt2_dir, texts(0, 200), workspace=ws, **ARGS, **LAYOUTS[request.param])
    arr = ext.activations(HP)
    assert (arr.shards is not None) == (request.param == "v2") and arr.chunks[0] == 128
    special = np.isin(ext.store.group["tokens/input_ids"][:], ext.tokenizer.all_special_ids)
    return request.param, ext, arr[:], special


def make(store, rank, **kw):
    layout, ext = store[0], store[1]
    kw = {"batch_size": 100, "seed": 7, "with_index": True, "run_mb": RUN_MB[layout], "buffer_tokens": 1000, **kw}
    return ms.loader(ext, HP, rank=rank, world_size=kw.pop("world_size", WORLD), **kw)


def rows_of(batches) -> np.ndarray:
    return np.concatenate([b["token_index"].numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def check_rows(batches, ref) -> None:
    for b in batches:
        np.testing.assert_array_equal(b[HP].numpy(), ref[b["token_index"].numpy()])


def share(store, rank, epoch=0, workers=WORKERS, **kw) -> list[list[dict]]:
    """The batches of each simulated DataLoader worker of one rank."""
    loader = make(store, rank, **kw)
    return [list(LoaderIterator(loader, epoch, w, workers)) for w in range(workers)]


def test_runs_stay_inside_shards(store):
    layout, ext, _, _ = store
    loader = make(store, 0)
    arr = ext.activations(HP)
    unit = (arr.shards or arr.chunks)[0]
    starts, stops = loader.runs[:, 1], loader.runs[:, 2]
    assert np.all(starts // unit == (stops - 1) // unit)  # a run never crosses a file
    np.testing.assert_array_equal(starts[1:], stops[:-1])  # and together they cover every row once
    assert starts[0] == 0 and stops[-1] == ext.n_tokens
    assert loader.slot_rows == (256 if layout == "v2" else 128)  # 2 chunks of a shard per run; else one chunk
    assert np.all(stops - starts <= loader.slot_rows)


@pytest.mark.parametrize("exclude_special", [False, True])
def test_every_row_once_over_ranks_and_workers(store, exclude_special):
    _, ext, ref, special = store
    expected = np.flatnonzero(~special) if exclude_special else np.arange(ext.n_tokens)
    seen, per_rank = [], []
    for rank in range(WORLD):
        workers = share(store, rank, even_batches=False, exclude_special=exclude_special)
        mine = [rows_of(w) for w in workers]
        assert all(len(b["token_index"]) == 100 for w in workers for b in w[:-1])  # whole batches but the last
        assert all(len(m) % 100 == 0 for m in mine[:-1])  # a worker's share is whole batches but the last one's
        for w in workers:
            check_rows(w, ref)
        seen += mine
        per_rank.append(sum(len(m) for m in mine))
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), expected)
    assert max(per_rank) - min(per_rank) <= 1


def test_order_is_fixed_by_seed_epoch_rank(store):
    a = rows_of(share(store, 1, epoch=2, workers=1)[0])
    np.testing.assert_array_equal(a, rows_of(share(store, 1, epoch=2, workers=1)[0]))
    assert not np.array_equal(a, rows_of(share(store, 1, epoch=3, workers=1)[0]))
    assert not set(a) & set(rows_of(share(store, 0, epoch=2, workers=1)[0]))
    assert not np.array_equal(a, rows_of(share(store, 1, epoch=2, workers=1, seed=8)[0]))


@pytest.mark.parametrize("drop_last", [True, False])
def test_even_batches(store, drop_last):
    _, ext, _, _ = store
    world = next(w for w in (3, 5, 7, 11) if ext.n_tokens % w)  # a world size that does not divide the rows
    total, rem = ext.n_tokens, ext.n_tokens % world
    counts, sizes, everything = set(), set(), []
    for rank in range(world):
        workers = share(store, rank, world_size=world, drop_last=drop_last)
        counts.add(sum(len(w) for w in workers))
        sizes.add(tuple(sorted(len(b["token_index"]) for w in workers for b in w)))
        everything.append(rows_of([b for w in workers for b in w]))
    assert len(counts) == 1 and len(sizes) == 1  # every rank: the same number of batches, of the same sizes
    flat = np.concatenate(everything)
    if drop_last:  # total // world rows each (less the partial batch), no row twice, the rest skipped
        assert len(flat) == len(np.unique(flat)) and len(flat) == world * (total // world // 100 * 100)
        assert counts == {total // world // 100}
    else:  # total // world + 1 rows each: every row, and world - rem ranks repeat one of their rows
        np.testing.assert_array_equal(np.unique(flat), np.arange(total))
        assert len(flat) == world * (total // world + 1) and len(flat) - total == world - rem
        for rank_rows in everything:  # the repeated row is the rank's own
            assert len(rank_rows) - len(np.unique(rank_rows)) in (0, 1)


@pytest.mark.parametrize("worker,workers", [(0, 1), (1, 2)])
def test_each_rank_resumes_exactly(store, worker, workers):
    for rank in range(WORLD):
        loader = make(store, rank, exclude_special=True)
        full = list(LoaderIterator(loader, 1, worker, workers))
        it = LoaderIterator(make(store, rank, exclude_special=True), 1, worker, workers)
        cut = len(full) // 2 + rank
        head = [next(it) for _ in range(cut)]
        state = pickle.loads(pickle.dumps(it.state_dict()))
        it.close()
        resumed = LoaderIterator(make(store, rank, exclude_special=True), 0, worker, workers)
        resumed.load_state_dict(state)
        tail = list(resumed)
        assert len(head) + len(tail) == len(full)
        for got, want in zip(head + tail, full):
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
        with pytest.raises(ms.InputError, match="rank"):  # another rank's state
            LoaderIterator(make(store, (rank + 1) % WORLD, exclude_special=True), 0, worker, workers) \
                .load_state_dict(state)


def test_worker_processes_resume_exactly(store):
    """Two real DataLoader workers per rank: batches round-robin over them, and a state resumes the merge."""
    _, ext, ref, _ = store
    rank, kw = 2, dict(num_workers=WORKERS, even_batches=False)
    full = list(make(store, rank, **kw))
    rows = rows_of(full)
    simulated = share(store, rank, even_batches=False)
    assert len(rows) == len(np.unique(rows)) == len(rows_of(simulated[0])) + len(rows_of(simulated[1]))
    order = [w for r in range(max(map(len, simulated))) for w in (0, 1) if r < len(simulated[w])]
    assert len(full) == len(order)  # round-robin over the workers, whatever order the processes deliver in
    for i, (got, w) in enumerate(zip(full, order)):
        want = simulated[w][order[:i].count(w)]
        np.testing.assert_array_equal(got["token_index"].numpy(), want["token_index"].numpy())
    check_rows(full, ref)
    it = iter(make(store, rank, **kw))
    head = [next(it) for _ in range(5)]
    state = pickle.loads(pickle.dumps(it.state_dict()))
    assert state["batches"] == 5 and state["settings"]["n_workers"] == WORKERS
    resumed = iter(make(store, rank, **kw))
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full):
        np.testing.assert_array_equal(got["token_index"].numpy(), want["token_index"].numpy())
        np.testing.assert_array_equal(got[HP].numpy(), want[HP].numpy())


def test_rank_arguments_are_checked(store):
    ext = store[1]
    for kw, needle in [(dict(rank=1), "world_size"), (dict(rank=3, world_size=3), "rank=3"),
                       (dict(rank=0, world_size=0), "world_size=0"), (dict(rank=-1, world_size=2), "rank=-1"),
                       (dict(rank=0.5, world_size=2), "rank=0.5")]:
        with pytest.raises(ms.InputError, match=needle):
            ms.loader(ext, HP, **kw)
    assert (ms.loader(ext, HP).rank, ms.loader(ext, HP).world_size) == (0, 1)  # torch.distributed not initialised
    assert (ext.loader(HP, rank=1, world_size=3).rank, ext.loader(HP, rank=1, world_size=3).world_size) == (1, 3)


RANK_CHILD = r"""
import os, sys, numpy as np, torch, torch.distributed as dist
import mistudio as ms
rank, world, location, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
ext = ms.open_extraction(location)
kw = dict(batch_size=100, seed=3, with_index=True, buffer_tokens=1000, num_workers=2, run_mb=float(sys.argv[6]))
loader = ms.loader(ext, "layers.0.residual", **kw)  # rank and world size from torch.distributed
assert (loader.rank, loader.world_size) == (rank, world)
epochs = [[b["token_index"].numpy() for b in loader] for _ in range(2)]
counts = [torch.zeros(world, dtype=torch.int64) for _ in range(2)]
for e in range(2):
    dist.all_gather_into_tensor(counts[e], torch.tensor([len(epochs[e])]))  # even_batches: equal counts
it = iter(ms.loader(ext, "layers.0.residual", **kw))
head = [next(it)["token_index"].numpy() for _ in range(3)]
resumed = iter(ms.loader(ext, "layers.0.residual", **kw))
resumed.load_state_dict(it.state_dict())
tail = [b["token_index"].numpy() for b in resumed]
np.savez(out, epoch0=np.concatenate(epochs[0]), epoch1=np.concatenate(epochs[1]), counts=torch.stack(counts).numpy(),
         resumed=np.concatenate(head + tail), first=np.concatenate(epochs[0]))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_real_ranks_with_gloo_and_worker_processes(store, tmp_path):
    """3 processes in a gloo group, each with 2 DataLoader worker processes: rank and world size come from
    torch.distributed; every row once per epoch across them; equal batch counts; exact resume per rank."""
    import subprocess

    layout, ext, _, _ = store
    script = tmp_path / "rank.py"
    script.write_text(RANK_CHILD)
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "PYTHONPATH": str(Path(ms.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(WORLD), ext.location, init,
                               str(tmp_path / f"rank{r}.npz"), str(RUN_MB[layout])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(WORLD)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]
    got = [np.load(tmp_path / f"rank{r}.npz") for r in range(WORLD)]
    for e in ("epoch0", "epoch1"):
        flat = np.concatenate([g[e] for g in got])
        np.testing.assert_array_equal(np.unique(flat), np.arange(ext.n_tokens))  # every row ...
        assert len(flat) - ext.n_tokens == (-ext.n_tokens) % WORLD  # ... once (but the even_batches padding)
    assert not np.array_equal(got[0]["epoch0"], got[0]["epoch1"])
    for g in got:
        assert len(set(g["counts"].ravel().tolist())) == 1
        np.testing.assert_array_equal(g["resumed"], g["first"])


def test_lanes_run_out_one_at_a_time(store):
    """Lanes are staggered: past the first half buffer, each batch takes batch_size / run rows new pieces
    (never a burst of all lanes at once), so reading keeps pace with the batches; nothing is read twice."""
    loader = make(store, 0, world_size=1, batch_size=1024, buffer_tokens=2048, even_batches=False)
    it = LoaderIterator(loader, 0)
    assert loader.lanes > 4 and len(it.plan) == loader.n_runs  # one piece per run: no run split or read twice
    taken = []
    for _ in it:
        taken.append(it.next_piece)
    per_batch = np.diff(taken)
    ramp = loader.lanes * loader.slot_rows // 1024  # batches while lanes join (start) or die (end)
    steady, per_run = per_batch[ramp:-ramp], 1024 / loader.slot_rows
    assert len(steady) >= 6 and steady.max() <= np.ceil(per_run) + 1 and steady.min() >= np.floor(per_run) - 1
