"""The local output's writer on a disk-backed directory: steady writeback (sync_file_range every 8 MiB, waited for
256 MiB behind) with the durable commit, against the same durable commit with writeback left to the kernel, and
against the old writer (no sync at all: fast to return, not on disk when the manifest is). Each variant writes
the same bytes through LocalSink in 16 MiB writes, as the graft's shard writer does, in fresh files; best of N
with the range, wall and system CPU seconds.

    .venv/bin/python bench/bench_local_writeback.py [--gb 2] [--repeat 3] [--dir /path/on/disk]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worker.engine.storage import local_files  # noqa: E402
from worker.engine.storage.sinks import LocalSink  # noqa: E402
from worker.engine.storage.uris import parse_uri  # noqa: E402

CHUNK = 16 << 20


@contextlib.contextmanager
def variant(name: str):
    real_range, real_sync, real_fsync = local_files.SYNC_FILE_RANGE, os.fdatasync, os.fsync
    real_dirty = local_files.DIRTY_BYTES
    if name == "steady-32":
        local_files.DIRTY_BYTES = 32 << 20
    if name in ("kernel", "none"):
        local_files.SYNC_FILE_RANGE = None
    if name == "none":
        os.fdatasync = os.fsync = lambda fd: None
    try:
        yield
    finally:
        local_files.SYNC_FILE_RANGE, os.fdatasync, os.fsync = real_range, real_sync, real_fsync
        local_files.DIRTY_BYTES = real_dirty


def write_once(root: str, total: int, name: str) -> tuple[float, float]:
    out = os.path.join(root, f"out-{name}-{time.monotonic_ns()}")
    data = os.urandom(CHUNK)
    sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    t0 = time.perf_counter()
    with variant(name):
        sink = LocalSink(parse_uri(out))
        shard = 2 << 30
        for k in range(0, total, shard):
            writer = sink.open(f"model-{k // shard:05d}.safetensors", min(shard, total - k))
            for _ in range(0, min(shard, total - k), CHUNK):
                writer.write(data)
            writer.close()
        sink.commit(b"{}")
    wall = time.perf_counter() - t0
    system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0
    shutil.rmtree(out)
    os.sync()
    return wall, system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="a directory on the disk to measure (default: the system's temp)")
    args = ap.parse_args()
    total = int(args.gb * (1 << 30)) // CHUNK * CHUNK
    root = tempfile.mkdtemp(prefix="graft-wb-", dir=args.dir)
    try:
        results = {name: [] for name in ("steady", "steady-32", "kernel", "none")}
        for _ in range(args.repeat):
            for name in results:  # interleaved: the machine's noise hits every variant alike
                results[name].append(write_once(root, total, name))
        print(f"{total / 1e9:.2f} GB written in {CHUNK >> 20} MiB writes to {root}, best of {args.repeat}")
        print(f"{'variant':<48} {'wall s (best, range)':<24} {'system CPU s':<12} GB/s")
        label = {"steady": "steady writeback + durable commit (graft now)",
                 "steady-32": "steady writeback waited 32 MiB behind",
                 "kernel": "durable commit, writeback left to the kernel",
                 "none": "no sync at all (graft before; not durable)"}
        for name, runs in results.items():
            walls = sorted(w for w, _ in runs)
            best = min(runs)
            print(f"{label[name]:<48} {walls[0]:6.2f} ({walls[0]:.2f}-{walls[-1]:.2f})     {best[1]:8.2f}    "
                  f"{total / 1e9 / walls[0]:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
