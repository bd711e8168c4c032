"""`graft jobs submit|get|wait|cancel|list|events`, `graft diffs extract|get|list|delete` and `graft loras
export|get|list|delete`: the client's command line. Every collection goes the same way: a create (POST of a body
from a file, flags and --set) that prints the id, or with --wait follows the record its answer points to; a
read, a list (a page, or --all) and a delete or cancel, each printing the server's JSON. Errors print as graft's
do and exit 2; a wait exits as graft run would have for the same graft (worker/client/follow.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from worker import exit_codes

from .api import ApiError, Client
from .follow import Bar, exit_status, wait_for


@dataclass(frozen=True)
class Lent:
    """What graft's command line (worker/cli.py) lends the client, so that `graft jobs submit` takes graft run's
    flags and reads them as graft run does: the kinds' submitting routes (from the kinds' table), a function
    adding graft run's flags to a parser, the body those flags describe, the bounded JSON/YAML reader, and the
    kinds' bodies."""

    kinds: Mapping[str, str]  # kind -> path under /v1 of the POST that submits it
    add_graft_flags: Callable[[argparse.ArgumentParser], None]
    graft_body: Callable[[argparse.Namespace], dict]
    read_document: Callable[[str], dict]
    bodies: Mapping[str, Any]  # kind -> its body's pydantic model (`graft loras export` takes a flag per field)


@dataclass(frozen=True)
class Collection:
    noun: str  # one record, for help texts
    path: str  # its routes: POST/GET path, GET/DELETE path/{id}


JOBS = Collection("job", "/v1/jobs")
DIFFS = Collection("diff", "/v1/diffs")
LORAS = Collection("LoRA adapter", "/v1/loras")


def _item(collection: Collection, record_id: str, *rest: str) -> str:
    # quoted: an id is a path segment, never a path of its own
    return "/".join((collection.path, quote(record_id, safe=""), *rest))


def _client(args: argparse.Namespace) -> Client:
    key = os.environ.get("GRAFT_API_KEY", "")
    if not key:
        raise ApiError("no_api_key", "set GRAFT_API_KEY to an API key of the server (GRAFT_API_KEYS there; "
                       "`graft serve` in dev mode prints one)")
    return Client(args.server, key)


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def _merged(base: dict, over: Mapping[str, Any]) -> dict:
    """`over` on `base`, mappings merged key by key (a flag's options join a file's), anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def _assignments(pairs: list[str]) -> dict:
    """--set FIELD=VALUE (FIELD dotted into nested objects; VALUE JSON where it parses, else a string): any field
    of any body, with no list of fields here."""
    out: dict = {}
    for pair in pairs:
        field, sep, text = pair.partition("=")
        if not sep or not field or "" in field.split("."):
            raise ApiError("invalid_option", f"--set {pair!r}: expected FIELD=VALUE (FIELD may be dotted: "
                           "options.alpha=0.5)")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        *parents, leaf = field.split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ApiError("invalid_option", f"--set {pair!r}: {name} was set to a value, not an object")
        node[leaf] = value
    return out


def _body(args: argparse.Namespace, lent: Lent, flags: dict) -> dict:
    """The body: the file's fields, then the flags', then --set's."""
    body = lent.read_document(args.body) if args.body else {}
    return _merged(_merged(body, flags), _assignments(args.set or []))


def _show_progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


def _summary(job: dict) -> str:
    result = job.get("result") or {}
    stats = result.get("stats") or {}
    line = f"{job.get('id')} succeeded: {result.get('uri')}"
    if "tensors" in stats and "seconds_total" in stats:
        line += f" ({stats['tensors']} tensors, {stats['seconds_total']:.2f}s)"
    verdict = (result.get("report") or {}).get("verdict")
    return line + (f"; verdict: {verdict}" if verdict else "")


def _follow(client: Client, path: str, record_id: str, args: argparse.Namespace) -> int:
    bar = Bar(sys.stderr) if _show_progress(args) else None
    try:
        job = wait_for(client, path, interval=args.interval, bar=bar)
    except KeyboardInterrupt:
        print(f"graft: stopped waiting; {record_id} goes on (graft jobs cancel {record_id} stops it)",
              file=sys.stderr)
        return exit_codes.INTERRUPTED
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        _print_json(job)
    elif job.get("status") == "succeeded":
        print(_summary(job))
    if job.get("status") == "cancelled":
        print(f"graft: {record_id} was cancelled; nothing was published", file=sys.stderr)
    elif job.get("status") != "succeeded":
        error = job.get("error") or {}
        print(f"graft: error [{error.get('code', 'failed')}]: {error.get('message', job.get('status'))}",
              file=sys.stderr)
    return exit_status(job)


def _create(path: str, body: dict, args: argparse.Namespace) -> int:
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    with _client(args) as client:
        reply = client.call("POST", path, body=body, headers=headers)
        record = reply.doc if isinstance(reply.doc, dict) else {}
        record_id = str(record.get("id"))
        if args.json and not args.wait:
            _print_json(reply.doc)
        elif not args.json:
            print(record_id, flush=True)  # first, so that a wait interrupted still leaves the id behind
        if not args.wait:
            return exit_codes.OK
        # The answer's Location is the record to poll (a job's /v1/jobs/{id}), whatever the collection.
        return _follow(client, reply.location or _item(JOBS, record_id), record_id, args)


def cmd_submit(lent: Lent, args: argparse.Namespace) -> int:
    return _create(f"/v1{lent.kinds[args.kind]}", _body(args, lent, lent.graft_body(args)), args)


def cmd_extract(lent: Lent, args: argparse.Namespace) -> int:
    flags: dict[str, Any] = {n: getattr(args, n) for n in ("source_base", "source_finetuned", "output")
                             if getattr(args, n)}
    if args.encoding:
        flags["encoding"] = {"encoding": args.encoding}
    return _create(DIFFS.path, _body(args, lent, flags), args)


def cmd_export(lent: Lent, fields: tuple[str, ...], args: argparse.Namespace) -> int:
    """`graft loras export`: the flags of the export's model's `fields` (those given) as the body's fields."""
    flags = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    return _create(LORAS.path, _body(args, lent, flags), args)


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _follow(client, _item(JOBS, args.id), args.id, args)


def cmd_get(collection: Collection, args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.get(_item(collection, args.id)))
    return exit_codes.OK


def cmd_events(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.get(_item(JOBS, args.id, "events")))
    return exit_codes.OK


def cmd_list(collection: Collection, args: argparse.Namespace) -> int:
    params = {"limit": 100 if args.all else args.limit, "after": args.after, "status": getattr(args, "status", None)}
    params = {k: v for k, v in params.items() if v is not None}
    with _client(args) as client:
        if not args.all:
            _print_json(client.get(collection.path, params))
            return exit_codes.OK
        data = [record for page in client.pages(collection.path, params) for record in page.get("data", [])]
    _print_json({"object": "list", "data": data, "has_more": False, "last_id": data[-1]["id"] if data else None})
    return exit_codes.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.call("POST", _item(JOBS, args.id, "cancel")).doc
    if args.json:
        _print_json(job)
    else:
        print(f"{job.get('id')} {job.get('status')}")
    return exit_codes.OK


def cmd_delete(collection: Collection, args: argparse.Namespace) -> int:
    with _client(args) as client:
        doc = client.call("DELETE", _item(collection, args.id)).doc
    if doc is not None:
        _print_json(doc)
    else:
        print(f"{args.id} deleted")
    return exit_codes.OK


def guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """A command, its refusals printed as graft prints errors (exit 2)."""
    try:
        return command(args)
    except ApiError as err:
        for line in err.lines():
            print(line, file=sys.stderr)
        return exit_codes.FAILED
