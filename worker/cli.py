"""`graft`: run a graft locally, serve the API, or run a queue worker."""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from .engine.errors import GraftError


def _add_graft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-base", required=True, help="URI of the base the fine-tune started from")
    p.add_argument("--source-finetuned", required=True, help="URI of the fine-tune whose diff is transferred")
    p.add_argument("--target-base", required=True, help="URI of the newer base that receives the diff")
    p.add_argument("--output", help="where the checkpoint goes: directory, file:// or s3:// (not with --dry-run)")
    p.add_argument("--alpha", type=float, default=1.0, help="scale of the diff (default 1.0)")
    p.add_argument("--vocab", choices=("extend", "target"), default="extend",
                   help="extend: keep the fine-tune's added rows; target: keep the target's rows only")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    p.add_argument("--shard-size", default="5GB", help="largest output shard (e.g. 5GB, 500MB)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="only tensors matching get the diff (others are copied from the target)")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="tensors matching are copied from the target")
    p.add_argument("--dry-run", action="store_true", help="print the plan from headers alone; read no data")
    p.add_argument("--json", action="store_true", help="print the plan or summary as JSON")


def _cmd_run(args: argparse.Namespace) -> int:
    from .engine.options import GraftOptions, GraftRequest

    if not args.dry_run and not args.output:
        raise GraftError("invalid_option", "--output is required (or use --dry-run)")
    options = GraftOptions(alpha=args.alpha, vocab=args.vocab, dtype=args.dtype, shard_size=args.shard_size,
                           device=args.device, include=args.include, exclude=args.exclude)
    request = GraftRequest(args.source_base, args.source_finetuned, args.target_base, args.output or "", options)
    if args.dry_run:
        from .engine.run import plan_graft

        plan, _ = plan_graft(request)
        summary = plan.to_dict()
        print(json.dumps(summary, indent=2) if args.json else _format_plan(summary))
        return 0
    from .engine.run import run_graft
    from .progress import TerminalProgress

    bar = TerminalProgress()
    try:
        result = run_graft(request, progress=bar.update, warn=bar.warn)
    finally:
        bar.close()
    stats = result.stats
    if args.json:
        print(json.dumps({"output": result.output_uri, "manifest": result.manifest_uri, "stats": stats}))
    else:
        actions = ", ".join(f"{n} {a}" for a, n in sorted(result.manifest["plan"]["actions"].items()))
        print(f"grafted {stats['tensors']} tensors ({actions}) into {result.output_uri} in "
              f"{stats['seconds_total']:.2f}s, {stats['bytes_read'] / 1e9:.2f} GB read at "
              f"{stats['input_gb_per_s']} GB/s, {len(result.warnings)} warning(s)")
    return 0


def _format_plan(summary: dict) -> str:
    lines = [f"tensors: {summary['tensors_total']} ("
             + ", ".join(f"{n} {a}" for a, n in sorted(summary["actions"].items())) + ")",
             f"output: {summary['output_bytes']:,} bytes in {len(summary['shards'])} shard(s); "
             f"{summary['input_bytes_to_read']:,} input bytes to read",
             f"tied word embeddings: {summary['tied_word_embeddings']}"]
    for shard in summary["shards"]:
        lines.append(f"  {shard['file']}: {shard['tensors']} tensors, {shard['bytes']:,} bytes")
    for name, rows in summary["vocab"].get("tensors", {}).items():
        lines.append(f"vocab {name}: {rows['transferred']} rows transferred, {rows['from_target']} from target, "
                     f"{rows['from_finetuned']} from fine-tune -> {rows['output_rows']} rows")
    for d in summary["source_only"]:
        lines.append(f"source only (not written): {d['tensor']} in {', '.join(d['in'])}")
    for w in summary["warnings"]:
        lines.append(f"warning: {w['message']}")
    return "\n".join(lines)


def _cmd_serve(args: argparse.Namespace) -> int:
    from app.server import serve

    serve(host=args.host, port=args.port)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from .service_worker import run_worker

    run_worker(burst=args.burst)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graft", description="Fine-tuning transfer: "
                                     "target_base + alpha * (source_finetuned - source_base)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="graft three checkpoints into a new one")
    _add_graft_args(run)
    run.set_defaults(func=_cmd_run)
    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_cmd_serve)
    worker = sub.add_parser("worker", help="run a queue worker")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=_cmd_worker)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GraftError as err:
        print(f"graft: error [{err.code}]: {err.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graft: interrupted; nothing was published", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours, not the user's input: one line unless asked for more
        if _debug():
            traceback.print_exc()
        message = " ".join(str(exc).split())[:500] or "no message"
        print(f"graft: error [internal_error]: {type(exc).__name__}: {message} (set GRAFT_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


def _debug() -> bool:
    try:
        from .settings import Settings

        return Settings().debug
    except Exception:  # settings that cannot be read must not hide the error being reported
        return False


if __name__ == "__main__":
    sys.exit(main())
