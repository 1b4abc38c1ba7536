"""CATALOGUE §1.11 Secrets / config: weak secrets, mixed algorithm families, dependency floors, exposure."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata as md
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import structlog.testing
import yaml

from gateway.app import build_service, make_upstream
from gateway.cli import REDIS_URL_ENV, _redis_url, build_parser, main
from gateway.fronts.client_addr import NO_PROXIES, TrustedProxies
from gateway.fronts.metrics_access import metrics_allowed, start_metrics_site
from gateway.keyfiles import InsecureSecretFile, read_or_create, secret_file_problem
from gateway.observability.metrics import Metrics
from gateway.policy.compile import CompileEnv, compile_pipeline
from gateway.policy.loader import PolicyError, load_policy_dir
from gateway.policy.schema import MetricsPolicy
from gateway.secret_strength import raw_key_problem
from gateway.settings import GrpcTarget, Settings, parse_backend
from gateway.startup_checks import StartupRefused, check_upstream_transport, writable_policy_files
from gateway.state.redis import parse_url
from gateway.tls import TlsSettings
from security_tests.support.side import SideGateway
from security_tests.support.world import ROOT, WORLD_DIR, Client, World
from tests.support.gateway_proc import free_port, start_gateway

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


# Long enough, guessable all the same: one byte repeated, a word repeated, a counting
# sequence, a keyboard walk, a passphrase, a "strong password" padded to length.
GUESSABLE_LONG = {
    "one_byte": "a" * 48,
    "word_repeated": "password" * 4,
    "hex_sequence": "0123456789abcdef" * 2,
    "keyboard_walk": "qwertyuiopasdfghjklzxcvbnm123456",
    "passphrase": "correct horse battery staple now",
    "padded_password": "MySuperSecretPassword2026!!!!!!!",
    "changeme": "changeme" * 6,
}


@pytest.mark.parametrize("secret", list(GUESSABLE_LONG.values()), ids=list(GUESSABLE_LONG))
def test_sec_01_long_but_guessable_hs_secret(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             secret: str) -> None:
    monkeypatch.setenv("SECTEST_WEAK_SECRET", secret)
    policy = load_policy_dir(_policies(world, tmp_path, HS_ISSUER.format(algs="HS256")))
    with pytest.raises(PolicyError, match="guessable") as refused:
        compile_pipeline(policy, Metrics(), CompileEnv(repo_dir=world.settings.profiles if world.settings else None))
    assert secret not in str(refused.value)  # the refusal never quotes the secret


@pytest.mark.parametrize("make", [lambda: secrets.token_urlsafe(32), lambda: secrets.token_hex(32),
                                  lambda: secrets.token_hex(16)], ids=["base64url_32", "hex_32", "hex_16"])
def test_sec_01_random_hs_secret_starts(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        make: Callable[[], str]) -> None:
    monkeypatch.setenv("SECTEST_WEAK_SECRET", make())
    policy = load_policy_dir(_policies(world, tmp_path, HS_ISSUER.format(algs="HS256")))
    pipeline = compile_pipeline(policy, Metrics(),
                                CompileEnv(repo_dir=world.settings.profiles if world.settings else None))
    assert pipeline is not None


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


_YAML_READERS = frozenset({"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all",
                           "compose", "compose_all", "parse", "scan"})
_SAFE_LOADERS = frozenset({"SafeLoader", "CSafeLoader"})


def yaml_unsafe_uses(source: str) -> list[int]:
    """Lines where PyYAML reads without a safe loader: any spelling, not only ``yaml.load(``.

    ``from yaml import load``, ``import yaml as y; y.full_load(...)``, a ``Loader=`` other than
    ``SafeLoader``/``CSafeLoader`` (``compose``/``parse`` default to the full ``Loader``).
    """
    import ast

    tree = ast.parse(source)
    aliases = {"yaml"} | {a.asname for node in ast.walk(tree) if isinstance(node, ast.Import)
                          for a in node.names if a.name == "yaml" and a.asname}
    bad: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "yaml":
            bad += [node.lineno for a in node.names if a.name in _YAML_READERS or a.name in
                    {"Loader", "FullLoader", "UnsafeLoader", "CLoader", "CFullLoader", "CUnsafeLoader"}]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in aliases
                and node.func.attr in _YAML_READERS):
            continue
        positional = node.args[1] if len(node.args) > 1 else None
        loader = next((k.value for k in node.keywords if k.arg == "Loader"), positional)
        name = loader.attr if isinstance(loader, ast.Attribute) else loader.id if isinstance(loader, ast.Name) else None
        if name not in _SAFE_LOADERS:
            bad.append(node.lineno)
    return bad


def test_sec_05_yaml_only_through_safe_loaders() -> None:
    root = Path(__file__).resolve().parent.parent
    for path in [*(root / "gateway").rglob("*.py"), *(root / "privacy").rglob("*.py")]:
        assert yaml_unsafe_uses(path.read_text()) == [], path
    # The scan sees the spellings a plain regex misses.
    for sneaky in ["from yaml import load\nload(s)", "import yaml as y\ny.full_load(s)",
                   "import yaml\nyaml.compose(s)", "import yaml\nyaml.load(s, Loader=yaml.Loader)",
                   "import yaml\nyaml.load(s, yaml.FullLoader)", "from yaml import CLoader"]:
        assert yaml_unsafe_uses(sneaky), sneaky
    assert yaml_unsafe_uses("import yaml\nyaml.compose(s, Loader=yaml.CSafeLoader)\nyaml.safe_load(s)") == []


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


# ------------------------------------------------------------------ SEC-09: /metrics exposure

NARROW_METRICS = 'metrics:\n  allow_from: ["127.0.0.1/32", "::1/128"]\naudit:\n'
PROXY = "127.0.0.9"


@pytest.fixture
def metrics_side(world: World, tmp_path: Path) -> Iterator[SideGateway]:
    """A side gateway trusting one loopback proxy (X-Forwarded-For believed only from it)."""
    side = SideGateway(world, tmp_path / "side", overrides={"trusted_proxies": (f"{PROXY}/32",)}).start()
    yield side
    side.stop()


def _scrape_allowed(side: SideGateway) -> str:
    with urllib.request.urlopen(f"{side.base}/metrics", timeout=30) as resp:  # noqa: S310 - loopback
        assert resp.status == 200
        return str(resp.read().decode())


def _denied_total(text: str) -> float:
    match = re.search(r"^gateway_metrics_denied_total (\S+)$", text, re.M)
    assert match, "gateway_metrics_denied_total not exported"
    return float(match.group(1))


async def test_sec_09_metrics_only_for_allowlisted_addresses(metrics_side: SideGateway) -> None:
    side = metrics_side
    outsider = side.client()  # 127.x.y.z, never 127.0.0.1
    # Protection off (every loopback address allowed, the default): the outsider reads metrics.
    opened = await outsider.request("GET", "/metrics")
    assert opened.status == 200 and b"gateway_requests_total" in opened.body
    side.edit_policy("gateway.yaml", "audit:\n", NARROW_METRICS)
    before = _denied_total(_scrape_allowed(side))

    refused = await outsider.request("GET", "/metrics")
    assert refused.status == 403
    assert b"gateway_" not in refused.body and refused.headers["Content-Type"].startswith("application/json")
    head = await outsider.request("HEAD", "/metrics")
    assert head.status == 403
    # X-Forwarded-For from an untrusted peer is the client's own claim: ignored.
    for forged in ("127.0.0.1", "127.0.0.1, 127.0.0.1", "::1"):
        spoofed = await outsider.request("GET", "/metrics", headers={"X-Forwarded-For": forged})
        assert spoofed.status == 403, forged
    # Through the trusted proxy the forwarded client counts, both ways.
    proxy = Client(cast(World, side), PROXY)
    remote = await proxy.request("GET", "/metrics", headers={"X-Forwarded-For": "203.0.113.7"})
    assert remote.status == 403
    chained = await proxy.request("GET", "/metrics", headers={"X-Forwarded-For": "127.0.0.1, 203.0.113.7"})
    assert chained.status == 403
    local = await proxy.request("GET", "/metrics", headers={"X-Forwarded-For": "127.0.0.1"})
    assert local.status == 200 and b"gateway_metrics_denied_total" in local.body

    after = _scrape_allowed(side)
    assert _denied_total(after) - before == 7
    assert 'gateway_requests_total{code="403",route="/metrics"}' in after
    assert side.world.logs.text().count('"metrics_denied"') >= 7
    side.check_nl()


def test_sec_09_default_allowlist_is_loopback() -> None:
    allow = MetricsPolicy().allow_from
    for addr, expected in [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
                           ("192.0.2.2", False), ("10.0.0.1", False), ("fd00::2", False), ("::ffff:10.0.0.1", False),
                           (None, False), ("", False)]:
        assert metrics_allowed(addr, [], NO_PROXIES, allow)[0] is expected, addr
    # A remote peer naming loopback in X-Forwarded-For stays remote without a trusted proxy.
    assert metrics_allowed("192.0.2.2", ["127.0.0.1"], NO_PROXIES, allow) == (False, "192.0.2.2")
    trusted = TrustedProxies.parse(["192.0.2.0/24"])
    assert metrics_allowed("192.0.2.2", ["127.0.0.1"], trusted, allow)[0] is True
    assert metrics_allowed("192.0.2.2", ["198.51.100.4"], trusted, allow)[0] is False
    assert metrics_allowed("127.0.0.1", [], NO_PROXIES, ())[0] is False  # []: main listener serves no one


@pytest.mark.parametrize("entry", ["0.0.0.0/0", "::/0", "10.0.0.1/8", "everyone", "127.0.0.1/33"])
def test_sec_09_allowlist_validation(world: World, tmp_path: Path, entry: str) -> None:
    target = world.render_policies(tmp_path / "p")
    gateway = target / "gateway.yaml"
    gateway.write_text(f'metrics:\n  allow_from: ["{entry}"]\n' + gateway.read_text())
    with pytest.raises(PolicyError, match="allow_from"):
        load_policy_dir(target)


async def test_sec_09_metrics_listener_serves_metrics_only() -> None:
    metrics = Metrics()
    runner, port = await start_metrics_site(metrics, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200 and "gateway_metrics_denied_total" in await resp.text()
                assert not re.search(r"\d", resp.headers.get("Server", ""))
            for method, path, status in [("GET", "/v2/models/pub_clf/infer", 404), ("POST", "/v2/models/x/infer", 404),
                                         ("GET", "/v2/health/live", 404), ("POST", "/metrics", 405),
                                         ("GET", "/metrics/../v2", 404)]:
                async with session.request(method, f"http://127.0.0.1:{port}{path}") as resp:
                    assert resp.status == status, (method, path)
    finally:
        await runner.cleanup()
    assert Settings.parse_listen(":9464") == ("127.0.0.1", 9464)  # loopback unless a host is named


async def test_sec_09_metrics_listener_refuses_rebound_names() -> None:
    """DNS rebinding: a browser page that points its own name at 127.0.0.1 sends that name as
    Host. The metrics-only listener answers IP literals, localhost and allowed names only."""
    metrics = Metrics()
    allowed = ("gateway-metrics.monitoring.svc",)
    runner, port = await start_metrics_site(metrics, "127.0.0.1", 0, lambda: allowed)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        async with aiohttp.ClientSession() as session:
            for host, status in [(f"127.0.0.1:{port}", 200), ("localhost", 200), (f"LOCALHOST.:{port}", 200),
                                 ("[::1]", 200), ("10.1.2.3:9464", 200), ("gateway-metrics.monitoring.svc", 200),
                                 ("rebind.attacker.example", 421), (f"evil.test:{port}", 421),
                                 ("localhost.attacker.example", 421), ("127.0.0.1.nip.io", 421),
                                 ("gw@evil", 400), ("a b", 400)]:
                async with session.get(url, headers={"Host": host}) as resp:
                    body = await resp.text()
                    assert resp.status == status, (host, resp.status)
                    assert ("gateway_requests_total" in body) == (status == 200), host
        # HTTP/1.0 naming no host at all: nothing to check, so refused (fail closed).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        raw = await reader.read()
        writer.close()
        assert raw.startswith((b"HTTP/1.0 421 ", b"HTTP/1.1 421 ")), raw[:40]
    finally:
        await runner.cleanup()
    # Each 421 counted: the four foreign names and the host-less request.
    assert "\ngateway_metrics_denied_total 5.0\n" in metrics.render().decode()


def test_sec_09_cli_metrics_listener(tmp_path: Path) -> None:
    """``--metrics-listen`` end to end: metrics on their own loopback port, the main port still 200 locally."""
    port = free_port()
    gw = start_gateway(tmp_path, backend=f"local:{ROOT / 'triton_repo'}",
                       extra=["--metrics-listen", f"127.0.0.1:{port}"])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            assert resp.status == 200 and b"gateway_requests_total" in resp.read()
        with urllib.request.urlopen(f"http://{gw.url}/metrics", timeout=30) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=30)
        assert err.value.code == 404
        err.value.close()
    finally:
        gw.stop()


# ------------------------------------------------------------------ SEC-07: upstream channel


@pytest.mark.parametrize("backend", ["grpc://triton:8001", "grpc://10.0.0.5:8001", "grpc://[fd00::2]:8001",
                                     "grpc://127.0.0.1.nip.io:8001", "grpc://localhost.evil.test:8001",
                                     "grpc://192.0.2.2:8001"])
def test_sec_07_plaintext_remote_upstream_refused(backend: str) -> None:
    with pytest.raises(StartupRefused, match="--upstream-insecure"):
        check_upstream_transport(Settings(backend=backend))
    warning = check_upstream_transport(Settings(backend=backend, upstream_insecure=True))
    assert warning is not None and "INSECURE" in warning
    assert check_upstream_transport(Settings(backend=backend, upstream_tls=True)) is None


@pytest.mark.parametrize("backend", ["grpc://127.0.0.1:8001", "grpc://127.3.2.1:8001", "grpc://[::1]:8001",
                                     "grpc://localhost:8001", "grpc://LOCALHOST.:8001", "local:triton_repo"])
def test_sec_07_loopback_or_embedded_needs_no_tls(backend: str) -> None:
    assert check_upstream_transport(Settings(backend=backend)) is None


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{free_port()}",
           "--policies", str(ROOT / "policies"), "--state-dir", str(tmp_path / "state"),
           "--audit-dir", str(tmp_path / "audit"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_sec_07_cli_refuses_plaintext_remote_upstream(tmp_path: Path) -> None:
    result = _serve(tmp_path, "--backend", "grpc://triton.invalid:8001")
    assert result.returncode == 2
    assert "refusing to start" in result.stderr and "--upstream-insecure" in result.stderr
    assert "listening" not in result.stdout
    assert not (tmp_path / "audit").exists(), "nothing may be created before the refusal"


def test_sec_07_override_is_logged_loudly(world: World, tmp_path: Path) -> None:
    assert world.settings is not None
    settings = dataclasses.replace(world.settings, backend="grpc://192.0.2.1:8001", upstream_insecure=True,
                                   audit_dir=tmp_path / "audit", state_dir=tmp_path / "state")
    start = len(world.logs.text())
    service = build_service(settings)
    logged = [json.loads(line) for line in world.logs.text()[start:].splitlines()
              if '"upstream_insecure"' in line]
    assert len(logged) == 1 and logged[0]["level"] == "warning"
    assert "INSECURE" in logged[0]["message"] and "--upstream-insecure" in logged[0]["message"]
    assert service.upstream is not None
    with pytest.raises(StartupRefused):
        build_service(dataclasses.replace(settings, upstream_insecure=False))


# ------------------------------------------------------------------ SEC-04: secret file permissions


def _foreign(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``path`` belong to another user: chown as root, else pretend to be someone else."""
    if os.geteuid() == 0:
        os.chown(path, 4242, -1)
    else:
        real = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: real + 1)


def _key(path: Path, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o666, 0o660, 0o620, 0o640])
def test_sec_04_loose_secret_file_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int) -> None:
    path = _key(tmp_path / "pii-hmac.key", mode)
    if mode == 0o640:  # group-readable is fine only for the gateway's own group: make it another one
        if os.geteuid() == 0:
            os.chown(path, -1, 4242)
        else:
            monkeypatch.setattr(os, "getegid", lambda: path.stat().st_gid + 1)
    problem = secret_file_problem(path)
    assert problem is not None and f"mode {mode:04o}" in problem
    with pytest.raises(InsecureSecretFile):
        read_or_create(path, lambda: b"x" * 32)
    assert read_or_create(path, lambda: b"x" * 32, allow_insecure=True) == path.read_bytes()


def test_sec_04_foreign_owner_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _key(tmp_path / "dev-issuer-ed25519.pem", 0o600)
    assert secret_file_problem(path) is None
    _foreign(path, monkeypatch)
    problem = secret_file_problem(path)
    assert problem is not None and "owned by uid" in problem


def test_sec_04_strict_files_pass(tmp_path: Path) -> None:
    for mode in (0o600, 0o400):
        assert secret_file_problem(_key(tmp_path / f"k{mode:o}", mode)) is None
    # Kubernetes Secret volume: a symlink to a group-readable file of the pod's own fsGroup.
    data = tmp_path / "..2026_01_01" / "tls.key"
    _key(data, 0o440)
    os.chown(data, -1, os.getegid())
    (tmp_path / "tls.key").symlink_to(data)
    assert secret_file_problem(tmp_path / "tls.key") is None
    made = read_or_create(tmp_path / "new" / "pii-token.key", lambda: b"k" * 32)
    assert made == b"k" * 32 and ((tmp_path / "new" / "pii-token.key").stat().st_mode & 0o777) == 0o600


def _side_settings(world: World, tmp_path: Path, **over: Any) -> Settings:
    assert world.settings is not None
    return dataclasses.replace(world.settings, audit_dir=tmp_path / "audit", state_dir=tmp_path / "state", **over)


@pytest.mark.parametrize("where", ["pii-hmac.key", "pii-token.key", "tls", "upstream_key", "audit_key", "dev"])
def test_sec_04_gateway_refuses_to_start(world: World, tmp_path: Path, where: str) -> None:
    over: dict[str, Any] = {}
    if where.startswith("pii"):
        _key(tmp_path / "state" / where, 0o644)
    elif where == "tls":
        over["tls"] = TlsSettings(cert=tmp_path / "cert.pem", key=_key(tmp_path / "tls-key.pem", 0o644))
    elif where == "upstream_key":
        over.update(upstream_tls=True, upstream_key=_key(tmp_path / "client-key.pem", 0o644),
                    upstream_cert=tmp_path / "client.pem")
    elif where == "audit_key":
        _key(tmp_path / "audit-keys" / "anchor" / "a-0123456789abcdef.key", 0o604)
    else:
        _key(tmp_path / "state" / "dev-issuer-ed25519.pem", 0o644)
        over["dev"] = True
    settings = _side_settings(world, tmp_path, **over)
    with pytest.raises(StartupRefused, match="--allow-insecure-secret-files"):
        build_service(settings)


@pytest.mark.parametrize("content", [b"a" * 32, b"0123456789abcdef" * 2, bytes(32), b"changeme" * 4],
                         ids=["one_byte", "hex_text", "zeros", "word"])
@pytest.mark.parametrize("name", ["pii-hmac.key", "pii-token.key"])
def test_sec_04_hand_filled_pii_key_refused(world: World, tmp_path: Path, name: str, content: bytes) -> None:
    """A PII key file with strict permissions but typed by hand holds no key: refused at
    start, with no override, and the refusal does not quote the file."""
    key = tmp_path / "state" / name
    key.parent.mkdir(parents=True)
    key.write_bytes(content)
    key.chmod(0o600)
    with pytest.raises(InsecureSecretFile, match="random bytes") as refused:
        build_service(_side_settings(world, tmp_path, allow_insecure_secret_files=True))
    assert content.decode("latin-1") not in str(refused.value)


def test_sec_04_generated_pii_keys_pass_the_randomness_check(world: World, tmp_path: Path) -> None:
    build_service(_side_settings(world, tmp_path))
    for name in ("pii-hmac.key", "pii-token.key"):
        assert raw_key_problem((tmp_path / "state" / name).read_bytes()) is None


def test_sec_04_override_warns_and_counts(world: World, tmp_path: Path) -> None:
    _key(tmp_path / "state" / "pii-hmac.key", 0o644)
    start = len(world.logs.text())
    service = build_service(_side_settings(world, tmp_path, allow_insecure_secret_files=True))
    text = service.metrics.render().decode()
    assert 'gateway_insecure_files{kind="secret_file"} 1.0' in text
    assert world.logs.text()[start:].count('"insecure_secret_file"') == 1


def test_sec_04_cli_refuses_loose_dev_key(tmp_path: Path) -> None:
    _key(tmp_path / "state" / "dev-issuer-ed25519.pem", 0o644)
    result = _serve(tmp_path, "--dev", "--backend", f"local:{ROOT / 'triton_repo'}")
    assert result.returncode == 2 and "refusing to start" in result.stderr
    assert "dev-issuer-ed25519.pem" in result.stderr and "Traceback" not in result.stderr


def test_sec_04_token_cli_refuses_loose_dev_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    key = _key(tmp_path / "dev-issuer-ed25519.pem", 0o600)
    key.unlink()
    assert main(["token", "--sub", "a", "--tenant", "t", "--state-dir", str(tmp_path)]) == 0  # creates it 0600
    assert capsys.readouterr().out.startswith("eyJ")
    key.chmod(0o644)
    assert main(["token", "--sub", "a", "--tenant", "t", "--state-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "refusing the dev key" in captured.err


def test_sec_04_writable_policy_files_warn_and_count(world: World, tmp_path: Path) -> None:
    policies = world.render_policies(tmp_path / "p")
    writable = [p for p in policies.iterdir() if p.is_file() and os.access(p, os.W_OK)]
    assert writable, "the copied policy files are writable by this user"
    start = len(world.logs.text())
    service = build_service(_side_settings(world, tmp_path, policies=policies))
    rendered = service.metrics.render().decode()
    assert f'gateway_insecure_files{{kind="policy_writable"}} {float(len(writable))}' in rendered
    assert world.logs.text()[start:].count('"policy_file_writable"') == len(writable)
    assert {f.path for f in writable_policy_files(policies)} == set(writable)


# ------------------------------------------------------------------ SEC-10: policy path safety


def _copy_world_policies(world: World, tmp_path: Path) -> Path:
    return world.render_policies(tmp_path / "p")


def test_sec_10_symlink_to_world_writable_file_refused(world: World, tmp_path: Path) -> None:
    policies = _copy_world_policies(world, tmp_path)
    assert load_policy_dir(policies).revision
    elsewhere = tmp_path / "safe"
    elsewhere.mkdir(mode=0o755)
    target = elsewhere / "access.yaml"
    shutil.move(policies / "access.yaml", target)
    (policies / "access.yaml").symlink_to(target)
    assert load_policy_dir(policies).revision  # a symlink to a safe file is fine
    target.chmod(0o666)
    with pytest.raises(PolicyError, match="world-writable") as err:
        load_policy_dir(policies)
    assert err.value.issues[0].file == "access.yaml"
    target.chmod(0o644)
    elsewhere.chmod(0o777)  # the file is fine, but anyone can swap it
    with pytest.raises(PolicyError, match=r"directory .*safe is world-writable"):
        load_policy_dir(policies)


def test_sec_10_world_writable_file_or_directory_refused(world: World, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    policies = _copy_world_policies(world, tmp_path)
    (policies / "limits.yaml").chmod(0o646)
    with pytest.raises(PolicyError, match="world-writable"):
        load_policy_dir(policies)
    (policies / "limits.yaml").chmod(0o644)
    policies.chmod(0o777)
    with pytest.raises(PolicyError, match="unsafe policy directory"):
        load_policy_dir(policies)
    policies.chmod(0o775)  # group-writable: fine only for root's or the gateway's own group
    if os.geteuid() == 0:
        os.chown(policies, -1, 4242)
    else:
        monkeypatch.setattr(os, "getegid", lambda: policies.stat().st_gid + 1)
    with pytest.raises(PolicyError, match="writable by group"):
        load_policy_dir(policies)


def test_sec_10_configmap_layout_loads(world: World, tmp_path: Path) -> None:
    """Kubernetes ConfigMap volume: name -> ..data/name, ..data -> ..<timestamp>/, files 0444."""
    rendered = _copy_world_policies(world, tmp_path)
    mount = tmp_path / "mount"
    stamp = mount / "..2026_01_01_00_00_00.123"
    stamp.mkdir(parents=True)
    for path in rendered.iterdir():
        shutil.copy(path, stamp / path.name)
        (stamp / path.name).chmod(0o444)
        (mount / path.name).symlink_to(Path("..data") / path.name)
    (mount / "..data").symlink_to(stamp.name)
    assert load_policy_dir(mount).revision == load_policy_dir(rendered).revision
    # Through a symlinked policy directory too.
    (tmp_path / "link").symlink_to(mount)
    assert load_policy_dir(tmp_path / "link").revision == load_policy_dir(rendered).revision


def test_sec_10_reload_refuses_and_keeps_the_active_policy(metrics_side: SideGateway) -> None:
    side = metrics_side
    assert side.settings is not None and side.service is not None
    active = side.service.store.current.policy.revision
    path = side.settings.policies / "access.yaml"
    path.write_text(path.read_text() + "\n# edited\n")
    path.chmod(0o666)
    assert side.world.loop.run(side.service.store.reload("test")) is False
    assert side.service.store.current.policy.revision == active
    path.chmod(0o644)
    assert side.world.loop.run(side.service.store.reload("test")) is True


# ------------------------------------------------------------------ SEC-08: Triton deployment lint

RESTRICTED = {"model-repository", "shared-memory", "trace", "logging"}


def _flags(args: list[str]) -> dict[str, list[str]]:
    """``--flag=value`` and ``--flag value`` forms; every value of a repeated flag."""
    out: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        arg = str(args[i])
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if not eq and i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                value = str(args[i + 1])
                i += 1
            out.setdefault(name, []).append(value)
        i += 1
    return out


def triton_problems(args: list[str], user: str | int | None) -> list[str]:
    """What a Triton command line lacks against its secure deployment guide (CATALOGUE SEC-08)."""
    flags = _flags(args)
    problems: list[str] = []

    def one(name: str) -> str | None:
        values = flags.get(name, [])
        return values[-1].lower() if values else None

    if one("--model-control-mode") != "none":
        problems.append("--model-control-mode=none missing")
    for name, setting in (("--http-restricted-api", "http"), ("--grpc-restricted-protocol", "grpc")):
        restricted: set[str] = set()
        for value in flags.get(name, []):
            apis, sep, header = value.partition(":")
            if sep and "=" in header and header.split("=", 1)[1].strip():
                restricted |= {a.strip() for a in apis.split(",")}
        if not restricted >= RESTRICTED:
            problems.append(f"{setting}: not restricted: {sorted(RESTRICTED - restricted)}")
    for name in ("--allow-sagemaker", "--allow-vertex-ai", "--allow-metrics"):
        if one(name) not in {"false", "0", "off"}:
            problems.append(f"{name}=false missing")
    if not any(v.replace(" ", "").lower() in {"level=off"} for v in flags.get("--trace-config", [])):
        problems.append("--trace-config level=OFF missing")
    if flags.get("--trace-file") or flags.get("--trace-level"):
        problems.append("tracing configured")
    pool = one("--grpc-max-response-pool-size")
    if pool is None or not pool.isdigit() or not 0 < int(pool) <= 1024:
        problems.append("--grpc-max-response-pool-size not bounded")
    if str(user).split(":")[0] != "1000":
        problems.append(f"runs as {user}, not uid 1000")
    return problems


def _compose_triton() -> tuple[list[str], str | int | None]:
    triton = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["triton"]
    assert "ports" not in triton, "Triton publishes no port (metrics and admin APIs stay private)"
    return [str(a) for a in triton["command"][1:]], triton.get("user")


def _k8s_triton() -> tuple[list[str], str | int | None]:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "triton.yaml").read_text()))
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "triton")
    service = next(d for d in docs if d and d["kind"] == "Service")
    assert [p["port"] for p in service["spec"]["ports"]] == [8001], "the Service exposes gRPC only (no metrics)"
    uid = {**pod.get("securityContext", {}), **container.get("securityContext", {})}.get("runAsUser")
    return [str(a) for a in container["args"]], uid


@pytest.mark.parametrize("source", [_compose_triton, _k8s_triton], ids=["compose", "k8s"])
def test_sec_08_triton_deployment_lint(source: Callable[[], tuple[list[str], str | int | None]]) -> None:
    args, user = source()
    assert triton_problems(args, user) == []


def test_sec_08_lint_catches_each_missing_protection() -> None:
    args, user = _k8s_triton()
    assert triton_problems(args, user) == []
    for drop in ("--model-control-mode", "--http-restricted-api", "--grpc-restricted-protocol", "--allow-sagemaker",
                 "--allow-vertex-ai", "--trace-config", "--allow-metrics"):
        weaker = [a for a in args if not a.startswith(drop)]
        assert triton_problems(weaker, user), drop
    assert triton_problems([*args, "--model-control-mode=explicit"], user)
    assert triton_problems([a.replace("shared-memory,", "") for a in args], user)
    assert triton_problems([a for a in args if a != "64"] + ["--grpc-max-response-pool-size=0"], user)
    assert triton_problems(args, 0) and triton_problems(args, "root")


# ------------------------------------------------------------------ SEC-07: one parse of the backend

# Spellings a lax split read as loopback (or skipped) while gRPC was handed the whole string.
SMUGGLED_BACKENDS = ["grpc://[::1]:8001,10.0.0.5:8001", "grpc://[::1]@10.0.0.5:8001", "grpc://127.0.0.1%evil.test:8001",
                     "grpc://[::1]x:8001", "grpc://[::1]:8001/10.0.0.5:1", "grpc://127.0.0.1:8001/../x",
                     "grpc://localhost..:8001", "grpc://localhost:8001\n", "grpc://dns:///10.0.0.5:8001",
                     "grpc://ipv4:10.0.0.5:8001", "grpcs://10.0.0.5:8001", "http://10.0.0.5:8001", "10.0.0.5:8001",
                     "grpc://10.0.0.5", "grpc://127.0.0.1:0", "grpc://127.0.0.1:65536", "local:"]


@pytest.mark.parametrize("backend", SMUGGLED_BACKENDS)
def test_sec_07_backend_is_parsed_strictly(backend: str) -> None:
    with pytest.raises(StartupRefused, match="--backend must be"):
        check_upstream_transport(Settings(backend=backend, upstream_insecure=True))
    with pytest.raises(ValueError, match="--backend must be"):
        make_upstream(backend)


@pytest.mark.parametrize("backend", ["GRPC://10.0.0.5:8001", "Grpc://[::ffff:10.0.0.5]:8001", "grpc://127.1:8001",
                                     "grpc://0x7f000001:8001", "grpc://[fe80::1%eth0]:8001"])
def test_sec_07_other_spellings_of_a_remote_upstream_refused(backend: str) -> None:
    with pytest.raises(StartupRefused, match="--upstream-insecure"):
        check_upstream_transport(Settings(backend=backend))


def test_sec_07_channel_dials_the_parsed_target() -> None:
    assert parse_backend("grpc://[::1]:8001/") == GrpcTarget("::1", 8001)
    assert parse_backend("GRPC://LocalHost:8001") == GrpcTarget("LocalHost", 8001)
    assert parse_backend("grpc://[::1]:8001").address == "[::1]:8001"  # type: ignore[union-attr]
    assert parse_backend("local:triton_repo") is None
    assert check_upstream_transport(Settings(backend="GRPC://localhost:8001")) is None


@pytest.mark.parametrize("args", [["--backend", "grpc://[::1]:8001,10.0.0.5:8001"], ["--backend", "GRPC://10.0.0.5:8001"],
                                  ["--listen", "127.0.0.1:0"], ["--metrics-listen", "nope"]])
def test_sec_07_cli_refuses_bad_settings_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 args: list[str]) -> None:
    assert main(["serve", "--policies", str(tmp_path / "none"), "--state-dir", str(tmp_path / "state"),
                 "--audit-dir", str(tmp_path / "audit"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infergate: refusing to start: ") and "Traceback" not in err
    assert not (tmp_path / "audit").exists()


# ------------------------------------------------------------------ SEC-03 / I3: the Redis URL and its password

REDIS_PW = "s3cret-Redis-PW-7f1c"


@pytest.mark.parametrize("url", [f"redis://127.0.0.1:6379?password={REDIS_PW}", f"redis://:x@h:1?db={REDIS_PW}",
                                 f"redis://:{REDIS_PW}@h:1?ssl_ca_certs=/ca.pem", f"rediss://:{REDIS_PW}@h:1?ssl_cert_reqs=none",
                                 f"redis://:{REDIS_PW}@h:1?db=0&db=1", f"unix://:{REDIS_PW}@/run/r.sock?db=x",
                                 f"redis://:{REDIS_PW}@h:1?{REDIS_PW}", f"redis://:{REDIS_PW}@h:1?sentinel_password=x"])
def test_sec_03_redis_url_settings_never_ignored_nor_quoted(url: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """An ignored parameter is a setting that silently does not apply (``?password=`` = no AUTH)."""
    with pytest.raises(ValueError, match="state URL") as refused:
        parse_url(url)
    assert REDIS_PW not in str(refused.value)
    assert main(["serve", "--policies", str(tmp_path / "none"), "--state-dir", str(tmp_path / "state"),
                 "--audit-dir", str(tmp_path / "audit"), "--redis", url]) == 2
    err = capsys.readouterr().err
    assert "refusing to start: " in err and REDIS_PW not in err and "Traceback" not in err


def test_sec_03_redis_url_stays_off_the_command_line(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://default:{REDIS_PW}@redis:6379/0"
    monkeypatch.setenv(REDIS_URL_ENV, url)
    assert _redis_url(build_parser().parse_args(["serve"])) == url  # from the environment, silently
    assert capsys.readouterr().err == ""
    monkeypatch.delenv(REDIS_URL_ENV)
    assert _redis_url(build_parser().parse_args(["serve"])) is None
    assert _redis_url(build_parser().parse_args(["serve", "--redis", url])) == url  # works, but warns
    err = capsys.readouterr().err
    assert "WARNING" in err and REDIS_URL_ENV in err and REDIS_PW not in err
    assert _redis_url(build_parser().parse_args(["serve", "--redis", "redis://redis:6379/0"])) is not None
    assert capsys.readouterr().err == ""  # no password, nothing to warn about
    k8s = next(d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "gateway.yaml").read_text())
               if d and d["kind"] == "Deployment")
    container = next(c for c in k8s["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")
    assert not any("REDIS" in str(a) or str(a).startswith("--redis") for a in container["args"])
    assert REDIS_URL_ENV in {e["name"] for e in container["env"]}


# ------------------------------------------------------------------ SEC-10: every link on the way


def _links_world(world: World, tmp_path: Path) -> tuple[Path, Path, Path]:
    policies = _copy_world_policies(world, tmp_path)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # anyone may replace what is in here
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o755)
    return policies, open_dir, safe


def test_sec_10_policy_dir_link_in_a_world_writable_directory_refused(world: World, tmp_path: Path) -> None:
    policies, open_dir, _safe = _links_world(world, tmp_path)
    (open_dir / "pol").symlink_to(policies)
    with pytest.raises(PolicyError, match=r"unsafe policy directory: directory .*open is world-writable"):
        load_policy_dir(open_dir / "pol")
    (tmp_path / "pol").symlink_to(policies)  # the same link in a safe directory loads
    assert load_policy_dir(tmp_path / "pol").revision == load_policy_dir(policies).revision


@pytest.mark.parametrize("via", ["file_link", "dir_link"])
def test_sec_10_link_chain_through_a_world_writable_directory_refused(world: World, tmp_path: Path,
                                                                       via: str) -> None:
    """``access.yaml -> open/x -> safe/access.yaml``: the target is safe, the middle link is anyone's."""
    policies, open_dir, safe = _links_world(world, tmp_path)
    shutil.move(policies / "access.yaml", safe / "access.yaml")
    if via == "file_link":
        (open_dir / "acc").symlink_to(safe / "access.yaml")
        (policies / "access.yaml").symlink_to(open_dir / "acc")
    else:
        (open_dir / "d").symlink_to(safe)
        (policies / "access.yaml").symlink_to(Path("..") / "open" / "d" / "access.yaml")
    with pytest.raises(PolicyError, match=r"world-writable") as err:
        load_policy_dir(policies)
    assert err.value.issues[0].file == "access.yaml"
    open_dir.chmod(0o755)
    assert load_policy_dir(policies).revision


def test_sec_10_link_in_a_sticky_directory_judged_by_its_owner(world: World, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A sticky world-writable directory (mode 1777): a link there is safe only while it belongs
    to root or the gateway's user (others may not rename or delete entries they do not own)."""
    policies, open_dir, _safe = _links_world(world, tmp_path)
    open_dir.chmod(0o1777)
    (open_dir / "pol").symlink_to(policies)
    assert load_policy_dir(open_dir / "pol").revision
    if os.geteuid() == 0:
        os.lchown(open_dir / "pol", 4242, -1)  # someone else's link
    else:
        real = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: real + 1)
    with pytest.raises(PolicyError, match="in sticky directory"):
        load_policy_dir(open_dir / "pol")


# ------------------------------------------------------------------ SEC-06: no asyncio debug mode in production


@pytest.mark.parametrize("how", ["PYTHONASYNCIODEBUG", "unset"])
def test_sec_06_asyncio_debug_stays_off_outside_dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Debug mode logs callback arguments (request bytes): ``serve`` runs its loop with ``debug=False``."""
    if how == "unset":
        monkeypatch.delenv("PYTHONASYNCIODEBUG", raising=False)
    else:
        monkeypatch.setenv("PYTHONASYNCIODEBUG", "1")
    ran: list[dict[str, Any]] = []

    def fake_run(coro: Any, **kwargs: Any) -> None:
        coro.close()
        ran.append(kwargs)

    monkeypatch.setattr("gateway.cli.asyncio.run", fake_run)
    monkeypatch.setattr("gateway.observability.logging.configure_logging", lambda _level: None)
    args = ["serve", "--backend", f"local:{ROOT / 'triton_repo'}", "--policies", str(ROOT / "policies"),
            "--state-dir", str(tmp_path / "state"), "--audit-dir", str(tmp_path / "audit")]
    with structlog.testing.capture_logs() as logged:
        assert main(args) == 0
    assert ran == [{"debug": False}]
    warned = [e for e in logged if e["event"] == "asyncio_debug_disabled"]
    assert len(warned) == (1 if how == "PYTHONASYNCIODEBUG" else 0)
    assert all(e["log_level"] == "warning" for e in warned)
    with structlog.testing.capture_logs():
        assert main([*args, "--dev"]) == 0  # --dev leaves Python's own choice
    assert ran[-1] == {"debug": None}
