"""The README's five-minute tour, run as written against a served gateway.

The README is the product's front door: its commands are taken from the file itself
(only the port, the state and audit directories and the report directory are pointed at
this test's gateway), so a tour that stops working fails here, not for a newcomer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway_proc import ROOT, GatewayProcess, start_gateway

from ..conftest import TRITON_REPO

README = ROOT / "README.md"


def _block(language: str, after: str) -> str:
    """The first fenced ``language`` block after the heading or sentence ``after``."""
    text = README.read_text()
    start = text.index(after)
    match = re.search(rf"```{language}\n(.*?)```", text[start:], re.S)
    assert match is not None, f"no {language} block after {after!r}"
    return match.group(1)


def _pointed(script: str, gw: GatewayProcess, workdir: Path) -> str:
    bin_dir = Path(sys.executable).parent
    script = script.replace("127.0.0.1:8080", f"127.0.0.1:{gw.port}")
    script = script.replace(".venv/bin/", f"{bin_dir}/")
    script = script.replace("infergate token ", f"infergate token --state-dir {workdir / 'state'} ")
    script = script.replace("var/audit", str(workdir / "audit"))
    return script.replace("/tmp/alice-report", str(workdir / "alice-report"))  # noqa: S108 (the README's path, replaced)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Path]]:
    workdir = tmp_path_factory.mktemp("tour")
    gw = start_gateway(workdir, backend=f"local:{TRITON_REPO}")
    yield gw, workdir
    assert gw.stop() == 0, gw.log_path.read_text()[-2000:]


def test_the_shell_tour_runs_as_written(served: tuple[GatewayProcess, Path]) -> None:
    gw, workdir = served
    script = _pointed(_block("bash", "## A five-minute tour"), gw, workdir)
    # ``set -e`` with pipefail off, as in a terminal: a failing step stops the tour here.
    done = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    out = done.stdout
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert '"name":"probabilities"' in out  # 2. the first request
    assert "HTTP/1.1 401" in out  # 3. no token
    assert "request rejected by input policy" in out  # 3. wrong shape, naming the rule
    sent = json.loads((ROOT / "examples" / "text-request.json").read_text())["inputs"][0]["data"][0]
    address = re.search(r"\S+@\S+", sent)
    assert address is not None and address.group() not in out and "[EMAIL]" in out  # 4. masked
    assert "X-Privacy-Budget-Remaining:" in out and '"name":"score"' in out  # 5. noised score
    assert '"epsilon_spent":0.5' in out  # 5. one row spent of the tenant's budget
    assert "verifies" in out  # 6. the audit trail checks out
    [report] = (workdir / "alice-report").glob("dsar-*.json")  # 6. alice's records exported
    rows = json.loads(report.read_text())["records"]
    assert rows and {(r["subject_id"], r["subject_tenant"]) for r in rows} == {("alice", "acme")}


def test_the_python_snippet_runs_as_written(served: tuple[GatewayProcess, Path]) -> None:
    gw, workdir = served
    snippet = _pointed(_block("python", "unchanged `tritonclient.http`"), gw, workdir)
    done = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "TOKEN": gw.token()})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0"
