"""The ``infergate`` command: serve, tokens for development, policy and audit tools."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from gateway.settings import Settings

REDIS_URL_ENV = "INFERGATE_REDIS_URL"


def _redis_url(args: argparse.Namespace) -> str | None:
    """``--redis``, else the ``INFERGATE_REDIS_URL`` environment variable; checked before start.

    # SECURITY: a URL with a password belongs in the environment (a Kubernetes Secret), not
    # on the command line, where every local user reads it in ``ps`` and ``/proc/PID/cmdline``.
    # Given on the command line all the same, it still works, with a warning that never
    # repeats the password.
    """
    from gateway.state.redis import parse_url

    url: str | None = args.redis if args.redis is not None else (os.environ.get(REDIS_URL_ENV) or None)
    if url is None or url == "memory://":
        return url
    target = parse_url(url)  # ValueError names the problem, never the password
    if args.redis is not None and target.password:
        print(f"infergate: WARNING: --redis carries a password, which any local user can read in the process list; "
              f"pass the URL in the {REDIS_URL_ENV} environment variable instead", file=sys.stderr)
    return url


def _check_tls_pairs(args: argparse.Namespace) -> None:
    """A certificate without its key (or the reverse) is a half-configured TLS: refused,
    never a TypeError traceback nor a silent plaintext fallback."""
    for cert, key, name in ((args.tls_cert, args.tls_key, "--tls-cert and --tls-key"),
                            (args.upstream_tls_cert, args.upstream_tls_key,
                             "--upstream-tls-cert and --upstream-tls-key")):
        if bool(cert) != bool(key):
            raise ValueError(f"{name} go together; give both or neither")


def _serve(args: argparse.Namespace) -> int:
    from gateway.settings import parse_backend

    # Settings that do not parse (--listen, --redis, --backend): a clear refusal, exit 2, not
    # a traceback from deep in start-up (whose frames can show the value that did not parse).
    try:
        for listen in (args.listen, args.grpc_listen, args.metrics_listen):
            if listen:
                Settings.parse_listen(listen)
        parse_backend(args.backend)
        args.redis_url = _redis_url(args)
        _check_tls_pairs(args)
    except ValueError as exc:
        print(f"infergate: refusing to start: {exc}", file=sys.stderr)
        return 2
    return _serve_checked(args)


def _serve_checked(args: argparse.Namespace) -> int:
    from gateway.app import serve, serve_workers
    from gateway.audit.log import AuditIntegrityError
    from gateway.keyfiles import InsecureSecretFile
    from gateway.observability.logging import configure_logging
    from gateway.policy.loader import PolicyError
    from gateway.startup_checks import StartupRefused
    from gateway.tls import TlsSettings

    host, port = Settings.parse_listen(args.listen)
    grpc_host, grpc_port = Settings.parse_listen(args.grpc_listen) if args.grpc_listen else (None, 8001)
    tls = None
    if args.tls_cert or args.tls_key:
        tls = TlsSettings(cert=Path(args.tls_cert), key=Path(args.tls_key),
                          client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
                          require_client_cert=args.tls_require_client_cert)
    upstream_tls = bool(args.upstream_tls or args.upstream_tls_ca or args.upstream_tls_cert)
    metrics_host, metrics_port = Settings.parse_listen(args.metrics_listen) if args.metrics_listen else (None, 9464)
    settings = Settings(
        upstream_insecure=args.upstream_insecure, allow_insecure_secret_files=args.allow_insecure_secret_files,
        metrics_host=metrics_host, metrics_port=metrics_port,
        grpc_host=grpc_host, grpc_port=grpc_port, tls=tls, upstream_tls=upstream_tls,
        trusted_proxies=tuple(args.trusted_proxy),
        upstream_ca=Path(args.upstream_tls_ca) if args.upstream_tls_ca else None,
        upstream_cert=Path(args.upstream_tls_cert) if args.upstream_tls_cert else None,
        upstream_key=Path(args.upstream_tls_key) if args.upstream_tls_key else None,
        host=host, port=port, policies=Path(args.policies), backend=args.backend,
        redis_url=args.redis_url, audit_dir=Path(args.audit_dir), state_dir=Path(args.state_dir), dev=args.dev,
        profiles=Path(args.profiles) if args.profiles else None,
        policy_trusted_keys=tuple(Path(k) for k in args.policy_trusted_key),
    )
    configure_logging(args.log_level)
    base = f"{'https' if tls else 'http'}://{host}:{port}"
    lines = [f"infergate listening on {base} (backend {settings.backend}, policies {settings.policies})"]
    if grpc_host:
        lines.append(f"gRPC front (tritonclient.grpc) on {grpc_host}:{grpc_port}")
    if metrics_host:
        lines.append(f"metrics on http://{metrics_host}:{metrics_port}/metrics")
    if settings.dev:
        lines += [
            "Dev mode: a local token issuer is trusted. Get a token and send a first request:",
            "  TOKEN=$(.venv/bin/infergate token --sub alice --tenant acme --roles analyst)",
            f'  curl -s -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" '
            f"-d @examples/digits-request.json {base}/v2/models/digits/infer",
        ]
    try:
        from gateway.startup_checks import (
            check_secret_files,
            check_upstream_transport,
            loop_debug,
            state_secret_files,
        )

        # SECURITY: refused here, once, before any worker starts (SEC-04, SEC-07).
        insecure = check_upstream_transport(settings)
        if insecure is not None:
            print(f"infergate: WARNING: {insecure}", file=sys.stderr)
        check_secret_files(settings, state_files=state_secret_files(settings))
        if args.workers > 1:
            # Validate once in the parent so a bad policy fails fast, not N times.
            from gateway.policy.bundle import BundleVerifier, load_bundle
            from gateway.policy.rollback import RollbackGuard
            from gateway.startup_checks import per_worker_limits_warning

            keys = settings.policy_trusted_keys
            policy_set, info = load_bundle(settings.policies, BundleVerifier.from_files(keys) if keys else None)
            if info is not None:
                RollbackGuard(settings.state_dir, allow_insecure=settings.allow_insecure_secret_files).check(info)
            per_worker = per_worker_limits_warning(settings, args.workers, policy_set.limits)
            if per_worker is not None:
                print(f"infergate: WARNING: {per_worker}", file=sys.stderr)
            return serve_workers(settings, args.workers, log_level=args.log_level, ready_message="\n".join(lines))
        asyncio.run(serve(settings, ready_message="\n".join(lines)), debug=loop_debug(settings))  # SEC-06
    except PolicyError as exc:
        from gateway.policy.bundle import refusal_summary

        print(f"infergate: {refusal_summary(exc)}, not starting:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    except (StartupRefused, InsecureSecretFile) as exc:
        print(f"infergate: refusing to start: {exc}", file=sys.stderr)
        return 2
    except AuditIntegrityError as exc:
        # SECURITY: a truncated, rolled-back or edited trail stops startup (fail closed); it
        # is the operator's finding to act on, said in one line, not a crash trace.
        print(f"infergate: refusing to start: the audit trail does not verify: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _token(args: argparse.Namespace) -> int:
    from gateway.devissuer import issue_token
    from gateway.keyfiles import InsecureSecretFile

    roles = [r for r in args.roles.split(",") if r]
    try:
        print(issue_token(Path(args.state_dir), sub=args.sub, tenant=args.tenant, roles=roles, ttl_s=args.ttl))
    except InsecureSecretFile as exc:
        print(f"infergate: refusing the dev key: {exc}", file=sys.stderr)
        return 2
    return 0


def _apikey_new(args: argparse.Namespace) -> int:
    import secrets

    from gateway.stages.authn import API_KEY_PREFIX, api_key_hash

    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    import json

    # SECURITY: every value is written as a JSON string (valid YAML flow scalar): an id, tenant
    # or role holding a newline, ": " or "]" cannot add keys (say roles: [admin]) to the entry
    # the operator pastes into identity.yaml.
    roles = ", ".join(json.dumps(r.strip()) for r in args.roles.split(",") if r.strip())
    print(f"API key (shown once; give it to the service, it is not stored anywhere):\n  {key}\n")
    print("Add this entry under api_keys: in policies/identity.yaml:")
    print(f"  - id: {json.dumps(args.id)}\n    sha256: {api_key_hash(key)}\n"
          f"    tenant: {json.dumps(args.tenant)}\n    roles: [{roles}]")
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    from gateway.observability.metrics import Metrics
    from gateway.policy.compile import CompileEnv, compile_pipeline
    from gateway.policy.loader import PolicyError, load_policy_dir

    try:
        policy = load_policy_dir(Path(args.dir))
        # Placeholder keys: checking compiles every stage but never masks anything.
        compile_pipeline(policy, Metrics(), CompileEnv(repo_dir=Path(args.profiles), pii_hmac_key=bytes(32),
                                                       pii_token_key=bytes(32)))
    except PolicyError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{len(exc.issues)} error(s)", file=sys.stderr)
        return 1
    from gateway.policy.lint import no_policy_files, wildcard_grants

    warnings = [*no_policy_files(Path(args.dir)), *wildcard_grants(Path(args.dir))]
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    if warnings and args.strict:
        print(f"{len(warnings)} warning(s), failing (--strict)", file=sys.stderr)
        return 1
    print(f"ok: revision {policy.revision}" + (f" ({len(warnings)} warning(s))" if warnings else ""))
    return 0


def _claim_value(text: str) -> str:
    """An argparse type for a subject or tenant: the gateway refuses a token whose ``sub`` or
    ``tenant`` is empty, padded or holds control or invisible characters, so the CLI does not
    issue one (one rule: gateway.stages.authn.usable_principal_name)."""
    from gateway.stages.authn import usable_principal_name  # lazy: keeps CLI start-up light

    if not usable_principal_name(text):
        raise argparse.ArgumentTypeError(f"not a usable value: {text!r} (empty, padded or with control or "
                                         "invisible characters)")
    return text


def _positive_int(text: str) -> int:
    """An argparse type: 0 or a negative worker count is a usage error (exit 2), not a default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1024, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infergate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the gateway")
    serve.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080)")
    serve.add_argument("--policies", default="policies", help="policy directory (default ./policies)")
    serve.add_argument("--backend", default="local:triton_repo",
                       help="local:DIR (embedded onnxruntime) or grpc://HOST:PORT (Triton)")
    serve.add_argument("--trusted-proxy", action="append", default=[], metavar="CIDR",
                       help="a reverse proxy whose X-Forwarded-For is believed (repeatable)")
    serve.add_argument("--grpc-listen", default=None, help="HOST:PORT of the gRPC front (default: off)")
    serve.add_argument("--tls-cert", default=None, help="PEM certificate chain for both fronts")
    serve.add_argument("--tls-key", default=None, help="PEM private key for both fronts")
    serve.add_argument("--tls-client-ca", default=None, help="CA bundle to verify client certificates (mTLS)")
    serve.add_argument("--tls-require-client-cert", action="store_true", help="refuse clients without a certificate")
    serve.add_argument("--upstream-tls", action="store_true",
                       help="TLS to Triton (system roots unless --upstream-tls-ca)")
    serve.add_argument("--upstream-tls-ca", default=None)
    serve.add_argument("--upstream-tls-cert", default=None, help="client certificate for mTLS to Triton")
    serve.add_argument("--upstream-tls-key", default=None)
    serve.add_argument("--upstream-insecure", action="store_true",
                       help="allow plaintext gRPC to a non-loopback upstream (refused otherwise; logged as a warning)")
    serve.add_argument("--metrics-listen", default=None, metavar="HOST:PORT",
                       help="a separate listener serving only /metrics (host defaults to 127.0.0.1: ':9464')")
    serve.add_argument("--allow-insecure-secret-files", action="store_true",
                       help="warn (and count) instead of refusing secret files other users can read or own")
    serve.add_argument("--profiles", default=None,
                       help="directory of model profiles (profile.json); default: the local backend's repository")
    serve.add_argument("--redis", default=None,
                       help=f"redis://... for shared state (default: ${REDIS_URL_ENV} if set, else in memory); "
                            f"a URL with a password belongs in ${REDIS_URL_ENV}, not on the command line")
    serve.add_argument("--audit-dir", default="var/audit", help="audit trail directory (default ./var/audit)")
    serve.add_argument("--state-dir", default="var", help="local state such as the dev key (default ./var)")
    serve.add_argument("--dev", action="store_true", help="trust the local dev token issuer")
    serve.add_argument("--workers", type=_positive_int, default=1,
                       help="processes sharing the port (DP budgets are shared through --state-dir; rate limits are "
                            "exact across them only with --redis)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--policy-trusted-key", action="append", default=[], metavar="PUB.pem",
                       help="load only policy bundles signed by this Ed25519 key (repeatable, for rotation)")
    serve.set_defaults(func=_serve)

    token = sub.add_parser("token", help="print a token from the local dev issuer (for --dev)")
    token.add_argument("--sub", required=True, type=_claim_value)
    token.add_argument("--tenant", required=True, type=_claim_value)
    token.add_argument("--roles", default="", help="comma-separated roles")
    token.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    token.add_argument("--state-dir", default="var")
    token.set_defaults(func=_token)

    apikey = sub.add_parser("apikey", help="service-account API keys")
    apikey_sub = apikey.add_subparsers(dest="apikey_command", required=True)
    new_key = apikey_sub.add_parser("new", help="make a key and print the policy entry holding its hash")
    new_key.add_argument("--id", required=True)
    new_key.add_argument("--tenant", required=True)
    new_key.add_argument("--roles", required=True, help="comma-separated roles")
    new_key.set_defaults(func=_apikey_new)

    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate and compile a policy directory")
    check.add_argument("dir")
    check.add_argument("--profiles", default="triton_repo", help="model profiles to check detectors against")
    check.add_argument("--strict", action="store_true",
                       help="fail (exit 1) on warnings too, such as a wildcard grant outside the admin role")
    check.set_defaults(func=_policy_check)
    from gateway.policy.workflow_cli import add_workflow_commands

    add_workflow_commands(policy_sub)  # schema, test, diff
    from gateway.policy.bundle_cli import add_bundle_commands

    add_bundle_commands(policy_sub)

    from gateway.audit.cli import add_audit_parser

    add_audit_parser(sub)
    from gateway.drift.report import add_drift_parser

    add_drift_parser(sub)
    return parser


def _refusal_types() -> tuple[type[BaseException], ...]:
    """Errors a command refuses with one line: bad values (ValueError, a bad --run regex),
    paths that are missing, directories or not writable (OSError), a broken model repository."""
    import re

    from gateway.upstream.model_repo import ModelRepoError

    return (OSError, ValueError, re.error, ModelRepoError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit 2 with one line on stderr for a refused value or path, 130 on Ctrl-C.

    # SECURITY: one wrapper for every subcommand, so no traceback reaches the user (its frames
    # can show argument values, such as a token claim or a key path's contents); only the
    # exception's own message is printed, which names the problem, not a secret.
    """
    args = build_parser().parse_args(argv)
    command = " ".join(str(getattr(args, a)) for a in ("command", "apikey_command", "policy_command",
                                                         "audit_command", "drift_command")
                       if getattr(args, a, None))
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        print(f"infergate {command}: interrupted", file=sys.stderr)
        return 130
    except _refusal_types() as exc:
        print(f"infergate {command}: error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
