"""Chat templates rendered within bounds: the Jinja of ``tokenizer.apply_chat_template``, with a cap on every
string and list a template makes and a time limit per conversation, checked inside the rendering.

A chat template is code from a model's folder or from the user. Jinja's sandbox (the one ``transformers`` renders
with) keeps a template from reaching Python's internals, but not from filling the memory (``{{ 'x ' * 200000000 }}``
makes 400 MB in one step) or from looping for hours (two nested ``range(100000)`` loops). :class:`BoundedEnvironment`
is that sandbox with the same options, filters and globals as ``transformers`` (so the text, and the token ids, are
exactly those of ``apply_chat_template``), plus:

- every operation that can make a large value is checked *before* it makes it: string and list repetition and
  concatenation (``*``, ``+``, ``~``), ``%`` and ``str.format`` (their widths too), big integers (``*``, ``**``),
  the filters and string methods that widen, pad, replace, join or serialise (``center``, ``indent``, ``replace``,
  ``join``, ``tojson``, ``string`` ...), the joined output of a block, a macro or ``{% set %}``, and what an
  expression prints; every string, list or dict a filter or a method returns is measured, and a generator counted
  as it is read;
- ``range`` is bounded (100,000 items, as in Jinja's sandbox), and every ``for`` loop, call, attribute and item
  access, filter and operator checks the conversation's deadline, so a loop stops within milliseconds of it;
- the output is counted as it is produced.

The cap (:class:`Budget`) is the conversation's own size, generously: ``1 MiB + 4 x its characters + 1 KiB per
message``. A real template writes each message once with a few markers around it, plus a preamble (the longest,
with tool-use instructions, are a few tens of KB): the cap is over ten times what any of them needs, and it keeps a
hostile one to a few MB. All the values one rendering makes, together, stay under 16 times the cap plus 4 x the
messages x their characters (what growing a string message by message makes; an item of a list counts 40
characters), so values each under the cap, kept one by one in a list, stop at tens of MB. The time limit counts
the CPU time spent in the template only (every prefix of a conversation is rendered too, to find the role of each
token): ``1 s + 1 ms per message + 40 µs per message squared``, several times what a real template takes in the
sandbox (a 200-message conversation and all its prefixes: about 0.7 s of rendering, against 2.8 s allowed), and a
hostile template stops after about a second of work, however loaded the machine. Going past either raises
:class:`Overrun` inside the template; :func:`render_chat` turns it, and every template error, into a
:class:`ChatTemplateError` (an ``InputError``: a job
fails with type VALIDATION) that names the template, the problem and the fix.
"""
from __future__ import annotations

import contextvars
import functools
import json
import re
import string
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InputError

BASE_CHARS = 1 << 20  # characters a conversation may render to, at least
CONTENT_FACTOR = 4  # and this many times the characters of its messages
PER_MESSAGE_CHARS = 1024  # and this many per message (its markers)
PROBE_SECONDS = 0.05  # a template's check on two one-message conversations (real ones take microseconds)
BASE_SECONDS = 1.0  # the time one conversation may take to render (all its prefixes included), at least
PER_MESSAGE_SECONDS = 0.001  # and this much per message
PER_PREFIX_SECONDS = 4e-5  # and this much per message squared (every prefix of the conversation is rendered)
TICKS_PER_CLOCK = 64  # operations between two reads of the rendering thread's CPU clock
ITEM_CHARS = 40  # what an item of a list, a tuple, a dict or a set a template makes counts for, in characters (an
# int object and its pointer: about 40 bytes)
MADE_FACTOR = 16  # one rendering may make this many times the cap in values, all together (plus 4 x messages x
# the content: a template that grows a string message by message makes quadratically many characters)
MAX_TEMPLATE_CHARS = 256 << 10  # a template's own source (real ones are a few KB, with tool use tens of KB)
MAX_RANGE = 100_000  # items of range(): Jinja's sandbox allows as many
MAX_INT_BITS = 1 << 16  # integers a template computes (about 20,000 digits; Python prints 4,300 at most)


class Overrun(Exception):
    """A template went past its conversation's budget (``kind``: "size" or "time"): ``what`` would have been
    ``amount`` ``unit``, past ``limit``. Not a TypeError, ValueError or LookupError: no Jinja code catches it on the
    way out."""

    def __init__(self, kind: str, what: str, amount: float, limit: float | None = None,
                 unit: str = "characters or items"):
        super().__init__(f"{what}: {amount:,} {unit}")
        self.kind, self.what, self.amount, self.limit, self.unit = kind, what, amount, limit, unit


class Budget:
    """What one conversation may take to render: ``chars`` (the most characters of any string, the most items of
    any list, and of the output) and ``seconds`` of rendering (every render of the conversation together: the text
    of each prefix is rendered too, to find the role of each token; tokenizing is not counted), checked by every
    operation against ``deadline``. The seconds are the rendering thread's CPU time, not the wall clock: a busy
    machine slows a real template down without making it overrun (a 200-message conversation once failed its
    2.8 s under a load of 6), and a hostile one still stops after the same work. The clock is read every
    ``TICKS_PER_CLOCK`` operations (a read costs about a microsecond; an operation, less)."""

    __slots__ = ("chars", "seconds", "spent", "deadline", "_started", "made_cap", "made", "_ticks")

    def __init__(self, chars: int, seconds: float, made_cap: int | None = None):
        self.chars, self.seconds, self.spent = int(chars), float(seconds), 0.0
        self.deadline = self._started = float("inf")
        self._ticks = 0
        self.made_cap = int(made_cap) if made_cap is not None else MADE_FACTOR * self.chars
        self.made = 0

    @classmethod
    def for_messages(cls, messages: list[dict], extra: int = 0) -> "Budget":
        """The budget of a conversation: see the module's docstring (``extra``: characters of the other values the
        template is given, e.g. the special tokens)."""
        content = sum(len(str(v)) for m in messages for v in m.values()) + extra
        n = len(messages)
        chars = BASE_CHARS + CONTENT_FACTOR * content + PER_MESSAGE_CHARS * n
        return cls(chars, BASE_SECONDS + PER_MESSAGE_SECONDS * n + PER_PREFIX_SECONDS * n * n,
                   MADE_FACTOR * chars + CONTENT_FACTOR * n * content)

    def start(self) -> None:
        """A render begins: the clock runs until :meth:`stop`."""
        self._started = time.thread_time()
        self.deadline = self._started + self.seconds - self.spent
        self.made = 0  # a render's values: those of an earlier render (another prefix) are gone

    def stop(self) -> None:
        self.spent += time.thread_time() - self._started
        self.deadline = self._started = float("inf")

    def tick(self) -> None:
        self._ticks += 1
        if self._ticks % TICKS_PER_CLOCK == 0 and time.thread_time() > self.deadline:
            raise Overrun("time", "the time limit", self.seconds, self.seconds, "s")

    def need(self, size: int, what: str) -> None:
        """Refuse to make a value of ``size`` characters or items past the cap."""
        if size > self.chars:
            raise Overrun("size", what, size, self.chars)

    def add_made(self, size: int) -> None:
        """Count a value this render made: all of them together stay under ``made_cap`` (values each under the
        cap, kept in a list one by one, once held gigabytes)."""
        self.made += size
        if self.made > self.made_cap:
            raise Overrun("size", "the values this rendering made in all", self.made, self.made_cap)

    def result(self, value: Any, what: str) -> Any:
        """A value just made, measured (a generator: counted as it is read)."""
        if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
            self.need(len(value), what)
            self.add_made(len(value) * (1 if isinstance(value, (str, bytes)) else ITEM_CHARS))
        elif hasattr(value, "__next__"):
            return BoundedIterator.of(value, what)
        return value


_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("mistudio_chat_budget", default=None)


def budget() -> Budget:
    """The budget of the conversation being rendered (outside a rendering: the base cap, no deadline)."""
    current = _BUDGET.get()
    return current if current is not None else Budget(BASE_CHARS, float("inf"))


class BoundedIterator:
    """An iterable read one item at a time, each read checking the deadline, at most ``chars`` items.
    ``BoundedIterator.of`` gives a :class:`SizedBoundedIterator` for what has a length (``loop.length``, ``if
    items`` read the same as without the wrapper)."""

    __slots__ = ("_source", "_it", "_count", "_what")

    def __init__(self, source: Any, what: str = "a loop"):
        self._source, self._it, self._count, self._what = source, iter(source), 0, what

    @staticmethod
    def of(source: Any, what: str = "a loop") -> "BoundedIterator":
        if isinstance(source, BoundedIterator):
            return source
        return (SizedBoundedIterator if hasattr(source, "__len__") else BoundedIterator)(source, what)

    def __iter__(self) -> "BoundedIterator":
        return self

    def __next__(self) -> Any:
        current = budget()
        current.tick()
        self._count += 1
        if self._count > current.chars:
            raise Overrun("size", f"the items read from {self._what}", self._count, current.chars, "items")
        return next(self._it)


class SizedBoundedIterator(BoundedIterator):
    __slots__ = ()

    def __len__(self) -> int:
        return len(self._source)


def text_size(value: Any, limit: int) -> int:
    """About how many characters ``str(value)`` takes (at least that many); counting stops once past ``limit``."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v)
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() * 3 // 10 + 2
        elif isinstance(v, float):
            total += 24
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, jinja2.utils.Namespace):
            stack.append(v._Namespace__attrs)  # noqa: SLF001 - printed as <Namespace {attrs}>
        elif not isinstance(v, jinja2.Undefined):
            total += 64  # a macro, a loop, a cycler: short reprs
        if total > limit:
            break
    return total


_PERCENT = re.compile(r"%(?:\(([^)]*)\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)


def _number(text: str) -> int:
    return int(text) if len(text) <= 12 else 10**12


def percent_size(fmt: str, args: Any, limit: int) -> int:
    """About how many characters ``fmt % args`` makes (widths and precisions included)."""
    values = args if isinstance(args, tuple) else (args,)
    mapping = args if isinstance(args, Mapping) else None
    total, pos = len(fmt), 0
    for key, width, precision, conversion in _PERCENT.findall(fmt):
        if conversion == "%":
            continue
        size = 32
        for part in (width, precision):
            if part == "*":
                star = values[pos] if pos < len(values) else 0
                size += abs(star) if isinstance(star, int) else 0
                pos += 1
            elif part:
                size += _number(part)
        if key and mapping is not None:
            arg = mapping.get(key)
        else:
            arg = values[pos] if pos < len(values) else None
            pos += 1
        total += size + text_size(arg, limit)
        if total > limit:
            break
    return total


def format_size(fmt: str, args: tuple, kwargs: Mapping) -> int:
    """About how many characters ``fmt.format(*args, **kwargs)`` makes (widths included)."""
    ints = [abs(a) for a in (*args, *kwargs.values()) if isinstance(a, int)]
    total, auto = 0, 0
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return len(fmt)  # malformed: str.format raises its own error
    for literal, field, spec, _ in fields:
        total += len(literal)
        if field is None:
            continue
        head = re.match(r"[^.\[]*", field).group()
        if head == "":
            arg, auto = (args[auto] if auto < len(args) else None), auto + 1
        elif head.isdigit():
            arg = args[int(head)] if int(head) < len(args) else None
        else:
            arg = kwargs.get(head)
        total += 32 + text_size(arg, 1 << 62) + sum(_number(d) for d in re.findall(r"\d+", spec or ""))
        if spec and "{" in spec:
            total += max(ints, default=0)
    return total


# -- filters and methods that widen, pad, replace, join or serialise: checked before they run ---------------------
def _items(value: Any, what: str) -> list:
    """An iterable as a list, read within the budget."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) or isinstance(value, Mapping):
        return list(value)
    return list(BoundedIterator.of(value, what))


def _sizes(items: list, limit: int) -> int:
    total = 0
    for item in items:
        total += text_size(item, limit)
        if total > limit:
            break
    return total


def _check_join(b: Budget, args: list, kwargs: dict, sep_index: int, what: str) -> None:
    items = _items(args[0], what)
    args[0] = items
    sep = args[sep_index] if len(args) > sep_index else kwargs.get("d", "")
    b.need(_sizes(items, b.chars) + len(str(sep)) * max(0, len(items) - 1), what)


def _check_replace(b: Budget, s: Any, old: Any, new: Any, count: Any = None) -> None:
    if not all(isinstance(x, str) for x in (s, old, new)):
        s, old, new = str(s), str(old), str(new)  # the filter prints them first
    found = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    b.need(len(s) + found * max(0, len(new) - len(old)), "replace()")


def _filter_checks() -> dict:
    def center(b, args, kwargs):
        b.need(len(str(args[0])) + _width(args, kwargs, 1, "width", 80), "the center filter")

    def indent(b, args, kwargs):
        s = str(args[0])
        width = args[1] if len(args) > 1 else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        b.need(len(s) + (s.count("\n") + 1) * width, "the indent filter")

    def wordwrap(b, args, kwargs):
        s = str(args[0])
        width = _width(args, kwargs, 1, "width", 79) or 1
        wrap = args[4] if len(args) > 4 else kwargs.get("wrapstring")
        wrap = 1 if wrap is None else len(str(wrap))
        b.need(len(s) + (len(s) // max(1, width) + s.count(" ") + s.count("\n") + 1) * wrap, "the wordwrap filter")

    def replace(b, args, kwargs):
        if len(args) >= 3:
            _check_replace(b, args[0], args[1], args[2], args[3] if len(args) > 3 else kwargs.get("count"))

    def truncate(b, args, kwargs):
        end = args[3] if len(args) > 3 else kwargs.get("end", "...")
        b.need(min(len(str(args[0])), _width(args, kwargs, 1, "length", 255)) + len(str(end)), "the truncate filter")

    def fmt(b, args, kwargs):
        b.need(percent_size(str(args[0]), kwargs or tuple(args[1:]), b.chars), "the format filter")

    def join(b, args, kwargs):
        _check_join(b, args, kwargs, 1, "the join filter")

    def total(b, args, kwargs):
        items = _items(args[0], "the sum filter")
        args[0] = items
        start = args[2] if len(args) > 2 else kwargs.get("start", 0)
        b.need(sum(len(x) for x in (*items, start) if isinstance(x, (str, list, tuple))), "the sum filter")

    def serialise(name):
        def check(b, args, kwargs):
            b.need(text_size(args[0], b.chars), f"the {name} filter")
        return check

    def urlize(b, args, kwargs):
        s = str(args[0])
        extra = sum(len(str(v)) for v in (*args[1:], *kwargs.values()) if isinstance(v, str))
        b.need(4 * len(s) + (s.count(".") + s.count("@") + 1) * (extra + 64), "the urlize filter")

    def count(index, name, default):
        def check(b, args, kwargs):
            b.need(_width(args, kwargs, index, name, default), f"the {name} of a filter")
        return check

    checks = {"center": center, "indent": indent, "wordwrap": wordwrap, "replace": replace, "truncate": truncate,
              "format": fmt, "join": join, "sum": total, "urlize": urlize,
              "batch": count(1, "linecount", 0), "slice": count(1, "slices", 0)}
    for name in ("string", "pprint", "tojson", "xmlattr", "urlencode", "list"):
        checks[name] = serialise(name)
    return checks


def _width(args: list, kwargs: dict, index: int, name: str, default: int) -> int:
    value = args[index] if len(args) > index else kwargs.get(name, default)
    return value if isinstance(value, int) else 0


_FILTER_CHECKS = _filter_checks()
_WIDENING = {"center", "ljust", "rjust", "zfill"}


def _check_method(b: Budget, name: str, owner: Any, args: list, kwargs: dict) -> None:
    """Checks of the str (and bytes) methods that can make much more than they are given."""
    if name in _WIDENING and args and isinstance(args[0], int):
        b.need(max(len(owner), args[0]), f"str.{name}()")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        b.need(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * max(0, int(size)),
               "str.expandtabs()")
    elif name == "replace" and len(args) >= 2 and isinstance(owner, str):
        _check_replace(b, owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count"))
    elif name == "join" and args:
        items = _items(args[0], "str.join()")
        args[0] = items
        b.need(sum(len(x) for x in items if isinstance(x, (str, bytes))) + len(owner) * max(0, len(items) - 1),
               "str.join()")
    elif name == "translate" and args and isinstance(args[0], Mapping):
        widest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        b.need(len(owner) * max(1, widest), "str.translate()")


# -- the environment ----------------------------------------------------------------------------------------------
class _CodeGenerator(CodeGenerator):
    """Jinja's code generator with ``a ~ b`` joined by the environment (checked) instead of ``str_join``."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        self.write("environment.concat_values((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: the body, as it is (transformers marks assistant text with it)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """``dict(...)`` in templates: a plain dict, without attribute access to the type (as transformers gives)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)``: no underscore-prefixed attributes (as transformers gives)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's signature trick (namespace(self=...))
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"Chat templates cannot store underscore-prefixed attributes on a "
                                                  f"namespace, but got {name!r}. Please rename the attribute.")


def _raise_exception(message: Any) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: Any) -> str:
    widths = [_number(d) for d in re.findall(r"\d+", fmt)] if isinstance(fmt, str) else []
    if isinstance(fmt, str) and max(widths, default=0) + len(fmt) > 1024:
        raise Overrun("size", "strftime_now()'s format (its field widths)", max(widths, default=0) + len(fmt), 1024,
                      "characters")
    return datetime.now().strftime(fmt)


def _bounded_range(*args: Any) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise Overrun("size", "range()", len(rng), MAX_RANGE, "items")
    return rng


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 - Jinja's names
    budget().need(int(n) * int(max) * 12, "lipsum()")
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


def _bounded_filter(name: str, func: Any) -> Any:
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0  # the context or environment comes first
    check = _FILTER_CHECKS.get(name)
    what = f"the {name} filter"

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        b = budget()
        b.tick()
        if len(args) > skip:
            head, rest = list(args[:skip]), list(args[skip:])
            if hasattr(rest[0], "__next__"):
                rest[0] = BoundedIterator.of(rest[0], what)  # a generator (map, select ...): read within the budget
            if check is not None:
                check(b, rest, kwargs)
            args = (*head, *rest)
        return b.result(func(*args, **kwargs), what)

    return run


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox ``transformers`` renders chat templates in (same options, filters and globals), bounded by the
    :class:`Budget` of the conversation being rendered (see the module's docstring)."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})
    code_generator_class = _CodeGenerator

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols],
                         finalize=self._finalize)
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals.update(range=_bounded_range, lipsum=_lipsum, raise_exception=_raise_exception,
                            strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace)

    # every for loop reads its iterable through a BoundedIterator (the deadline at every step)
    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [], None,
                                          None, lineno=loop.lineno)
        return tree

    def bounded_iter(self, iterable: Any) -> BoundedIterator:
        return BoundedIterator.of(iterable)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        b = budget()
        b.tick()
        sequences = (str, bytes, list, tuple)
        if operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
            b.need(len(left) + len(right), "a + b")
        elif operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, sequences) and isinstance(times, int):
                    b.need(len(seq) * max(0, times), "a repetition (a * n)")
            bits = left.bit_length() + right.bit_length() if isinstance(left, int) and isinstance(right, int) else 0
            if bits > MAX_INT_BITS:
                raise Overrun("size", "an integer (a * b)", bits, MAX_INT_BITS, "bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            bits = right * (abs(left).bit_length() - 1)
            if bits > MAX_INT_BITS:
                raise Overrun("size", "an integer (a ** b)", bits, MAX_INT_BITS, "bits")
        elif operator == "%" and isinstance(left, str):
            b.need(percent_size(left, right, b.chars), "a % formatting")
        return b.result(self.binop_table[operator](left, right), f"a {operator} b")

    def concat_values(self, values: tuple) -> str:
        """``a ~ b ~ ...``: the values printed and joined, checked before."""
        b = budget()
        b.tick()
        b.need(_sizes(list(values), b.chars), "a ~ b")
        return b.result("".join(map(str, values)), "a ~ b")

    def concat(self, pieces: Any) -> str:  # the output of a macro, a block, {% set %}, {% filter %}, a call block
        b = budget()
        b.tick()
        pieces = list(pieces)
        size = sum(len(p) for p in pieces)
        b.need(size, "the output of a block or macro")
        b.add_made(size)
        return "".join(pieces)

    def _finalize(self, value: Any) -> Any:  # what {{ ... }} prints
        if not isinstance(value, str):
            b = budget()
            b.tick()
            b.need(text_size(value, b.chars), "a printed value")
        return value

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget().tick()
        return super().getitem(obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's
        b = budget()
        b.tick()
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, (str, bytes)):
            args = list(args)
            _check_method(b, name, owner, args, kwargs)
        return b.result(super().call(__context, __obj, *args, **kwargs), f"{name or 'a call'}()")

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def bounded(*args: Any, **kwargs: Any) -> str:
            b = budget()
            b.tick()
            named = args[0] if is_map and args and isinstance(args[0], Mapping) else kwargs
            b.need(format_size(str(fmt), () if is_map else args, named), "str.format()")
            return b.result(wrapped(*args, **kwargs), "str.format()")

        return bounded


_ENV = BoundedEnvironment()


@functools.lru_cache(maxsize=32)
def _compiled(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def render(source: str, variables: dict, limits: Budget) -> str:
    """``source`` rendered with ``variables`` within ``limits`` (raises :class:`Overrun`, or the template's error)."""
    token = _BUDGET.set(limits)
    limits.start()
    try:
        template = _compiled(source)  # compiled within the budget too (Jinja folds constant expressions)
        pieces, size = [], 0
        for piece in template.generate(**variables):
            size += len(piece)
            limits.need(size, "the output")
            pieces.append(piece)
        return "".join(pieces)
    finally:
        limits.stop()
        _BUDGET.reset(token)


class ChatTemplateError(InputError):
    """A chat template that cannot render a conversation. ``kind``: "syntax" (not valid Jinja), "failed" (its error,
    ``raise_exception``, an undefined name ...) or "bounds" (past the size or time limit)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message, param="chat_template")
        self.kind = kind


# a template of one's own: a string in Python and the Studio, the path of a file on the command line
PASS_TEMPLATE = ("«py+studio:«pass chat_template=\"<jinja string>\"»»"
                 "«cli:«pass chat_template=<path of a Jinja template file>»»")
FIX = f"fix the template, or {PASS_TEMPLATE} with one that renders each conversation once"


def check_template(source: str, label: str) -> None:
    """Compile ``source``: a :class:`ChatTemplateError` ("syntax") when it is not valid Jinja."""
    render_chat(source, [], {}, label, Budget(BASE_CHARS, BASE_SECONDS), compile_only=True)


def check_reads_messages(source: str, label: str) -> None:
    """Refuse a template whose text does not depend on the conversation (a data file passed as the template, a
    template that never reads ``messages``): every sample would be the same text. Two system-user-assistant
    conversations whose every message differs must render differently (a template that renders one role only, or
    skips a turn, still differs); a template that refuses them, or runs past its budget on them, is left to the
    data (whose errors name the dataset row, and which also refuses a template rendering all its rows alike)."""
    probes = [[{"role": role, "content": f"mistudio probe {i} {role}"} for role in ("system", "user", "assistant")]
              for i in (1, 2)]
    try:
        first, second = (render_chat(source, m, {}, label, Budget(BASE_CHARS, PROBE_SECONDS)) for m in probes)
    except ChatTemplateError:
        return
    if first == second:
        raise ChatTemplateError(f"{label} renders every conversation as the same text ({first[:60]!r}"
                                f"{'...' if len(first) > 60 else ''}): it never reads the messages' contents, so "
                                f"every sample would be that text; {FIX}", "failed")


def render_chat(source: str, messages: list[dict], variables: dict, label: str, limits: Budget | None = None,
                where: str = "a conversation", compile_only: bool = False) -> str:
    """The text of ``messages`` as ``apply_chat_template(messages, chat_template=source, tokenize=False)`` renders
    it (``variables``: the tokenizer's special tokens), within ``limits`` (default: the conversation's
    :class:`Budget`). Every failure is a :class:`ChatTemplateError` naming ``label`` (the template), ``where`` (the
    conversation), the problem and the fix."""
    limits = limits or Budget.for_messages(messages, sum(len(str(v)) for v in variables.values()))
    if len(source) > MAX_TEMPLATE_CHARS:  # compiling is not bounded inside: 3 MB of template took 50 s and 1.2 GB
        raise ChatTemplateError(f"{label} is {len(source):,} characters long, past the {MAX_TEMPLATE_CHARS:,} a chat "
                                f"template may be (real ones are a few KB, tens of KB with tool use); {FIX}", "bounds")
    try:
        if compile_only:
            token = _BUDGET.set(limits)
            limits.start()
            try:
                _compiled(source)
            finally:
                limits.stop()
                _BUDGET.reset(token)
            return ""
        return render(source, {"messages": messages, "tools": None, "documents": None, "add_generation_prompt": False,
                               **variables}, limits)
    except Overrun as exc:
        if exc.kind == "time":
            raise ChatTemplateError(
                f"{label} ran past its time limit ({limits.seconds:.1f} s) on {where} (a chat template renders a "
                "conversation in about a millisecond): it loops without bound (e.g. nested for loops over "
                f"range(100000)); {FIX}", "bounds") from None
        limit = limits.chars if exc.limit is None else int(exc.limit)
        raise ChatTemplateError(
            f"{label} makes too much on {where}: {exc.what} would be {int(exc.amount):,} {exc.unit}, past the "
            f"{limit:,} a conversation may take (its messages written out with their markers need far fewer): it "
            f"repeats, pads or counts without bound (e.g. 'x ' * 200000000); {FIX}", "bounds") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"{label} is not valid Jinja: {exc.message} (line {exc.lineno}); {FIX}",
                                "syntax") from None
    except jinja2.UndefinedError as exc:
        raise ChatTemplateError(f"{label} failed on {where}: {exc.message}; {FIX}", "failed") from None
    except jinja2.TemplateError as exc:  # raise_exception(...), the sandbox's refusals
        raise ChatTemplateError(f"{label} refused {where}: {exc.message}; {FIX}", "failed") from None
    except (RecursionError, MemoryError) as exc:
        raise ChatTemplateError(f"{label} recursed or allocated without bound on {where} ({type(exc).__name__}); "
                                f"{FIX}", "bounds") from None
    except Exception as exc:  # noqa: BLE001 - any error of the template's own code (TypeError, ZeroDivisionError ...)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ChatTemplateError(f"{label} failed on {where} ({type(exc).__name__}: {first[:200]}); {FIX}",
                                "failed") from None
