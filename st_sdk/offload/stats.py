"""What an expert cache did: hits, misses, bytes read, time the compute waited (ExpertCache.stats)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OffloadStats:
    hits: int = 0              # expert already resident when the MoE needed it
    prefetch_hits: int = 0     # ... because the router's prefetch brought it in time
    misses: int = 0            # read on demand, the MoE waited for all of it
    late: int = 0              # prefetched but still in flight when needed
    bytes_read: int = 0
    reads: int = 0
    stall_s: float = 0.0       # time the compute thread waited for I/O
    evictions: int = 0
    ahead: int = 0             # reads started for the next layer from this layer's input (lookahead)

    @property
    def lookups(self) -> int:
        return self.hits + self.misses + self.late

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else float("nan")

    def as_dict(self) -> dict:
        return {"hits": self.hits, "prefetch_hits": self.prefetch_hits, "misses": self.misses,
                "late": self.late, "hit_rate": self.hit_rate, "bytes_read": self.bytes_read,
                "reads": self.reads, "stall_s": self.stall_s, "evictions": self.evictions, "ahead": self.ahead}
