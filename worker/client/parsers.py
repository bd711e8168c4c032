"""The argparse side of `graft jobs ...`, `graft diffs ...` and `graft loras ...` (the commands are commands.py's)."""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Callable
from functools import partial

from worker.service.statuses import STATUSES

from . import commands
from .api import DEFAULT_SERVER
from .commands import DIFFS, JOBS, LORAS, Collection, Lent


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", metavar="URL", default=os.environ.get("GRAFT_SERVER") or DEFAULT_SERVER,
                        help=f"the API (default $GRAFT_SERVER, else {DEFAULT_SERVER}); the key is read from "
                             "$GRAFT_API_KEY")
    return common


def _waiting() -> argparse.ArgumentParser:
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="draw the job's progress on stderr (default: when stderr is a terminal)")
    waiting.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                         help="seconds between polls of the job (default 1)")
    return waiting


def _creating(p: argparse.ArgumentParser, noun: str) -> None:
    p.add_argument("body", nargs="?", metavar="BODY", help=f"a JSON or YAML file holding the {noun}'s body; "
                   "flags and --set override its fields")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="a field of the body (dotted into "
                   "objects, e.g. options.alpha=0.5; VALUE is JSON where it parses, else text); repeatable")
    p.add_argument("--idempotency-key", metavar="KEY", help="send again with the same key and body: one job")
    p.add_argument("--json", action="store_true", help="print the record (with --wait, the final one), not the id")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit as graft run would")


def _leaf(actions, name: str, command: Callable[[argparse.Namespace], int], help_: str,
          parents: list[argparse.ArgumentParser], id_help: str | None = None) -> argparse.ArgumentParser:
    p = actions.add_parser(name, help=help_, description=help_, parents=parents)
    if id_help:
        p.add_argument("id", help=id_help)
    p.set_defaults(func=partial(commands.guarded, command))
    return p


def _listing(actions, collection: Collection, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = _leaf(actions, "list", partial(commands.cmd_list, collection), f"the caller's {collection.noun}s, newest "
              "first, as JSON", parents)
    p.add_argument("--limit", type=int, default=20, help="records per page, 1 to 100 (default 20)")
    p.add_argument("--after", metavar="ID", help="the page after this id (the previous page's last_id)")
    p.add_argument("--all", action="store_true", help="every page, as one list")
    return p


def _flag_type(annotation) -> type | tuple | None:
    """What a field's value is on a command line: a type (int, float, str), the choices of a Literal, or None
    (a list, an object: such a field goes by --set)."""
    while typing.get_origin(annotation) in (typing.Annotated, typing.Union, types.UnionType):
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]  # Optional[X]: X
        if len(rest) != 1:
            return None
        annotation = rest[0]
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return annotation if annotation in (int, float, str) else None


def model_flags(p: argparse.ArgumentParser, model) -> None:
    """One flag per field of `model` (a pydantic model) whose value is one number, string or choice
    (--source-base, --rank, ...), with the field's description: a field added to the model is a flag with no edit
    here (the others, lists and objects, go by --set)."""
    for name, info in model.model_fields.items():
        kind, flag = _flag_type(info.annotation), "--" + name.replace("_", "-")
        if kind is None or flag in p._option_string_actions:
            continue
        text = (info.description or f"the body's {name}").replace("%", "%%")
        if isinstance(kind, tuple):
            p.add_argument(flag, choices=kind, help=text)
        else:
            p.add_argument(flag, type=kind, help=text)


def add_parsers(sub, lent: Lent) -> None:
    """`graft jobs`, `graft diffs` and `graft loras`, on the command line's subparsers."""
    common, waiting = _common(), _waiting()
    jobs = sub.add_parser("jobs", help="submit and follow jobs on a graft service (--server, $GRAFT_API_KEY)")
    actions = jobs.add_subparsers(dest="action", required=True)
    submit = _leaf(actions, "submit", partial(commands.cmd_submit, lent), "submit a job: graft run's flags, or "
                   "a body file; prints its id", [common, waiting])
    submit.add_argument("--kind", choices=list(lent.kinds), default="graft", help="the job's kind (default graft)")
    _creating(submit, "job")
    lent.add_graft_flags(submit)
    _leaf(actions, "get", partial(commands.cmd_get, JOBS), "a job's record, as JSON", [common], "the job's id")
    wait = _leaf(actions, "wait", commands.cmd_wait, "wait for a job, with its progress; exit as graft run would "
                 "(0 published, 2 failed with its code, 1 the service's fault, 130 cancelled)", [common, waiting],
                 "the job's id")
    wait.add_argument("--json", action="store_true", help="print the final record")
    cancel = _leaf(actions, "cancel", commands.cmd_cancel, "cancel a queued or running job", [common],
                   "the job's id")
    cancel.add_argument("--json", action="store_true", help="print the record")
    listing = _listing(actions, JOBS, [common])
    listing.add_argument("--status", choices=STATUSES, help="only jobs with this status")
    _leaf(actions, "events", commands.cmd_events, "a job's timestamped events, as JSON", [common], "the job's id")

    diffs = sub.add_parser("diffs", help="extract and manage diff artifacts on a graft service")
    actions = diffs.add_subparsers(dest="action", required=True)
    extract = _leaf(actions, "extract", partial(commands.cmd_extract, lent), "extract a diff artifact (a job); "
                    "prints its id", [common, waiting])
    _creating(extract, "extraction")
    extract.add_argument("--source-base", help="URI of the base the fine-tune started from")
    extract.add_argument("--source-finetuned", help="URI of the fine-tune whose diff is extracted")
    extract.add_argument("--output", help="where the artifact goes (default: the tenant's namespace)")
    # A name only: the encodings' parameter models import torch; their fields go by --set (encoding.density=0.1).
    extract.add_argument("--encoding", metavar="NAME", help="how the delta is stored: an encoding's name "
                         "(`graft diff extract --help` lists them; default exact), its parameters by --set "
                         "(encoding.density=0.1)")
    _leaf(actions, "get", partial(commands.cmd_get, DIFFS), "a diff's record, as JSON", [common], "the diff's id")
    _listing(actions, DIFFS, [common])
    _leaf(actions, "delete", partial(commands.cmd_delete, DIFFS), "delete a diff artifact", [common],
          "the diff's id")

    body = lent.bodies["lora_export"]  # the kind's body, LoraExport's fields: the flags follow it
    loras = sub.add_parser("loras", help="export and manage LoRA adapters on a graft service")
    actions = loras.add_subparsers(dest="action", required=True)
    export = _leaf(actions, "export", partial(commands.cmd_export, lent, tuple(body.model_fields)),
                   "export the transfer as a LoRA adapter for the target (a job); prints its id", [common, waiting])
    _creating(export, "export")
    model_flags(export, body)
    _leaf(actions, "get", partial(commands.cmd_get, LORAS), "an adapter's record, as JSON", [common],
          "the adapter's id")
    _listing(actions, LORAS, [common])
    _leaf(actions, "delete", partial(commands.cmd_delete, LORAS), "delete an adapter and its files", [common],
          "the adapter's id")
