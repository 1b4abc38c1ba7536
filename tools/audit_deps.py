"""Audit the runtime dependencies for known vulnerabilities; write security_tests/results/pip-audit.json.

What is audited: pyproject's ``[project.dependencies]`` and everything they pull in, at
the versions installed in this interpreter's environment (``.venv``), i.e. exactly what
the gateway process runs. Test and tooling extras are not part of the attack surface.

How: ``pip-audit`` (pinned in the test extra) with PyPI's vulnerability data
(``--vulnerability-service pypi``, the only advisory source reachable from CI). pip-audit
asks PyPI's per-release JSON API (``/pypi/<name>/<version>/json``). Where that API does
not answer for a package (here it answers 404 for every release), the package's project
JSON (``/pypi/<name>/json``) is used instead: its ``vulnerabilities`` list is PyPI's
advisory data for the *latest* release, so it covers a pin exactly when the pin is the
latest release. A package neither source can answer for is listed as **unaudited** with
the reason, never counted as clean.

Exit status: 0 when every audited package is free of known vulnerabilities (or each
finding has a decision in DECISIONS below); 1 when a finding has no decision; 2 when
nothing could be audited at all (PyPI unreachable). With ``--strict``, unaudited
packages are an error too (3).

Usage: .venv/bin/python tools/audit_deps.py [--strict] [--output PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "security_tests" / "results" / "pip-audit.json"
PYPI = "https://pypi.org/pypi"

# Accepted findings: advisory id -> why it does not apply or what mitigates it. Every
# entry is a decision someone took; a new finding fails the audit until it gets one.
DECISIONS: dict[str, str] = {}


@dataclass
class Finding:
    package: str
    version: str
    id: str
    aliases: list[str]
    fix_versions: list[str]
    source: str
    decision: str | None = None


@dataclass
class Report:
    tool: str
    service: str
    generated_at: str
    packages: list[dict[str, str]] = field(default_factory=list)
    audited: list[str] = field(default_factory=list)
    unaudited: list[dict[str, str]] = field(default_factory=list)
    vulnerabilities: list[Finding] = field(default_factory=list)
    status: str = "clean"
    notes: list[str] = field(default_factory=list)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """Installed name -> version for the runtime dependencies and their dependencies."""
    declared = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    found: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    stack = [Requirement(text) for text in declared]
    while stack:
        req = stack.pop()
        key = (_canonical(req.name), frozenset(req.extras))
        if key in visited:
            continue
        visited.add(key)
        dist = metadata.distribution(req.name)
        found[_canonical(req.name)] = dist.version
        environments = [{"extra": extra} for extra in (req.extras or {""})]
        for text in dist.requires or []:
            inner = Requirement(text)
            if inner.marker is None or any(inner.marker.evaluate(env) for env in environments):
                stack.append(inner)
    return dict(sorted(found.items()))


def run_pip_audit(pins: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "runtime.txt"
        requirements.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
        output = Path(tmp) / "audit.json"
        # --no-deps/--disable-pip: the closure above is already complete and pinned, so
        # pip-audit needs no resolver venv (and no index other than PyPI's JSON API).
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("pip-audit")), "--requirement", str(requirements), "--no-deps",
             "--disable-pip", "--vulnerability-service", "pypi", "--format", "json", "--progress-spinner", "off",
             "--output", str(output)],
            capture_output=True, text=True, timeout=600, check=False)
        if not output.exists():
            raise RuntimeError(f"pip-audit failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(output.read_text())
        return result


def project_json(name: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{PYPI}/{name}/json", timeout=20) as resp:  # noqa: S310 - fixed https URL
            data: dict[str, Any] = json.load(resp)
            return data
    except (urllib.error.URLError, TimeoutError, ValueError):
        return None


def audit(pins: dict[str, str]) -> Report:
    report = Report(tool=f"pip-audit {metadata.version('pip-audit')}", service="pypi",
                    generated_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    packages=[{"name": n, "version": v} for n, v in pins.items()])
    result = run_pip_audit(pins)
    skipped: dict[str, str] = {}
    for dep in result.get("dependencies", []):
        name = _canonical(dep["name"])
        if dep.get("skip_reason"):
            skipped[name] = dep["skip_reason"]
            continue
        report.audited.append(name)
        for vuln in dep.get("vulns", []):
            report.vulnerabilities.append(Finding(name, dep["version"], vuln["id"], vuln.get("aliases", []),
                                                  vuln.get("fix_versions", []), "pip-audit"))
    if skipped:
        report.notes.append(f"pip-audit could not audit {len(skipped)} of {len(pins)} packages "
                            f"(first reason: {next(iter(skipped.values()))}); PyPI's project JSON used instead "
                            "where the pin is the latest release")
    for name, reason in skipped.items():
        data = project_json(name)
        version = pins[name]
        if data is None:
            report.unaudited.append({"name": name, "version": version, "reason": f"{reason}; project JSON unreachable"})
            continue
        latest = str(data.get("info", {}).get("version", ""))
        if latest != version:
            report.unaudited.append({"name": name, "version": version, "reason": (
                f"per-release JSON API unavailable and the pin is not the latest release ({latest}), whose "
                "advisories are the only ones the project JSON lists")})
            continue
        report.audited.append(name)
        for vuln in data.get("vulnerabilities") or []:
            if vuln.get("withdrawn"):
                continue
            report.vulnerabilities.append(Finding(name, version, vuln["id"], vuln.get("aliases", []),
                                                  vuln.get("fixed_in", []), "pypi-project-json"))
    for finding in report.vulnerabilities:
        finding.decision = DECISIONS.get(finding.id) or next(
            (DECISIONS[a] for a in finding.aliases if a in DECISIONS), None)
    if not report.audited:
        report.status = "unreachable"
    elif any(f.decision is None for f in report.vulnerabilities):
        report.status = "vulnerable"
    elif report.unaudited:
        report.status = "incomplete"
    return report


def write(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = asdict(report)
    doc["audited"] = sorted(doc["audited"])
    path.write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--strict", action="store_true", help="unaudited packages fail the audit")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report = audit(runtime_closure())
    write(report, args.output)
    total = len(report.packages)
    print(f"dependency audit ({report.tool}, {report.service}): {report.status}; "
          f"{len(report.audited)}/{total} runtime packages audited, "
          f"{len(report.vulnerabilities)} known vulnerabilities -> {args.output}")
    for note in report.notes:
        print(f"  note: {note}")
    for entry in report.unaudited:
        print(f"  UNAUDITED {entry['name']}=={entry['version']}: {entry['reason']}")
    for finding in report.vulnerabilities:
        verdict = f"accepted: {finding.decision}" if finding.decision else "NO DECISION"
        print(f"  VULNERABLE {finding.package}=={finding.version} {finding.id} "
              f"(fixed in {', '.join(finding.fix_versions) or 'nothing yet'}): {verdict}")
    if report.status == "unreachable":
        print("  ERROR: no vulnerability data could be fetched from PyPI: nothing was audited", file=sys.stderr)
        return 2
    if report.status == "vulnerable":
        return 1
    if report.unaudited and args.strict:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
