"""This process's memory mappings as the kernel describes them (/proc/self/smaps, Linux)."""
from __future__ import annotations


def vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (`hg`: huge pages advised, `rr`:
    random reads advised, ...)."""
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")
