"""The hardware probe: CPU model, flags, cores, RAM from the OS; GPUs only from frameworks asked."""
import dataclasses
import json
import os
import sys
import types

import pytest

from st_sdk import hardware

X86_TWO_SOCKETS = "\n".join(
    f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n"
    f"physical id\t: {i // 4}\ncore id\t\t: {(i // 2) % 2}\n"
    "flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_tile\n"
    for i in range(8))
ARM = "\n".join(
    f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd asimddp sve i8mm bf16\n"
    f"CPU implementer\t: 0x41\nCPU part\t: 0xd40\n" for i in range(4))


def test_probe_this_machine():
    hw = hardware.probe()
    assert hw.cpu_model and hw.machine
    assert 1 <= hw.physical_cores <= hw.logical_cores <= (os.cpu_count() or 1)
    assert hw.features <= set(hardware.KNOWN_FEATURES)
    assert hw.ram_bytes is None or hw.ram_bytes > 2**27
    if sys.platform == "linux" and hw.machine == "x86_64":
        flags = open("/proc/cpuinfo").read()
        assert hw.has("avx2") == (" avx2" in flags)
        assert hw.has("avx512_vnni") == ("avx512_vnni" in flags)
    json.dumps(hw.to_dict())                       # plain data, for the report and the cache key
    assert dataclasses.is_dataclass(hw) and hardware.probe() is hw   # probed once per process


def test_parse_x86_cpuinfo_counts_physical_cores_across_sockets():
    model, vendor, flags, phys = hardware._linux_cpu(X86_TWO_SOCKETS)
    assert model == "Intel(R) Xeon(R) Gold 6338" and vendor == "GenuineIntel"
    assert phys == 4                               # 2 sockets x 2 cores, 2 threads each
    assert {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"} <= flags


def test_parse_arm_cpuinfo_reports_neon_and_sve():
    _, vendor, flags, _ = hardware._linux_cpu(ARM)
    assert vendor == "0x41"
    assert {"neon", "asimddp", "sve", "i8mm", "bf16"} <= flags


def fake_torch(n_gpus=1):
    props = types.SimpleNamespace(name="Fake H100", total_memory=80 * 2**30)
    cuda = types.SimpleNamespace(is_available=lambda: n_gpus > 0, device_count=lambda: n_gpus,
                                 get_device_properties=lambda i: props)
    return types.SimpleNamespace(cuda=cuda, version=types.SimpleNamespace(hip=None, cuda="12.4"),
                                 backends=types.SimpleNamespace(mps=None))


def test_gpus_come_only_from_frameworks_already_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    hw = hardware.probe_gpus(hardware.probe())
    assert hw.gpus == [] and hw.gpus_probed == ()
    assert "torch" not in sys.modules and "jax" not in sys.modules

    monkeypatch.setitem(sys.modules, "torch", fake_torch())
    hw = hardware.probe_gpus(hardware.probe())
    assert hw.gpus_probed == ("torch",)
    assert [(g.kind, g.name, g.memory_bytes, g.via) for g in hw.gpus] == [("cuda", "Fake H100", 80 * 2**30, "torch")]
    assert "cuda Fake H100" in hw.summary()


def test_gpu_probe_failures_are_not_fatal(monkeypatch):
    broken = fake_torch()
    broken.cuda.is_available = lambda: (_ for _ in ()).throw(RuntimeError("driver too old"))
    monkeypatch.setitem(sys.modules, "torch", broken)
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    assert hardware.probe_gpus(hardware.probe()).gpus == []


def test_real_torch_gpu_probe_runs():
    torch = pytest.importorskip("torch")                 # imported: so the probe asks it
    hw = hardware.probe_gpus(hardware.probe())
    assert "torch" in hw.gpus_probed
    mps = getattr(torch.backends, "mps", None)
    assert bool(hw.gpus) == (torch.cuda.is_available() or bool(mps and mps.is_available()))


def test_last_level_cache_is_the_largest_data_cache_in_sysfs(monkeypatch, tmp_path):
    base = tmp_path / "cache"
    for name, kind, size in (("index0", "Data", "48K"), ("index1", "Instruction", "64M"),
                             ("index2", "Unified", "2048K"), ("index3", "Unified", "480M")):
        (base / name).mkdir(parents=True)
        (base / name / "type").write_text(kind + "\n")
        (base / name / "size").write_text(size + "\n")
    real_listdir, real_read = os.listdir, hardware._read
    sysfs = "/sys/devices/system/cpu/cpu0/cache"
    monkeypatch.setattr(hardware.os, "listdir", lambda p: real_listdir(base) if p == sysfs else real_listdir(p))
    monkeypatch.setattr(hardware, "_read", lambda p: real_read(p.replace(sysfs, str(base))))
    hardware.last_level_cache_bytes.cache_clear()
    try:
        assert hardware.last_level_cache_bytes() == 480 * 2**20   # the instruction cache does not count
    finally:
        hardware.last_level_cache_bytes.cache_clear()
    assert hardware._size_bytes("491520K") == 480 * 2**20 and hardware._size_bytes("?") is None


def test_memory_probe_streams_twice_the_last_level_cache(monkeypatch):
    from st_sdk.bench import machine

    monkeypatch.setattr(machine, "last_level_cache_bytes", lambda: 480 * 2**20)
    assert machine.memory_probe_mib() == 960
    monkeypatch.setattr(machine, "last_level_cache_bytes", lambda: 32 * 2**20)
    assert machine.memory_probe_mib() == 512           # never less than 512 MiB
    monkeypatch.setattr(machine, "last_level_cache_bytes", lambda: None)
    assert machine.memory_probe_mib() == 512
    monkeypatch.setattr(machine, "last_level_cache_bytes", lambda: 2**40)
    ram = hardware.probe().ram_bytes
    assert machine.memory_probe_mib() == max(512, ram // 8 // 2**20)   # at most an eighth of the RAM
