"""The producer's only Redis code: push the jobs of one delivery in one atomic round trip.

A Lua script does, for each job in order, ``SET <mark> <task_id> NX EX <ttl>`` (IDEMPOTENCY_TTL_SECONDS)
and, only when the mark is new, ``RPUSH <queue list> <job>``; then one ``PUBLISH <wake> job``. Being one
script, a crash (of Redis, the Lambda, the network) cannot leave a mark without its job, which would drop
the task on redelivery, nor a job without its mark, which would run it twice. Every key is type-checked
before the first write, because an error half way through a script does not undo the writes before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry

from producer.errors import QueueUnavailable
from producer.events import Planned
from producer.keys import IDEMPOTENCY_TTL_SECONDS, Keys, queue_key
from producer.password import fetch_password
from producer.settings import ProducerSettings

# KEYS: per job i (1-based) KEYS[2i-1] its queue list, KEYS[2i] its idempotency mark.
# ARGV: [1] wake channel, [2] mark TTL in seconds, then per job ARGV[2i+1] task_id, ARGV[2i+2] job JSON.
# Returns per job {task_id, 1} when pushed now, {task_id of the first delivery, 0} when already marked.
PUSH_LUA = """
local n = #KEYS / 2
for i = 1, n do
  local qtype = redis.call('TYPE', KEYS[2*i-1])['ok']
  if qtype ~= 'none' and qtype ~= 'list' then
    return redis.error_reply('WRONGTYPE queue key ' .. KEYS[2*i-1] .. ' holds a ' .. qtype .. ', not a list')
  end
  local mtype = redis.call('TYPE', KEYS[2*i])['ok']
  if mtype ~= 'none' and mtype ~= 'string' then
    return redis.error_reply('WRONGTYPE mark key ' .. KEYS[2*i] .. ' holds a ' .. mtype)
  end
end
local out, pushed = {}, 0
for i = 1, n do
  local task_id = ARGV[2*i+1]
  if redis.call('SET', KEYS[2*i], task_id, 'NX', 'EX', ARGV[2]) then
    redis.call('RPUSH', KEYS[2*i-1], ARGV[2*i+2])
    pushed = pushed + 1
    out[i] = {task_id, 1}
  else
    out[i] = {redis.call('GET', KEYS[2*i]), 0}
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

_clients: dict[tuple[str, str | None], tuple[redis.Redis, Script]] = {}


@dataclass(frozen=True, slots=True)
class Pushed:
    task_ids: list[str]  # in the delivery's order; a redelivered task's id is the first delivery's
    duplicates: int  # tasks not pushed because an earlier delivery already had


def push(planned: Sequence[Planned], settings: ProducerSettings) -> Pushed:
    """Push all jobs or none; raises QueueUnavailable when Redis cannot take them."""
    if not planned:
        return Pushed([], 0)
    redis_keys, args = push_arguments(
        planned, Keys(settings.redis_key_prefix), ttl=settings.idempotency_ttl_seconds
    )
    client, script = _client(settings)
    try:
        reply = script(keys=redis_keys, args=args, client=client)
    except redis.RedisError as exc:
        # Includes a refused connection, a timeout, a wrong password, a read-only replica after a
        # failover and a WRONGTYPE from the check above: in each case nothing was pushed.
        raise QueueUnavailable(detail=f"{type(exc).__name__}: {exc}") from exc
    task_ids = [str(task_id) for task_id, _ in reply]
    return Pushed(task_ids, sum(1 for _, new in reply if not new))


def push_arguments(
    planned: Sequence[Planned], keys: Keys, *, ttl: int = IDEMPOTENCY_TTL_SECONDS
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of ``PUSH_LUA`` for ``planned``, marks living ``ttl`` seconds (IDEMPOTENCY_TTL_SECONDS);
    the dispatcher's HTTP intake runs the same script with its own (asyncio) client."""
    redis_keys: list[str] = []
    args: list[Any] = [keys.wake, ttl]
    for item in planned:
        redis_keys += [queue_key(item.job.queue, item.job.priority), keys.idem(item.idem_key)]
        args += [item.job.task_id, item.job.to_redis()]
    return redis_keys, args


def _client(settings: ProducerSettings) -> tuple[redis.Redis, Script]:
    """One client per warm container and Redis address; its pool keeps the connection between calls."""
    password = fetch_password(settings.redis_secret_arn) if settings.redis_secret_arn else None
    dsn = settings.redis_dsn(password)
    cached = _clients.get((dsn, password))
    if cached is None:
        client = redis.Redis.from_url(
            dsn,
            password=password,  # used when REDIS_URL carries none
            decode_responses=True,
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            socket_timeout=_SOCKET_TIMEOUT_S,
            retry=_RETRY,
            # A frozen container's connection may have been dropped by Redis or a NAT: check it after
            # an idle spell rather than fail the first command.
            health_check_interval=30,
        )
        cached = _clients[dsn, password] = (client, client.register_script(PUSH_LUA))
    return cached


def close_clients() -> None:
    """Drop the cached clients (tests, the local CLI); Lambda just freezes them with the container."""
    while _clients:
        _, (client, _) = _clients.popitem()
        client.close()
