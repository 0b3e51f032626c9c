"""CPU memory allocator settings for the command line: the same numbers, less time spent getting memory.

glibc's ``malloc`` serves every request above its mmap threshold (128 KiB, rising adaptively to at most 32 MiB)
with a fresh ``mmap`` and returns it to the system on ``free``. A CNN forward allocates feature maps of several MB
per layer, so on the CPU every such buffer comes back as new zero pages, which are page-faulted in at the first write
(a ``fill_`` of a padded 8 × 96 × 65 × 65 map took 13 ms of a 180 ms ReContrast evaluation batch). Raising the mmap
and trim thresholds keeps those blocks in the heap for reuse. It changes no computation, only where memory comes
from; ``benchmarks/allocator.py`` measures the gain and checks the maps are bit-identical.

The CLI calls :func:`tune_cpu_allocator` before each command; a library user may call it once at start-up.
``RECONAD_TUNE_MALLOC=0`` keeps glibc's defaults. Nothing happens at import time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 30
"""Blocks up to 1 GiB come from the heap and freed memory up to 1 GiB at its top stays there (the process keeps
what it needed at its peak instead of unmapping and faulting it in again)."""


def tune_cpu_allocator(threshold_bytes: int = THRESHOLD_BYTES) -> dict[str, int] | None:
    """Raise glibc's mmap and trim thresholds to ``threshold_bytes``; returns what was set, or None where glibc is
    not the allocator (macOS, Windows, musl) or ``RECONAD_TUNE_MALLOC=0`` asks for the defaults."""
    if os.environ.get("RECONAD_TUNE_MALLOC", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = {"M_MMAP_THRESHOLD": M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": M_TRIM_THRESHOLD}
    applied = {name: threshold_bytes for name, param in settings.items() if libc.mallopt(param, threshold_bytes) == 1}
    log.debug("glibc malloc: %s", applied)
    return applied
