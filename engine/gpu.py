"""One reading of every NVIDIA GPU through NVML (nvidia-ml-py): utilisation, memory, temperature, power
and the processes on it. No torch: the console samples this in a thread every second.

With no driver (a laptop, a CPU box, this project's CI) `GpuSampler()` raises `GpuUnavailable` with the
driver's own reason, and the caller shows that instead of a panel.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field


class GpuUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    utilization: float | None  # percent of the last sample period with a kernel running
    memory_used: int  # bytes
    memory_total: int
    temperature: float | None  # degrees C
    power: float | None  # watts
    power_limit: float | None
    pids: tuple[int, ...] = field(default_factory=tuple)
    process_memory: tuple[int | None, ...] = field(default_factory=tuple)  # bytes per pid (None: not reported)


def process_group(pid: int) -> int | None:
    """The process group of a pid on this machine (None if it is gone or not ours to see)."""
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _bytes_or_none(value: int | None) -> int | None:
    # NVML reports "not available" (under MIG, or without the rights to see another user's process) as a
    # huge sentinel or None
    return None if value is None or value >= 2**63 else int(value)


def no_gpu_here() -> str | None:
    """Why this machine has no GPU for a run, or None where it has one or nothing is known. Asked of NVML,
    not torch (the console launches too, and never loads torch). Only a clear "none" answers: a ROCm
    machine, which NVML cannot see, passes, and RLHF_GPU_CHECK=0 skips the question."""
    if os.environ.get("RLHF_GPU_CHECK") == "0" or os.path.exists("/dev/kfd"):
        return None
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    try:
        import pynvml
    except ImportError:  # nothing can be said: the launch goes ahead
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        # A container given CUDA without NVML's library still has the GPUs' device files.
        return None if glob.glob("/dev/nvidia[0-9]*") else "no NVIDIA driver and no /dev/nvidia* device"
    except pynvml.NVMLError_DriverNotLoaded:
        return "the NVIDIA driver is not loaded"
    except pynvml.NVMLError:
        return None  # another failure says nothing of the GPUs
    try:
        return None if pynvml.nvmlDeviceGetCount() > 0 else "the NVIDIA driver reports no GPU"
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


class GpuSampler:
    """Holds NVML open; `read()` returns one reading per device."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as err:
            raise GpuUnavailable(f"nvidia-ml-py is not installed ({err})") from None
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise GpuUnavailable(f"no NVIDIA driver: {err}") from None
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if not self._handles:
            raise GpuUnavailable("the NVIDIA driver reports no GPU")

    def _optional(self, call, *args):
        # Many fields are "not supported" on some boards (power on MIG slices, say): show them as unknown.
        try:
            return call(*args)
        except self._nvml.NVMLError:
            return None

    def read(self) -> list[GpuReading]:
        nv = self._nvml
        readings = []
        for index, handle in enumerate(self._handles):
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            util = self._optional(nv.nvmlDeviceGetUtilizationRates, handle)
            temp = self._optional(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU)
            power = self._optional(nv.nvmlDeviceGetPowerUsage, handle)
            limit = self._optional(nv.nvmlDeviceGetEnforcedPowerLimit, handle)
            procs = self._optional(nv.nvmlDeviceGetComputeRunningProcesses, handle) or []
            name = nv.nvmlDeviceGetName(handle)
            readings.append(GpuReading(
                index=index,
                name=name.decode() if isinstance(name, bytes) else str(name),
                utilization=None if util is None else float(util.gpu),
                memory_used=int(memory.used),
                memory_total=int(memory.total),
                temperature=None if temp is None else float(temp),
                power=None if power is None else power / 1000.0,
                power_limit=None if limit is None else limit / 1000.0,
                pids=tuple(int(p.pid) for p in procs),
                process_memory=tuple(_bytes_or_none(getattr(p, "usedGpuMemory", None)) for p in procs),
            ))
        return readings

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass
