"""Prometheus metrics of one app, in a registry of its own (two apps in one process never collide), and their
`vllm:`-named aliases (metrics_vllm.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llmengine_runtime.server.metrics_vllm import VllmMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0, 30.0)


class _EngineCollector:
    """Reads each engine's stats() at scrape time: KV blocks used, free and cached, requests waiting and
    running, the prefix cache's queried and hit tokens with their ratio, and speculative decoding's proposed and
    accepted tokens, acceptance rate and mean accepted length per speculating sequence-step."""

    def __init__(self, engines: Callable[[], dict[str, Any]]) -> None:
        self._engines = engines

    def collect(self):
        families = {
            "blocks_used": GaugeMetricFamily("llmengine_kv_blocks_used", "KV-cache blocks in use", labels=["model"]),
            "blocks_free": GaugeMetricFamily("llmengine_kv_blocks_free", "KV-cache blocks free", labels=["model"]),
            "num_waiting": GaugeMetricFamily("llmengine_queue_depth", "requests waiting in the engine's queue",
                                             labels=["model"]),
            "num_running": GaugeMetricFamily("llmengine_running_requests", "requests in the running batch",
                                             labels=["model"]),
            "blocks_cached": GaugeMetricFamily("llmengine_kv_blocks_cached",
                                               "free KV-cache blocks still holding a cached prefix", labels=["model"]),
            "prefix_cache_queries": CounterMetricFamily("llmengine_prefix_cache_queried_tokens",
                                                        "prompt tokens looked up in the prefix cache",
                                                        labels=["model"]),
            "prefix_cache_hits": CounterMetricFamily("llmengine_prefix_cache_hit_tokens",
                                                     "prompt tokens reused from the prefix cache", labels=["model"]),
            "spec_proposed_tokens": CounterMetricFamily("llmengine_spec_proposed_tokens",
                                                        "speculative decoding: tokens proposed", labels=["model"]),
            "spec_accepted_tokens": CounterMetricFamily("llmengine_spec_accepted_tokens",
                                                        "speculative decoding: proposed tokens the model accepted",
                                                        labels=["model"]),
        }
        acceptance = GaugeMetricFamily("llmengine_spec_acceptance_rate",
                                       "speculative decoding: accepted / proposed tokens since start", labels=["model"])
        accepted_length = GaugeMetricFamily("llmengine_spec_mean_accepted_length",
                                            "speculative decoding: accepted tokens per sequence-step that proposed",
                                            labels=["model"])
        hit_rate = GaugeMetricFamily("llmengine_prefix_cache_hit_rate",
                                     "prefix-cache hit tokens / queried tokens since start", labels=["model"])
        for name, engine in self._engines().items():
            stats = engine.stats()
            for key, family in families.items():
                if key in stats:
                    family.add_metric([name], float(stats[key]))
            if stats.get("prefix_cache_queries"):
                hit_rate.add_metric([name], stats["prefix_cache_hits"] / stats["prefix_cache_queries"])
            if stats.get("spec_proposed_tokens"):
                acceptance.add_metric([name], stats["spec_accepted_tokens"] / stats["spec_proposed_tokens"])
            if stats.get("spec_steps"):
                accepted_length.add_metric([name], stats["spec_accepted_tokens"] / stats["spec_steps"])
        yield from families.values()
        yield hit_rate
        yield acceptance
        yield accepted_length


class Metrics:
    def __init__(self, engines: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmengine_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.tokens = Counter("llmengine_generated_tokens", "tokens generated", ["model"], registry=r)
        self.ttft = Histogram("llmengine_time_to_first_token_seconds", "arrival to first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("llmengine_time_per_output_token_seconds", "time per generated token after the first",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("llmengine_requests_in_flight",
                               "generation requests in the server (waiting + running)", registry=r)
        r.register(_EngineCollector(engines))
        self.vllm = VllmMetrics(r, engines)

    def token_observer(self, model: str) -> Callable[[bool, int, float], None]:
        tokens, ttft, tpot = self.tokens.labels(model), self.ttft.labels(model), self.tpot.labels(model)
        vllm_tokens, vllm_ttft = self.vllm.generation_tokens.labels(model), self.vllm.ttft.labels(model)

        def observe(first: bool, n: int, seconds: float) -> None:
            tokens.inc(n)
            vllm_tokens.inc(n)
            if first:
                ttft.observe(seconds)
                vllm_ttft.observe(seconds)
            else:
                for _ in range(n):
                    tpot.observe(seconds / n)
        return observe

    def request_finished(self, job: Any) -> None:
        """An engine request ended (server.generation.Job): its prompt tokens and latency."""
        self.vllm.request_finished(job)

    def render(self) -> bytes:
        return generate_latest(self.registry)
