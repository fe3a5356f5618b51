"""Chat templates rendered within bounds (issue 16, part 4): the ids of real templates are exactly those of
``tokenizer.apply_chat_template``; a hostile template stops within a second or two with an InputError that names
the template, the problem and the fix (VALIDATION in a job), using megabytes, never gigabytes, and leaves no core
busy once its job says CANCELLED."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import jinja2
import pytest
from transformers import AutoTokenizer

import mistudio as ms
from mistudio.chat import Budget, ChatTemplateError, render_chat
from mistudio.data import chat_tokens

from chat_templates import SPECIAL, TEMPLATES

JOB = dict(layers=[0], hooks=["residual"], dtype="float32")
ARGS = dict(JOB, progress=False)
LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Hi {{ there }} <|im_end|> ünïcødé 🙂 {% raw %}"},
              {"role": "assistant", "content": "  Hello!  "}],
    "system": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is Zarr?"},
               {"role": "assistant", "content": "Chunked arrays."}],
    "long": [{"role": "user", "content": "x" * 50_000}, {"role": "assistant", "content": "long " * 4000}],
    "many": [m for i in range(60) for m in ({"role": "user", "content": f"question {i}?"},
                                           {"role": "assistant", "content": f"answer {i}."})],
    "alone": [{"role": "user", "content": "one turn"}],
}


@pytest.fixture(scope="module")
def tok(gpt2_dir):
    """The test tokenizer with a bos token and the control tokens of the templates as special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    tokenizer.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": SPECIAL})
    return tokenizer


def _theirs(tokenizer, messages, template):
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True)
    return [int(i) for i in (out["input_ids"] if hasattr(out, "keys") else out)]


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_ids_are_those_of_apply_chat_template(tok, name, conversation):
    template, messages = TEMPLATES[name], CONVERSATIONS[conversation]
    try:
        want = _theirs(tok, messages, template)
    except jinja2.TemplateError as exc:  # the template refuses this conversation (gemma: no system role)
        with pytest.raises(ChatTemplateError, match=f"refused a conversation: {exc.message}") as refused:
            chat_tokens(tok, messages, template)
        assert refused.value.kind == "failed"
        return
    ids, roles = chat_tokens(tok, messages, template)
    assert ids.tolist() == want
    assert len(roles) == len(ids)


def test_the_tokenizers_own_template_is_stored_as_apply_chat_template_gives_it(gpt2_dir, tmp_path, workspace):
    """chat_template='auto' reads the tokenizer's template; the stored ids are apply_chat_template's."""
    shutil.copytree(gpt2_dir, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    tok.chat_template = TEMPLATES["chatml"]
    tok.save_pretrained(tmp_path / "model")
    chats = [CONVERSATIONS["plain"], CONVERSATIONS["system"], CONVERSATIONS["many"][:2]]  # within max_length
    ext = ms.extract(str(tmp_path / "model"), [{"messages": m} for m in chats], chat_template="auto",
                     workspace=workspace, **ARGS)
    for row, messages in enumerate(chats):  # cut at max_length=128, as any sample
        assert ext.sample(row)["input_ids"].tolist() == _theirs(tok, messages, TEMPLATES["chatml"])[:128]


HOSTILE = {
    "repetition": "{{ 'x ' * 200000000 }}",
    "nested loops": LOOPS,
    "loops over a string": "{% set s = 'ab' * 500 %}{% for a in s %}{% for b in s %}{% for c in s %}{% endfor %}"
                           "{% endfor %}{% endfor %}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s }}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}",
    "doubling a block": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set b %}{{ ns.s }}{{ ns.s }}"
                        "{% endset %}{% set ns.s = b %}{% endfor %}",
    "exponential macro": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "join of copies": "{% set s = 'x' * 1000000 %}{{ ([s] * 1000) | join }}",
    "printing a list": "{% set s = 'x' * 1000000 %}{{ [s] * 1000 }}",
    "center": "{{ 'x' | center(1000000000) }}",
    "ljust": "{{ 'x'.ljust(1000000000) }}",
    "percent width": "{{ '%999999999s' % 'x' }}",
    "format width": "{{ '{:>{}}'.format('x', 999999999) }}",
    "many fields": "{% set s = 'x' * 1000000 %}{{ ('{0}' * 1000).format(s) }}",
    "power": "{{ 10 ** 100000000 }}",
    "squaring": "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "replace": "{% set s = 'x' * 1000000 %}{{ s | replace('x', s) }}",
    "tojson growth": "{% set ns = namespace(s='\"') %}{% for i in range(60) %}{% set ns.s = ns.s|tojson %}"
                     "{% endfor %}",
    "range": "{{ range(10 ** 9) | list | length }}",
    "batch fill": "{{ [1] | batch(1000000000, 'x') | list }}",
    "sum of lists": "{% set l = [1] * 1000000 %}{{ ([l] * 1000) | sum(start=[]) | length }}",
    "expandtabs": "{% set s = '\t' * 1000000 %}{{ s.expandtabs(100000) }}",
    "lipsum": "{{ lipsum(1000000) }}",
    "map then join": "{% set s = 'x' * 1000000 %}{{ range(100000) | map('string') | map('replace', '1', s) | join }}",
    "keeping copies": "{% set s = 'x' * 1000000 %}{% set ns = namespace(keep=[]) %}{% for i in range(100000) %}"
                      "{% set ns.keep = ns.keep + [s ~ i] %}{% endfor %}{{ ns.keep | length }}",
    "keeping lists": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
                     "{% set ns.l = ns.l + [range(100000) | list] %}{% endfor %}{{ ns.l | length }}",
    "recursive loop": "{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}",
}


def test_a_template_too_long_to_be_real_is_refused_before_compiling():
    """Compiling is not bounded inside: 3 MB of template took 50 s and 1.2 GB before it was refused as a loop."""
    source = "{% for m in messages %}" + "{{ m['content'] ~ m['role'] }}" * 100_000 + "{% endfor %}"
    started = time.thread_time()
    with pytest.raises(ChatTemplateError, match=r"is 3,000,035 characters long, past the 262,144") as refused:
        render_chat(source, CONVERSATIONS["plain"], {}, "the chat template of 'model'")
    assert time.thread_time() - started < 2.0 and refused.value.kind == "bounds"  # it took 50 s


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_stop_fast_in_megabytes(name):
    messages = CONVERSATIONS["plain"]
    tracemalloc.start()
    started = time.thread_time()
    try:
        with pytest.raises(ChatTemplateError) as refused:
            render_chat(HOSTILE[name], messages, {"eos_token": "</s>"}, "the chat template of 'model'",
                        where="dataset row 7")
        elapsed = time.thread_time() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.kind == "bounds"
    assert elapsed < 2.5, elapsed
    assert peak < 48 * 2**20, f"{peak / 2**20:.0f} MB"
    text = str(refused.value)
    assert text.startswith("the chat template of 'model' ") and "dataset row 7" in text
    assert "fix the template, or pass chat_template=" in text
    assert ("time limit" in text) == (name in ("nested loops", "loops over a string", "exponential macro"))
    assert refused.value.param == "chat_template"
    assert "--chat-template" in refused.value.render("cli")


def test_the_budget_fits_real_conversations():
    """The cap grows with the conversation; the time counts rendering only, and every prefix fits it."""
    small, big = Budget.for_messages(CONVERSATIONS["plain"]), Budget.for_messages(CONVERSATIONS["long"])
    assert small.chars >= 2**20 and big.chars >= 2**20 + 4 * 70_000
    assert 1.0 <= small.seconds < 1.01
    many = [m for i in range(100) for m in ({"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"})]
    ids, _ = chat_tokens(_simple_tokenizer(), many, TEMPLATES["llama3ish"])  # 200 messages, 200 renders: in budget
    assert len(ids) > 400


def test_a_template_that_grows_a_string_message_by_message_fits():
    """Values made in all grow with messages x content: a template that builds its text in a namespace, message by
    message (quadratically many characters made), renders a long conversation and all its prefixes."""
    grow = ("{% set ns = namespace(text='') %}{% for m in messages %}{% set ns.text = ns.text ~ '<|' ~ m['role'] ~ "
            "'|>' ~ m['content'] ~ '</s>' %}{% endfor %}{{ ns.text }}")
    many = [{"role": ("user", "assistant")[i % 2], "content": f"message {i} " + "word " * 100} for i in range(100)]
    budget = Budget.for_messages(many)
    text = render_chat(grow, many, {}, "the chat template of 'model'", budget)
    assert text.count("</s>") == 100 and budget.made > 50 * len(text) // 2  # quadratically many characters made


def _simple_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


@pytest.mark.parametrize("template,kind,message", [
    ("{% for %}", "syntax", r"is not valid Jinja: Expected an expression.* \(line 1\)"),
    ("{{ foo.bar }}", "failed", r"failed on dataset row 0: 'foo' is undefined"),
    ("{{ raise_exception('Roles must alternate') }}", "failed", r"refused dataset row 0: Roles must alternate"),
    ("{{ 1 / 0 }}", "failed", r"failed on dataset row 0 \(ZeroDivisionError"),
    ("{{ messages.__class__.__name__ }}", "failed", r"refused dataset row 0: access to attribute .__class__. of .list. object is unsafe"),
])
def test_template_errors_are_input_errors_naming_the_template(tok, gpt2_dir, workspace, template, kind, message):
    with pytest.raises(ChatTemplateError) as refused:
        chat_tokens(tok, CONVERSATIONS["plain"], template, where="dataset row 0")
    assert refused.value.kind == kind
    with pytest.raises(ms.InputError, match=message) as refused:
        ms.extract(gpt2_dir, [{"messages": CONVERSATIONS["plain"]}], chat_template=template, workspace=workspace,
                   **ARGS)
    assert str(refused.value).startswith("the chat template given as chat_template ")


def test_a_hostile_template_fails_its_job_as_validation(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    chats = [{"messages": CONVERSATIONS["plain"]}] * 3
    for template, words in [("{{ 'x ' * 200000000 }}", "makes too much"), (LOOPS, "time limit")]:
        started = time.monotonic()
        job = ws.submit(gpt2_dir, chats, chat_template=template, **JOB).wait(60)
        assert job.status == "FAILED" and time.monotonic() - started < 30
        assert job.error["error_type"] == "VALIDATION", job.error
        assert words in job.error["error_message"] and "dataset row 0" in job.error["error_message"]
        assert "pass chat_template=" in job.error["error_message"]


def _tokenizing() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mistudio-tokenize"]


def test_a_cancelled_job_leaves_no_core_busy(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    job = ws.submit(gpt2_dir, [{"messages": CONVERSATIONS["plain"]}] * 50, chat_template=LOOPS, **JOB)
    deadline = time.monotonic() + 30
    while not _tokenizing() and job.status not in ("FAILED", "CANCELLED") and time.monotonic() < deadline:
        time.sleep(0.01)
    job.cancel().wait(30)
    cancelled = time.monotonic()
    assert job.status == "CANCELLED", job.error
    while _tokenizing() and time.monotonic() < cancelled + 5:
        time.sleep(0.05)
    assert not _tokenizing(), "the template still renders after CANCELLED"
    assert time.monotonic() - cancelled < 2.5
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(1.0)
    assert (time.process_time() - cpu) / (time.monotonic() - wall) < 0.5  # idle: no core left spinning


@pytest.mark.slow  # a fresh process (imports torch): about 12 s
def test_a_hostile_extract_stays_far_below_a_gigabyte(gpt2_dir, tmp_path):
    """The whole path (ms.extract, the planning thread, the job) in a fresh process: peak RSS measured."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        import mistudio as ms
        chats = [{{"messages": [{{"role": "user", "content": "hi"}}]}}] * 4
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ms.extract({gpt2_dir!r}, ["warm up"], workspace={str(tmp_path / 'ws')!r}, layers=[0], progress=False)
        warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {{}}
        for name, template in [("repetition", "{{{{ 'x ' * 200000000 }}}}"), ("loops", {LOOPS!r})]:
            try:
                ms.extract({gpt2_dir!r}, chats, chat_template=template, workspace={str(tmp_path / 'ws')!r},
                           layers=[0], progress=False)
                out[name] = "no error"
            except ms.InputError as exc:
                out[name] = str(exc)
        out["grew_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - warm
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "makes too much" in out["repetition"] and "time limit" in out["loops"], out
    print(f"peak RSS grew {out['grew_kb'] / 1024:.0f} MB over a warm extraction")
    assert out["grew_kb"] < 200 * 1024, f"peak RSS grew {out['grew_kb'] / 1024:.0f} MB (it was 4-6 GB)"
