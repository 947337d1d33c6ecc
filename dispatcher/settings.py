"""The dispatcher's settings: the seed's variable names plus gpuq's own (SPEC §2), from the environment and
``.env``. A missing or malformed one stops the process at start with one line naming the variable."""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from functools import cached_property
from urllib.parse import quote, urlsplit

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from dispatcher.gpus.endpoints import DEFAULT_POOL, GpuEndpoint, parse_gpu_endpoints
from dispatcher.queues.presence import new_instance
from producer.settings import QueueSettings, parse_pairs

HOUR = 3600.0
DAY = 24 * HOUR
# Durations are added to datetimes: past these bounds (or inf) every lease, backoff and expiry would overflow,
# and every job be dead-lettered ("cannot convert float infinity to integer") instead of the start refused.
_LEVELS = ("CRITICAL", "FATAL", "ERROR", "WARNING", "WARN", "INFO", "DEBUG", "NOTSET")  # Python's names


def _default_dispatcher_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class StoreSettings(QueueSettings):
    """Where the state lives (Redis, the database) and the fleet-wide defaults: what the dispatcher and the
    operator CLI share. The CLI loads only this, so it works without the dispatcher's CALLBACK_SECRET."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=False, env_ignore_empty=True, allow_inf_nan=False
    )

    database_url: str | None = None
    db_host: str | None = None
    db_port: int = Field(default=3306, ge=1, le=65535)
    db_name: str = "queue_system"
    db_user: str = "root"
    db_password: SecretStr = SecretStr("")
    slots_per_gpu: int = Field(default=4, ge=1, le=1024)
    max_attempts: int = Field(default=3, ge=1, le=100)

    @field_validator("database_url")
    @classmethod
    def _check_db_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("mysql", "mariadb", "sqlite")):
            raise ValueError("must be a mysql+pymysql://… or sqlite:///… URL")
        if value and value.startswith(("mysql://", "mariadb://", "mysql+mysqldb://")):
            # SQLAlchemy's default MySQL driver (MySQLdb) is not installed: PyMySQL is.
            raise ValueError("use mysql+pymysql://… (gpuq talks to MySQL/MariaDB through PyMySQL)")
        return value or None

    @cached_property
    def all_queues(self) -> list[str]:
        """TASK_QUEUES plus the queues routed types are sent to (one per pool), without repeats."""
        queues = list(self.queues)
        for pool in parse_pairs(self.task_routes, "TASK_ROUTES").values():
            if pool not in queues:
                queues.append(pool)
        return queues

    def db_url(self) -> str:
        """DATABASE_URL, else one built from the seed's DB_* parts, else the embedded SQLite file."""
        if self.database_url:
            return self.database_url
        if self.db_host:
            pw = quote(self.db_password.get_secret_value(), safe="")
            auth = quote(self.db_user, safe="") + (f":{pw}" if pw else "")
            return f"mysql+pymysql://{auth}@{self.db_host}:{self.db_port}/{self.db_name}"
        return "sqlite:///.gpuq/gpuq.db"


class DispatcherSettings(StoreSettings):
    gpu_endpoints: str = ""
    queue_weights: str = ""
    callback_url: str | None = None
    callback_host: str = "0.0.0.0"  # noqa: S104 - GPU services call back from other machines
    callback_port: int = Field(default=8000, ge=0, le=65535)
    callback_secret: SecretStr | None = None
    bearer_token: SecretStr = SecretStr("")
    api_token: SecretStr | None = None
    #: When set, GET /metrics needs ``Authorization: Bearer <METRICS_TOKEN>``.
    metrics_token: SecretStr | None = None
    #: Open HTTP connections at most (event streams included); more are closed at once. Lowered at start
    #: to what the open-file limit allows (see dispatcher/http/edge_limits.py).
    http_max_connections: int = Field(default=4096, ge=16, le=1_000_000)
    #: A request's headers and body must arrive within this many seconds of its first byte (slowloris).
    request_read_timeout_seconds: float = Field(default=10.0, gt=0, le=HOUR)
    #: GET /tasks/{id}/events streams plus POST /v1/embeddings waits at once per process; more get 429.
    event_listeners_max: int = Field(default=3072, ge=1)
    #: A GPU's answer to the job's POST is read up to this many bytes; a longer one fails the attempt.
    gpu_answer_max_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    #: GET /tasks/{id}/result serves a task's result this long after it ended (by ``finished_at``).
    result_ttl_seconds: float = Field(default=86400.0, gt=0, le=365 * DAY)
    #: A GPU's result larger than this (as JSON) fails its attempt with a clear error instead of being
    #: stored; the dispatcher lowers it to what the database's max_allowed_packet takes.
    max_result_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=1 << 30)

    task_timeout_seconds: float = Field(default=900.0, gt=0, le=30 * DAY)
    #: Largest ``partial`` a ``running`` callback may carry (its JSON, in bytes); a larger one is 413.
    partial_max_bytes: int = Field(default=65536, ge=1, le=8 * 1024 * 1024)
    retry_backoff_seconds: float = Field(default=2.0, ge=0, le=30 * DAY)
    retry_backoff_max_seconds: float = Field(default=300.0, ge=0, le=30 * DAY)
    gpu_request_timeout_seconds: float = Field(default=30.0, gt=0, le=DAY)
    gpu_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=HOUR)
    gpu_failure_threshold: int = Field(default=3, ge=1)
    gpu_probe_seconds: float = Field(default=5.0, gt=0, le=HOUR)
    #: A pull GPU whose agent has not polled for this long is out of rotation (SPEC §9).
    agent_stale_seconds: float = Field(default=60.0, gt=0, le=DAY)
    dispatch_batch_size: int = Field(default=64, ge=1, le=1000)
    #: Jobs per pool kept ready for slot hand-off (dispatcher/loop/ready.py); 0 turns hand-off off. A job of
    #: higher priority enqueued later can start behind at most this many jobs of its pool.
    handoff_buffer: int = Field(default=32, ge=0, le=1000)
    #: Buffered jobs are also recorded as standbys of this process's busy slots and sent the moment the
    #: slot's holder calls back (dispatcher/loop/standbys.py); needs HANDOFF_BUFFER > 0; false: hand-off only.
    standby_jobs: bool = True
    #: Group-commit batches of attempt endings in flight at once, each on a database connection of its own
    #: (dispatcher/db/hot.py): the next batch runs its statements while the previous one commits. SQLite:
    #: always 1. Default 1: 2 raised the overhead-bound rate by a fifth to a third on the 2-core benchmark box
    #: and cost the 100 ms and 40 ms runs about 0.01 of efficiency (bench/RESULTS.md, 2026-12-02).
    commit_pipeline: int = Field(default=1, ge=1, le=8)
    #: Below 10 ms an idle dispatcher would spin (it looks for jobs pushed without a wake-up this often).
    idle_poll_seconds: float = Field(default=0.5, ge=0.01, le=60)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=HOUR)
    dispatcher_id: str = Field(default_factory=_default_dispatcher_id)
    #: A local directory for the journal of sent requests (dispatcher/sent_journal.py).
    state_dir: str = ".gpuq"
    #: false: no journal (after a kill -9, jobs recorded but never sent hold their slots until their lease).
    sent_journal: bool = True
    log_level: str = "INFO"
    # This process among all that ever had its DISPATCHER_ID (queues/presence.py ``claim``): not a setting.
    _instance: str = PrivateAttr(default_factory=new_instance)
    log_format: str = "json"

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.upper() not in _LEVELS:
            raise ValueError(f"{value!r} is not a log level: one of {', '.join(_LEVELS)}")
        return value.upper()

    @field_validator("queue_weights")
    @classmethod
    def _check_weights(cls, value: str) -> str:
        for queue, weight in parse_pairs(value, "QUEUE_WEIGHTS").items():
            if not weight.isdigit() or not 1 <= int(weight) <= 100:
                raise ValueError(f"{queue}={weight}: a weight is a whole number from 1 to 100")
        return value

    @model_validator(mode="after")
    def _backoff_under_its_cap(self) -> DispatcherSettings:
        # The cap won silently: RETRY_BACKOFF_SECONDS=600 with the default cap of 300 waited 300 s (a trial).
        if self.retry_backoff_seconds > self.retry_backoff_max_seconds:
            raise ValueError(
                f"RETRY_BACKOFF_SECONDS ({self.retry_backoff_seconds:g}) is above RETRY_BACKOFF_MAX_SECONDS"
                f" ({self.retry_backoff_max_seconds:g}), the cap of every wait: raise the cap, or lower it"
            )
        return self

    @model_validator(mode="after")
    def _one_authorization(self) -> DispatcherSettings:
        # A request has one Authorization header: with BEARER_TOKEN set, a URL's user:password@ cannot be
        # sent (aiohttp refuses the pair), and every job to that GPU would be refused.
        if self.bearer_token.get_secret_value():
            for ep in self.endpoints:
                if urlsplit(ep.url).username is not None:
                    raise ValueError(
                        f"GPU {ep.gpu_id}: its URL carries credentials (user:password@) and BEARER_TOKEN is"
                        " set; a request has one Authorization header: drop one of them"
                    )
        return self

    @model_validator(mode="after")
    def _weights_name_queues(self) -> DispatcherSettings:
        unknown = set(self.weights) - set(self.all_queues)
        if unknown:
            raise ValueError(f"QUEUE_WEIGHTS names queues that are not served: {sorted(unknown)}")
        return self

    @property
    def instance(self) -> str:
        return self._instance

    @property
    def weights(self) -> dict[str, int]:
        """Queue -> weight in the round-robin over queues (default 1)."""
        return {q: int(w) for q, w in parse_pairs(self.queue_weights, "QUEUE_WEIGHTS").items()}

    @field_validator("gpu_endpoints")
    @classmethod
    def _check_endpoints(cls, value: str) -> str:
        parse_gpu_endpoints(value)
        return value

    @field_validator("callback_host")
    @classmethod
    def _bare_host(cls, value: str) -> str:
        """``[::1]`` is how an IPv6 address is written in a URL; a socket takes it bare (a trial: brackets
        stopped the start with "Name or service not known")."""
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            return value[1:-1]
        return value

    @field_validator("callback_url")
    @classmethod
    def _check_callback_url(cls, value: str | None) -> str | None:
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value or None

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        if value not in ("json", "text"):
            raise ValueError("must be json or text")
        return value

    @model_validator(mode="after")
    def _secret_required(self) -> DispatcherSettings:
        if self.callback_secret is None or len(self.callback_secret.get_secret_value()) < 16:
            raise ValueError("CALLBACK_SECRET must be set to a random string of at least 16 characters")
        if not _random_enough(self.callback_secret.get_secret_value()):
            raise ValueError(
                "CALLBACK_SECRET does not look random (fewer than 4 different characters): use e.g."
                " `openssl rand -hex 32`"
            )
        token = self.api_secret
        if token is not None and (problem := _header_problem(token)) is not None:
            # it travels in an HTTP header: one that no request can carry would lock every client out with
            # a 401 nobody can explain (an outside trial: a pasted trailing space, a newline, an "é")
            raise ValueError(f"API_TOKEN {problem}: it must be sent as `Authorization: Bearer <API_TOKEN>`")
        if token is not None and not _random_enough(token):
            # "API_TOKEN=short" was taken (an outside trial), guarding task data, results and GPU time
            raise ValueError(
                "API_TOKEN must be a random string of at least 16 characters (e.g. `openssl rand -hex 32`),"
                " or none for an API open on purpose"
            )
        return self

    @cached_property
    def endpoints(self) -> list[GpuEndpoint]:
        return parse_gpu_endpoints(self.gpu_endpoints)

    def pool_for(self, task_type: str) -> str:
        return self.routes.get(task_type, DEFAULT_POOL)

    @property
    def secret(self) -> bytes:
        assert self.callback_secret is not None  # checked by _secret_required
        return self.callback_secret.get_secret_value().encode()

    @property
    def api_secret(self) -> str | None:
        """API_TOKEN, or None when the API is open: API_TOKEN unset or ``none`` (see open_api_refusal)."""
        value = self.api_token.get_secret_value() if self.api_token is not None else ""
        return None if value in ("", "none") else value

    def open_api_refusal(self) -> str | None:
        """Why this dispatcher must not start with an open API, or None. Outside embedded mode (SQLite) a
        dispatcher listening beyond loopback needs API_TOKEN, or ``API_TOKEN=none`` said on purpose: task
        data and results, GPU URLs and /v1/embeddings (GPU time) would be open to the network."""
        if self.api_token is not None or self.db_url().startswith("sqlite") or self._on_loopback():
            return None
        return (
            f"API_TOKEN: not set while listening on {self.callback_host}; set a token, "
            "or API_TOKEN=none to serve /tasks, /gpus, events and /v1/embeddings without one"
        )

    def standby_warning(self) -> str | None:
        """What to log at start when STANDBY_JOBS=true was asked for but cannot be: standbys are jobs of the
        hand-off buffer, which HANDOFF_BUFFER=0 turns off (an outside review found it silently ignored)."""
        if "standby_jobs" in self.model_fields_set and self.standby_jobs and self.handoff_buffer == 0:
            return (
                "STANDBY_JOBS=true has no effect with HANDOFF_BUFFER=0: standby jobs are off (they are jobs"
                " of the hand-off buffer)"
            )
        return None

    def lease_warning(self) -> str | None:
        """What to log at start when TASK_TIMEOUT_SECONDS is shorter than GPU_REQUEST_TIMEOUT_SECONDS: a lease
        that runs out while the GPU may still work frees a slot in use, and that GPU gets more jobs than its
        slots (an outside trial: a 0.05 s lease and 0.2-1 s jobs put 9 jobs on 4 slots). Not refused: tests
        and fast fleets use short leases knowingly."""
        lease, request = self.task_timeout_seconds, self.gpu_request_timeout_seconds
        if lease >= request:
            return None
        return (
            f"TASK_TIMEOUT_SECONDS={lease:g} is shorter than GPU_REQUEST_TIMEOUT_SECONDS={request:g}: a lease"
            " that runs out while a GPU still works on its job frees a slot in use, so that GPU gets more"
            " jobs than its slots, and the job runs again; make the lease longer than any job takes"
        )

    def open_api_warning(self) -> str | None:
        """What to log at start when the API is open to the network (``API_TOKEN=none``, or embedded mode
        without a token, beyond loopback): the operator chose it, but must see it. None otherwise."""
        if self.api_secret is not None or self._on_loopback():
            return None
        return (
            f"the API is open: no API_TOKEN while listening on {self.callback_host}; anyone who can reach it "
            "reads task data and results and GPU URLs, and spends GPU time through /v1/embeddings"
        )

    def _on_loopback(self) -> bool:
        host = self.callback_host
        try:
            return host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def public_callback_url(self) -> str:
        if self.callback_url:
            return self.callback_url
        # The wildcard's loopback of its family: "::" listens on IPv6 only (as asyncio binds it), so
        # 127.0.0.1 reached nothing there (a review). An IPv6 literal goes in brackets.
        loopback = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}  # noqa: S104 - not a bind
        host = loopback.get(self.callback_host, self.callback_host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.callback_port}/callback"


def _random_enough(value: str) -> bool:
    """16 characters at least, 4 different ones at least, whitespace not counted. Twenty spaces or
    "aaaa..." passed a length rule alone (an outside trial): anyone could sign; so did "abcd" and twelve
    spaces (another). Four, not more: 16 random hex digits show fewer than 8 different ones in 1 draw of
    100 (a review)."""
    seen = "".join(value.split())
    return len(seen) >= 16 and len(set(seen)) >= 4


def _header_problem(token: str) -> str | None:
    """Why a request could never carry this token in its Authorization header, or None. A header is
    latin-1 text without control characters (a client sends UTF-8 bytes that the server reads as latin-1,
    so an "é" never matches), and its value's surrounding whitespace is stripped on the way."""
    if token != token.strip():
        return "begins or ends with whitespace"
    bad = next((c for c in token if not " " <= c <= "~"), None)
    if bad is not None:
        return f"holds {bad!r}, which is not a printable ASCII character"
    return None
