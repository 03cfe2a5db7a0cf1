"""GPU gauges, read at scrape time: ``torch.cuda`` memory, and NVML utilisation when present.

A :class:`GpuProbe` returns one :class:`GpuReading` per visible device. The default,
:func:`torch_cuda_probe`, reads only devices this process has already initialised (a
scrape never creates a CUDA context) and adds utilisation, memory and power from NVML
when ``pynvml`` (package ``nvidia-ml-py``) imports. A host without CUDA exports the
families with no samples: the series are absent, not zero.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    name: str
    memory_total_bytes: float
    memory_used_bytes: float  # whole device (every process), from cudaMemGetInfo or NVML
    memory_allocated_bytes: float | None = None  # this process's tensors (torch)
    memory_reserved_bytes: float | None = None  # this process's caching allocator (torch)
    utilization_ratio: float | None = None  # NVML only
    power_watts: float | None = None  # NVML only


GpuProbe = Callable[[], list[GpuReading]]

_FAMILIES = (
    ("tplr_gpu_memory_total_bytes", "memory_total_bytes", "GPU memory of the device."),
    ("tplr_gpu_memory_used_bytes", "memory_used_bytes", "GPU memory in use (all processes)."),
    (
        "tplr_gpu_memory_allocated_bytes",
        "memory_allocated_bytes",
        "GPU memory held by this process's tensors.",
    ),
    (
        "tplr_gpu_memory_reserved_bytes",
        "memory_reserved_bytes",
        "GPU memory reserved by this process's caching allocator.",
    ),
    ("tplr_gpu_utilization_ratio", "utilization_ratio", "GPU busy time share, 0 to 1 (NVML)."),
    ("tplr_gpu_power_watts", "power_watts", "GPU power draw (NVML)."),
)


class GpuCollector(Collector):
    """Exports :data:`NAMES` with ``gpu`` (index) and ``name`` labels."""

    NAMES = tuple(name for name, _, _ in _FAMILIES)

    def __init__(self, registry: CollectorRegistry, *, probe: GpuProbe | None = None) -> None:
        self.probe = probe or torch_cuda_probe
        self._warned = False
        registry.register(self)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, _, documentation in _FAMILIES:
            yield GaugeMetricFamily(name, documentation, labels=["gpu", "name"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        readings = self._read()
        for name, attribute, documentation in _FAMILIES:
            family = GaugeMetricFamily(name, documentation, labels=["gpu", "name"])
            for reading in readings:
                value = getattr(reading, attribute)
                if value is not None:
                    family.add_metric([str(reading.index), reading.name], value)
            yield family

    def _read(self) -> list[GpuReading]:
        try:
            return self.probe()
        except Exception as exc:  # a broken driver must not break /metrics
            if not self._warned:
                log.warning("GPU metrics unavailable: %s: %s", type(exc).__name__, exc)
                self._warned = True
            return []


def torch_cuda_probe() -> list[GpuReading]:
    """Readings of the CUDA devices this process uses (none before CUDA is initialised)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    nvml = _nvml()
    readings = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        reading = GpuReading(
            index=index,
            name=torch.cuda.get_device_name(index),
            memory_total_bytes=float(total),
            memory_used_bytes=float(total - free),
            memory_allocated_bytes=float(torch.cuda.memory_allocated(index)),
            memory_reserved_bytes=float(torch.cuda.memory_reserved(index)),
        )
        readings.append(_with_nvml(reading, nvml) if nvml is not None else reading)
    return readings


def _nvml():  # pragma: no cover - needs a GPU and nvidia-ml-py
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


def _with_nvml(reading: GpuReading, nvml) -> GpuReading:  # pragma: no cover - needs a GPU
    """Utilisation and power from NVML, matched to the CUDA device by its PCI bus id (NVML
    and CUDA number devices differently)."""
    import torch

    try:
        props = torch.cuda.get_device_properties(reading.index)
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        handle = nvml.nvmlDeviceGetHandleByPciBusId(bus_id.encode())
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
        power = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
    except (nvml.NVMLError, AttributeError):
        return reading
    return replace(reading, utilization_ratio=utilization, power_watts=power)
