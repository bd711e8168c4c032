"""file://: a model directory read through descriptors checked against the confinement, and an output
built in a hidden sibling directory and renamed into place (the local scheme's store and sink)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import socket
import stat
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from worker.engine.errors import GraftError
from worker.engine.storage.direct_writes import DIRECT_MIN_BYTES, DirectFile, set_direct
from worker.engine.storage.sinks import MANIFEST, OWNER, STAGING, FileWriter, Sink
from worker.engine.storage.stores import Confinement, Store, fd_path
from worker.engine.storage.uris import Location


def pread_full(fd: int, start: int, view: memoryview, what: str) -> int:
    """Fill `view` from byte `start` of `fd`; the bytes read, fewer only where the file ends first. A failed
    read is a storage_error naming `what`."""
    got = 0
    while got < len(view):
        try:
            n = os.preadv(fd, [view[got:]], start + got)
        except OSError as exc:
            raise GraftError("storage_error", f"{what}: read failed: {exc.strerror}") from None
        if n == 0:
            break
        got += n
    return got


class LocalStore(Store):
    """A local model directory. Confined, every file is checked after it is opened, on the descriptor
    itself, to lie where the confinement admits: a symlink inside the directory (or a file swapped for
    one) cannot make the graft read, copy or report the digest of a file outside the allowed roots."""

    def __init__(self, location: Location, confinement: Confinement | None = None) -> None:
        self.location = location
        self.root = location.path
        self.confinement = confinement
        if not os.path.isdir(self.root):
            raise GraftError("input_not_found", f"{location}: not a directory")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def list_files(self) -> dict[str, int]:
        out = {}
        try:
            for entry in os.scandir(self.root):
                if self.confinement is not None and entry.is_symlink() and not self.confinement.admits(
                        os.path.realpath(entry.path)):
                    # Refused at once, not only when opened: the input hashes would otherwise report the
                    # digest of a file outside the roots (they hash every file the directory lists).
                    raise self._escape(entry.name)
                if entry.is_file():
                    out[entry.name] = entry.stat().st_size
        except OSError as exc:
            raise GraftError("storage_error", f"{self.location}: cannot list: {exc.strerror}") from None
        return out

    def _escape(self, name: str) -> GraftError:
        # Where the link leads is not said: that would tell a client about files it may not see.
        return GraftError("uri_not_allowed", f"{self.location}/{name} resolves outside the allowed roots")

    def _open(self, name: str) -> int:
        if name not in self.files:
            raise GraftError("input_not_found", f"{self.location}: no file {name}")
        path = os.path.join(self.root, name)
        try:
            # O_NONBLOCK: a file swapped for a FIFO since the listing must not block the open forever.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise GraftError("input_not_found", f"{self.location}/{name}: cannot open: {exc.strerror}") from None
        try:
            if self.confinement is not None and not self.confinement.admits(fd_path(fd, path)):
                raise self._escape(name)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise GraftError("invalid_input", f"{self.location}/{name} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            with self._lock:
                fd = self._fds.get(name)
                if fd is None:
                    fd = self._fds[name] = self._open(name)
        return fd

    def read_into(self, name: str, start: int, view: memoryview) -> None:
        if pread_full(self._fd(name), start, view, f"{self.location}/{name}") < len(view):
            raise GraftError("invalid_safetensors",
                             f"{self.location}/{name}: file ends before byte {start + len(view)}")

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


# Writeback started every WRITEBACK_BYTES, waited for once a range is DIRTY_BYTES behind the writer: the
# kernel otherwise lets dirty pages pile up and then throttles the writer in bursts (a 1.9 GB output cost 2.5 s
# more on disk than on tmpfs), and the final fdatasync, which the manifest waits for, has little left to do.
WRITEBACK_BYTES = 8 << 20
DIRTY_BYTES = 256 << 20  # at 32 MiB the waits cost throughput on this VM's disk
_SYNC_WRITE, _SYNC_WAIT = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER


def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none: then only the final fdatasync runs."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


SYNC_FILE_RANGE = _sync_file_range()


class _Writeback:
    """Steady writeback of one file as it grows (see WRITEBACK_BYTES); failures only cost the steadiness."""

    def __init__(self, fd: int) -> None:
        self.fd, self.written, self.started, self.waited = fd, 0, 0, 0

    def wrote(self, n: int) -> None:
        self.written += n
        if SYNC_FILE_RANGE is None or self.written - self.started < WRITEBACK_BYTES:
            return
        SYNC_FILE_RANGE(self.fd, self.started, self.written - self.started, _SYNC_WRITE)
        self.started = self.written
        if self.started - self.waited > DIRTY_BYTES:
            end = self.started - DIRTY_BYTES
            SYNC_FILE_RANGE(self.fd, self.waited, end - self.waited, _SYNC_WAIT)
            self.waited = end


class _LocalWriter(FileWriter):
    def __init__(self, name: str, dir_fd: int, expected_size: int | None, io: ThreadPoolExecutor, *,
                 part: str | None = None, landed=None) -> None:
        super().__init__(name)
        self._dir_fd, self._part, self._landed = dir_fd, part, landed
        self._fd = _create(part or name, dir_fd)
        self._io = io
        self._writeback = _Writeback(self._fd)
        if expected_size:
            try:  # one extent up front: block allocation while streaming costs more than the copy
                os.posix_fallocate(self._fd, 0, expected_size)
            except OSError:
                pass
        self._direct = None
        if (expected_size or 0) >= DIRECT_MIN_BYTES and set_direct(self._fd, True):
            try:
                self._direct = DirectFile(self._fd, io)
            except (OSError, MemoryError):  # no staging buffers: the page cache, as before
                set_direct(self._fd, False)

    def write(self, data) -> None:
        try:
            self._write_hashed(data)
        except OSError as exc:  # a full or failing disk: the job's error, not a crash of ours
            raise GraftError("storage_error", f"cannot write {self.name} to the output: {exc.strerror}") from None

    def _write_hashed(self, data) -> None:
        if self._direct is not None:  # staged here (one copy), written on the I/O thread around the page cache
            self._sha.update(data)
            self.size += len(data)
            self._direct.append(data)
            return
        # The write goes to the I/O thread while this thread hashes the same bytes.
        pending = self._io.submit(self._write, data) if len(data) >= (1 << 20) else None
        self._sha.update(data)
        self.size += len(data)
        if pending is None:
            self._write(data)
        else:
            pending.result()

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._writeback.wrote(n)

    def _finish(self) -> None:
        # On disk before the manifest that names it can be: a crash after the commit never leaves a published
        # output whose shards are holes.
        fd, self._fd = self._fd, -1  # closed once: an abort() after a failure here must not close a reused number
        try:
            if self._direct is not None:
                direct, self._direct = self._direct, None
                direct.finish()
            os.fdatasync(fd)
        except OSError as exc:
            raise GraftError("storage_error", f"cannot write {self.name} to the output: {exc.strerror}") from None
        finally:
            os.close(fd)
        if self._part is not None:
            os.rename(self._part, self.name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            self._landed(self._part)

    def abort(self) -> None:
        direct, self._direct = self._direct, None
        try:
            if direct is not None:
                direct.close()
        finally:
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def remove_orphans(parent: str, prefix: str) -> None:
    """Remove what killed grafts to this output left: temp directories whose writer process is gone.
    Only this host's are judged; a live writer's directory is never touched."""
    host = socket.gethostname()
    for entry in os.scandir(parent):
        if not (entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            with open(os.path.join(entry.path, OWNER)) as fh:
                owner_host, pid = fh.read().split()
            if owner_host != host:
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except (OSError, ValueError):
            continue


def remove_files(location: Location, names: list[str], confinement: Confinement | None = None) -> None:
    """Remove the files `names` directly in the output directory `location`, in that order, then the directory
    once empty (never anything else in it). Through the directory's descriptor, checked against the
    confinement: no symlink swapped into the path since it was checked moves what is removed. Names already
    gone are no error."""
    path = location.path
    if any(not n or "/" in n or n in (".", "..") for n in names):
        raise GraftError("invalid_input", f"{location}: only files directly in the output are removed")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # removed already
    except OSError as exc:
        raise GraftError("storage_error", f"{location}: cannot open the output to remove it: {exc.strerror}") from None
    try:
        if confinement is not None and not confinement.admits(fd_path(fd, path)):
            raise GraftError("uri_not_allowed", f"{location}: resolves outside the allowed roots")
        for name in names:
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise GraftError("storage_error", f"{location}: cannot remove {name}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # something else is in it (not ours to remove) or it is in use: the directory stays


def _create(name: str, dir_fd: int) -> int:
    """A new file in the directory `dir_fd` holds. O_EXCL | O_NOFOLLOW: whatever someone planted under
    that name (a symlink out of the allowed roots, a file) is refused, never followed or overwritten."""
    try:
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                       dir_fd=dir_fd)
    except OSError as exc:
        raise GraftError("storage_error", f"cannot create {name} in the output: {exc.strerror}") from None


def _real_ancestor(path: str) -> str:
    """realpath of the deepest existing ancestor joined with the rest (an output need not exist yet)."""
    head, tail = path, []
    while not os.path.lexists(head) and head not in ("/", ""):
        head, name = os.path.split(head)
        tail.append(name)
    return os.path.join(os.path.realpath(head), *reversed(tail))


class LocalSink(Sink):
    """The output is built in a hidden sibling directory, reached through descriptors (of the parent and
    of the temp directory) opened once: confined, the parent is checked on its descriptor, and no later
    swap of a path component for a symlink can move where the files land."""

    def __init__(self, location: Location, confinement: Confinement | None = None, *,
                 manifest_name: str | None = None, writer: str | None = None, split: str = "") -> None:
        self.location = location
        self.manifest_name = manifest_name or MANIFEST
        self.final = location.path
        self.split = split
        try:
            occupied = os.path.exists(self.final) and (not os.path.isdir(self.final) or bool(os.listdir(self.final)))
        except OSError as exc:
            raise GraftError("storage_error", f"{location}: cannot inspect the output: {exc.strerror}") from None
        if occupied:
            raise GraftError("output_exists", f"{location} already exists and is not an empty directory")
        parent = os.path.dirname(self.final) or "."
        if confinement is not None and not confinement.admits(_real_ancestor(parent)):
            raise self._escape()  # before makedirs creates anything out there
        prefix = f".{os.path.basename(self.final)}{STAGING}"
        # A split graft's tasks run in other processes (other hosts, with a shared file system): they find the
        # staging directory by the writer's name.
        token = hashlib.sha256((writer or "").encode()).hexdigest()[:12] if split else uuid.uuid4().hex[:12]
        self._tmp_name = prefix + token
        self.tmp = os.path.join(parent, self._tmp_name)
        self._parent_fd = self._dir_fd = -1
        try:
            self._open_staging(parent, prefix, confinement)
        except BaseException as exc:
            if split != "join":
                self._discard()
            self._close_fds()
            if isinstance(exc, OSError):
                raise GraftError("storage_error", f"{location}: cannot create the output: {exc.strerror}") from None
            raise
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graft-write")
        self._parts: set[str] = set()  # a joined task's files not yet renamed into place

    def _open_staging(self, parent: str, prefix: str, confinement: Confinement | None) -> None:
        if self.split != "join":
            os.makedirs(parent, exist_ok=True)
        self._parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if confinement is not None and not confinement.admits(fd_path(self._parent_fd, parent)):
            raise self._escape()
        if self.split == "join":
            try:
                self._dir_fd = os.open(self._tmp_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                       dir_fd=self._parent_fd)
            except FileNotFoundError:
                raise GraftError("output_not_found", f"{self.location}: the split graft's staging directory is "
                                 "gone (the job was cancelled or failed)") from None
            return
        remove_orphans(parent, prefix)
        if self.split:  # a retried planning task starts its staging over
            shutil.rmtree(self._tmp_name, ignore_errors=True, dir_fd=self._parent_fd)
        os.mkdir(self._tmp_name, 0o755, dir_fd=self._parent_fd)
        self._dir_fd = os.open(self._tmp_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=self._parent_fd)
        fd = _create(OWNER, self._dir_fd)
        with os.fdopen(fd, "w") as fh:
            # A split graft's staging outlives the process that claimed it: no host name, so that
            # remove_orphans never judges it by a pid.
            fh.write("split -1\n" if self.split else f"{socket.gethostname()} {os.getpid()}\n")

    def staged(self) -> Location:
        return Location("file", path=self.tmp)  # each write returns once it has landed

    def _escape(self) -> GraftError:
        return GraftError("uri_not_allowed", f"{self.location}: the output's directory resolves outside the "
                          "allowed roots")

    def open(self, name: str, expected_size: int | None = None) -> FileWriter:
        if self.split != "join":
            return _LocalWriter(name, self._dir_fd, expected_size, self._io)
        # Written aside and renamed: a duplicated or retried task replaces the file with the same bytes, and a
        # reader never sees half of it.
        part = f".{name}.part-{uuid.uuid4().hex[:12]}"
        self._parts.add(part)
        return _LocalWriter(name, self._dir_fd, expected_size, self._io, part=part, landed=self._parts.discard)

    def commit(self, manifest: bytes) -> str:
        self.put(self.manifest_name, manifest)
        self._io.shutdown(wait=True)
        final_name = os.path.basename(self.final)
        try:
            if self.split == "join":  # a killed task's unfinished file (its retry wrote the whole one)
                for name in os.listdir(self._dir_fd):
                    if name.startswith(".") and ".part-" in name:
                        os.unlink(name, dir_fd=self._dir_fd)
            os.unlink(OWNER, dir_fd=self._dir_fd)
            try:
                os.rmdir(final_name, dir_fd=self._parent_fd)  # empty at the check in __init__; filled since, refused
            except FileNotFoundError:
                pass
            os.fsync(self._dir_fd)  # the entries of the files just written
            os.rename(self._tmp_name, final_name, src_dir_fd=self._parent_fd, dst_dir_fd=self._parent_fd)
            os.fsync(self._parent_fd)  # the rename itself: the publication
        except OSError as exc:
            raise GraftError("output_exists", f"{self.location}: cannot publish the output: {exc}") from exc
        self._close_fds()
        return f"file://{os.path.join(self.final, self.manifest_name)}"

    def _close_fds(self) -> None:
        for fd in (self._dir_fd, self._parent_fd):
            if fd >= 0:
                os.close(fd)
        self._dir_fd = self._parent_fd = -1

    def _discard(self) -> None:
        if self._parent_fd >= 0:
            shutil.rmtree(self._tmp_name, ignore_errors=True, dir_fd=self._parent_fd)
        self._close_fds()

    def abort(self) -> None:
        self._io.shutdown(wait=True)
        if self.split == "join":  # the staging is the job's: only this task's unfinished files go
            for part in list(self._parts):
                try:
                    os.unlink(part, dir_fd=self._dir_fd)
                except OSError:
                    pass
            self._close_fds()
            return
        self._discard()

    def abandon(self) -> None:
        self.abort()  # the temp directory is this writer's own, whoever publishes the output

    def detach(self) -> None:
        self._io.shutdown(wait=True)
        self._close_fds()
