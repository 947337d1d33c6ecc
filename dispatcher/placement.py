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
class SlotView:
    gpu_id: str
    slot_index: int
    url: str
    pool: str
    free: bool


@dataclass(frozen=True, slots=True)
class Pick:
    gpu_id: str
    slot_index: int
    url: str


class Placer:
    """Hands out free slots of a snapshot, least-loaded GPU first, counting its own picks as load."""

    def __init__(self, slots: Iterable[SlotView], rng: random.Random | None = None) -> None:
        rng = rng or random.Random()  # noqa: S311 - tie-breaking, not crypto
        busy: dict[str, int] = defaultdict(int)
        free: dict[str, list[int]] = defaultdict(list)
        meta: dict[str, tuple[str, str]] = {}
        for s in slots:
            meta[s.gpu_id] = (s.url, s.pool)
            if s.free:
                free[s.gpu_id].append(s.slot_index)
            else:
                busy[s.gpu_id] += 1
        self._meta = meta
        self._busy = busy
        self._free = {gpu: sorted(indexes, reverse=True) for gpu, indexes in free.items()}
        self._heaps: dict[str, list[tuple[int, float, str]]] = defaultdict(list)
        for gpu in self._free:
            heapq.heappush(self._heaps[meta[gpu][1]], (busy[gpu], rng.random(), gpu))
        self._rng = rng

    def free_in(self, pool: str) -> int:
        return sum(len(self._free[gpu]) for _, _, gpu in self._heaps.get(pool, ()))

    def take(self, pool: str) -> Pick | None:
        heap = self._heaps.get(pool)
        if not heap:
            return None
        _, _, gpu = heapq.heappop(heap)
        slot_index = self._free[gpu].pop()
        self._busy[gpu] += 1
        if self._free[gpu]:
            heapq.heappush(heap, (self._busy[gpu], self._rng.random(), gpu))
        return Pick(gpu_id=gpu, slot_index=slot_index, url=self._meta[gpu][0])
