"""How much memory this process may still allocate, and the one check that refuses work that cannot fit.

Headers and configs declare sizes (a 1200³ NIfTI, a backbone of 48 channels and 8 scales, 200 000 classes) long
before anything is allocated; callers estimate the bytes from them and call :func:`check_fits` first, so the user
gets the numbers and a fix instead of a killed process or a swap storm.
"""

from __future__ import annotations

import contextlib
import os

from vox2vec.errors import InputError

__all__ = ["available_memory_bytes", "check_fits", "format_bytes"]


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _address_space_left() -> int | None:
    """RLIMIT_AS minus the address space already mapped (None when unlimited, or on Windows)."""
    try:
        import resource  # Unix only
    except ImportError:
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    used = 0
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmSize:"):
                    used = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(0, limit - used)


def _cgroup_left() -> int | None:
    """The cgroup v2 memory limit minus current usage (None without a limit)."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as handle:
            limit = handle.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as handle:
            current = int(handle.read().strip())
        return max(0, int(limit) - current)
    except (OSError, ValueError):
        return None


def available_memory_bytes() -> int:
    """The bytes this process may still allocate: the least of the machine's available memory, the address-space
    limit (``ulimit -v``) and the container's memory limit; ``VOX2VEC_MEMORY_BYTES`` overrides all of them."""
    override = os.environ.get("VOX2VEC_MEMORY_BYTES")
    if override and override.strip().isdigit():
        return int(override)
    known = [v for v in (_meminfo_available(), _address_space_left(), _cgroup_left()) if v is not None]
    if not known and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            known.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(known) if known else 1 << 62


def format_bytes(count: float) -> str:
    """``1.5 GiB``-style sizes for messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(count) < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB"


def check_fits(bytes_needed: float, what: str, fix: str) -> None:
    """Refuse (``InputError``, before any allocation) when ``what`` needs more than this process may allocate."""
    available = available_memory_bytes()
    if bytes_needed > available:
        raise InputError(f"{what} needs about {format_bytes(bytes_needed)} of memory, but only "
                         f"{format_bytes(available)} is available here; {fix}")
