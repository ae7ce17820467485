"""kd_cache: run a multimodal teacher once and cache what LLaVA-KD's losses need. See docs/cache-format.md."""

from kd_cache.format import FORMAT_VERSION
from kd_cache.reader import Cache, Position, open_cache

__all__ = ["FORMAT_VERSION", "Cache", "Position", "open_cache"]
