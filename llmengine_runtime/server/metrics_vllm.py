"""`vllm:`-named aliases of our metrics, labelled `model_name` as vLLM's are, so dashboards and autoscalers built
for vLLM (KEDA, the production-stack router, Grafana boards) read this server unchanged:

- gauges read at scrape time: `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`
  (and its older name `vllm:gpu_cache_usage_perc`), a fraction of the KV-cache blocks in use;
- counters: `vllm:prompt_tokens_total` (each engine request's prompt, when it ends), `vllm:generation_tokens_total`,
  `vllm:request_success_total` (by finished_reason);
- histograms: `vllm:time_to_first_token_seconds`, `vllm:e2e_request_latency_seconds`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _VllmGauges:
    def __init__(self, engines: Callable[[], dict[str, Any]]) -> None:
        self._engines = engines

    def collect(self):
        running = GaugeMetricFamily("vllm:num_requests_running", "requests in the running batch",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "requests waiting to be scheduled",
                                    labels=["model_name"])
        usage = [GaugeMetricFamily(name, "fraction of the KV-cache blocks in use (1 = full)", labels=["model_name"])
                 for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")]
        for name, engine in self._engines().items():
            stats = engine.stats()
            running.add_metric([name], float(stats.get("num_running", 0)))
            waiting.add_metric([name], float(stats.get("num_waiting", 0)))
            used, free = stats.get("blocks_used"), stats.get("blocks_free")
            if used is not None and free is not None and used + free:
                for family in usage:
                    family.add_metric([name], used / (used + free))
        yield running
        yield waiting
        yield from usage


class VllmMetrics:
    def __init__(self, registry: CollectorRegistry, engines: Callable[[], dict[str, Any]]) -> None:
        r = registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "prompt tokens of the requests that ended",
                                     ["model_name"], registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "tokens generated", ["model_name"], registry=r)
        self.success = Counter("vllm:request_success", "requests that ended with an answer, by finish reason",
                               ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "arrival to first generated token",
                              ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "arrival to the request's end", ["model_name"],
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_VllmGauges(engines))

    def request_finished(self, job: Any) -> None:
        """Count an engine request that ended (server.generation.Job), whatever ended it."""
        model = job.model
        self.prompt_tokens.labels(model).inc(job.num_prompt_tokens)
        if job.finish_reason in ("stop", "length"):
            self.success.labels(model, job.finish_reason).inc()
        if job.ended_at is not None:
            self.e2e.labels(model).observe(max(job.ended_at - job.started, 0.0))
