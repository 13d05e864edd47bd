"""How this process returns freed tensor memory to the operating system.

glibc's malloc hands out blocks of 128 KB and more as separate mappings, but raises that
threshold (up to 32 MB) each time such a block is freed. After a few training steps the
activation tensors (a few MB each) come from the heap instead, where freed blocks stay mapped
between live small ones, and the peak RSS grows with the fragments: on the default run's GSM8K
training, about 0.9 GB. Fixing the threshold keeps every block of 1 MB or more its own mapping,
unmapped when the tensor is freed. Allocation only: no number changes.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MAPPED_FROM_BYTES = 1 << 20


def map_large_blocks(threshold: int = MAPPED_FROM_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process; whether it was set. Left alone where the user
    set MALLOC_MMAP_THRESHOLD_ (glibc reads it at start-up) and off glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
