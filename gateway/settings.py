"""Process settings: where to listen, which upstream, where state lives. Not policy.

Settings are fixed for the life of a process (changing them means a restart); policy
is what security teams edit and the gateway hot-reloads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from pathlib import Path

from gateway.tls import TlsSettings

# A DNS name as written (letters, digits, hyphens; dot-separated labels, one trailing dot).
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_AUTHORITY_RE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)(?P<zone>%[A-Za-z0-9_.-]{1,32})?\]|(?P<host>[^\[\]:/@%,]+))"
                           r":(?P<port>[0-9]{1,5})/?$")
BACKEND_FORMS = "local:DIR or grpc://HOST:PORT (HOST a DNS name, an IPv4 address or [IPv6])"


@dataclass(frozen=True, slots=True)
class GrpcTarget:
    """The one upstream a ``grpc://`` backend names: what the transport check judges is what is dialled."""

    host: str  # a DNS name, an IPv4 address, or an IPv6 address (with its zone) without brackets
    port: int

    @property
    def address(self) -> str:
        """``host:port`` as gRPC takes it (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_backend(backend: str) -> GrpcTarget | None:
    """``None`` for ``local:DIR`` (in process); the host and port of ``grpc://HOST:PORT``.

    Raises ``ValueError`` for anything else.

    # SECURITY (SEC-07): the backend is parsed once, strictly, and the channel is built from
    # the parsed value. A lax split let ``grpc://[::1]:8001,10.0.0.5:8001``,
    # ``grpc://[::1]@10.0.0.5:8001`` or ``grpc://127.0.0.1%evil:8001`` pass the loopback check
    # on one reading while gRPC was handed the whole string to read its own way; an upper-case
    # ``GRPC://`` skipped the check and crashed start-up with a traceback instead of a refusal.
    """
    scheme, sep, rest = backend.partition(":")
    if sep and scheme.lower() == "local" and not rest.startswith("//"):
        if not rest:
            raise ValueError(f"--backend must be {BACKEND_FORMS}; local: needs a directory")
        return None
    if not sep or scheme.lower() != "grpc" or not rest.startswith("//"):
        raise ValueError(f"--backend must be {BACKEND_FORMS}")
    match = _AUTHORITY_RE.fullmatch(rest[2:])
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"--backend must be {BACKEND_FORMS}, with one host, a port 1-65535 and nothing else")
    if match["v6"] is not None:
        try:
            IPv6Address(match["v6"])
        except ValueError:
            raise ValueError(f"--backend: [{match['v6']}] is not an IPv6 address") from None
        return GrpcTarget(match["v6"] + (match["zone"] or ""), int(match["port"]))
    host = match["host"]
    try:
        ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"--backend must be {BACKEND_FORMS}; {host!r} is neither") from None
    return GrpcTarget(host, int(match["port"]))


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    policies: Path = Path("policies")
    backend: str = "local:triton_repo"
    redis_url: str | None = None
    audit_dir: Path = Path("var/audit")
    audit_key_dir: Path | None = None  # default: <audit_dir>-keys
    state_dir: Path = Path("var")
    dev: bool = False
    policy_poll_s: float = 1.0
    # PEM Ed25519 public keys; when set, only policy bundles signed by one of them load.
    policy_trusted_keys: tuple[Path, ...] = ()
    # Proxies whose X-Forwarded-For is believed (CIDRs); the client address is the rightmost untrusted hop.
    trusted_proxies: tuple[str, ...] = ()
    # gRPC front (Triton's GRPCInferenceService); None = HTTP only.
    grpc_host: str | None = None
    grpc_port: int = 8001
    # TLS for both fronts, and for the upstream channel to Triton.
    tls: TlsSettings | None = None
    upstream_tls: bool = False
    upstream_ca: Path | None = None
    upstream_cert: Path | None = None
    upstream_key: Path | None = None
    # SECURITY: plaintext gRPC to a non-loopback upstream is refused unless this is set
    # (gateway/startup_checks.py); then it is logged as a warning at every start.
    upstream_insecure: bool = False
    # Secret files with loose modes or a foreign owner refuse start-up unless this is set
    # (then: a warning per file and gateway_insecure_files{kind="secret_file"}).
    allow_insecure_secret_files: bool = False
    # A second listener serving only /metrics (None: /metrics only on the main listener,
    # for the addresses of gateway.yaml metrics.allow_from).
    metrics_host: str | None = None
    metrics_port: int = 9464
    # Where model profiles (profile.json) live; default: the local backend's repository.
    profiles: Path | None = None
    embedded_threads: int = 2

    def profiles_dir(self) -> Path:
        if self.profiles is not None:
            return self.profiles
        if self.backend[:6].lower() == "local:":
            return Path(self.backend[6:])
        return Path("triton_repo")

    @staticmethod
    def parse_listen(value: str) -> tuple[str, int]:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--listen wants HOST:PORT, got {value!r}")
        return host.strip("[]") or "127.0.0.1", int(port)
