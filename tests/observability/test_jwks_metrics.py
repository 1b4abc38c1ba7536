"""``gateway_jwks_events_total``: the key sources' plain counters, copied at scrape time."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.metrics import Metrics


def _events(metrics: Metrics) -> dict[str, float]:
    text = metrics.render().decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "gateway_jwks_events")
    return {s.labels["event"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_scrape_copies_the_running_totals() -> None:
    metrics = Metrics()
    totals = {"hits": 40, "fetches": 2, "failures": 1, "stale_served": 0, "waits_cut": 3}
    metrics.scrape_hooks.append(lambda: metrics.copy_jwks_counters(totals))
    assert _events(metrics) == {"fetch": 2, "fetch_failure": 1, "wait_cut": 3}
    totals.update(fetches=5, stale_served=7)
    assert _events(metrics) == {"fetch": 5, "fetch_failure": 1, "stale_served": 7, "wait_cut": 3}
    assert _events(metrics)["fetch"] == 5  # a scrape with no change adds nothing


def test_a_replaced_source_restarts_the_baseline_without_uncounting() -> None:
    metrics = Metrics()
    totals = {"fetches": 4, "failures": 0, "stale_served": 0, "waits_cut": 0}
    metrics.scrape_hooks.append(lambda: metrics.copy_jwks_counters(totals))
    assert _events(metrics)["fetch"] == 4
    totals["fetches"] = 1  # a policy reload replaced the key source: its count starts again
    assert _events(metrics)["fetch"] == 4
    totals["fetches"] = 3
    assert _events(metrics)["fetch"] == 6
