"""The per-request metrics' families expose exactly what prometheus_client's own Counter
and Histogram would for the same updates: names, labels, buckets, sums, _created."""

from __future__ import annotations

import re

import prometheus_client.metrics
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from service import hotmetrics
from service.hotmetrics import CounterFamily, HistogramFamily

BOUNDS = (0.001, 0.0025, 0.01, 0.5, 1, 10)
_CREATED = re.compile(r"^(\w+_created(?:\{[^}]*\})?) \S+$", re.MULTILINE)


def _exposition(registry: CollectorRegistry) -> str:
    # The _created series hold the moment a child was made: equal in form, not value.
    return _CREATED.sub(r"\1 T", generate_latest(registry).decode())


@given(st.lists(st.tuples(st.sampled_from(["/a", "/b"]), st.sampled_from(["202", "503"]))))
def test_a_counter_family_exposes_what_a_prometheus_counter_does(
    updates: list[tuple[str, str]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    family = CounterFamily("x_requests_total", "Requests", ["route", "code"], registry=ours)
    counter = Counter("x_requests_total", "Requests", ["route", "code"], registry=theirs)
    family.labels("/a", "202")  # a child made before its first update shows at zero
    counter.labels("/a", "202")
    for route, code in updates:
        family.labels(route, code).inc()
        counter.labels(route, code).inc()
    assert _exposition(ours) == _exposition(theirs)
    assert ours.get_sample_value("x_requests_total", {"route": "/a", "code": "202"}) == sum(
        1 for update in updates if update == ("/a", "202")
    )


_OBSERVED = st.one_of(st.sampled_from([0.0, *BOUNDS]), st.floats(0, 20, allow_nan=False))


@given(st.lists(st.tuples(st.sampled_from(["/a", "/b"]), _OBSERVED)))
def test_a_histogram_family_exposes_what_a_prometheus_histogram_does(
    updates: list[tuple[str, float]],
) -> None:
    """Bucket by bucket, a value on a bound included (Prometheus's "le"), one past the
    last bound in +Inf only, the sum and count."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    family = HistogramFamily("x_seconds", "Latency", ["route"], BOUNDS, registry=ours)
    histogram = Histogram("x_seconds", "Latency", ["route"], buckets=BOUNDS, registry=theirs)
    for route, value in updates:
        family.labels(route).observe(value)
        histogram.labels(route).observe(value)
    assert _exposition(ours) == _exposition(theirs)


def test_a_child_is_asked_for_with_every_label_and_bounds_must_increase() -> None:
    registry = CollectorRegistry()
    family = CounterFamily("y_total", "Y", ["a", "b"], registry=registry)
    with pytest.raises(ValueError, match="takes the labels"):
        family.labels("only one")
    assert family.labels("1", "2") is family.labels("1", "2")
    with pytest.raises(ValueError, match="increasing"):
        HistogramFamily("z_seconds", "Z", [], (1, 0.5), registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        CounterFamily("y_total", "Y again", ["a"], registry=registry)


def test_a_label_value_is_its_text_as_in_prometheus_client() -> None:
    registry = CollectorRegistry()
    family = CounterFamily("codes_total", "Codes", ["code"], registry=registry)
    family.labels(202).inc()  # type: ignore[arg-type]  # an untyped caller's int
    family.labels("202").inc()
    assert registry.get_sample_value("codes_total", {"code": "202"}) == 2
    assert generate_latest(registry)  # and the exposition still renders


def test_a_trailing_infinite_bound_is_the_families_own_inf_bucket() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    family = HistogramFamily("w_seconds", "W", [], (0.5, float("inf")), registry=ours)
    histogram = Histogram("w_seconds", "W", buckets=(0.5, float("inf")), registry=theirs)
    family.labels().observe(0.7)
    histogram.observe(0.7)
    assert _exposition(ours) == _exposition(theirs)


def test_created_series_follow_prometheus_clients_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", False)
    assert not hotmetrics._created_series()
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    CounterFamily("v_total", "V", ["a"], registry=ours).labels("1").inc()
    Counter("v_total", "V", ["a"], registry=theirs).labels("1").inc()
    HistogramFamily("u_seconds", "U", ["a"], BOUNDS, registry=ours).labels("1").observe(1)
    Histogram("u_seconds", "U", ["a"], buckets=BOUNDS, registry=theirs).labels("1").observe(1)
    text = generate_latest(ours).decode()
    assert "_created" not in text
    assert text == generate_latest(theirs).decode()
