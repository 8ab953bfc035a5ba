"""Server metrics in the Prometheus text exposition format (notes ch.06.4 serving metrics: TTFT, TPOT/ITL,
throughput; the Prometheus text format 0.0.4).

Counters only grow; gauges are read at scrape time from the engine (queue depth, running sequences, KV blocks);
histograms keep cumulative bucket counts, their sum and count, so p50/p99 can be estimated with PromQL's
`histogram_quantile`. Written by hand (a few dozen lines) rather than pulling in `prometheus_client`.

Not covered: labels beyond one per counter, summaries, the OpenMetrics format, multi-process aggregation.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Cumulative-bucket histogram: observe(v) adds v to every bucket whose upper bound is ≥ v."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, c in zip([*self.bounds, float("inf")], self.counts, strict=True):
            total += c
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*out, f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """The server's counters and histograms; `render(gauges)` writes the exposition text."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, http status) → count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.aborted = 0
        self.faults = 0  # failed engine steps plus requests the engine ended with an error
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def add_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def count_fault(self) -> None:
        with self.lock:
            self.faults += 1

    def observe(self, histogram: str, value: float) -> None:
        with self.lock:
            getattr(self, histogram).observe(value)

    def render(self, gauges: Callable[[], dict[str, float]]) -> str:
        p = "tinyllm"
        lines = [f"# HELP {p}_requests_total HTTP requests by endpoint and status", f"# TYPE {p}_requests_total counter"]
        with self.lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'{p}_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            for name, value, text in (
                    ("prompt_tokens_total", self.prompt_tokens, "prompt tokens admitted"),
                    ("generation_tokens_total", self.generation_tokens, "tokens generated"),
                    ("requests_aborted_total", self.aborted, "requests aborted (client gone, shutdown)"),
                    ("engine_faults_total", self.faults, "failed engine steps and requests failed by the engine")):
                lines += [f"# HELP {p}_{name} {text}", f"# TYPE {p}_{name} counter", f"{p}_{name} {value}"]
            for name, h, text in (("time_to_first_token_seconds", self.ttft, "time to first token"),
                                  ("inter_token_latency_seconds", self.itl, "time between streamed tokens"),
                                  ("request_latency_seconds", self.e2e, "end-to-end request latency")):
                lines += [f"# HELP {p}_{name} {text}", f"# TYPE {p}_{name} histogram", *h.lines(f"{p}_{name}")]
        for name, value in gauges().items():
            lines += [f"# TYPE {p}_{name} gauge", f"{p}_{name} {value}"]
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """{sample name with labels: value} of an exposition text (for tests and benchmarks)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
