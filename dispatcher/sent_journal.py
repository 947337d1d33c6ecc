"""The attempts this process has POSTed, on local disk, each written before its request goes out: after a
kill -9, the attempts it recorded in the database but never sent can be given back at once (``recovery.py``)
instead of holding their slots for the lease.

Why: a standby is recorded on its slot before it is sent, and a placed job is committed before its POST
(``docs/standby.md``). A dispatcher killed in between leaves a slot held by a job no GPU has, and neither
store says whether it went out: only the process knew, and this file keeps what it knew past its death. A
line costs one ``write`` (no fsync): a kill -9 keeps the page cache, so the file is trusted only on the boot
that wrote it (an OS crash may have lost its tail; then leases decide, as without it).

One set of files per life (instance) of a dispatcher, in ``STATE_DIR/sent/``:

- ``<instance>.lock``: the life's header (JSON); ``flock``-ed by the process for its whole life. A lock
  another process can take belongs to a process that is gone (the kernel dropped it with the process).
- ``<instance>.log``: one JSON line ``[task_id, attempt]`` per request, appended; ``<instance>.next.log``
  while the log is being replaced by a shorter one (``rotate``): a reader takes both.

Every life starts by writing down every attempt its DISPATCHER_ID still holds (``carry``: sent by an earlier
life, or not known), so that its own file covers all a later recovery must know.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("gpuq.dispatcher")

#: The directory under STATE_DIR.
SUBDIR = "sent"
#: Requests between two rewrites of the log (each keeps only the attempts still holding a slot): about 1 MB
#: of file and 2 MB of memory.
ROTATE_ENTRIES = 20_000
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

Pair = tuple[str, int]


def boot_id() -> str | None:
    """This boot of the machine (Linux); None elsewhere: then no journal (nothing proves it complete)."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def realm(database_url: str, redis_url: str, key_prefix: str) -> str:
    """Which database and Redis a life worked against (passwords left out): a journal is only read by a
    process of the same ones (two test runs, or two deployments, may share a STATE_DIR and dispatcher ids)."""

    def bare(url: str) -> str:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}?{parts.query}"

    return hashlib.sha256(f"{bare(database_url)}|{bare(redis_url)}|{key_prefix}".encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Life:
    """One process's run under a DISPATCHER_ID: the header of its journal."""

    dispatcher_id: str
    instance: str
    boot: str
    realm: str

    def dumps(self) -> bytes:
        return json.dumps({"journal": 1, **asdict(self)}).encode()

    @classmethod
    def loads(cls, raw: bytes) -> Life | None:
        try:
            data = json.loads(raw)
            return cls(
                str(data["dispatcher_id"]), str(data["instance"]), str(data["boot"]), str(data["realm"])
            )
        except (ValueError, KeyError, TypeError):
            return None


def _line(pair: Pair) -> bytes:
    return (json.dumps(pair) + "\n").encode()


class SentJournal:
    """This life's journal. Disabled (every call a no-op) when it has no directory or cannot write there."""

    def __init__(self, directory: Path | None, life: Life | None) -> None:
        self.dir = directory / SUBDIR if directory is not None else None
        self.life = life
        self._lock: int | None = None
        self._fd: int | None = None
        self._since: set[Pair] = set()  # written to the current log since it was started
        self._count = 0
        self._rotating = False
        #: Called when the log is due for ``rotate`` (the owner schedules it; runtime.py).
        self.rotate_due: Callable[[], None] = lambda: None

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def _path(self, suffix: str) -> Path:
        assert self.dir is not None
        assert self.life is not None
        return self.dir / f"{self.life.instance}{suffix}"

    def open(self) -> bool:
        """Start this life's files and hold its lock. False (said in the log) when it cannot: a kill -9 of
        this process then leaves its unsent attempts to their leases, as without a journal."""
        if self.dir is None or self.life is None:
            return False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            lock = os.open(self._path(".lock"), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self._lock = lock
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(lock, self.life.dumps())
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
            self._fd = os.open(self._path(".log"), flags, 0o600)
        except OSError as exc:
            log.warning(
                "no journal of sent requests (STATE_DIR): after a kill -9 of this process, the jobs it had"
                " recorded but not sent hold their slots until their lease ends",
                extra={"action": "journal", "error": str(exc), "path": str(self.dir)},
            )
            self.close()
            return False
        return True

    def record(self, task_id: str, attempt: int) -> None:
        """Before a request goes out. A write that fails turns the journal off for this life (``_fail``)."""
        if self._fd is None:
            return
        pair = (task_id, attempt)
        try:
            os.write(self._fd, _line(pair))
        except OSError as exc:
            self._fail(exc)
            return
        self._since.add(pair)
        self._count += 1
        if self._count >= ROTATE_ENTRIES and not self._rotating:
            self._rotating = True
            self.rotate_due()

    def carry(self, pairs: Iterable[Pair]) -> None:
        """Write down attempts this life did not send but must be taken as sent (an earlier life's)."""
        pairs = [p for p in pairs if p not in self._since]
        if self._fd is None or not pairs:
            return
        try:
            os.write(self._fd, b"".join(_line(p) for p in pairs))
        except OSError as exc:
            self._fail(exc)
            return
        self._since.update(pairs)

    async def rotate(self, holdings: Callable[[], Awaitable[set[Pair]]]) -> None:
        """Replace the log by one with only what still holds a slot: requests from now on go to the new
        file, then the old one's lines still holding a slot are copied over, then the new file takes the
        old one's name. A crash on the way leaves both files, and a reader takes both."""
        try:
            if self._fd is None:
                return
            nxt = self._path(".next.log")
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
            new = os.open(nxt, flags, 0o600)
            old, before = self._fd, self._since
            self._fd, self._since, self._count = new, set(), 0
            os.close(old)
            try:
                keep = before & await holdings()
            except Exception as exc:  # the database is away: keep all, shrink next time
                log.warning("journal kept whole", extra={"action": "journal", "error": str(exc)})
                keep = before
            self.carry(keep)
            if self._fd is new:  # not turned off meanwhile
                os.replace(nxt, self._path(".log"))
        except OSError as exc:
            self._fail(exc)
        finally:
            self._rotating = False

    def _fail(self, exc: OSError) -> None:
        """A request may go out unrecorded from now on: the lock file goes first, so that nobody trusts this
        life's journal (its unsent attempts wait for their lease, as without one)."""
        log.error(
            "journal of sent requests turned off (STATE_DIR): after a kill -9 of this process, the jobs it"
            " had recorded but not sent hold their slots until their lease ends",
            extra={"action": "journal", "error": str(exc)},
        )
        for suffix in (".lock", ".log", ".next.log"):
            try:
                self._path(suffix).unlink(missing_ok=True)
            except OSError:
                log.exception("journal file not removed", extra={"action": "journal", "suffix": suffix})
        self.close()

    def close(self) -> None:
        """The process stops: its lock is dropped, its files stay for the next process to read."""
        for fd in (self._fd, self._lock):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock = None


# -- reading the journals of lives that are over (``recovery.py``) ---------------------------------------


@dataclass(slots=True)
class DeadLife:
    """A journal whose process is gone, locked by the reader until ``forget`` or ``release``."""

    life: Life | None  # None: a header nobody can read
    instance: str
    lock: int
    dir: Path

    def sent(self) -> set[Pair]:
        """Every attempt the life recorded (both logs; a line cut short by the kill is not a request that
        went out: it is written before the request)."""
        seen: set[Pair] = set()
        for suffix in (".log", ".next.log"):
            try:
                raw = (self.dir / f"{self.instance}{suffix}").read_bytes()
            except FileNotFoundError:
                continue
            for line in raw.splitlines():
                try:
                    task_id, attempt = json.loads(line)
                except (ValueError, TypeError):
                    continue
                if isinstance(task_id, str) and isinstance(attempt, int):
                    seen.add((task_id, attempt))
        return seen

    def forget(self) -> None:
        """Done with: the lock file first (so no other reader takes it for a life still to recover), then
        the logs, then the lock itself."""
        for suffix in (".lock", ".log", ".next.log"):
            try:
                (self.dir / f"{self.instance}{suffix}").unlink(missing_ok=True)
            except OSError:
                log.exception("journal file not removed", extra={"action": "journal", "suffix": suffix})
        self.release()

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.lock)


def dead_lives(journal: SentJournal) -> list[DeadLife]:
    """The journals in ``journal``'s directory whose process is gone, each locked for the caller."""
    if journal.dir is None or journal.life is None:
        return []
    try:
        names = sorted(p.name for p in journal.dir.glob("*.lock"))
    except OSError:
        return []
    found = []
    for name in names:
        instance = name.removesuffix(".lock")
        if instance == journal.life.instance:
            continue
        path = journal.dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Still the file at that name: another reader may have finished with it (and removed it)
            # between our open and our lock.
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError(path)
            raw = os.read(fd, 64 * 1024)
        except OSError:  # alive (locked), or gone meanwhile
            os.close(fd)
            continue
        found.append(DeadLife(Life.loads(raw), instance, fd, journal.dir))
    return found
