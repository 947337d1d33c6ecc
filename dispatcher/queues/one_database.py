"""The dispatchers of one Redis key prefix share its queues and its GPUs, so they must share one database.

Each books the GPUs' slots in its own tables: two databases on one prefix give a GPU twice its slots (an
outside trial: a second machine without DATABASE_URL fell back to embedded SQLite and put 8 jobs on 4-slot
GPUs). Every dispatcher says its database (``db/identity.py``) under ``Keys.owner_databases``: its heartbeat
does, and its start does before it looks at the others' (with ``Keys.starting`` until the heartbeat runs),
so that of two starting at once the second to look sees the first. ``preflight.py`` refuses the start.
"""

from __future__ import annotations

from typing import Any

from dispatcher.queues.presence import as_str
from producer.keys import Keys

#: How long a start's mark (``Keys.starting``) lasts: past the time from its look to its first heartbeat.
STARTING_SECONDS = 60


def say_and_look(
    client: Any, keys: Keys, me: str, ours: str
) -> tuple[bool, tuple[str, str, int | None] | None]:
    """Say our database (unless a live process holds our id: a twin, refused later by its claim, whose entry
    is its own), then look for a live or starting dispatcher of another one: (said, (its id, its database,
    None when it runs or the seconds its start's mark has left) or None). A start refused here takes back
    what it said: it blocks nobody."""
    said = False
    if not client.exists(keys.alive(me)):
        client.set(keys.starting(me), "1", ex=STARTING_SECONDS)
        client.hset(keys.owner_databases, me, ours)
        said = True
    others = {as_str(k): as_str(v) for k, v in client.hgetall(keys.owner_databases).items()}
    other = next(
        (
            (who, theirs, lapse)
            for who, theirs in sorted(others.items())
            if who != me and theirs != ours
            for lapse in [_starting_for(client, keys, who)]
            if lapse != 0
        ),
        None,
    )
    if other is not None and said:
        unsay(client, keys, me)
    return said, other


def _starting_for(client: Any, keys: Keys, who: str) -> int | None:
    """None when ``who`` runs (its heartbeat is alive), else the seconds left of its start's mark (0: none).
    A start killed between its look and its first heartbeat leaves the mark until it lapses: the refusal
    says how long (an outside trial waited a minute for a reason it was not told)."""
    if client.exists(keys.alive(who)):
        return None
    return max(int(client.ttl(keys.starting(who))), 0)


def unsay(client: Any, keys: Keys, me: str) -> None:
    client.delete(keys.starting(me))
    client.hdel(keys.owner_databases, me)
