"""A graft that fails or is cancelled leaves no thread of its own behind: the input digests' side thread is told
to stop and joined on every path (it went on hashing inputs whose stores were being closed)."""

from __future__ import annotations

import threading

import pytest
from graft_helpers import graft

from worker.engine import GraftCancelled


def _hashing() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "graft-hash" and t.is_alive()]


def test_a_cancelled_graft_stops_hashing_its_inputs(trio, tmp_path, monkeypatch):
    import worker.engine.storage.input_hashes as hashes

    monkeypatch.setattr(hashes, "HASH_CHUNK", 1)  # a byte at a time: hashing outlasts the graft by seconds
    calls = []

    def cancel_soon() -> bool:
        calls.append(1)
        return len(calls) > 1

    assert _hashing() == []
    with pytest.raises(GraftCancelled):
        graft(trio, tmp_path / "out", should_cancel=cancel_soon, settings_overrides={"cache_dir": ""})
    assert _hashing() == []
    assert not (tmp_path / "out").exists()
