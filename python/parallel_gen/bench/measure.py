"""Peak resident memory of this process or of a child, in MiB."""

from __future__ import annotations

import re
import resource
import sys
from typing import Any, Optional


def vmhwm_kib(pid: str = "self") -> Optional[int]:
    """The kernel's high-water mark of a process's RSS (VmHWM), or None where unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def ru_maxrss_kib(ru: Any) -> int:
    return int(ru.ru_maxrss // 1024 if sys.platform == "darwin" else ru.ru_maxrss)  # bytes on macOS


class PeakRSS:
    """Peak resident set size of this process during a ``with`` block, in MiB (``mib``).

    Linux: the high-water mark (VmHWM) is reset to the current RSS on entry by writing "5"
    to /proc/self/clear_refs, and read on exit; so the figure is the peak during the
    block. Elsewhere (or if the reset is refused) it falls back to ru_maxrss, the peak of
    the whole process so far; ``method`` says which.
    """

    def __enter__(self) -> "PeakRSS":
        self.method = "ru_maxrss"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if vmhwm_kib() is not None:
                self.method = "VmHWM"
        except OSError:
            pass
        self.mib: Optional[float] = None
        return self

    def __exit__(self, *exc: Any) -> None:
        kib = vmhwm_kib() if self.method == "VmHWM" else None
        if kib is None:
            kib = ru_maxrss_kib(resource.getrusage(resource.RUSAGE_SELF))
        self.mib = kib / 1024.0
