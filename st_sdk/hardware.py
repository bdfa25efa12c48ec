"""Hardware probe: what the machine offers, read cheaply from the OS.

`probe()` never imports torch or jax. GPUs are filled in by `probe_gpus()`, which asks only the
frameworks already imported (a GPU backend's `is_available()` imports its own) unless told to import.
Backends read the result in `score(hardware, fmt)`; keep `HardwareInfo` a plain dataclass.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field

from .errors import InputError

log = logging.getLogger("st_sdk")

#: the environment variable that sets the thread count when no argument does
THREADS_ENV = "ST_NUM_THREADS"

#: feature flags worth reporting and keying caches on (x86 names as in /proc/cpuinfo; Arm as below)
KNOWN_FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
    "neon", "asimddp", "i8mm", "bf16", "sve", "sve2",
)


@dataclass
class GPUInfo:
    kind: str            # "cuda" | "rocm" | "mps" | "tpu" | ...
    name: str
    memory_bytes: int | None = None
    driver: str | None = None
    via: str = ""        # the framework that saw it


@dataclass
class HardwareInfo:
    machine: str                      # platform.machine(): x86_64, arm64, aarch64 ...
    system: str                       # Linux, Darwin, Windows
    cpu_model: str
    vendor: str
    features: frozenset[str]          # normalised flags, a subset of KNOWN_FEATURES
    physical_cores: int
    logical_cores: int
    ram_bytes: int | None
    gpus: list[GPUInfo] = field(default_factory=list)
    gpus_probed: tuple[str, ...] = ()  # frameworks asked so far

    def has(self, *flags: str) -> bool:
        return all(f in self.features for f in flags)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["features"] = sorted(self.features)
        d["gpus_probed"] = list(self.gpus_probed)
        return d

    def summary(self) -> str:
        simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon", "sve")
                if f in self.features]
        ram = f", {self.ram_bytes / 2**30:.0f} GiB" if self.ram_bytes else ""
        gpus = "".join(f", {g.kind} {g.name}" for g in self.gpus)
        return (f"{self.cpu_model} ({self.machine}, {self.physical_cores} cores / {self.logical_cores} threads"
                f"{ram}; {' '.join(simd) or 'no SIMD extensions detected'}{gpus})")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _linux_cpu(cpuinfo: str) -> tuple[str, str, set[str], int | None]:
    model = vendor = ""
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    phys = core = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model", "cpu model") and not model:
            model = value
        elif key in ("vendor_id", "CPU implementer") and not vendor:
            vendor = value
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
        elif not line.strip() and core is not None:
            cores.add((phys or "0", core))
            phys = core = None
    if core is not None:
        cores.add((phys or "0", core))
    return model, vendor, _normalise(flags), (len(cores) or None)


#: other spellings (macOS sysctl, older kernels) of the /proc/cpuinfo names used here
_ALIASES = {"asimd": "neon", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx1_0": "avx",
            "sse4_2": "sse4_2", "sse4.2": "sse4_2", "avxvnni": "avx_vnni"}


def _normalise(flags: set[str]) -> set[str]:
    flags = {f.lower() for f in flags}
    return flags | {_ALIASES[f] for f in flags if f in _ALIASES}


def _darwin_cpu() -> tuple[str, str, set[str], int | None]:
    model = _sysctl("machdep.cpu.brand_string")
    flags = set((_sysctl("machdep.cpu.features") + " " + _sysctl("machdep.cpu.leaf7_features")).split())
    if platform.machine() == "arm64":
        flags |= {"neon", "asimddp"}
        if _sysctl("hw.optional.arm.FEAT_BF16") == "1":
            flags.add("bf16")
        if _sysctl("hw.optional.arm.FEAT_I8MM") == "1":
            flags.add("i8mm")
    phys = _sysctl("hw.perflevel0.physicalcpu") or _sysctl("hw.physicalcpu")
    return (model, "Apple" if platform.machine() == "arm64" else "", _normalise(flags),
            int(phys) if phys.isdigit() else None)


def _ram_bytes() -> int | None:
    m = re.search(r"MemTotal:\s+(\d+)\s+kB", _read("/proc/meminfo"))
    if m:
        return int(m.group(1)) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        v = _sysctl("hw.memsize")
        return int(v) if v.isdigit() else None


def _size_bytes(text: str) -> int | None:
    """sysfs cache sizes ("491520K", "32M") in bytes, or None."""
    m = re.fullmatch(r"(\d+)\s*([KMG]?)", text.strip())
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)] if m else None


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int | None:
    """The size of the CPU's largest cache level (its L3 on most hosts) in bytes, or None where the OS
    does not say (Linux sysfs, macOS sysctl). Benchmarks size what they stream by it: a buffer that fits
    in this cache, read twice in a row, measures the cache rather than memory."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        entries = []
    for entry in entries:
        if entry.startswith("index") and _read(f"{base}/{entry}/type").strip() in ("Unified", "Data"):
            size = _size_bytes(_read(f"{base}/{entry}/size"))
            if size:
                sizes.append(size)
    if not sizes and platform.system() == "Darwin":
        sizes = [int(v) for v in (_sysctl("hw.l3cachesize"), _sysctl("hw.l2cachesize")) if v.isdigit()]
    return max(sizes) if sizes else None


def _logical_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))   # what this process may actually use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def probe() -> HardwareInfo:
    """The CPU side of the machine, read once per process (no heavy imports, no GPU query)."""
    system, machine = platform.system(), platform.machine()
    if system == "Linux":
        model, vendor, flags, phys = _linux_cpu(_read("/proc/cpuinfo"))
    elif system == "Darwin":
        model, vendor, flags, phys = _darwin_cpu()
    else:
        model, vendor, flags, phys = platform.processor(), "", set(), None
    if phys is None:
        try:
            import psutil   # optional; only for platforms /proc does not describe

            phys = psutil.cpu_count(logical=False)
        except Exception:
            phys = None
    logical = _logical_cores()
    phys = min(phys or logical, logical)
    return HardwareInfo(machine=machine, system=system, cpu_model=model or platform.processor() or machine,
                        vendor=vendor, features=frozenset(f for f in flags if f in KNOWN_FEATURES),
                        physical_cores=phys, logical_cores=logical, ram_bytes=_ram_bytes())


def nvidia_driver() -> str | None:
    m = re.search(r"Kernel Module\s+([\d.]+)", _read("/proc/driver/nvidia/version"))
    return m.group(1) if m else None


def _torch_gpus(torch) -> list[GPUInfo]:
    out = []
    try:
        if torch.cuda.is_available():
            kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
            driver = torch.version.hip if kind == "rocm" else nvidia_driver()
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                out.append(GPUInfo(kind, p.name, int(p.total_memory), driver, "torch"))
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            out.append(GPUInfo("mps", "Apple GPU", None, None, "torch"))
    except Exception:
        pass
    return out


def _jax_gpus(jax) -> list[GPUInfo]:
    out = []
    try:
        for d in jax.devices():
            if d.platform == "cpu":
                continue
            kind = d.platform
            if kind == "gpu":   # jax names CUDA and ROCm devices alike; the client's version tells them apart
                kind = "rocm" if "rocm" in str(getattr(d.client, "platform_version", "")).lower() else "cuda"
            out.append(GPUInfo(kind, getattr(d, "device_kind", d.platform), None,
                               nvidia_driver() if kind == "cuda" else None, "jax"))
    except Exception:
        pass
    return out


def probe_gpus(hw: HardwareInfo | None = None, import_frameworks: bool = False) -> HardwareInfo:
    """`hw` with GPUs seen by torch / jax. Only frameworks already imported are asked, unless
    `import_frameworks` (the CLI's `--gpus`): probing must not pull in a heavy library by itself."""
    hw = hw or probe()
    gpus, asked = [], []
    for name, fn in (("torch", _torch_gpus), ("jax", _jax_gpus)):
        mod = sys.modules.get(name)
        if mod is None and import_frameworks:
            try:
                import importlib

                mod = importlib.import_module(name)
            except Exception:
                mod = None
        if mod is None:
            continue
        asked.append(name)
        for g in fn(mod):
            if not any(g.kind == o.kind and g.name == o.name for o in gpus):
                gpus.append(g)
    return dataclasses.replace(hw, gpus=gpus, gpus_probed=tuple(asked))


def resolve_threads(n: int | None = None, what: str = "n_threads") -> int:
    """The number of threads to compute with, st-sdk's one policy: `n`, else ST_NUM_THREADS, else the
    physical cores this process may use (hyper-threads slow memory-bound decode down). A request
    above that is clamped to it with a warning; one below 1 is an InputError naming `what`."""
    cores = probe().physical_cores
    if n is None and os.environ.get(THREADS_ENV, "").strip():
        env, what = os.environ[THREADS_ENV].strip(), THREADS_ENV
        try:
            n = int(env)
        except ValueError:
            raise InputError(f"{THREADS_ENV}={env!r} is not an integer") from None
    if n is None:
        return cores
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise InputError(f"{what} must be an integer >= 1, got {n!r}")
    if n > cores:
        log.warning("%s=%d is more than the %d cores this process may use; using %d", what, n, cores, cores)
        return cores
    return int(n)
