"""CATALOGUE §1.11 Secrets / config: weak secrets, mixed algorithm families, dependency floors, exposure."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
from pathlib import Path

import pytest

from gateway.observability.metrics import Metrics
from gateway.policy.compile import CompileEnv, compile_pipeline
from gateway.policy.loader import PolicyError, load_policy_dir
from security_tests.support.world import WORLD_DIR, Client, World

HS_ISSUER = """issuers:
  - issuer: svc
    audiences: [inference-gw]
    algorithms: [{algs}]
    keys:
      hs_secret_env: SECTEST_WEAK_SECRET
"""


def _policies(world: World, tmp: Path, identity: str) -> Path:
    assert world.settings is not None
    target = tmp / "p"
    shutil.copytree(world.settings.policies, target)
    (target / "identity.yaml").write_text(identity)
    return target


@pytest.mark.parametrize("secret", ["0123456789abcdef", "password", ""], ids=["16_bytes", "dictionary", "empty"])
def test_sec_01_weak_hs_secret(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    monkeypatch.setenv("SECTEST_WEAK_SECRET", secret)
    policy = load_policy_dir(_policies(world, tmp_path, HS_ISSUER.format(algs="HS256")))
    with pytest.raises(PolicyError, match="at least 32 bytes"):
        compile_pipeline(policy, Metrics(), CompileEnv(repo_dir=world.settings.profiles if world.settings else None))


def test_sec_02_one_family_per_issuer(world: World, tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="one key family"):
        load_policy_dir(_policies(world, tmp_path, HS_ISSUER.format(algs="RS256, HS256")))


def _version(dist: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", md.version(dist))[:3])


def test_sec_05_dependency_floors() -> None:
    assert _version("aiohttp") >= (3, 14, 2)
    assert _version("PyJWT") >= (2, 13, 0)
    installed = {d.metadata["Name"].lower() for d in md.distributions()}
    assert "python-jose" not in installed
    assert "AIOHTTP_NO_EXTENSIONS" not in os.environ
    import aiohttp.http_parser as hp

    assert hp.HttpRequestParser is not hp.HttpRequestParserPy  # the C parser is in use
    # PyYAML only through the safe loaders in gateway code.
    root = Path(__file__).resolve().parent.parent
    for path in [*(root / "gateway").rglob("*.py"), *(root / "privacy").rglob("*.py")]:
        text = path.read_text()
        assert not re.search(r"yaml\.(load|load_all|full_load|unsafe_load)\(", text), path
        assert "yaml.Loader" not in text and "UnsafeLoader" not in text and "FullLoader" not in text, path


@pytest.mark.parametrize("path", ["/debug", "/config", "/debug/pprof", "/_config", "/admin"])
async def test_sec_06_production_exposure(gw: Client, world: World, path: str) -> None:
    r = await gw.request("GET", path)
    assert r.status in (401, 404)
    server = r.headers.get("Server", "")
    assert not re.search(r"\d", server) and "aiohttp" not in server.lower() and "python" not in server.lower()
    assert os.environ.get("PYTHONASYNCIODEBUG") in (None, "", "0")


async def test_sec_03_debug_logs_no_secrets(gw: Client, world: World) -> None:
    """The session logs at DEBUG (world._configure_logging); I3 scans every case. Here the whole log."""
    text = world.logs.text()
    assert world.keys.hs_secret_text not in text
    assert not re.search(r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.", text)


def test_sec_world_policies_are_strict() -> None:
    """The world's own policy files load only through the strict loader (no anchors, no tags)."""
    text = "".join(p.read_text() for p in (WORLD_DIR / "policies").glob("*.yaml"))
    assert "&" not in text.replace("&&", "") and "!!" not in text
