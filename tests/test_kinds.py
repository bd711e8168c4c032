"""The table of job kinds (worker/service/kinds.py): every kind the API can record has a runner the work horse can
import, the API's schema lists exactly those kinds, and a record without a kind (written before kinds
existed) runs as a graft."""

from __future__ import annotations

import importlib
import inspect

from worker.service.kinds import KINDS, kind_of
from worker.service.statuses import JobKind


def test_every_kind_has_a_runner_of_the_runners_signature():
    assert set(KINDS) == set(JobKind)
    for kind in KINDS.values():
        module, _, function = kind.runner.partition(":")
        runner = getattr(importlib.import_module(module), function)
        assert list(inspect.signature(runner).parameters) == ["request", "spec", "settings", "reporter"], kind


def test_records_name_their_kind_and_old_records_are_grafts():
    assert kind_of({"kind": "preflight"}).name is JobKind.PREFLIGHT
    assert kind_of({}).name is JobKind.GRAFT and kind_of({"kind": None}).name is JobKind.GRAFT


def test_the_api_schema_lists_the_kinds():
    from app.openapi_dump import spec

    assert spec()["components"]["schemas"]["JobKind"]["enum"] == [k.value for k in JobKind]
