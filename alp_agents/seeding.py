"""One way to derive seeds: a stable hash of the parts that make a random draw distinct.

    derive_seed(base_seed, episode, turn, bits=31)      # a generate request (fits every engine's seed type)
    derive_seed(seed, update, micro_batch, rank)        # ALP's noise draw (63 bits)

The same parts give the same seed in every process and Python version (no `hash()`, which is salted).
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str, bits: int = 63) -> int:
    """A `bits`-bit seed (bits = 8k - 1: 31 or 63) that differs for every combination of `parts`."""
    if (bits + 1) % 8:
        raise ValueError(f"bits must be 8k - 1 (e.g. 31 or 63), got {bits}")
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=(bits + 1) // 8).digest()
    return int.from_bytes(digest, "little") >> 1
