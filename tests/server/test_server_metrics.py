"""/metrics reads each engine's stats() at scrape time, prefix-cache figures included."""

from __future__ import annotations

from types import SimpleNamespace

from llmengine_runtime.server.metrics import Metrics


def scrape(stats: dict) -> str:
    engine = SimpleNamespace(stats=lambda: stats)
    return Metrics(lambda: {"m": engine}).render().decode()


def test_prefix_cache_figures_and_hit_rate():
    text = scrape({"blocks_used": 3, "blocks_free": 7, "blocks_cached": 2, "num_waiting": 0, "num_running": 1,
                   "prefix_cache_queries": 400, "prefix_cache_hits": 300})
    assert 'llmengine_prefix_cache_queried_tokens_total{model="m"} 400.0' in text
    assert 'llmengine_prefix_cache_hit_tokens_total{model="m"} 300.0' in text
    assert 'llmengine_prefix_cache_hit_rate{model="m"} 0.75' in text
    assert 'llmengine_kv_blocks_cached{model="m"} 2.0' in text


def test_no_hit_rate_before_any_query():
    text = scrape({"blocks_used": 0, "blocks_free": 10, "prefix_cache_queries": 0, "prefix_cache_hits": 0})
    assert 'llmengine_prefix_cache_hit_rate{model="m"}' not in text
    assert 'llmengine_prefix_cache_queried_tokens_total{model="m"} 0.0' in text
