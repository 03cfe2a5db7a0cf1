"""A Prometheus gauge that is absent until it is set: no placeholder 0.

``prometheus_client``'s unlabelled ``Gauge`` exports 0 from the moment it is made, so a
training loss or a free-disk figure reads 0 before anything was measured (a perfect loss,
a full disk) and a restart plots a drop to 0. :class:`OptionalGauge` exports nothing until
:meth:`~OptionalGauge.set`, so ``absent()`` and ``or`` in PromQL work as meant.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class OptionalGauge(Collector):
    """An unlabelled gauge that is absent until set (and after :meth:`clear`); a NaN that
    was measured (a diverged loss) is exported as NaN."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self._value: float | None = None
        self._function: Callable[[], float | None] | None = None
        self._lock = threading.Lock()
        registry.register(self)

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def set_function(self, function: Callable[[], float | None]) -> None:
        """Computed at scrape time; ``None`` or NaN means absent."""
        self._function = function

    def clear(self) -> None:
        with self._lock:
            self._value = None

    def value(self) -> float | None:
        if self._function is not None:
            return self._function()
        with self._lock:
            return self._value

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation)
        value = self.value()
        if value is not None:
            family.add_metric([], value)
        yield family
