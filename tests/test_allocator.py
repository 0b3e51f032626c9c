"""reconad.allocator: glibc's malloc thresholds raised for the CLI (same numbers; benchmarks/allocator.py)."""

from __future__ import annotations

import ctypes
import platform

import reconad.allocator as allocator
from reconad.cli import main


def test_raises_both_glibc_thresholds_on_this_linux():
    # the development and CI machines run glibc: the setting must really be applied there
    assert platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    applied = allocator.tune_cpu_allocator(64 << 20)
    assert applied == {"M_MMAP_THRESHOLD": 64 << 20, "M_TRIM_THRESHOLD": 64 << 20}
    # the heap then serves a 32 MB block: allocating and freeing it leaves it in the arena (mallinfo2's arena grows
    # past it) instead of a separate mmap
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    mmapped_before = libc.mallinfo2().hblks
    block = libc.malloc(32 << 20)
    try:
        assert libc.mallinfo2().hblks == mmapped_before  # not an mmapped chunk
    finally:
        libc.free(block)
    allocator.tune_cpu_allocator()  # back to the CLI's setting for the rest of this test process


def test_opt_out_keeps_the_defaults(monkeypatch):
    monkeypatch.setenv("RECONAD_TUNE_MALLOC", "0")
    assert allocator.tune_cpu_allocator() is None


def test_the_cli_tunes_the_allocator_before_a_command(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: calls.append(True))
    assert main(["list"]) == 0
    assert calls == [True]
