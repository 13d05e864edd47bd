"""allocator.map_large_blocks: freed tensor-sized blocks go back to the operating system."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loracombench.allocator import map_large_blocks

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# Frees a 4 MB block (glibc then serves blocks up to 4 MB from its heap), allocates 64 blocks of
# 2 MB with a small live object after each, frees the large ones and prints the kB returned.
FRAGMENTS = r"""
import sys
from loracombench.allocator import map_large_blocks
if sys.argv[1] == "fixed":
    assert map_large_blocks()
def anonymous_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])
first = bytearray(4 << 20)
del first
blocks, small = [], []
for _ in range(64):
    blocks.append(bytearray(2 << 20))
    small.append(bytearray(1000))
before = anonymous_kb()
del blocks
print(before - anonymous_kb())
"""


def returned_kb(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", FRAGMENTS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout)


@glibc
def test_fixed_threshold_returns_freed_large_blocks_that_glibc_would_keep():
    assert returned_kb("fixed") > 100_000  # the 128 MB of blocks, unmapped on free
    assert returned_kb("default") < 50_000  # glibc's own threshold kept them in its heap


@glibc
def test_a_threshold_the_user_set_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert map_large_blocks() is False
