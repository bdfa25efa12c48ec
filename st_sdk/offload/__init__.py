"""Memory-budget mode: dense weights resident, experts read from the model file on demand into one
cross-layer cache (LFRU or LRU eviction), prefetched as soon as the pre-attention router has picked them."""
from .budget import MemoryPlan, parse_size, plan_memory
from .cache import ExpertCache
from .stats import OffloadStats

__all__ = ["ExpertCache", "MemoryPlan", "OffloadStats", "parse_size", "plan_memory"]
