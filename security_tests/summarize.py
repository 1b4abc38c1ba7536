"""Write security_tests/results/SUMMARY.md: catalogue cases per section, passes, bugs found.

Usage::

    python -m security_tests.summarize                 # runs the catalogue suite itself
    python -m security_tests.summarize --junit run.xml # summarises an existing junit file

Cases are counted from junit ``testcase`` elements of ``security_tests/test_1_*.py`` (one
module per catalogue section, plus ``test_protection_off.py``: each category's case failing
with its protection switched off); loop lag comes from ``results/loop_lag.json`` (written by
the ``world`` fixture).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

SECTIONS = {
    "test_1_1_authn": "1.1 Authentication",
    "test_1_1_jwks_faults": "1.1 Authentication",
    "test_1_2_authz": "1.2 Authorization and flags",
    "test_1_3_ratelimit": "1.3 Rate-limit evasion",
    "test_1_4_input": "1.4 Input / parser",
    "test_1_5_http": "1.5 HTTP protocol",
    "test_1_5_upstream": "1.5 HTTP protocol",
    "test_1_6_pii": "1.6 PII leakage",
    "test_1_8_audit": "1.8 Audit integrity",
    "test_1_10_availability": "1.10 Availability / faults",
    "test_1_10_flags": "1.10 Availability / faults",
    "test_1_11_secrets": "1.11 Secrets / config",
    "test_protection_off": "Protection off (one per category)",
}

# Bugs this suite found, per section: (status, description). Keep in step with the fixes.
BUGS: dict[str, list[tuple[str, str]]] = {
    "1.1 Authentication": [
        ("fixed", "AUTHN-20: no `typ` check, ID/refresh tokens accepted as access tokens "
                  "(IssuerPolicy.token_types, stages/authn.py)"),
        ("fixed", "AUTHN-23: two Authorization headers answered 401 instead of 400 (fronts/http/server.py)"),
        ("fixed", "AUTHN-24: a hanging IdP held requests for the whole fetch deadline (policy fetch_timeout_s, "
                  "up to 3600 s); requests now wait at most 1.5 s from the fetch's start, later ones not at all, "
                  "while the fetch goes on (identity/jwks.py request_wait_s)"),
        ("fixed", "AUTHN-24: max-stale was a fixed 24 h, not in policy; now jwks_settings.max_stale_s"),
        ("fixed", "AUTHN-24: an OIDC discovery document naming another issuer raised on the request path: "
                  "500 and one discovery fetch per request; now 503 under the failure backoff "
                  "(identity/registry.py)"),
        ("fixed", "AUTHN-21/HTTP-11: parser refusals echoed ~100 bytes of input (token prefix) in the 400 body and "
                  "logged them with a traceback at ERROR; sizes now 431/414 (fronts/http/protocol.py)"),
    ],
    "1.2 Authorization and flags": [
        ("fixed", "AUTHZ-09: no scope check (IssuerPolicy.required_scope, 403 authz_scope)"),
        ("fixed", "AUTHZ-08: no per-issuer role mapping (IssuerPolicy.allowed_roles)"),
        ("fixed", "AUTHZ-15: `!!python/...` tag raised a raw yaml ConstructorError instead of PolicyError: a hot "
                  "reload would kill the policy watcher (policy/loader.py)"),
        ("fixed", "AUTHZ-10: no per-role output allowlist (BOPLA); now Grant.outputs: named withheld outputs 403 "
                  "authz_output_denied, unnamed requests narrowed, extra upstream outputs dropped (stages/authz.py)"),
    ],
    "1.5 HTTP protocol": [
        ("fixed", "HTTP-02: `Transfer-Encoding: chunked` accepted on HTTP/1.0 (fronts/http/protocol.py)"),
        ("fixed", "HTTP-17: the drift report client (`infergate drift report`) followed redirects with the "
                  "bearer token (drift/report.py allow_redirects=False)"),
        ("fixed", "HTTP-13: body read timeout was a hard-coded 30 s constant; now limits.body_timeout_s "
                  "(policy/schema.py, fronts/http/server.py); runner_for lets keepalive_timeout (header "
                  "timeout) be overridden (app.py)"),
        ("fixed", "HTTP-13 (found by test_protection_off): a client leaving mid-body before body_timeout_s "
                  "(ConnectionResetError from the body read) was answered 500 with a traceback; now 400 "
                  "body_incomplete, logged and audited (fronts/http/body.py)"),
    ],
    "1.8 Audit integrity": [
        ("fixed", "AUD-08: a request refused because its record could not be written (disk full, EIO, "
                  "EACCES, timeout) left no record at all; it is now recorded as the 503 it got once the sink "
                  "heals, and a record written after its 503 gets an abandoned marker saying so (audit/log.py)"),
        ("fixed", "AUD-08: a stalled fsync held every request 5 s (hard-coded); now audit.append_timeout_s "
                  "(default 2 s) and immediate 503 while the writer is stuck; after a failed fsync the "
                  "segment is retired (fsyncgate) (audit/log.py, policy/schema.py)"),
        ("fixed", "AUD-11: checkpoint interval and segment age used the wall clock (stepped back 1 h = no "
                  "time checkpoints for 1 h); a forward jump let retention delete fresh segments; both now "
                  "bounded by the monotonic clock (audit/log.py)"),
    ],
    "1.3 Rate-limit evasion": [
        ("open", "RL-08 harness: the gateway offers no way to inject a clock into its memory limiter "
                 "(MemoryState(clock=) exists, build_service does not pass one); the suite sets it on the live store"),
    ],
    "1.10 Availability / faults": [
        ("fixed", "AV-12: a garbage/truncated flags.json was refused but the active revision kept routing the "
                  "canary split being rolled back; a deleted flags.json activated a revision without flags, "
                  "sending routed names to the upstream's default version (the canary). Now every route serves "
                  "stable (variant_reason flag_file_unusable) until a usable file loads; deletion after routing "
                  "is refused (flags/rollback.py, stages/feature_flags.py)"),
        ("fixed", "AV-09: no connection cap on the HTTP listener (only max_in_flight for requests); now "
                  "limits.max_connections (4096) / max_connections_per_ip: 503 + close at accept time, "
                  "gateway_connections_open / _refused_total (fronts/http/connection_cap.py)"),
        ("fixed", "AV-11: no per-model in-flight cap: one slow model could take every max_in_flight slot; now "
                  "models.<name>.max_in_flight, excess 503 model_load_shed (resilience/model_slots.py)"),
        ("fixed", "AV-14: bodies > 256 KiB were parsed with json.loads in a thread, which holds the GIL: an 8 MB "
                  "body stalled the loop ~200 ms (p99 206 ms); > 2 MiB now parse in a worker process "
                  "(fronts/decode_pool.py), p99 9 ms"),
        ("fixed", "world config: tab_dp privacy policy said width 1, model metadata [1,10] -> every tab_dp "
                  "answer through the world gateway was 502; world/policies/privacy.yaml now says width 10 "
                  "(AV-07 no longer patches its side copy)"),
    ],
    "1.11 Secrets / config": [
        ("fixed", "SEC-06: `Server: Python/3.11 aiohttp/3.x` on every answer (now `infergate`)"),
        ("fixed", "SEC-09: /metrics was served unauthenticated on the main listener to any address; now "
                  "gateway.yaml metrics.allow_from (loopback by default, 403 + gateway_metrics_denied_total) or a "
                  "separate --metrics-listen port (fronts/metrics_access.py)"),
    ],
    "2 ML attacks (security_tests/ml, results/ml_attacks.json)": [
        ("fixed", "MI-01/MI-02: advantage ~0.13 against the 0.15 target, asserted only at +3 SE; now top-1 after the "
                  "DP noise (tab_mlp for everyone; tab_dp for role `external` via the new output_by_role) -> "
                  "~0.05 / ~0.07, asserted on the one-sided 95% upper bound"),
        ("fixed", "output hardening top_k zeroed the withheld scores even when the kept, DP-noised score was negative: "
                  "the released arg-max could be a withheld class (gateway/adversarial/hardening.py)"),
        ("fixed", "EX-02: the cosine <= 0.90 assertion flaked (~6% of single attempts exceed it at b = 2); now the "
                  "median of 21 attempts, and the 10(d+1) = 310 rows/principal/day cap is enforced and asserted"),
        ("open", "EX-02: the §2.4 targets hold only with noise that makes lr_bc near-useless (released label = model "
                 "label ~0.6); a useful label-only output gives cosine ~0.97 / agreement ~0.99 at 310 queries"),
    ],
}


def run_suite(junit: Path) -> int:
    modules = [str(HERE / f"{m}.py") for m in SECTIONS]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *modules]
    return subprocess.run(cmd, check=False).returncode


def summarize(junit: Path) -> str:
    tree = ET.parse(junit)  # noqa: S314 - our own pytest output
    per: dict[str, dict[str, int]] = defaultdict(lambda: {"cases": 0, "passed": 0, "failed": 0, "skipped": 0})
    ids: dict[str, set[str]] = defaultdict(set)
    for case in tree.iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        section = SECTIONS.get(module)
        if section is None:
            continue
        stats = per[section]
        stats["cases"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            stats["failed"] += 1
        elif case.find("skipped") is not None:
            stats["skipped"] += 1
        else:
            stats["passed"] += 1
        name = case.get("name", "")
        ids[section].add(name.split("[", 1)[0].removeprefix("test_"))
    lines = ["# Security catalogue results", "",
             "Generated by `python -m security_tests.summarize`; one row per CATALOGUE.md section.", "",
             "| Section | Cases | Passed | Failed | Skipped | Test groups | Bugs fixed | Bugs open |",
             "|---|---|---|---|---|---|---|---|"]
    for section in dict.fromkeys(SECTIONS.values()):  # several modules may share a section
        s = per.get(section, {"cases": 0, "passed": 0, "failed": 0, "skipped": 0})
        bugs = BUGS.get(section, [])
        lines.append(f"| {section} | {s['cases']} | {s['passed']} | {s['failed']} | {s['skipped']} | "
                     f"{len(ids[section])} | {sum(1 for b in bugs if b[0] == 'fixed')} | "
                     f"{sum(1 for b in bugs if b[0] == 'open')} |")
    lines += ["", "## Bugs found", ""]
    for section, bugs in BUGS.items():
        for status, text in bugs:
            lines.append(f"- [{status}] {section}: {text}")
    lag = RESULTS / "loop_lag.json"
    if lag.is_file():
        doc = json.loads(lag.read_text())
        lines += ["", "## Event-loop lag of the gateway during the run (I5, target p99 < 100 ms)", "",
                  f"samples {doc['samples']}, p50 {doc['p50_ms']} ms, p99 {doc['p99_ms']} ms, "
                  f"max {doc['max_ms']} ms"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--junit", type=Path, help="an existing junit xml (default: run the suite)")
    args = parser.parse_args(argv)
    code = 0
    junit = args.junit
    if junit is None:
        junit = Path(tempfile.mkdtemp()) / "security.xml"
        code = run_suite(junit)
    RESULTS.mkdir(exist_ok=True)
    text = summarize(junit)
    (RESULTS / "SUMMARY.md").write_text(text)
    print(text)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
