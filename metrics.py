"""Prometheus metrics: every metric declared once, here, with its help text and labels."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Literal

BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)

Labels = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str


WEBHOOKS = Metric("forgebottle_webhooks_total", "counter", "Webhooks received, by outcome")
TRANSITIONS = Metric("forgebottle_transitions_total", "counter", "Bottle transitions")
WATCHDOG = Metric("forgebottle_watchdog_firings_total", "counter", "Runs frozen by the watchdog")
FORGE_ERRORS = Metric("forgebottle_forge_errors_total", "counter", "Forge calls that failed")
SIDECAR_CALLS = Metric("forgebottle_sidecar_calls_total", "counter", "Sidecar calls, by method and outcome")
WEBHOOK_SECONDS = Metric("forgebottle_webhook_seconds", "histogram", "Webhook intake duration")
SIDECAR_SECONDS = Metric("forgebottle_sidecar_call_seconds", "histogram", "Sidecar call duration")
RUN_SECONDS = Metric("forgebottle_run_seconds", "histogram", "Agent run wall-clock duration")
BOTTLES = Metric("forgebottle_bottles", "gauge", "Bottles by state")
INBOX = Metric("forgebottle_inbox_events", "gauge", "Stored webhook events by status")


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    escaped = (f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in pairs)
    return "{" + ",".join(escaped) + "}"


class Metrics:
    """Counters and histograms kept in memory; gauges are read at render time."""

    def __init__(self) -> None:
        self.counters: dict[tuple[Metric, Labels], float] = defaultdict(float)
        self.histograms: dict[tuple[Metric, Labels], list[float]] = {}

    def inc(self, metric: Metric, amount: float = 1, **labels: str) -> None:
        assert metric.kind == "counter"
        self.counters[(metric, tuple(sorted(labels.items())))] += amount

    def observe(self, metric: Metric, seconds: float, **labels: str) -> None:
        assert metric.kind == "histogram"
        key = (metric, tuple(sorted(labels.items())))
        counts = self.histograms.setdefault(key, [0.0] * (len(BUCKETS) + 2))
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1  # cumulated when rendered
        counts[-1] += seconds

    def value(self, metric: Metric, **labels: str) -> float:
        return self.counters.get((metric, tuple(sorted(labels.items()))), 0.0)

    def render(self, gauges: Mapping[Metric, Mapping[Labels, float]]) -> str:
        lines: list[str] = []
        for metric in sorted({m for m, _ in self.counters}, key=lambda m: m.name):
            lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} counter"]
            for (m, pairs), value in sorted(self.counters.items(), key=lambda kv: (kv[0][0].name, kv[0][1])):
                if m == metric:
                    lines.append(f"{metric.name}{_labels(pairs)} {value:g}")
        for metric, values in sorted(gauges.items(), key=lambda kv: kv[0].name):
            lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} gauge"]
            for pairs, value in sorted(values.items()):
                lines.append(f"{metric.name}{_labels(pairs)} {value:g}")
        for metric in sorted({m for m, _ in self.histograms}, key=lambda m: m.name):
            lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} histogram"]
            for (m, pairs), counts in sorted(self.histograms.items(), key=lambda kv: (kv[0][0].name, kv[0][1])):
                if m != metric:
                    continue
                cumulative = list(itertools.accumulate(counts[:-1]))  # the last bucket is +Inf: all
                name = metric.name
                for index, bound in enumerate(BUCKETS):
                    lines.append(f"{name}_bucket{_labels([*pairs, ('le', f'{bound:g}')])} {cumulative[index]:g}")
                lines.append(f"{name}_bucket{_labels([*pairs, ('le', '+Inf')])} {cumulative[-1]:g}")
                lines.append(f"{name}_count{_labels(pairs)} {cumulative[-1]:g}")
                lines.append(f"{name}_sum{_labels(pairs)} {counts[-1]:.6f}")
        return "\n".join(lines) + "\n"
