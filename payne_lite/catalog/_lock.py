"""One owner per output: the lock file of a fit_catalog run.

``<path_out>.lock`` (beside the results file and its ``.parts`` folder) holds a
kernel lock (``flock``) for as long as its run lives, and names the run in JSON:
host, pid, the process's start time, when the run began and its command line. A
second run on the same output finds the lock held and stops at once with
:class:`~payne_lite.errors.OutputLockedError`, naming the owner, before it reads,
deletes (``restart=True``) or writes anything.

The kernel drops the lock when its process ends, however it ends (a kill, a crash,
a lost node): a lock file whose lock nobody holds is stale, and the next run takes
it over with a warning naming the run that left it. Where the filesystem has no
``flock`` (``ENOLCK``, ``EOPNOTSUPP``), the file alone decides: a lock of this host
whose process is gone (or is another process under a reused pid: the start times
differ) is stale; one of another host is taken to be live, and the message says
to delete the file if that run is over.

On network filesystems whose locks are only local to each client (Lustre mounted
with ``localflock``) two hosts do not see each other's locks; NFS v4 and Lustre's
``flock`` mount option share them.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import sys
import uuid
import warnings
from pathlib import Path

from ..errors import OutputLockedError

try:  # POSIX; elsewhere the file alone decides
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_log = logging.getLogger("payne_lite.catalog")

LOCK_FORMAT = "payne_lite.fit_catalog.lock"
#: errnos of a filesystem without (working) flock
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_path(path_out: str | os.PathLike) -> Path:
    """The lock file of the output ``path_out``: ``<path_out>.lock``."""
    p = Path(path_out)
    return p.with_name(p.name + ".lock")


def _process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or
    None where unknown: with the pid it names one process, even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after it
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def _alive(owner: dict) -> bool | None:
    """Whether the process ``owner`` names runs: True, False, or None where this
    host cannot tell (another host's)."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    start = owner.get("process_start")
    now = _process_start(pid)
    return not (start is not None and now is not None and start != now)


def describe(owner: dict | None) -> str:
    """One line naming the run of a lock file's ``owner`` (None: unreadable)."""
    if not owner:
        return "a run whose lock file is empty or unreadable"
    cmd = owner.get("argv") or []
    cmd = " ".join(str(c) for c in cmd)
    if len(cmd) > 120:
        cmd = cmd[:117] + "..."
    return (
        f"pid {owner.get('pid')} on host {owner.get('host')!r}, started "
        f"{owner.get('started')}" + (f" ({cmd})" if cmd else "")
    )


def read_owner(path: Path) -> dict | None:
    """A lock file's owner (its JSON), or None when it is unreadable or foreign."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict) or owner.get("format") != LOCK_FORMAT:
        return None
    return owner


class OutputLock:
    """The lock of one output, held from :meth:`acquire` to :meth:`release` (or as a
    context manager). Not reentrant: a second lock of the same output in the same
    process is refused as another run's would be."""

    def __init__(self, path_out: str | os.PathLike):
        self.path = lock_path(path_out)
        self.output = Path(path_out)
        self._fd: int | None = None
        self.owner: dict | None = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _me(self) -> dict:
        return {
            "format": LOCK_FORMAT,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "started": datetime.datetime.now(datetime.UTC).isoformat(
                timespec="seconds"
            ),
            "argv": list(sys.argv),
            "token": uuid.uuid4().hex,
        }

    def _refuse(self, owner):
        raise OutputLockedError(
            f"{self.output}: another fit_catalog run owns this output: "
            f"{describe(owner)}. Wait for it to finish or stop it; if it is no "
            f"longer running, delete {self.path}",
            owner=owner,
        )

    def acquire(self) -> None:
        """Take the lock, or raise :class:`OutputLockedError` naming its live owner;
        a stale lock is taken over with a warning."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this object")
        for _ in range(10):  # retried only when the file is replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                kernel = self._flock(fd)
                old = read_owner(self.path)
                empty = os.fstat(fd).st_size == 0
                if kernel is False:
                    self._refuse(old)
                if kernel is None and old is not None and _alive(old) is not False:
                    self._refuse(old)  # no flock here: the file alone decides
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # released (unlinked) between our open and our lock
                    os.close(fd)
                    continue
                if not empty:
                    msg = (
                        f"{self.path}: taking over the lock of {describe(old)}, "
                        "which is no longer running (killed, or its node lost)"
                    )
                    warnings.warn(msg, RuntimeWarning, stacklevel=3)
                    _log.warning(msg)
                me = self._me()
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(me, indent=1) + "\n").encode(), 0)
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fd, self.owner = fd, me
            return
        raise OutputLockedError(  # pragma: no cover - a lock file that keeps moving
            f"{self.path}: could not take the lock (the file kept being replaced)"
        )

    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: locked; False: another process holds it; None: no flock here."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            if err.errno in _NO_FLOCK:
                return None
            raise
        return True

    def release(self) -> None:
        """Remove the lock file (ours only) and drop the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(self.path)  # unlinked while locked: see acquire
        finally:
            os.close(fd)
