"""How the process's open-file limit is shared: inbound HTTP connections, requests to GPUs, and the rest.

One limit (``RLIMIT_NOFILE``) covers every socket. Exhausted, it failed jobs that never reached a GPU (each
POST's EMFILE used an attempt) and refused the GPUs' callbacks, so they ran again after their lease (an
outside attack at ``ulimit -n 256`` with 200 GPUs). A fixed reserve of 512 left such a process 16 inbound
connections and unbounded outbound ones. Now each side has a share it keeps to:

- requests to GPUs: a quarter of the limit, at least 16 and at most 4,096 (the client's connection pool
  waits for a free connection past it, which is no failure of the GPU's);
- Redis, the database, log files, the listening socket: ``OTHER``;
- inbound connections (callbacks, agents' polls, the API): what is left, at least 16, and at most
  HTTP_MAX_CONNECTIONS (``edge_limits.raise_open_files``).
"""

from __future__ import annotations

import resource

#: Descriptors for everything but HTTP in and out: Redis and database pools, logs, the listening socket.
OTHER = 128


def soft_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def outbound(soft: int) -> int:
    """Connections to GPUs at most, for an open-file limit of ``soft``."""
    return max(16, min(soft // 4, 4096))


def inbound(soft: int) -> int:
    """Inbound connections the limit leaves room for."""
    return max(16, soft - outbound(soft) - OTHER)
