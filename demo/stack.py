"""Starting the demo's pieces in order, each registering its own stop, so that they stop in reverse order
(dispatcher, fleet, Redis), also after a failure half way through starting."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from demo.services import RedisService, start_dispatcher
from dispatcher.testing import DispatcherProcess
from producer.settings import ProducerSettings
from simgpu.fleet import SimFleet

Say = Callable[..., None]
OnExit = Callable[..., object]


@dataclass
class Stack:
    tag: str  # the demo's queue name and Redis key prefix (without the colon)
    workdir: Path
    redis: RedisService
    fleet: SimFleet
    dispatcher: DispatcherProcess

    @property
    def db_path(self) -> Path:
        """Where the dispatcher puts its database when no DATABASE_URL or DB_HOST is set (its cwd)."""
        return self.workdir / ".gpuq" / "gpuq.db"


def start(*, gpus: int, slots: int, service: str, redis_port: int, say: Say, on_exit: OnExit) -> Stack:
    workdir = Path(tempfile.mkdtemp(prefix="gpuq-demo-"))
    on_exit(shutil.rmtree, workdir, ignore_errors=True)
    tag = f"gpuq-demo-{uuid.uuid4().hex[:8]}"

    rs = RedisService.find_or_start(redis_port, workdir)
    if rs.proc is None:
        say(f"Redis      the one on 127.0.0.1:{redis_port}, keys under {tag}")
        on_exit(_drop_keys, say, rs.url, tag)
    else:
        pid = rs.proc.pid
        say(f"Redis      none on 127.0.0.1:{redis_port}: started redis-server (pid {pid}), {rs.url}")
        on_exit(_stopping, say, f"redis-server (pid {pid})", rs.stop)

    for name in ("DATABASE_URL", "DB_HOST"):
        if os.environ.get(name):
            say(f"[dim]           ignoring {name}: the demo's database is a throwaway file[/]")
    say(f"Database   embedded SQLite: {workdir / '.gpuq' / 'gpuq.db'}")

    bearer = secrets.token_urlsafe(16)
    fleet = SimFleet(gpus=gpus, slots=slots, service_time=service, token=bearer).start()
    on_exit(_stopping, say, "simulated fleet", fleet.stop)
    say(f"GPUs       simgpu.SimFleet, {fleet.url('g0')} ... /g{gpus - 1}")

    settings = {
        "REDIS_URL": rs.url,
        "REDIS_KEY_PREFIX": f"{tag}:",
        "TASK_QUEUES": tag,
        "GPU_ENDPOINTS": fleet.gpu_endpoints(),
        "SLOTS_PER_GPU": str(slots),
        "CALLBACK_SECRET": secrets.token_urlsafe(32),
        "BEARER_TOKEN": bearer,
    }
    dispatcher = start_dispatcher(settings, workdir, grace=5.0)
    assert dispatcher.proc is not None
    on_exit(_stopping, say, f"dispatcher (pid {dispatcher.proc.pid})", lambda: dispatcher.stop(15.0))
    say(f"Dispatcher python -m dispatcher (pid {dispatcher.proc.pid}), {dispatcher.url}")
    for line in dispatcher.log_path.read_text(errors="replace").splitlines():
        if "embedded mode" in line:
            say(f"[dim]           {line.split('gpuq.main: ')[-1].split('  action=')[0].strip()}[/]")

    _producer_env(rs.url, tag)
    from producer.enqueue import close_clients

    on_exit(close_clients)
    return Stack(tag, workdir, rs, fleet, dispatcher)


def _producer_env(redis_url: str, tag: str) -> None:
    """The Lambda handler reads its settings from the environment, as in AWS: only the demo's apply."""
    for name in ProducerSettings.model_fields:
        os.environ.pop(name.upper(), None)
    os.environ |= {"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": f"{tag}:", "TASK_QUEUES": tag}
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")  # a log line per delivery would drown the view
    from producer.settings import get_settings

    get_settings.cache_clear()


def _stopping(say: Say, what: str, stop: Callable[[], object]) -> None:
    try:
        code = stop()
    except Exception as exc:  # keep stopping the rest
        say(f"[red]could not stop {what}: {exc}[/]")
        return
    say(f"stopped {what}" + (f", exit code {code}" if isinstance(code, int) else ""))


def _drop_keys(say: Say, url: str, tag: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(f"{tag}*"))
        if keys:
            client.delete(*keys)
        say(f"removed the demo's {len(keys)} Redis keys ({tag}*)")
    except redis.RedisError as exc:
        say(f"[red]could not remove the demo's Redis keys ({tag}*): {exc}[/]")
    finally:
        client.close()
