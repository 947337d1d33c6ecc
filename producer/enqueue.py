"""The producer's only Redis code: push the jobs of one delivery, one atomic round trip per queue.

A Lua script does, for each job in order, ``SET <mark> <task_id> NX EX <ttl>`` (IDEMPOTENCY_TTL_SECONDS)
and, only when the mark is new, ``RPUSH <queue list> <job>``; then one ``PUBLISH <wake> job``. Being one
script, a crash (of Redis, the Lambda, the network) cannot leave a mark without its job, which would drop
the task on redelivery, nor a job without its mark, which would run it twice. Every key is type-checked
before the first write, because an error half way through a script does not undo the writes before it.

On a Redis Cluster a script may touch one slot only: a queue's keys share one (``producer.keys``), and a
delivery spanning queues runs the script once per queue. When a later queue fails after an earlier one was
pushed, the delivery is answered as not enqueued and its retry finds the earlier jobs' marks: nothing runs
twice, nothing is lost. On one Redis the whole delivery stays one script, all or nothing.

``REDIS_WAIT_REPLICAS=n``: each script is followed, on its connection, by ``WAIT n timeout``; fewer
acknowledgements make the delivery "not durably enqueued" (503, an SQS item failure), retried safely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from producer.connect import check_replicas, refresh_slots, sync_client, wait_options
from producer.errors import QueueUnavailable
from producer.events import Planned
from producer.keys import IDEMPOTENCY_TTL_SECONDS, Keys, Legacy, queue_key, scope
from producer.password import fetch_password
from producer.settings import ProducerSettings

# KEYS: per job i (1-based) KEYS[3i-2] its queue list, KEYS[3i-1] its idempotency mark, KEYS[3i] the mark's
# name before issue 15 (honoured, never written; the same as KEYS[3i-1] on a cluster, where no old mark
# can exist). ARGV: [1] wake channel, [2] mark TTL in seconds, then per job ARGV[2i+1] task_id, ARGV[2i+2]
# job JSON. Returns per job {task_id, 1} when pushed now, {task_id of the first delivery, 0} when marked.
PUSH_LUA = """
local n = #KEYS / 3
for i = 1, n do
  local qtype = redis.call('TYPE', KEYS[3*i-2])['ok']
  if qtype ~= 'none' and qtype ~= 'list' then
    return redis.error_reply('WRONGTYPE queue key ' .. KEYS[3*i-2] .. ' holds a ' .. qtype .. ', not a list')
  end
  for _, mark in ipairs({KEYS[3*i-1], KEYS[3*i]}) do
    local mtype = redis.call('TYPE', mark)['ok']
    if mtype ~= 'none' and mtype ~= 'string' then
      return redis.error_reply('WRONGTYPE mark key ' .. mark .. ' holds a ' .. mtype)
    end
  end
end
local out, pushed = {}, 0
for i = 1, n do
  local task_id = ARGV[2*i+1]
  local old = redis.call('GET', KEYS[3*i])
  if old then
    out[i] = {old, 0}
  elseif redis.call('SET', KEYS[3*i-1], task_id, 'NX', 'EX', ARGV[2]) then
    redis.call('RPUSH', KEYS[3*i-2], ARGV[2*i+2])
    pushed = pushed + 1
    out[i] = {task_id, 1}
  else
    out[i] = {redis.call('GET', KEYS[3*i-1]), 0}
  end
end
if pushed > 0 then
  redis.call('PUBLISH', ARGV[1], 'job')
end
return out
"""

# Lambda bills the wait: a Redis that does not answer within a few seconds is down for this invocation,
# and SQS / the API caller / Lambda's async retry will try again later.
_CONNECT_TIMEOUT_S = 2.0
_SOCKET_TIMEOUT_S = 5.0
_RETRY = Retry(ExponentialBackoff(cap=0.25, base=0.05), retries=2)

_clients: dict[tuple[str, str | None, bool], redis.Redis] = {}


@dataclass(frozen=True, slots=True)
class Pushed:
    task_ids: list[str]  # in the delivery's order; a redelivered task's id is the first delivery's
    duplicates: int  # tasks not pushed because an earlier delivery already had


def by_queue(planned: Sequence[Planned], *, cluster: bool) -> list[list[int]]:
    """Indexes of ``planned`` grouped by the queue's keys (one cluster slot each), in first-seen order; on
    one Redis a single group: the whole delivery in one script, all or nothing."""
    if not cluster:
        return [list(range(len(planned)))]
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(planned):
        groups.setdefault(scope(item.job.queue), []).append(i)
    return list(groups.values())


def push(planned: Sequence[Planned], settings: ProducerSettings) -> Pushed:
    """Push all jobs or raise QueueUnavailable (then some may be queued; a retry is idempotent)."""
    if not planned:
        return Pushed([], 0)
    keys = Keys(settings.redis_key_prefix)
    try:
        client = _client(settings)
    except (redis.RedisError, RedisClusterException) as exc:
        # A cluster client learns the slots in its constructor: a cluster that is down (or a plain Redis
        # under REDIS_CLUSTER=true) fails here, and is as unavailable as a plain Redis that refuses.
        raise QueueUnavailable(detail=f"{type(exc).__name__}: {exc}{_hint(exc, settings)}") from exc
    replies: list[Any] = [None] * len(planned)
    for group in by_queue(planned, cluster=settings.redis_cluster):
        redis_keys, args = push_arguments(
            [planned[i] for i in group],
            keys,
            ttl=settings.idempotency_ttl_seconds,
            legacy=None if settings.redis_cluster else Legacy(settings.redis_key_prefix),
        )
        try:
            pipe: Any = client.pipeline(transaction=False)
            # EVAL, not EVALSHA: one round trip whatever the server's script cache holds (a cluster
            # pipeline cannot load scripts first), and the script is small.
            pipe.execute_command("EVAL", PUSH_LUA, len(redis_keys), *redis_keys, *args)
            if settings.redis_wait_replicas:
                timeout_ms = int(settings.redis_wait_timeout_seconds * 1000)
                pipe.execute_command(
                    "WAIT", settings.redis_wait_replicas, timeout_ms, **wait_options(client, redis_keys[0])
                )
            results = pipe.execute()
        except (redis.RedisError, RedisClusterException) as exc:
            refresh_slots(client)  # a failover: the next delivery goes to the new master
            # Includes a refused connection, a timeout, a wrong password, a read-only replica after a
            # failover and a WRONGTYPE from the check above: in each case this queue's jobs were not
            # pushed (earlier queues' were, and their marks make the retry skip them).
            raise QueueUnavailable(detail=f"{type(exc).__name__}: {exc}{_hint(exc, settings)}") from exc
        if settings.redis_wait_replicas:
            check_replicas(results[1], settings.redis_wait_replicas, "the jobs")
        for i, reply in zip(group, results[0], strict=True):
            replies[i] = reply
    task_ids = [_text(task_id) for task_id, _ in replies]
    return Pushed(task_ids, sum(1 for _, new in replies if not new))


def _hint(exc: Exception, settings: ProducerSettings) -> str:
    """What to fix when REDIS_CLUSTER does not match the Redis: such an error recurs on every push."""
    text = str(exc)
    if settings.redis_cluster and "cluster mode is not enabled" in text.lower():
        return " (REDIS_CLUSTER=true but this Redis is not a cluster: set REDIS_CLUSTER=false)"
    moved = isinstance(exc, (redis.exceptions.MovedError, redis.exceptions.AskError))
    if not settings.redis_cluster and (moved or "don't hash to the same slot" in text):
        return " (this Redis is a cluster node: set REDIS_CLUSTER=true)"
    return ""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def push_arguments(
    planned: Sequence[Planned],
    keys: Keys,
    *,
    ttl: int = IDEMPOTENCY_TTL_SECONDS,
    legacy: Legacy | None = None,
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of ``PUSH_LUA`` for ``planned`` (one queue's on a cluster), marks living ``ttl`` s;
    ``legacy``: also honour marks of the layout before issue 15 (plain Redis only). The dispatcher's HTTP
    intake runs the same script with its own (asyncio) client."""
    redis_keys: list[str] = []
    args: list[Any] = [keys.wake, ttl]
    for item in planned:
        mark = keys.idem(item.job.queue, item.idem_key)
        old = legacy.idem(item.idem_key) if legacy is not None else mark
        redis_keys += [queue_key(item.job.queue, item.job.priority), mark, old]
        args += [item.job.task_id, item.job.to_redis()]
    return redis_keys, args


def _client(settings: ProducerSettings) -> redis.Redis:
    """One client per warm container and Redis address; its pool keeps the connection between calls."""
    password = fetch_password(settings.redis_secret_arn) if settings.redis_secret_arn else None
    dsn = settings.redis_dsn(password)
    cached = _clients.get((dsn, password, settings.redis_cluster))
    if cached is None:
        cached = _clients[dsn, password, settings.redis_cluster] = sync_client(
            dsn,
            cluster=settings.redis_cluster,
            password=password,  # used when REDIS_URL carries none
            decode_responses=True,
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            socket_timeout=_SOCKET_TIMEOUT_S,
            retry=_RETRY,
            # A frozen container's connection may have been dropped by Redis or a NAT: check it after
            # an idle spell rather than fail the first command.
            health_check_interval=30,
        )
    return cached


def close_clients() -> None:
    """Drop the cached clients (tests, the local CLI); Lambda just freezes them with the container."""
    while _clients:
        _, client = _clients.popitem()
        client.close()
