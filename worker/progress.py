"""Terminal progress for `graft run`: a bar on a TTY, silence otherwise; warnings always go to stderr."""

from __future__ import annotations

import sys

from worker.engine.pipeline.graft import Progress


class TerminalProgress:
    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._bar = None

    def update(self, p: Progress) -> None:
        if not self.enabled or p.phase != "streaming" or not p.bytes_total:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=p.bytes_total, unit="B", unit_scale=True, file=self.stream,
                             desc="grafting", dynamic_ncols=True)
        self._bar.set_postfix_str(f"{p.tensors_done}/{p.tensors_total} tensors", refresh=False)
        self._bar.update(p.bytes_written - self._bar.n)

    def warn(self, warning: dict) -> None:
        msg = f"graft: warning [{warning.get('code')}]: {warning.get('message')}"
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
