"""Process settings: where to listen, which upstream, where state lives. Not policy.

Settings are fixed for the life of a process (changing them means a restart); policy
is what security teams edit and the gateway hot-reloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.tls import TlsSettings


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
        if self.backend.startswith("local:"):
            return Path(self.backend[len("local:"):])
        return Path("triton_repo")

    @staticmethod
    def parse_listen(value: str) -> tuple[str, int]:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--listen wants HOST:PORT, got {value!r}")
        return host.strip("[]") or "127.0.0.1", int(port)
