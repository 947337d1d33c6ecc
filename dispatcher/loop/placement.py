"""Choosing slots: the least-loaded GPU of the job's pool that has a free slot, ties spread at random.

Pure and process-local: it only proposes. The database accepts or refuses each proposal (a conditional
UPDATE on the slot row), so a stale view can cost a retry, never a double booking.
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GpuFree:
    """One eligible GPU with at least one free slot, as the database saw it."""

    gpu_id: str
    url: str
    pool: str
    busy: int
    free: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Pick:
    gpu_id: str
    slot_index: int
    url: str


def capacity(snapshot: Iterable[GpuFree]) -> dict[str, int]:
    """Free slots per pool."""
    out: dict[str, int] = defaultdict(int)
    for g in snapshot:
        out[g.pool] += len(g.free)
    return dict(out)


class Placer:
    """Hands out free slots of a snapshot, least-loaded GPU first, counting its own picks as load."""

    def __init__(self, snapshot: Iterable[GpuFree], rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()  # noqa: S311 - tie-breaking, not crypto
        self._gpus: dict[str, GpuFree] = {}
        self._busy: dict[str, int] = {}
        self._free: dict[str, list[int]] = {}
        self._heaps: dict[str, list[tuple[int, float, str]]] = defaultdict(list)
        for g in snapshot:
            self._gpus[g.gpu_id] = g
            self._busy[g.gpu_id] = g.busy
            self._free[g.gpu_id] = sorted(g.free, reverse=True)
            heapq.heappush(self._heaps[g.pool], (g.busy, self._rng.random(), g.gpu_id))

    def take(self, pool: str, avoid: str | None = None) -> Pick | None:
        """A free slot of ``pool``'s least-loaded GPU; of the next one when that is ``avoid`` (the GPU that
        failed the job's last attempt) and another has room. Least-loaded alone, a GPU answering 500 while
        its probes (a GET) succeeded won the retries of the jobs it had just failed, and two tasks failed
        every attempt there with seven healthy GPUs free (an outside trial)."""
        heap = self._heaps.get(pool)
        if not heap:
            return None
        if avoid is not None and heap[0][2] == avoid and len(heap) > 1:
            kept = heapq.heappop(heap)
            _, _, gpu = heapq.heappop(heap)
            heapq.heappush(heap, kept)
        else:
            _, _, gpu = heapq.heappop(heap)
        slot_index = self._free[gpu].pop()
        self._busy[gpu] += 1
        if self._free[gpu]:
            heapq.heappush(heap, (self._busy[gpu], self._rng.random(), gpu))
        return Pick(gpu_id=gpu, slot_index=slot_index, url=self._gpus[gpu].url)
