"""Process configuration the gateway refuses to start with (CATALOGUE SEC-04, SEC-07).

Policy is validated by the policy loader; this module judges what only the operator's
command line and the filesystem decide: the transport to the upstream, and who can read
the secret files the process holds. Each check either passes, refuses start-up
(:class:`StartupRefused`, the CLI exits 2), or — under an explicit override flag —
returns findings the caller logs loudly and counts in ``gateway_insecure_files``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from gateway.keyfiles import secret_file_problem
from gateway.settings import Settings, parse_backend

if TYPE_CHECKING:
    from gateway.observability.metrics import Metrics
    from gateway.stages.ratelimit import RateLimitPolicy

log = structlog.get_logger("gateway.startup")


class StartupRefused(Exception):
    """An unsafe process configuration; the message names the override, if there is one."""


# --------------------------------------------------------------------------- SEC-07


def upstream_host(backend: str) -> str | None:
    """The host of a ``grpc://HOST:PORT`` backend; ``None`` for the in-process backend.

    Raises :class:`StartupRefused` for a backend that is neither (``settings.parse_backend``).
    """
    try:
        target = parse_backend(backend)
    except ValueError as exc:
        raise StartupRefused(str(exc)) from None
    return None if target is None else target.host


def is_loopback_host(host: str) -> bool:
    """Loopback by address, or the name ``localhost``; any other name is not (no DNS here).

    # SECURITY: a name is judged as written, never resolved: what it resolves to can change
    # after start-up, and ``triton`` in a cluster is a remote pod whatever /etc/hosts says.
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def check_upstream_transport(settings: Settings) -> str | None:
    """Refuse plaintext gRPC to a non-loopback upstream; the warning to log if overridden.

    # SECURITY: tensors (PII included) and the upstream's answers cross the network in the
    # clear otherwise, and anyone on the path can answer in Triton's name. TLS (``--upstream-tls``,
    # mTLS with ``--upstream-tls-cert/-key``) or an explicit ``--upstream-insecure`` is required.
    """
    host = upstream_host(settings.backend)
    if host is None or settings.upstream_tls or is_loopback_host(host):
        return None
    if not settings.upstream_insecure:
        raise StartupRefused(
            f"upstream {settings.backend} is not on loopback and the channel has no TLS; use --upstream-tls "
            "(--upstream-tls-ca/--upstream-tls-cert/--upstream-tls-key for mTLS), or --upstream-insecure "
            "if a private network protects the channel")
    return (f"INSECURE: plaintext gRPC to {settings.backend} (--upstream-insecure): tensors and answers are "
            "readable and forgeable by anyone on that network path")


def per_worker_limits_warning(settings: Settings, workers: int, limits: RateLimitPolicy) -> str | None:
    """The warning to print when ``--workers N`` would multiply the rate limits by N.

    # SECURITY: without Redis each worker keeps its limits in its own memory, and the kernel
    # spreads connections over the workers (SO_REUSEPORT): a client opening fresh
    # connections gets up to N times every rate, quota, concurrency and pre-auth limit.
    # DP budgets are not affected (shared through the state directory). Not refused, since
    # the limits still bind each worker; but the operator must hear it at start-up.
    """
    if workers <= 1 or (settings.redis_url not in (None, "memory://")):
        return None
    if not limits.limits and limits.pre_auth is None:
        return None
    return (f"--workers {workers} without --redis: each worker enforces the rate limits, quotas, concurrency "
            f"caps and pre-auth limit of limits.yaml on its own, so a client spread over the workers gets up to "
            f"{workers} times each; use --redis for limits exact across workers")


# --------------------------------------------------------------------------- SEC-06


def loop_debug(settings: Settings) -> bool | None:
    """The ``debug=`` for ``asyncio.run``: ``False`` outside ``--dev`` (warned if asked for), else Python's choice.

    # SECURITY (SEC-06): ``PYTHONASYNCIODEBUG=1`` or ``python -X dev`` left in a production
    # environment would put the loop in debug mode, whose slow-callback warnings log the
    # repr of each callback *with its arguments* (request bytes, a token being verified),
    # and whose origin tracking costs every task a stack capture. Not refused (the variable
    # is often inherited unnoticed), but never in effect and always said.
    """
    if settings.dev:
        return None
    if sys.flags.dev_mode or os.environ.get("PYTHONASYNCIODEBUG"):
        log.warning("asyncio_debug_disabled", reason="PYTHONASYNCIODEBUG or -X dev outside --dev",
                    message="asyncio debug mode stays off: it logs callback arguments (request data)")
    return False


# --------------------------------------------------------------------------- SEC-04


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # secret_file | policy_writable
    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def _audit_key_files(key_dir: Path) -> Iterator[Path]:
    for folder in (key_dir, key_dir / "anchor"):
        if folder.is_dir():
            yield from sorted(p for p in folder.iterdir() if p.suffix == ".key" or p.name == "CURRENT")


def secret_files(settings: Settings, *, state_files: Iterable[str] = ()) -> list[Path]:
    """Every private file this configuration makes the process read (public keys excluded)."""
    paths = [settings.state_dir / name for name in state_files]
    if settings.tls is not None:
        paths.append(settings.tls.key)
    if settings.upstream_key is not None:
        paths.append(settings.upstream_key)
    key_dir = settings.audit_key_dir or settings.audit_dir.with_name(settings.audit_dir.name + "-keys")
    paths += _audit_key_files(key_dir)
    return paths


def check_secret_files(settings: Settings, *, state_files: Iterable[str] = ()) -> list[Finding]:
    """Refuse loose secret files unless ``--allow-insecure-secret-files``; then return them."""
    findings = [Finding("secret_file", p, problem) for p in secret_files(settings, state_files=state_files)
                if (problem := secret_file_problem(p)) is not None]
    if findings and not settings.allow_insecure_secret_files:
        listed = "; ".join(str(f) for f in findings)
        raise StartupRefused(f"unsafe secret files: {listed} (fix with chmod 600 / chown, or start with "
                             "--allow-insecure-secret-files to only warn)")
    return findings


def writable_policy_files(directory: Path) -> list[Finding]:
    """Policy files the gateway itself could rewrite: a warning, not a refusal.

    A compromised gateway process that can edit its own policy can switch its protections
    off at the next reload; production mounts policy read-only (a ConfigMap, ``:ro``).
    Development edits the files in place, so this is reported, not refused.
    """
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if os.access(path, os.W_OK):
            found.append(Finding("policy_writable", path, "writable by the gateway's user"))
    return found


STATE_SECRET_FILES = ("pii-hmac.key", "pii-token.key")


def state_secret_files(settings: Settings) -> tuple[str, ...]:
    """The secret files of the state directory this configuration reads."""
    from gateway.devissuer import KEY_FILE

    return STATE_SECRET_FILES + ((KEY_FILE,) if settings.dev else ())


def report_startup_findings(settings: Settings, metrics: Metrics, *, injected_upstream: bool = False) -> None:
    """Run every start-up check: refuse (raise), or log each overridden finding loudly and count it.

    ``injected_upstream``: the caller supplies the upstream object itself (tests), so no
    channel is built from ``settings.backend`` and its transport is not judged here.
    """
    warning = None if injected_upstream else check_upstream_transport(settings)
    if warning is not None:
        log.warning("upstream_insecure", backend=settings.backend, message=warning)
    secrets = check_secret_files(settings, state_files=state_secret_files(settings))
    for finding in secrets:
        log.warning("insecure_secret_file", path=str(finding.path), problem=finding.problem,
                    override="--allow-insecure-secret-files")
    metrics.insecure_files.labels(kind="secret_file").set(len(secrets))
    writable = writable_policy_files(settings.policies)
    for finding in writable:
        log.warning("policy_file_writable", path=str(finding.path), problem=finding.problem)
    metrics.insecure_files.labels(kind="policy_writable").set(len(writable))
