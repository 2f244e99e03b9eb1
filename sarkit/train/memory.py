"""Host memory habits that decide whether a large model fits beside its optimiser state.

glibc serves allocations below its mmap threshold from the heap, and raises that threshold
(up to 32 MB) each time a large block is freed, so the 4-16 MB tensors of a ViT-L, freed
when ZeRO-3 partitions the model or between steps, stay in the process as heap that the
OS never gets back. Measured on ViT-L + MiniLM, ZeRO-3 with CPU offload, 2 processes
(bench/deepspeed_memory.py): peak RSS 9.3 GiB per rank with the default, 7.0 with a fixed
1 MiB threshold (blocks of 1 MiB and more are mapped and returned when freed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20


def return_freed_memory() -> bool:
    """Make large host allocations mmapped (returned to the OS on free); glibc only.

    Worth it where host memory holds the model state (DeepSpeed CPU offload); each such
    allocation then costs a system call, which a GPU run (few host tensors) never notices.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
