"""Validate everything under deploy/ without a Docker engine or a cluster.

No engine runs here, so `docker compose config`, a real build and `kubectl apply
--dry-run=server` are impossible. What can be checked is checked:

* every YAML file parses (multi-document for Kubernetes) and has the structure the
  hardening promises: non-root, read-only root filesystem, no privilege escalation,
  probes, resources, NetworkPolicies that let only the gateway reach Triton, an HPA and
  a PDB that point at the gateway, Secret templates without real-looking secrets;
* the compose stack: services, Redis AOF, internal networks, a pinned Triton image;
* the Dockerfile: multi-stage, non-root USER, HEALTHCHECK, no build tools at runtime;
* every PromQL expression of the Grafana dashboard and the alert rules only names
  metrics the code really exports (read from ``Metrics()`` at test time), with their
  real labels, and uses counters, gauges and histograms the way their type allows.
  Metrics other engineers are still adding are listed, once, in
  ``EXPECTED_NOT_YET_EXPORTED``;
* the real validators run too (promtool, amtool, hadolint, kubernetes-validate), which
  ``tools/test.sh`` installs (pip extras and Debian packages unpacked under ``.cache/``).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "infergate.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts.test.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
GRAFANA_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "infergate.yaml"

# Metrics the dashboard and the alert rules already use but that other work items are
# still adding to gateway/observability/metrics.py: name -> (type, label names).
# Remove an entry once the metric is exported (test_expected_list_is_not_stale names
# the ones that have landed); a dashboard or rule naming a metric that is neither
# exported nor listed here fails the suite.
EXPECTED_NOT_YET_EXPORTED: dict[str, tuple[str, tuple[str, ...]]] = {
}

# Labels Prometheus attaches at scrape time (deploy/prometheus/prometheus.yml adds `service`).
TARGET_LABELS = frozenset({"instance", "job", "service"})
# Labels that identify people or tenants never become metric labels (privacy).
FORBIDDEN_LABELS = frozenset({"tenant", "subject", "sub", "user", "principal", "api_key"})
SEVERITIES = frozenset({"critical", "severe", "warning", "info"})
GATEWAY_LABELS = {"app.kubernetes.io/name": "infergate", "app.kubernetes.io/component": "gateway"}
TRITON_LABELS = {"app.kubernetes.io/name": "infergate", "app.kubernetes.io/component": "triton"}
REDIS_LABELS = {"app.kubernetes.io/name": "infergate", "app.kubernetes.io/component": "redis"}
TRITON_IMAGE = re.compile(r"nvcr\.io/nvidia/tritonserver:(\d{2}\.\d{2})-py3")
PLACEHOLDER = "REPLACE_ME"


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class MetricInfo:
    type: str  # counter | gauge | histogram | summary | info
    labels: frozenset[str] | None  # None: unknown, label checks are skipped


def _series_name(name: str, kind: str) -> str:
    """The name PromQL sees: prometheus_client reports counters without ``_total``."""
    suffix = {"counter": "_total", "info": "_info"}.get(kind, "")
    return name if name.endswith(suffix) else name + suffix


def exported_metrics() -> dict[str, MetricInfo]:
    """Every metric ``Metrics()`` registers, read from the live registry, not a copy.

    Names and types come from the registry's public ``collect()``; label names from the
    metric objects' ``_labelnames`` (prometheus_client has no public accessor for the
    labels of a family without samples), so labels are only checked where known.
    """
    metrics = Metrics()
    labels: dict[str, frozenset[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind = getattr(value, "_type", "")
            names = getattr(value, "_labelnames", None)
            if names is not None:
                labels[_series_name(value._name, kind)] = frozenset(names)
    out: dict[str, MetricInfo] = {}
    for family in metrics.registry.collect():
        name = _series_name(family.name, family.type)
        out[name] = MetricInfo(family.type, labels.get(name))
    return out


def known_metrics() -> dict[str, MetricInfo]:
    """Exported metrics plus the expected ones (the real definition wins once exported)."""
    known = {name: MetricInfo(kind, frozenset(labels)) for name, (kind, labels) in EXPECTED_NOT_YET_EXPORTED.items()}
    known.update(exported_metrics())
    return known


_METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])(gateway_[a-z0-9_]*[a-z0-9])(?![A-Za-z0-9_])")
_SELECTOR = re.compile(r"(gateway_[a-z0-9_]*[a-z0-9])\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_AGGREGATION = re.compile(r"\b(?:sum|min|max|avg|count|topk|bottomk|stddev|stdvar|quantile|group)\b")
_RANGE_FUNCS = frozenset({"rate", "irate", "increase", "resets"})
_COUNTER_OK = _RANGE_FUNCS | {"label_values", "absent", "absent_over_time"}


def _resolve(used: str, known: dict[str, MetricInfo]) -> tuple[str, str, MetricInfo] | None:
    """Map a series name to (base metric, suffix, info); ``_bucket`` etc. belong to histograms."""
    if used in known:
        return used, "", known[used]
    for suffix in ("_bucket", "_sum", "_count"):
        base = used.removesuffix(suffix)
        if base != used and base in known:
            return base, suffix, known[base]
    return None


def _enclosing_function(expr: str, pos: int) -> str:
    """Name of the innermost function call around ``pos`` ('' for an aggregation or none)."""
    depth = 0
    for i in range(pos - 1, -1, -1):
        if expr[i] == ")":
            depth += 1
        elif expr[i] == "(":
            if depth == 0:
                match = re.search(r"([A-Za-z_]+)\s*$", expr[:i])
                return match.group(1) if match else ""
            depth -= 1
    return ""


def _labels_of(expr: str, known: dict[str, MetricInfo]) -> frozenset[str] | None:
    """All labels the metrics of ``expr`` can carry; None if one of them has unknown labels."""
    out = set(TARGET_LABELS)
    for used in _METRIC_NAME.findall(expr):
        resolved = _resolve(used, known)
        if resolved is None:
            continue
        _, suffix, info = resolved
        if info.labels is None:
            return None
        out |= info.labels
        if suffix == "_bucket":
            out.add("le")
    return frozenset(out)


def _grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in _GROUPING.findall(expr) for label in group.split(",") if label.strip()}


def promql_problems(expr: str, known: dict[str, MetricInfo]) -> list[str]:
    """What is wrong with one PromQL expression, judged against the known metrics."""
    problems: list[str] = []
    for match in _METRIC_NAME.finditer(expr):
        used = match.group(1)
        resolved = _resolve(used, known)
        if resolved is None:
            problems.append(f"{used}: not exported by gateway.observability.metrics and not in "
                            "EXPECTED_NOT_YET_EXPORTED")
            continue
        base, suffix, info = resolved
        func = _enclosing_function(expr, match.start())
        if info.type in {"histogram", "summary"}:
            if not suffix:
                problems.append(f"{used}: a {info.type} has no plain series; use _bucket, _sum or _count")
            elif suffix == "_bucket" and info.type != "histogram":
                problems.append(f"{used}: only histograms have _bucket series")
            elif func not in _COUNTER_OK:
                problems.append(f"{used}: histogram series are counters; wrap them in rate() or increase()")
        elif suffix:
            problems.append(f"{used}: {base} is a {info.type}, it has no {suffix} series")
        elif info.type == "counter" and func not in _COUNTER_OK:
            problems.append(f"{used}: a counter must be read through rate() or increase(), not {func or 'as is'}")
        elif info.type == "gauge" and func in _RANGE_FUNCS:
            problems.append(f"{used}: {func}() of a gauge is meaningless; use deriv() or delta()")
    for name, body in _SELECTOR.findall(expr):
        resolved = _resolve(name, known)
        if resolved is None or resolved[2].labels is None:
            continue
        allowed = resolved[2].labels | TARGET_LABELS | ({"le"} if resolved[1] == "_bucket" else set())
        problems += [f"{name}: no label {label!r}" for label in _MATCHER_LABEL.findall(body) if label not in allowed]
    available = _labels_of(expr, known)
    if available is not None:
        problems += [f"grouping by {label!r}, which no metric of the expression has"
                     for label in sorted(_grouping_labels(expr) - available)]
    used_labels = _grouping_labels(expr) | {lbl for _, body in _SELECTOR.findall(expr)
                                            for lbl in _MATCHER_LABEL.findall(body)}
    problems += [f"label {label!r} identifies people or tenants" for label in sorted(used_labels & FORBIDDEN_LABELS)]
    return problems


def _result_labels(expr: str, known: dict[str, MetricInfo]) -> frozenset[str] | None:
    """Labels an expression's result can carry (a heuristic good enough for templates)."""
    if _AGGREGATION.search(expr):
        return frozenset(_grouping_labels(expr))
    return _labels_of(expr, known)


@cache
def load_yaml(path: Path) -> Any:
    """Parsed once per run (pure-Python YAML is the slow part); callers must not mutate it."""
    return yaml.safe_load(path.read_text())


@cache
def k8s_documents() -> tuple[tuple[Path, dict[str, Any]], ...]:
    """Every document of every manifest (multi-document files included), parsed once."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return tuple(docs)


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_documents() if doc.get("kind") == kind]


WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"})


def workloads() -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_documents() if doc.get("kind") in WORKLOAD_KINDS]


def _pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template: dict[str, Any] = spec["template"]
    return template


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels only, as used here) matches ``labels``."""
    unsupported = set(selector) - {"matchLabels"}
    assert not unsupported, f"selector uses {unsupported}; extend the test before using them"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _named(kind: str, name: str) -> dict[str, Any]:
    """The one object of ``kind`` called ``name``."""
    matches = [w for w in k8s_kind(kind) if w["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def _gateway_deployment() -> dict[str, Any]:
    matches = [w for w in k8s_kind("Deployment") if _pod_template(w)["metadata"]["labels"] == GATEWAY_LABELS]
    assert len(matches) == 1, "exactly one Deployment must run the gateway pods"
    return matches[0]


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = _pod_template(workload)["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _image_pinned(image: str) -> bool:
    """A tag (or digest) that is not ``latest``: the same manifest always runs the same image."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in {"", "latest"}


def _entropy(token: str) -> float:
    counts = Counter(token)
    return -sum(n / len(token) * math.log2(n / len(token)) for n in counts.values())


_KEY_SHAPES = (
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\bxox[abprs]-[0-9A-Za-z-]{10,}"),
    re.compile(r"\bgh[pousr]_[0-9A-Za-z]{30,}"),
)
_TOKEN = re.compile(r"[A-Za-z0-9+/=_\-]{24,}")


def looks_like_a_secret(text: str) -> list[str]:
    """Known key formats, and long random-looking tokens (mixed letters and digits, high entropy)."""
    hits = [m.group(0)[:20] for shape in _KEY_SHAPES for m in shape.finditer(text)]
    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if PLACEHOLDER in token or text[:match.start()].endswith("sha256:"):
            continue  # a placeholder, or an image/content digest (public by nature)
        if "/" in token and (token.lower() == token or token.upper() == token):
            continue  # a path or URL part; base64 mixes both cases
        digits = sum(c.isdigit() for c in token)
        letters = sum(c.isalpha() for c in token)
        if digits >= (2 if len(token) >= 32 else 4) and letters >= 4 and _entropy(token) >= 3.5:
            hits.append(token[:8] + "...")
    return hits


def which(tool: str) -> str:
    """The validators are installed by tools/test.sh (CI runs them all; none is optional there)."""
    search = os.pathsep.join([str(Path(sys.executable).parent), str(ROOT / ".cache" / "deploy-tools" / "usr" / "bin"),
                              os.environ.get("PATH", "")])
    path = shutil.which(tool, path=search)
    assert path is not None, f"{tool} is not installed: run `make test` (tools/test.sh installs it)"
    return path


def run_tool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


# --------------------------------------------------------------------------- metrics


def test_metric_registry_is_readable() -> None:
    """The validation below is only as good as its view of the code's metrics."""
    exported = exported_metrics()
    assert "gateway_requests_total" in exported
    assert exported["gateway_request_duration_seconds"].type == "histogram"
    assert exported["gateway_requests_total"].labels == {"route", "code"}


def test_expected_metrics_match_their_real_definition() -> None:
    """When an expected metric lands, its type and labels must be what the dashboards assumed."""
    exported = exported_metrics()
    for name, (kind, labels) in EXPECTED_NOT_YET_EXPORTED.items():
        if name in exported:
            assert exported[name].type == kind, f"{name} is a {exported[name].type}, the list says {kind}"
            if exported[name].labels is not None:
                assert exported[name].labels == set(labels), f"{name} labels {exported[name].labels} != {labels}"


def test_expected_list_is_not_stale() -> None:
    """An entry of EXPECTED_NOT_YET_EXPORTED that the code now exports must leave the list."""
    landed = sorted(set(EXPECTED_NOT_YET_EXPORTED) & set(exported_metrics()))
    assert not landed, f"now exported, remove from EXPECTED_NOT_YET_EXPORTED: {', '.join(landed)}"


def test_expected_metrics_have_no_tenant_labels() -> None:
    """Per-tenant or per-subject series would leak who uses what to anyone who can read metrics."""
    for name, (_, labels) in EXPECTED_NOT_YET_EXPORTED.items():
        assert not set(labels) & FORBIDDEN_LABELS, name


def test_promql_checker_catches_mistakes() -> None:
    """The checker must reject what it claims to reject, or the green tests below mean nothing."""
    known = known_metrics()
    assert promql_problems('sum(rate(gateway_requests_total{code="500"}[5m]))', known) == []
    assert promql_problems("gateway_no_such_metric", known)
    assert promql_problems("sum(gateway_requests_total)", known)  # counter without rate()
    assert promql_problems("rate(gateway_requests_in_flight[5m])", known)  # rate() of a gauge
    assert promql_problems("rate(gateway_request_duration_seconds[5m])", known)  # histogram without suffix
    assert promql_problems("rate(gateway_requests_total_bucket[5m])", known)  # counter has no buckets
    assert promql_problems('rate(gateway_requests_total{model="x"}[5m])', known)  # unknown label
    assert promql_problems("sum by (model) (rate(gateway_requests_total[5m]))", known)
    assert promql_problems('sum by (tenant) (rate(gateway_dp_epsilon_spent_total[5m]))', known)


# --------------------------------------------------------------------------- Grafana


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, expr, legend) for every PromQL in the dashboard: panels, variables, annotations."""
    out = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"], target.get("legendFormat", "")))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        out.append((f"variable {var['name']!r}", text, ""))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            out.append((f"annotation {annotation['name']!r}", annotation["expr"], annotation.get("textFormat", "")))
    return out


def test_dashboard_is_valid_grafana_json() -> None:
    """Grafana refuses (or silently mangles) dashboards with duplicate ids or missing layout."""
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for panel in panels:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid), panel["title"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} overflows the 24-column grid"
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']} has no query"
            assert all(t.get("expr") and t.get("refId") for t in panel["targets"]), panel["title"]
        boxes.append((panel["title"], grid["x"], grid["y"], grid["w"], grid["h"]))
    for i, (title_a, xa, ya, wa, ha) in enumerate(boxes):
        for title_b, xb, yb, wb, hb in boxes[i + 1:]:
            overlap = xa < xb + wb and xb < xa + wa and ya < yb + hb and yb < ya + ha
            assert not overlap, f"panels {title_a!r} and {title_b!r} overlap"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    """A panel naming another datasource uid shows 'datasource not found' on a fresh Grafana."""
    provisioned = {d["uid"] for d in load_yaml(GRAFANA_DATASOURCES)["datasources"]}
    dashboard = _dashboard()
    refs = [p["datasource"] for p in _panels(dashboard) if "datasource" in p]
    refs += [t["datasource"] for p in _panels(dashboard) for t in p.get("targets", []) if "datasource" in t]
    refs += [v["datasource"] for v in dashboard["templating"]["list"] if "datasource" in v]
    assert refs
    for ref in refs:
        assert ref["type"] == "prometheus" and ref["uid"] in provisioned, ref


def test_dashboard_queries_name_only_real_metrics() -> None:
    """Every metric, label and legend field must exist, or the panel is silently empty."""
    known = known_metrics()
    problems = []
    for where, expr, legend in _dashboard_exprs(_dashboard()):
        problems += [f"{where}: {p}" for p in promql_problems(expr, known)]
        available = _labels_of(expr, known)
        legend_fields = set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend))
        if available is not None:
            problems += [f"{where}: legend field {f!r} is not a label" for f in sorted(legend_fields - available)]
    assert not problems, "\n".join(problems)


def test_dashboard_has_the_promised_panels() -> None:
    """The issue asks for P50/P90/P99, QPS, error rate, limiter and DP budget panels, and more."""
    exprs = [expr for _, expr, _ in _dashboard_exprs(_dashboard())]
    joined = "\n".join(exprs)
    for quantile in ("0.5", "0.9", "0.99"):
        assert any(f"histogram_quantile({quantile}," in e and "gateway_request_duration_seconds_bucket" in e
                   for e in exprs), f"no P{quantile} latency panel"
    assert re.search(r"rate\(gateway_requests_total\{", joined), "no QPS panel"
    assert any('code=~"5.."' in e and "/" in e for e in exprs), "no error-rate panel"
    for metric in ("gateway_refusals_total", "gateway_ratelimit_decisions_total", "gateway_dp_budget_remaining",
                   "gateway_dp_epsilon_spent_total", "gateway_upstream_duration_seconds_bucket",
                   "gateway_policy_info", "gateway_drift_psi", "gateway_detector_fired_total"):
        assert metric in joined, f"no panel shows {metric}"


def test_grafana_provisioning_matches_compose() -> None:
    """The provider must read the folder compose mounts, and the datasource must be reachable."""
    compose = load_yaml(COMPOSE)
    grafana = compose["services"]["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"] if m.startswith(".")}
    providers = load_yaml(GRAFANA_PROVIDERS)["providers"]
    for provider in providers:
        path = provider["options"]["path"]
        assert path in mounts, f"dashboard provider reads {path}, which compose does not mount"
        assert (COMPOSE.parent / mounts[path] / DASHBOARD.name).is_file()
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    datasource = load_yaml(GRAFANA_DATASOURCES)["datasources"][0]
    host = re.match(r"https?://([^:/]+)", datasource["url"])
    assert host and host.group(1) in compose["services"]
    assert set(grafana["networks"]) & set(compose["services"][host.group(1)]["networks"])


# --------------------------------------------------------------------------- alert rules


def _rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_alert_rules_have_one_of_four_severities() -> None:
    """Alertmanager routes on `severity`; a rule without one would reach only the default receiver."""
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    used = set()
    for rule in rules:
        severity = rule.get("labels", {}).get("severity")
        assert severity in SEVERITIES, f"{rule['alert']}: severity {severity!r}"
        assert rule.get("annotations", {}).get("summary"), f"{rule['alert']}: no summary"
        if "for" in rule:
            assert re.fullmatch(r"(\d+[smhdwy])+", rule["for"]), rule["alert"]
        used.add(severity)
    assert used == SEVERITIES, f"severities never used: {SEVERITIES - used}"


def test_alert_rules_name_only_real_metrics() -> None:
    """A rule over a metric that does not exist never fires: the worst kind of alert."""
    known = known_metrics()
    problems = []
    for rule in _rules():
        expr = rule["expr"]
        problems += [f"{rule['alert']}: {p}" for p in promql_problems(expr, known)]
        available = _result_labels(expr, known)
        templated = set(re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", json.dumps(rule.get("annotations", {}))))
        if available is not None:
            missing = templated - available - set(rule.get("labels", {}))
            problems += [f"{rule['alert']}: annotation uses $labels.{m}, absent from the result" for m in missing]
    assert not problems, "\n".join(problems)


def test_alert_rules_cover_the_issue() -> None:
    """critical: down; severe: SLO; warning: drift, budget, detectors; info: reloads, rollbacks."""
    by_severity: dict[str, str] = {}
    for rule in _rules():
        by_severity[rule["labels"]["severity"]] = by_severity.get(rule["labels"]["severity"], "") + rule["expr"]
    assert 'up{job="infergate"}' in by_severity["critical"]
    assert "gateway_upstream_requests_total" in by_severity["critical"]
    assert 'code=~"5.."' in by_severity["severe"]
    assert "histogram_quantile(0.99" in by_severity["severe"]
    for metric in ("gateway_drift_state", "gateway_dp_budget_remaining", "gateway_detector_fired_total"):
        assert metric in by_severity["warning"]
    assert 'gateway_policy_reloads_total{result="applied"}' in by_severity["info"]
    assert "gateway_canary_rollbacks_total" in by_severity["info"]


def test_prometheus_config_loads_the_rules_and_scrapes_the_gateway() -> None:
    """The rules select job="infergate" and the gateway service name of compose."""
    config = load_yaml(PROMETHEUS)
    assert [(PROMETHEUS.parent / f).resolve() for f in config["rule_files"]] == [ALERTS.resolve()]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["infergate"]["static_configs"] for t in sc["targets"]]
    assert targets == ["gateway:9464"]  # the metrics-only listener (--metrics-listen), SEC-09
    gateway_args = load_yaml(COMPOSE)["services"]["gateway"]["command"]
    assert "--metrics-listen=0.0.0.0:9464" in gateway_args
    assert jobs["infergate"].get("metrics_path", "/metrics") == "/metrics"
    compose = load_yaml(COMPOSE)
    am_targets = [t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert all(t.split(":")[0] in compose["services"] for t in targets + am_targets)


# --------------------------------------------------------------------------- Alertmanager


def _matches(matcher: str, labels: dict[str, str]) -> bool:
    match = re.fullmatch(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"(.*)"\s*', matcher)
    assert match, f"unsupported matcher {matcher!r}"
    name, op, value = match.groups()
    actual = labels.get(name, "")
    return {"=": actual == value, "!=": actual != value,
            "=~": re.fullmatch(value, actual) is not None, "!~": re.fullmatch(value, actual) is None}[op]


def route_receivers(route: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Alertmanager's routing: depth first, first matching child wins unless it says `continue`."""
    found: list[str] = []
    for child in route.get("routes", []):
        if all(_matches(m, labels) for m in child.get("matchers", [])):
            found += route_receivers(child, labels)
            if not child.get("continue", False):
                break
    return found or [route["receiver"]]


def test_alertmanager_routes_each_severity() -> None:
    """critical and severe page by e-mail and chat; warning and info only reach the chat."""
    config = load_yaml(ALERTMANAGER)
    receivers = {r["name"]: r for r in config["receivers"]}
    kinds = {name: {k for k in r if k.endswith("_configs")} for name, r in receivers.items()}

    def channels(severity: str) -> set[str]:
        names = route_receivers(config["route"], {"severity": severity, "service": "infergate"})
        assert all(n in receivers for n in names), names
        return set().union(*(kinds[n] for n in names))

    assert channels("critical") == {"email_configs", "webhook_configs"}
    assert channels("severe") == {"email_configs", "webhook_configs"}
    assert channels("warning") == {"webhook_configs"}
    assert channels("info") == {"webhook_configs"}


def test_alertmanager_addresses_are_placeholders() -> None:
    """The example must never mail or post to a real address by accident."""
    config = load_yaml(ALERTMANAGER)
    for receiver in config["receivers"]:
        for email in receiver.get("email_configs", []):
            assert email["to"].endswith("@example.com"), email["to"]
        for hook in receiver.get("webhook_configs", []):
            host = re.match(r"https://([^/:]+)", hook["url"])
            assert host and (host.group(1).endswith(".invalid") or host.group(1).endswith("example.com")), hook
    assert config["global"]["smtp_smarthost"].split(":")[0].endswith("example.com")
    assert not looks_like_a_secret(ALERTMANAGER.read_text())


# --------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def test_compose_services_and_images() -> None:
    """The whole stack is there and every image is pinned (no `latest` drifting under us)."""
    services = _compose()["services"]
    assert {"gateway", "triton", "redis", "prometheus", "alertmanager", "grafana"} <= set(services)
    for name, service in services.items():
        assert "image" in service, name
        assert _image_pinned(service["image"]), f"{name}: image {service['image']} is not pinned"
    assert TRITON_IMAGE.fullmatch(services["triton"]["image"]), services["triton"]["image"]
    assert services["redis"]["image"].startswith("redis:7")


def test_compose_triton_serves_the_repository_strictly() -> None:
    """The real Triton serves triton_repo/ with complete configs and no model-control API."""
    triton = _compose()["services"]["triton"]
    command = triton["command"]
    assert "--model-repository=/models" in command
    assert "--strict-model-config=true" in command
    assert "--model-control-mode=none" in command
    assert "../triton_repo:/models:ro" in triton["volumes"]
    repo = (COMPOSE.parent / "../triton_repo").resolve()
    assert list(repo.glob("*/config.pbtxt")), "the mounted repository has no models"
    assert "deploy" not in triton, "GPU must stay optional (the block is commented out)"
    # The commented block must be valid compose once uncommented.
    lines = COMPOSE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# deploy:")
    block = []
    for line in lines[start:]:
        if not line.strip().startswith("#"):
            break
        block.append(line.replace("# ", "", 1))
    gpu = yaml.safe_load(textwrap.dedent("\n".join(block)))
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_compose_isolates_triton_and_redis() -> None:
    """Only the gateway reaches Triton and Redis: they live on internal networks, publish nothing."""
    compose = _compose()
    networks = compose["networks"]
    services = compose["services"]
    for name in ("triton", "redis"):
        assert "ports" not in services[name], f"{name} must not publish ports"
        for net in services[name]["networks"]:
            assert networks[net].get("internal") is True, f"{name} is on non-internal network {net}"
            peers = {s for s, svc in services.items() if net in svc.get("networks", [])}
            assert peers <= {"gateway", "triton", "redis"}, f"{net} also reaches {peers}"
    assert "gateway" in {s for s, svc in services.items() if set(svc["networks"]) & set(services["triton"]["networks"])}


def test_compose_redis_keeps_an_append_only_file() -> None:
    """The DP ledger and limits must survive a Redis restart."""
    redis = _compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "healthcheck" in redis


def test_compose_containers_are_hardened() -> None:
    """Every container: read-only root, no capabilities, no setuid escalation; ports on localhost only."""
    compose = _compose()
    for name, service in compose["services"].items():
        assert service.get("read_only") is True, f"{name}: read_only"
        assert service.get("cap_drop") == ["ALL"], f"{name}: cap_drop"
        assert "no-new-privileges:true" in service.get("security_opt", []), f"{name}: no-new-privileges"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} is published on all interfaces"
        for env_name, value in (service.get("environment") or {}).items():
            if re.search(r"(PASSWORD|SECRET|TOKEN|_KEY|_AUTH)$", env_name):
                assert str(value).startswith("${"), f"{name}: {env_name} must come from the environment"
    gateway = compose["services"]["gateway"]
    assert gateway["user"].split(":")[0] not in {"0", "root"}


def test_compose_gateway_build_and_wiring() -> None:
    """The gateway builds from deploy/Dockerfile at the repo root and talks gRPC to Triton."""
    gateway = _compose()["services"]["gateway"]
    context = (COMPOSE.parent / gateway["build"]["context"]).resolve()
    assert (context / "pyproject.toml").is_file()
    assert (context / gateway["build"]["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert (context / ".dockerignore").is_file()
    args = gateway["command"]
    assert args[0] == "serve"
    assert "--backend=grpc://triton:8001" in args
    # The Redis URL (with its password) comes from the environment, never the command line.
    assert not any(a.startswith("--redis") for a in args)
    assert "@redis:6379" in gateway["environment"]["INFERGATE_REDIS_URL"]
    assert gateway["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "../policies:/etc/infergate/policies:ro" in gateway["volumes"]


def test_compose_bind_mounts_exist() -> None:
    """A missing bind-mount source makes Docker create an empty root-owned directory instead."""
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions as (KEYWORD, arguments), grouped by stage; continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), rest.strip()))
    return stages


def test_dockerfile_is_multi_stage_with_a_slim_runtime() -> None:
    """Wheels are built in one stage; the runtime stage is python:3.11-slim with only those wheels."""
    stages = _dockerfile_stages()
    preamble, builds = stages[0], stages[1:]
    assert len(builds) >= 2
    args = dict(a.split("=", 1) for k, a in preamble if k == "ARG" and "=" in a)
    final_from = builds[-1][0][1].split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], final_from)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    assert any(k == "RUN" and "pip wheel" in a for k, a in builds[0])
    final_runs = " ".join(a for k, a in builds[-1] if k == "RUN")
    assert "--no-index" in final_runs and "from=builder" in final_runs


def test_dockerfile_runtime_stage_is_hardened() -> None:
    """Non-root uid, a liveness HEALTHCHECK without curl, no compilers, one writable volume."""
    final = _dockerfile_stages()[-1]
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    healthchecks = [a for k, a in final if k == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert "/v2/health/live" in healthchecks[0] and "urllib" in healthchecks[0]
    assert not re.search(r"\b(curl|wget)\b", healthchecks[0])
    body = " ".join(a for k, a in final if k in {"RUN", "COPY", "ADD"})
    for tool in ("gcc", "g++", "build-essential", "make", "apt-get install", "python3-dev"):
        assert tool not in body, f"runtime stage installs {tool}"
    assert not [a for k, a in final if k == "ADD"], "ADD can fetch URLs and unpack archives: use COPY"
    assert ("EXPOSE", "8080") in final
    assert ("VOLUME", '["/var/lib/infergate"]') in final


def test_dockerignore_allow_lists_the_build_context() -> None:
    """The context is the repo root: keep .git, .venv, var/ (keys, audit) and tests out."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "start from an empty context and allow-list"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for keyword, arguments in (s for stage in _dockerfile_stages() for s in stage):
        if keyword == "COPY" and "--from" not in arguments:
            sources = [a for a in arguments.split() if not a.startswith("--")][:-1]
            copied |= {Path(s).parts[0] for s in sources}
    assert copied <= included, f"COPY sources excluded by .dockerignore: {copied - included}"
    assert not included & {".git", ".venv", "var", "tests", ".env"}


# --------------------------------------------------------------------------- Kubernetes


def test_k8s_manifests_parse_and_are_listed() -> None:
    """Every manifest is applied by `kubectl apply -k`, except the Secret templates."""
    docs = k8s_documents()
    assert docs
    for path, doc in docs:
        assert {"apiVersion", "kind"} <= set(doc), path.name
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], path.name
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == on_disk
    assert "secrets.example.yaml" not in listed, "placeholder secrets must never be applied"


def test_k8s_namespace_enforces_restricted_pod_security() -> None:
    """The API server then rejects any pod that drops the hardening checked below."""
    namespaces = k8s_kind("Namespace")
    assert len(namespaces) == 1
    assert namespaces[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert load_yaml(K8S / "kustomization.yaml")["namespace"] == namespaces[0]["metadata"]["name"]


def test_k8s_workloads_are_hardened() -> None:
    """Each container: non-root, read-only root, no escalation, no capabilities, seccomp, probes, resources."""
    assert {w["metadata"]["name"] for w in workloads()} >= {"infergate-gateway", "triton", "redis"}
    for workload in workloads():
        name = workload["metadata"]["name"]
        pod = _pod_template(workload)["spec"]
        pod_sc = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, f"{name}: service account token mounted"
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(forbidden), f"{name}: {forbidden}"
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], f"{name}: hostPath volume"
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}/{container['name']}"
            sc = {**pod_sc, **container.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert sc.get("runAsUser", 1) != 0, f"{where}: runAsUser 0"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert sc.get("privileged", False) is False, f"{where}: privileged"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: capabilities not dropped"
            assert not sc.get("capabilities", {}).get("add"), f"{where}: capabilities added"
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}: resources.{kind}"
            assert "livenessProbe" in container and "readinessProbe" in container, f"{where}: probes"
            assert _image_pinned(container["image"]), f"{where}: image {container['image']} not pinned"


def test_k8s_gateway_deployment() -> None:
    """Probes on the KServe health routes; writable paths are volumes; policies from the ConfigMap."""
    deployment = _gateway_deployment()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert _selects(deployment["spec"]["selector"], _pod_template(deployment)["metadata"]["labels"])
    pod = _pod_template(deployment)["spec"]
    container = _container(deployment, "gateway")
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert [p["containerPort"] for p in container["ports"]] == [8080, 9464]  # API, metrics-only listener
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"]  # noqa: S108 - the container's /tmp, not a file of ours
    assert "emptyDir" in mounts["/var/lib/infergate/state"]
    assert "persistentVolumeClaim" in mounts["/var/lib/infergate/audit"]
    claim = mounts["/var/lib/infergate/audit"]["persistentVolumeClaim"]["claimName"]
    assert claim in {c["metadata"]["name"] for c in k8s_kind("PersistentVolumeClaim")}
    args = container["args"]
    assert "--backend=grpc://triton:8001" in args
    assert any(a.startswith("--audit-dir=/var/lib/infergate/audit/") for a in args)
    policies = next(a.split("=", 1)[1] for a in args if a.startswith("--policies="))
    assert "configMap" in mounts[policies]
    env = {e["name"]: e for e in container["env"]}
    for arg in args:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in env, f"{arg} expands an undefined variable"
    for entry in env.values():
        assert "value" not in entry or not looks_like_a_secret(entry["value"]), entry["name"]


def test_k8s_services_select_their_pods() -> None:
    """A selector that matches no pod template routes to nothing; Triton exposes gRPC only."""
    templates = [_pod_template(w)["metadata"]["labels"] for w in workloads()]
    services = {s["metadata"]["name"]: s for s in k8s_kind("Service")}
    for name, service in services.items():
        selector = service["spec"]["selector"]
        assert any(_selects({"matchLabels": selector}, labels) for labels in templates), name
    assert [p["port"] for p in services["triton"]["spec"]["ports"]] == [8001]
    assert services["triton"]["spec"]["selector"] == TRITON_LABELS


def test_k8s_hpa_targets_the_gateway() -> None:
    """autoscaling/v2 on CPU, scaling the Deployment that runs the gateway pods."""
    hpas = k8s_kind("HorizontalPodAutoscaler")
    assert len(hpas) == 1
    hpa = hpas[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", _gateway_deployment()["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2, "one replica cannot survive a disruption"
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])


def test_k8s_pdb_selects_the_gateway_pods() -> None:
    """A PDB whose selector misses the pods protects nothing during node drains."""
    pdbs = k8s_kind("PodDisruptionBudget")
    assert len(pdbs) == 1
    selector = pdbs[0]["spec"]["selector"]
    assert _selects(selector, _pod_template(_gateway_deployment())["metadata"]["labels"])
    assert not _selects(selector, TRITON_LABELS) and not _selects(selector, REDIS_LABELS)
    # At least one pod stays up, and a drain can still evict one while the HPA runs its minimum.
    minimum = pdbs[0]["spec"].get("minAvailable", 0)
    min_replicas = _named("HorizontalPodAutoscaler", "infergate-gateway")["spec"]["minReplicas"]
    assert isinstance(minimum, int) and 1 <= minimum < min_replicas


def _policies_for(labels: dict[str, str], direction: str) -> list[dict[str, Any]]:
    return [np for np in k8s_kind("NetworkPolicy")
            if direction in np["spec"].get("policyTypes", ["Ingress"]) and _selects(np["spec"]["podSelector"], labels)]


def test_k8s_network_policies_default_deny() -> None:
    """Without a default deny, every other policy only adds to an allow-all."""
    deny = [np for np in k8s_kind("NetworkPolicy")
            if np["spec"]["podSelector"] == {} and set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}]
    assert deny and not deny[0]["spec"].get("ingress") and not deny[0]["spec"].get("egress")


def test_k8s_only_the_gateway_reaches_triton() -> None:
    """Every ingress rule selecting Triton admits gateway pods of this namespace on 8001, nothing else."""
    rules = [rule for np in _policies_for(TRITON_LABELS, "Ingress") for rule in np["spec"].get("ingress", [])]
    assert rules, "no policy admits the gateway to Triton"
    for rule in rules:
        assert rule.get("from"), "an ingress rule without `from` admits everyone"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"Triton admits {peer}"
            assert _selects(peer["podSelector"], GATEWAY_LABELS), f"Triton admits {peer}"
            assert not _selects(peer["podSelector"], REDIS_LABELS)
        assert [(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]] == [("TCP", 8001)]
    egress = [rule for np in _policies_for(TRITON_LABELS, "Egress") for rule in np["spec"].get("egress", [])]
    assert not egress, "Triton needs no egress"


def test_k8s_redis_and_gateway_paths() -> None:
    """Redis admits only the gateway; the gateway admits the ingress on 8080 and Prometheus on 9464."""
    for rule in (r for np in _policies_for(REDIS_LABELS, "Ingress") for r in np["spec"].get("ingress", [])):
        assert all(set(p) == {"podSelector"} and _selects(p["podSelector"], GATEWAY_LABELS) for p in rule["from"])
        assert [p["port"] for p in rule["ports"]] == [6379]
    gateway_in = [r for np in _policies_for(GATEWAY_LABELS, "Ingress") for r in np["spec"].get("ingress", [])]
    assert gateway_in
    for rule in gateway_in:
        ports = [p["port"] for p in rule["ports"]]
        assert ports in ([8080], [9464])
        for peer in rule["from"]:
            assert "ipBlock" not in peer and "namespaceSelector" in peer, peer
            if ports == [9464]:  # metrics: the monitoring namespace's Prometheus only
                assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    gateway_out = [r for np in _policies_for(GATEWAY_LABELS, "Egress") for r in np["spec"].get("egress", [])]

    def reaches(labels: dict[str, str], port: int) -> bool:
        return any(any("podSelector" in p and _selects(p["podSelector"], labels) for p in r.get("to", []))
                   and port in [x["port"] for x in r.get("ports", [])] for r in gateway_out)

    assert reaches(TRITON_LABELS, 8001) and reaches(REDIS_LABELS, 6379)
    for rule in gateway_out:
        for peer in rule.get("to", []):
            if "ipBlock" in peer:
                assert "169.254.0.0/16" in peer["ipBlock"].get("except", []), "cloud metadata must stay unreachable"


def test_k8s_triton_matches_compose() -> None:
    """One Triton release everywhere, strict configs, no model control, models read-only."""
    triton = _container(_named("Deployment", "triton"), "triton")
    assert triton["image"] == _compose()["services"]["triton"]["image"]
    assert "--model-repository=/models" in triton["args"] and "--strict-model-config=true" in triton["args"]
    assert "--model-control-mode=none" in triton["args"]
    assert any(m["mountPath"] == "/models" and m.get("readOnly") for m in triton["volumeMounts"])


def test_k8s_redis_keeps_an_append_only_file() -> None:
    """Same as compose: the ledger survives a restart, on a persistent volume."""
    redis = _named("StatefulSet", "redis")
    container = _container(redis, "redis")
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert any(m["mountPath"] == "/data" for m in container["volumeMounts"])
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_k8s_secret_templates_hold_no_real_secrets() -> None:
    """Templates carry placeholders only (stringData, never base64 `data` that hides content)."""
    secrets = [doc for _, doc in k8s_documents() if doc["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        assert "data" not in secret, f"{secret['metadata']['name']}: base64 data in a template"
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER in value, f"{secret['metadata']['name']}.{key} is not a placeholder"
    deployment = _gateway_deployment()
    referenced = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                  for e in _container(deployment, "gateway")["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    templated = {(s["metadata"]["name"], k) for s in secrets for k in s["stringData"]}
    assert referenced <= templated, f"no template for {referenced - templated}"


def test_no_deploy_file_contains_a_real_looking_secret() -> None:
    """A key pasted into a deployment file is a leaked key."""
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / ".dockerignore"]
    for path in files:
        assert not looks_like_a_secret(path.read_text()), path
    assert looks_like_a_secret("key: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
    assert looks_like_a_secret("secret: q3J9v2Lr0Zx8Yt1Wm5Pn7Kc4Hd6Gs0Fa")
    assert not looks_like_a_secret("image: python:3.11-slim@sha256:" + "9f86d081884c7d659a2feaa0c55ad015" * 2)


def test_k8s_policy_configmap_is_a_valid_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped ConfigMap must load and compile with the gateway's own loader, and every
    secret environment variable it names must be provided by the Deployment."""
    from gateway.policy.compile import compile_pipeline
    from gateway.policy.loader import load_policy_dir

    configmap = next(c for c in k8s_kind("ConfigMap") if c["metadata"]["name"] == "infergate-policies")
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    policy = load_policy_dir(tmp_path)
    env = {e["name"] for e in _container(_gateway_deployment(), "gateway")["env"]}
    for issuer in policy.identity.issuers:
        if issuer.keys.hs_secret_env:
            assert issuer.keys.hs_secret_env in env, f"{issuer.keys.hs_secret_env} is not set by the Deployment"
            monkeypatch.setenv(issuer.keys.hs_secret_env, secrets.token_urlsafe(32))
    compile_pipeline(policy, Metrics())


# --------------------------------------------------------------------------- real validators (optional)


def test_promtool_check_rules() -> None:
    run_tool(which("promtool"), "check", "rules", str(ALERTS))


def test_promtool_check_config() -> None:
    run_tool(which("promtool"), "check", "config", str(PROMETHEUS))


def test_promtool_rule_unit_tests() -> None:
    """alerts.test.yml feeds series and asserts which alerts fire, with which labels and text."""
    run_tool(which("promtool"), "test", "rules", str(ALERTS_TEST))


def test_amtool_check_config_and_routes() -> None:
    amtool = which("amtool")
    run_tool(amtool, "check-config", str(ALERTMANAGER))
    expected = {"critical": "oncall-email,chat", "severe": "oncall-email,chat", "warning": "chat", "info": "chat-info"}
    for severity, receivers in expected.items():
        result = run_tool(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}",
                          f"severity={severity}", "service=infergate")
        assert result.stdout.strip() == receivers, (severity, result.stdout)


def test_hadolint() -> None:
    run_tool(which("hadolint"), str(DOCKERFILE))


def test_kubernetes_validate_strict() -> None:
    """The Kubernetes OpenAPI schemas, strict: an unknown or misspelt field fails."""
    manifests = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    run_tool(which("kubernetes-validate"), "--strict", "--quiet", *manifests)
