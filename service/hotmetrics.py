"""The metrics updated for every request, as plain numbers that Prometheus reads through
a collector.

prometheus_client's ``Counter.inc`` and ``Histogram.observe`` take a lock and make
several calls per update; the four updates an ingest request makes (its route and code,
its latency, its outcome, its account) cost ~6 us of its CPU under load (a wrk A/B, the
updates on against off). Here an update is an attribute added to, with no lock: every
update runs on the event loop's thread (the ingest handler and the access log do, and
nothing else updates these), and a scrape reads the numbers there too (``/metrics`` is
served by the same loop), so no two updates, and no update and a read, ever interleave.
Only the families below work this way; the others, updated now and then and some from
other threads (the spool's writer), stay prometheus_client's own.

What Prometheus reads is what prometheus_client's own families would write: the same
names, labels, bucket bounds and ``_created`` series.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar, cast

import prometheus_client.metrics
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# How prometheus_client writes a bucket's "le" (untyped there).
_le = cast(Callable[[float], str], floatToGoString)


Child = TypeVar("Child")


def _created_series() -> bool:
    """Whether prometheus_client writes _created series (PROMETHEUS_DISABLE_CREATED_SERIES,
    ``disable_created_metrics()``): these families follow its switch."""
    return bool(getattr(prometheus_client.metrics, "_use_created", True))


class _Family(Collector, Generic[Child]):
    """What both families share: a name, its labels, and a child per label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        registry.register(self)

    def labels(self, *values: str) -> Child:
        """The child of these label values (made at zero the first time)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes the labels {self.labelnames}")
        child = self._children.get(values)
        if child is None:
            # As prometheus_client does, a label value is its str: a 202 and a "202" are
            # one child (and the exposition can escape it).
            values = tuple(str(value) for value in values)
            child = self._children.get(values)
            if child is None:
                child = self._children[values] = self._new_child()
        return child

    def _new_child(self) -> Child:
        raise NotImplementedError


class Count:
    """One labelled child of a :class:`CounterFamily`."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()

    def inc(self) -> None:
        self.value += 1


class CounterFamily(_Family[Count]):
    """A counter with labels, each child a :class:`Count`, as ``Counter(name, ...)``
    would expose it (``name`` ends in ``_total``)."""

    def _new_child(self) -> Count:
        return Count()

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _created_series()
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value, created=child.created if created else None)
        yield family


class Latency:
    """One labelled child of a :class:`HistogramFamily`: a count per bucket (the last
    one +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound is >= value: Prometheus's "le".
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class HistogramFamily(_Family[Latency]):
    """A histogram with labels, each child a :class:`Latency`, as ``Histogram(name,
    ..., buckets=bounds)`` would expose it."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        bounds: Sequence[float],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        if bounds and bounds[-1] == float("inf"):
            bounds = bounds[:-1]  # +Inf is every histogram's last bucket anyway
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("bucket bounds must be given in increasing order")
        self.bounds = tuple(float(b) for b in bounds)
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> Latency:
        return Latency(self.bounds)

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        names = [_le(b) for b in (*self.bounds, float("inf"))]
        created = _created_series()
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for name, count in zip(names, child.counts, strict=True):
                cumulative += count
                buckets.append((name, float(cumulative)))
            family.add_metric(values, buckets, child.sum)
            if created:
                # HistogramMetricFamily has no created argument: the sample the
                # exposition writes as the family's _created series.
                labels = dict(zip(self.labelnames, values, strict=True))
                family.samples.append(Sample(f"{self.name}_created", labels, child.created))
        yield family
