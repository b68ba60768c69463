"""How much memory decoded images may take: the in-memory or streamed decision's budget."""

import os
from pathlib import Path

MEMORY_SHARE = 0.5  # data.memory_limit_gb=null: this share of the available memory


def memory_available() -> int:
    """Bytes this process can still use: MemAvailable, or less under a cgroup v2 memory limit
    (a container's, SLURM's), whose usage counts the reclaimable file cache too."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(meminfo.split("MemAvailable:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):  # not Linux
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            used = int((cgroup / "memory.current").read_text()) - int(stat["inactive_file"])
            available = min(available, int(limit) - used)
    except (OSError, ValueError, KeyError):  # no cgroup v2 here
        pass
    return max(available, 0)


def memory_limit(limit_gb: float | None) -> tuple[float, str]:
    """The bytes decoded images may take in memory, and where the figure comes from."""
    if limit_gb is not None:
        return limit_gb * 2**30, f"data.memory_limit_gb={limit_gb}"
    available = memory_available()
    return MEMORY_SHARE * available, (
        f"data.memory_limit_gb=null: {MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB "
        "available"
    )
