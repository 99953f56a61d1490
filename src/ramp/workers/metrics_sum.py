"""One /metrics for all workers: their expositions summed, sample by sample.

Counters, histograms and most gauges add up (flows open in all workers, connections held by
all of them). A few gauges say the same thing in every worker (a configured limit, the number
of routes in the one store): those take the largest value instead of N times it. `_created`
samples keep the earliest time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# metrics every worker sets alike, from the config, the shared store or a signal they all get
SAME_IN_EVERY_WORKER = frozenset(
    {
        "ramp_policy_rules",
        "ramp_routes",
        "ramp_icmp_mode",
        "ramp_onramp_steering",
        "ramp_config_reloads",  # every worker takes each SIGHUP: one reload, not N
    }
)

_Key = tuple[str, tuple[tuple[str, str], ...]]


def sum_expositions(texts: Iterable[str]) -> list[Metric]:
    """The families of all `texts` (Prometheus text format), values summed per sample."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[_Key, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            into = values[family.name]
            keep_max = family.name in SAME_IN_EVERY_WORKER
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in into:
                    into[key] = sample.value
                elif sample.name.endswith("_created"):
                    into[key] = min(into[key], sample.value)
                elif keep_max:
                    into[key] = max(into[key], sample.value)
                else:
                    into[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class SummedCollector(Collector):
    """A registry entry that yields what `update` was last given (for generate_latest)."""

    def __init__(self) -> None:
        self._families: list[Metric] = []

    def update(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families
