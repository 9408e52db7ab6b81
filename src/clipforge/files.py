"""Writing files so that a crash never leaves a torn one: write beside the target, then rename over it."""
from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

RUN_LOCK = ".clipforge-run.lock"  # in a folder a run writes into: who holds it


class FolderInUseError(ValueError):
    """Another clipforge run is writing into the folder this one was given."""


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block finishes without error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file asked for, not the temporary one beside it
        raise type(exc)(f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def run_lock(folder: str | os.PathLike, what: str, enabled: bool = True):
    """Hold ``folder``'s run lock while a run writes into it, so that a second run given the same folder (a command
    started twice, an embed started while another still adds images) stops at once, naming the first, instead of
    both writing the same checkpoints or shards. A POSIX record lock: the process's own, not its data-loading
    workers' (a forked worker outliving a killed run would hold a lock it inherited), let go of when the process
    ends, killed too. A folder made for the lock by a run that wrote nothing else is removed again. ``enabled``
    False (a torchrun rank other than 0: one lock per run), or a platform or file system without locks: no lock."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    if not enabled or fcntl is None:
        yield
        return
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / RUN_LOCK, "a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = True
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EAGAIN):
            handle.seek(0)
            holder = handle.read().strip() or "another clipforge run"
            handle.close()
            raise FolderInUseError(f"{folder}: {holder} is writing into this folder; wait for it to end, or give "
                                   "this run a folder of its own") from None
        locked = False  # a file system without locks (some network mounts): run as before
    if not locked:
        handle.close()
        yield
        return
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"clipforge {what} (process {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        yield
    finally:
        handle.close()  # lets go of the lock
        if made and [path.name for path in folder.iterdir()] == [RUN_LOCK]:
            (folder / RUN_LOCK).unlink()
            folder.rmdir()


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``target`` as a hard link to ``source`` (no second copy on disk), else a copy; atomically either way."""
    import shutil

    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(source, tmp)


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))  # JSON is UTF-8 whatever the locale


def read_user_text(path: str | os.PathLike, what: str) -> str:
    """A text file a person wrote (class names, prompt templates, queries, a config, a CSV, a caption), read as UTF-8
    whatever the locale, without the byte-order mark that Windows editors and Excel's "CSV UTF-8" put first (it
    became part of the first class name, or of the first column's name); other encodings are named. ``what``: the
    option or role the file came by, for the message."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
                         ) from None


class PathReferences:
    """How a file kept in ``folder`` (a collection's metadata, a LiMBer map's limber.json) names other files, so that
    it finds them again from any working directory and after a move:

    - a path given relative to the working directory, or any path inside ``folder``, is recorded relative to
      ``folder``: the folder, or a project holding it beside what it names, can move as a whole;
    - any other absolute path stays absolute: it was given as a fixed place.

    ``resolve`` reads a recorded reference back as an absolute path. Links among the folders are resolved once per
    folder, so that recording millions of paths costs no file-system call per path."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.path.realpath(folder)
        self._real_folders: dict[str, str] = {}

    def _real(self, path: str) -> str:
        """``path`` absolute, its folder's links resolved (the name itself kept: a linked file keeps its name)."""
        head, name = os.path.split(os.path.abspath(path))
        if head not in self._real_folders:
            self._real_folders[head] = os.path.realpath(head)
        return os.path.join(self._real_folders[head], name)

    def record(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        real = self._real(path)
        inside = real == self.folder or real.startswith(self.folder.rstrip(os.sep) + os.sep)
        if os.path.isabs(path) and not inside:
            return path
        return os.path.relpath(real, self.folder)

    def resolve(self, reference: str) -> str:
        return reference if os.path.isabs(reference) else os.path.normpath(os.path.join(self.folder, reference))

    def record_if_path(self, spec: str | None) -> str | None:
        """``spec`` recorded when it names an existing path; anything else (a zoo name, a shard pattern) as given."""
        return self.record(spec) if spec and os.path.exists(spec) else spec

    def find(self, reference: str | None) -> str | None:
        """The existing path ``reference`` names, or None when it names none (a zoo name, or a file gone)."""
        path = self.resolve(reference) if reference else None
        return path if path and os.path.exists(path) else None
