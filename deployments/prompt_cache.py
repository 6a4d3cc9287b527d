"""An LRU cache of prompt embeddings, bounded by entries and by bytes, that counts its hits and misses.

A FaceDetailer workflow sends the same positive and negative prompt with every image, and T5-XXL
takes far longer to run than a dictionary lookup: the shared text encoder
(:mod:`deployments.text_encoder`) keeps each (encoder identity, prompt) it encoded. Keys are
built by the caller; values are :class:`~deployments.families.base.TextConditioning` (their
tensors' bytes are what the byte bound counts). Thread-safe: a Serve replica encodes in worker
threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch

from deployments.families.base import TextConditioning

__all__ = ["PromptEmbeddingCache", "conditioning_bytes"]


def conditioning_bytes(value: TextConditioning) -> int:
    """Bytes held by an entry's tensors (context, and pooled if any)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in value if isinstance(tensor, torch.Tensor))


class PromptEmbeddingCache:
    """Least recently used first out, once there are more than ``max_entries`` or more than ``max_bytes``.

    An entry larger than ``max_bytes`` on its own is not kept (it would evict everything else).
    ``max_entries`` 0 disables the cache (every lookup a miss).
    """

    def __init__(self, max_entries: int = 1024, max_bytes: int = 512 * 1024 * 1024) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("max_entries and max_bytes must be >= 0")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[Hashable, tuple[TextConditioning, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> TextConditioning | None:
        """The entry (now the most recently used), counted as a hit; None counted as a miss."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found[0]

    def put(self, key: Hashable, value: TextConditioning) -> None:
        size = conditioning_bytes(value)
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[1]
            if self.max_entries == 0 or size > self.max_bytes:
                return
            self._entries[key] = (value, size)
            self.bytes += size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted
                self.evictions += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": round(self.hits / lookups, 4) if lookups else None,
                "entries": len(self._entries),
                "bytes": self.bytes,
                "evictions": self.evictions,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
            }
