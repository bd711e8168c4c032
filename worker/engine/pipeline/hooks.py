"""What the caller of a graft gives besides the request: its settings and its callbacks (progress, the cancel
flag, warnings as they are found, and a last look before the manifest is committed). One record for the
graft's pipeline and the checked graft built on it; importable without torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.engine.config import EngineSettings

if TYPE_CHECKING:
    from worker.engine.pipeline.graft import Progress
    from worker.engine.storage.model import ResolvedModel
    from worker.engine.storage.sinks import FileRecord
    from worker.engine.storage.uris import Location

BeforeCommit = Callable[["Location", "dict[str, ResolvedModel]", "list[FileRecord]"], dict]


@dataclass
class Hooks:
    settings: EngineSettings
    progress: Callable[[Progress], None]
    should_cancel: Callable[[], bool] | None
    warn: Callable[[dict], None]
    # Called once every output file is written and before the manifest is, with where the output can be read
    # back and the shards' records; the sections it returns go into the manifest (an evaluation).
    before_commit: BeforeCommit | None = None
