"""Telemetry reads NVML fields by name, and never fails: no GPU, no library or an unsupported query → "n/a"."""
import types

import torch

from degla_scale.telemetry import FIELDS, NA, Telemetry


def test_cpu_reads_all_na():
    assert Telemetry(torch.device("cpu")).read() == dict.fromkeys(FIELDS, NA)


def test_fields_from_nvml_and_unsupported_query_left_na():
    def power(handle):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
    fake = types.SimpleNamespace(
        NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87),
        nvmlDeviceGetPowerUsage=power,
        nvmlDeviceGetClockInfo=lambda h, which: (1980, 2619)[which],
    )
    telemetry = Telemetry(torch.device("cpu"))
    telemetry.handle, telemetry.nvml = object(), fake
    got = telemetry.read()
    assert got["gpu.mem_used_mib"] == 3072.0 and got["gpu.util_pct"] == 87.0
    assert got["gpu.sm_clock_mhz"] == 1980.0 and got["gpu.mem_clock_mhz"] == 2619.0
    assert got["gpu.power_w"] == NA and got["torch.max_allocated_mib"] == NA
