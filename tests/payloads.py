"""Record bytes for tests whose claims are about sizes: zstd cannot shrink them, so the cache
stores them raw and a record's stored size is its length (tests/test_compression.py covers
records that compress)."""

import random


def incompressible(size: int, seed: object = 0) -> bytes:
    """``size`` pseudo-random bytes, the same for the same ``seed``."""
    return random.Random(f"payload:{seed}:{size}").randbytes(size)
