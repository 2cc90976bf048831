"""GPU telemetry for the training log: NVML readings plus PyTorch's own peak-memory counter.

Read through nvidia-ml-py (`pynvml` module). NVML numbers devices physically and ignores
CUDA_VISIBLE_DEVICES, so the handle is found by the device's UUID. Without a GPU or without the NVML
library every field reads "n/a" and nothing fails.
"""
from __future__ import annotations

import torch

FIELDS = ("gpu.mem_used_mib", "gpu.util_pct", "gpu.power_w", "gpu.sm_clock_mhz", "gpu.mem_clock_mhz",
          "torch.max_allocated_mib")
NA = "n/a"


class Telemetry:
    """`read()` → {field: number or "n/a"} for this process's GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.handle = None
        self.nvml = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                nvml_uuid = pynvml.nvmlDeviceGetUUID(handle)
                nvml_uuid = nvml_uuid.decode() if isinstance(nvml_uuid, bytes) else nvml_uuid
                if nvml_uuid.removeprefix("GPU-") == uuid.removeprefix("GPU-"):
                    self.handle, self.nvml = handle, pynvml
                    break
        except Exception:  # no driver library, no permission, an old driver: telemetry is optional
            self.handle = None

    def read(self) -> dict:
        out = dict.fromkeys(FIELDS, NA)
        if self.device.type == "cuda":
            out["torch.max_allocated_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        if self.handle is None:
            return out
        nvml, h = self.nvml, self.handle
        readers = {
            "gpu.mem_used_mib": lambda: nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20,
            "gpu.util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
            "gpu.power_w": lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000,
            "gpu.sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
            "gpu.mem_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
        }
        for key, read in readers.items():
            try:
                out[key] = round(float(read()), 1)
            except Exception:  # one unsupported query (e.g. power on some boards) leaves that field n/a
                pass
        return out
