"""Pull GPUs (SPEC §9): names and agent tokens, shared by the dispatcher, its HTTP edge and the CLI.

A pull GPU cannot be reached: its agent calls out (``POST /agents/{gpu_id}/jobs``) and takes the jobs
placed on its slots. In the ``gpus`` table it is a GPU like any other whose ``url`` is ``pull:<gpu_id>``
(no http URL: nothing is ever POSTed to it, and ``GET /gpus`` shows what it is) and whose
``agent_token_hash`` holds the SHA-256 of its agent token.

The token is 32 random bytes, shown once when it is issued; only its hash is stored, so a database dump
gives no agent's token. SHA-256 and not a slow password hash: the token is random, not a password a
dictionary could guess, and the hash is looked up on every poll.
"""

from __future__ import annotations

import hashlib
import secrets

#: The URL scheme that marks a pull GPU in ``gpus.url``.
PULL_SCHEME = "pull:"
#: Agent tokens start with this, so a leaked one is recognisable (secret scanners, logs).
TOKEN_PREFIX = "gpuq_agent_"  # noqa: S105 - a prefix, not a secret


def pull_url(gpu_id: str) -> str:
    return f"{PULL_SCHEME}{gpu_id}"


def is_pull(url: str) -> bool:
    return url.startswith(PULL_SCHEME)


def new_agent_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_agent_token(token: str) -> str:
    """What the database keeps of a token (hex SHA-256); equal tokens hash equal, so it is looked up by
    index, and a lookup by hash reveals nothing through timing about the token itself."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
