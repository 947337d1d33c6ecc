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
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dispatcher.db.engine import sqlite_file

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
    """Which database and Redis a life worked against (passwords left out, spellings of one server made
    alike): a journal is only read by a process of the same ones (two test runs, or two deployments, may
    share a STATE_DIR and dispatcher ids)."""
    db = _where(database_url, {"mysql": 3306, "mariadb": 3306})
    rds = _where(redis_url, {"redis": 6379, "rediss": 6379})
    return hashlib.sha256(f"{db}|{rds}|{key_prefix}".encode()).hexdigest()[:16]


def _where(url: str, ports: dict[str, int]) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme == "sqlite":
        return f"sqlite:{os.path.abspath(sqlite_file(url) or ':memory:')}"
    host = (parts.hostname or "").lower()
    host = "127.0.0.1" if host in ("localhost", "", "::1") else host
    db = parts.path.strip("/") or "0"
    for pair in parts.query.split("&"):  # redis-py's ?db= wins over the path
        name, _, value = pair.partition("=")
        if name == "db" and value:
            db = value
    return f"{scheme}://{host}:{parts.port or ports.get(scheme, 0)}/{db}"


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
        #: What our id held at this life's start once recovery was done: sent by an earlier life, or not
        #: known. None of it is ours to send: a copy of such a job that comes back to us (our id's processing
        #: list) finds its attempt recorded under our id, which used to read as a commit whose answer was
        #: lost, and was POSTed again (``GpuRequests.sent``; runtime.py sets it, journal or not).
        self.inherited: set[Pair] = set()
        #: Called when the log is due for ``rotate`` (the owner schedules it; runtime.py).
        self.rotate_due: Callable[[], None] = lambda: None
        #: Called when the journal turns off for good (runtime.py: the id's mark then names no journal).
        self.on_fail: Callable[[], None] = lambda: None
        #: Dead lives (instance) whose id another process was found running again: when first so
        #: (monotonic), and the instances found holding the id. Their journals are left to that process for
        #: a while, and read later only if each of those kept a journal here (``recovery.py``).
        self.runs_again: dict[str, tuple[float, set[str]]] = {}

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
            # Locked before it is written: a reader that took an empty file's lock read no header, and
            # removed the new life's files (a review).
            lock = os.open(self._path(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._lock = lock
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(lock, 0)
            _write_all(lock, self.life.dumps())
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
            _write_all(self._fd, _line(pair))
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
            _write_all(self._fd, b"".join(_line(p) for p in pairs))
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
        """A request may go out unrecorded from now on, so nobody may trust this life's journal: its lock
        file goes first, the id's mark names no journal (``on_fail``), and the lock stays held while the
        process lives (a file system gone read-only keeps the file: dropped, the lock let a reader take a
        live process's journal for a dead one's, and give back what it had just sent)."""
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
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self.on_fail()

    def close(self) -> None:
        """The process stops: its lock is dropped, its files stay for the next process to read."""
        for fd in (self._fd, self._lock):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock = None


def _write_all(fd: int, data: bytes) -> None:
    """One ``write`` of all of ``data``, or an error: a short write (a full disk) is a line cut short, which
    a reader skips, so the request it stood for must not go out as if recorded (an outside review)."""
    if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, "short write (the disk is full?)")


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

    def stale(self, seconds: float) -> bool:
        """Nothing written for ``seconds``: whoever it was for has no use for it any more."""
        newest = 0.0
        for suffix in (".lock", ".log", ".next.log"):
            with contextlib.suppress(OSError):
                newest = max(newest, (self.dir / f"{self.instance}{suffix}").stat().st_mtime)
        return time.time() - newest > seconds

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


def lock_path(journal: SentJournal, instance: str) -> Path | None:
    """Where life ``instance``'s journal (its lock file) is here; None without a directory, or for an
    instance no life could have (a path, a hidden name: it comes from Redis)."""
    if journal.dir is None or "/" in instance or instance.startswith("."):
        return None
    return journal.dir / f"{instance}.lock"


def kept_a_journal(journal: SentJournal, dispatcher_id: str, instance: str) -> bool:
    """Did life ``instance`` of ``dispatcher_id``, on this machine's boot and stores, start a journal here?
    Such a life names its journal the id's (the mark) before it places anything: if it died before that, the
    mark still names the journal that knows what the id sent. A gpuq without the journal (a rollback), or a
    life on another machine, leaves none here. Read without its lock: the header is written once, under it."""
    path = lock_path(journal, instance)
    if path is None or journal.life is None:
        return False
    try:
        with path.open("rb") as f:
            life = Life.loads(f.read(64 * 1024))
    except OSError:
        return False
    me = journal.life
    return life is not None and (life.dispatcher_id, life.instance, life.boot, life.realm) == (
        dispatcher_id,
        instance,
        me.boot,
        me.realm,
    )


def held_elsewhere(journal: SentJournal, instance: str) -> bool:
    """Is life ``instance``'s journal here locked by a process (its own, or a reader's)?"""
    path = lock_path(journal, instance)
    if path is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # drops our lock, if we took it
    return False


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
