"""Size limits that keep one job's or one GPU's content from breaking the dispatcher's writes.

MySQL/MariaDB refuse a statement bigger than ``max_allowed_packet`` by dropping the connection ("server has
gone away"): that looks like an outage, so it was retried forever (a 20 MB job blocked every job behind it;
eight 7 MiB results in one group commit were answered 503 round after round). The dispatcher reads the packet
size at start and keeps what one statement carries under it:

- ``room``: content bytes one statement may carry: half the packet (the driver may escape every byte) less
  1 MiB for the rest of the statement (PyMySQL packs a batch of inserted rows up to 1 MB plus one row);
- a job: ``MAX_JOB_BYTES``, at most ``room`` (a bigger one is dead-lettered with the reason);
- a result: ``MAX_RESULT_BYTES``, at most ``room`` (a bigger one fails its attempt with the reason);
- a group commit of attempt endings: as many as ``room`` holds, at least one.

Error texts go to TEXT columns (65,535 bytes on MySQL): they are cut to fit, with a marker saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dispatcher.db.attempts import EncodedJson

_MIB = 1024 * 1024
#: What a statement needs besides the content it carries, and what an unknown packet size is taken to be.
_STATEMENT_MARGIN = _MIB
_DEFAULT_PACKET = 16 * _MIB  # MariaDB's default; MySQL 8's is 64 MiB


@dataclass(frozen=True, slots=True)
class Limits:
    job_bytes: int
    result_bytes: int
    batch_bytes: int  # results and errors committed in one group commit at most (one item always goes)

    @classmethod
    def for_packet(cls, packet: int | None, *, max_job_bytes: int, max_result_bytes: int) -> Limits:
        """``packet`` is the database's max_allowed_packet; None for a database without one (SQLite)."""
        if packet is None:
            return cls(max_job_bytes, max_result_bytes, 64 * _MIB)
        room = max(packet // 4, (packet - _STATEMENT_MARGIN) // 2)
        return cls(min(max_job_bytes, room), min(max_result_bytes, room), room)

    @classmethod
    def default(cls) -> Limits:
        return cls.for_packet(_DEFAULT_PACKET, max_job_bytes=256 * 1024, max_result_bytes=8 * _MIB)


def encode_result(result: Any, limit: int) -> tuple[EncodedJson | None, str | None]:
    """The result as the database stores it, or why it cannot be stored (too large, not JSON)."""
    if result is None:
        return None, None
    try:
        # NaN and Infinity are no JSON: stored, no strict reader (a browser, MySQL) could read them back
        text = EncodedJson(json.dumps(result, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        return None, f"the result cannot be stored as JSON ({type(exc).__name__}: {exc})"
    if len(text) > limit:
        return None, (
            f"the result is {len(text)} bytes as JSON, more than the {limit} bytes a result may take "
            "(MAX_RESULT_BYTES, or the database's max_allowed_packet)"
        )
    return text, None


def item_bytes(item: dict[str, Any]) -> int:
    """Content bytes an attempt ending adds to a group commit's statement."""
    result, error = item.get("result"), item.get("error")
    return (len(result) if isinstance(result, str) else 0) + (
        len(error.encode("utf-8", "replace")) if error else 0
    )
