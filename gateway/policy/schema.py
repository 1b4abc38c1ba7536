"""The shape of every policy file, as frozen pydantic models.

``extra="forbid"`` everywhere, so a misspelt key is an error rather than a silent
default; strict scalar types, so YAML 1.1's ``no`` never becomes a role or a model name.
Each file in ``policies/`` maps to one top-level model (see :data:`POLICY_FILES`).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from gateway.drift.policy import DriftPolicy
from gateway.policy.model import StrictModel
from gateway.stages.base import Mode

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)

PositiveInt = Annotated[StrictInt, Field(gt=0)]
Seconds = Annotated[StrictFloat | StrictInt, Field(gt=0, le=3600)]




class LimitsPolicy(StrictModel):
    """Hard caps applied while parsing, before any model or stage sees the request."""

    max_body_bytes: PositiveInt = Field(8 * 1024 * 1024, description="Body cap, also after decompression.")
    max_elements_per_tensor: PositiveInt = Field(1_048_576, description="Elements in one tensor.")
    max_dims: PositiveInt = Field(8, le=64, description="Rank of one tensor.")
    max_bytes_element: PositiveInt = Field(65_536, description="Bytes in one BYTES element.")
    max_inputs: PositiveInt = Field(64, description="Input tensors in one request.")
    max_in_flight: PositiveInt = Field(
        256, description="Requests processed at once by one gateway process; beyond it 503 + Retry-After "
                         "(load shedding instead of unbounded queues).",
    )
    write_timeout_s: Seconds = Field(
        30.0, description="Time a client has to read a whole response; a slower reader's connection is closed "
                          "(counted, logged and audited).",
    )
    body_timeout_s: Seconds = Field(
        30.0, description="Time a client has to send a whole request body; a slower sender gets 408.",
    )
    max_connections: PositiveInt = Field(
        4096, description="Client connections one gateway process holds open on the HTTP listener; a new one "
                          "beyond it is answered 503 + Retry-After and closed before anything is read (with TLS: "
                          "counted from accept, closed before the handshake). The gRPC front has the same cap of its "
                          "own, fixed at start. Keep both together well below the process's file-descriptor limit "
                          "(ulimit -n).",
    )
    max_connections_per_ip: PositiveInt | None = Field(
        None, description="Open connections per client address (the socket peer); beyond it 503 and close. "
                          "Omitted = only max_connections (behind a load balancer every client shares its "
                          "address).",
    )


class UpstreamPolicy(StrictModel):
    infer_timeout_s: Seconds = Field(10.0, description="Deadline of one inference call.")
    metadata_timeout_s: Seconds = Field(2.0, description="Deadline of metadata and readiness calls.")
    metadata_cache_s: Annotated[StrictFloat | StrictInt, Field(ge=0, le=3600)] = Field(
        30.0, description="How long model metadata is cached for request validation.",
    )
    breaker_failures: PositiveInt = Field(5, description="Consecutive upstream failures that open a model's circuit.")
    breaker_cooldown_s: Seconds = Field(5.0, description="How long an open circuit fails fast before one probe.")


class ModelPolicy(StrictModel):
    versions: tuple[Annotated[StrictStr, Field(pattern=r"^[0-9]{1,19}$")], ...] | None = Field(
        None, description="Versions that may be called; a call naming no version goes to the newest listed one "
                          "the upstream serves (never to an unlisted upstream default). Omitted = any the upstream "
                          "serves.",
    )
    max_in_flight: PositiveInt | None = Field(
        None, description="Inference calls to this model processed at once by one gateway process; beyond it "
                          "503 + Retry-After (reason model_load_shed), so one slow model cannot take every "
                          "slot of limits.max_in_flight. Omitted = only the process-wide cap.",
    )
    drift: DriftPolicy | None = Field(
        None, description="Data and prediction drift monitoring against the training profile; omitted = off.",
    )


class StageSwitch(StrictModel):
    mode: Mode = Mode.ENFORCE


class StagesPolicy(StrictModel):
    """Per-stage switches. Authentication has no switch: it is always enforced."""

    model_exposure: StageSwitch = StageSwitch()


class AuditPolicy(StrictModel):
    """Read at startup (the audit log belongs to the process, not to a revision)."""

    retention_days: Annotated[StrictInt, Field(gt=0, le=36_500)] | None = Field(
        None, description="Delete segments older than this, behind a signed tombstone; omitted = keep all.",
    )
    stdout: StrictBool = Field(False, description="Also write every committed record to stdout (log shippers).")
    append_timeout_s: Annotated[StrictFloat | StrictInt, Field(gt=0, le=30)] = Field(
        2.0, description="Longest a request waits for its audit record to be durable (a stalled disk); "
                         "then 503 audit_unavailable, and new requests are refused at once until the "
                         "writer moves again. The refusal is recorded once the disk heals.",
    )


EnvName = Annotated[StrictStr, Field(pattern=r"^[A-Z_][A-Z0-9_]{0,127}$")]
_PY_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


class FileFlagProvider(StrictModel):
    """Evaluate ``policies/flags.json`` in this process (the default): no I/O per request."""

    kind: Literal["file"] = "file"


class _RemoteFlagProvider(StrictModel):
    timeout_s: Annotated[StrictFloat | StrictInt, Field(gt=0, le=10)] = Field(
        0.5, description="Deadline of one evaluation; later = the flag's stable variant.")
    cooldown_s: Annotated[StrictFloat | StrictInt, Field(ge=0, le=300)] = Field(
        5.0, description="After the provider failed, serve stable without asking it for this long.")


class OfrepFlagProvider(_RemoteFlagProvider):
    """A remote OFREP service (OpenFeature Remote Evaluation Protocol), e.g. flagd on port 8016."""

    kind: Literal["ofrep"]
    url: StrictStr = Field(pattern=r"^https?://[^\s/?#@]+(/[^\s?#]*)?$",
                           description="Base URL; evaluations go to <url>/ofrep/v1/evaluate/flags/<key>.")
    auth_header: StrictStr = Field("Authorization", pattern=r"^[A-Za-z0-9\-]{1,64}$")
    auth_env: EnvName | None = Field(
        None, description="Environment variable holding the header's value; the secret never goes in policy.")
    allow_http: StrictBool = Field(False, description="Plain http to a host other than loopback.")

    @model_validator(mode="after")
    def _transport(self) -> OfrepFlagProvider:
        host = urlsplit(self.url).hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        # SECURITY: the answers choose which model serves a call and whether a stage runs;
        # on a plain-http path anyone in between could choose for us.
        if self.url.startswith("http://") and not loopback and not self.allow_http:
            raise ValueError("an ofrep url must be https (or http to loopback, or set allow_http: true)")
        return self


class PythonFlagProvider(_RemoteFlagProvider):
    """Any OpenFeature provider installed in the environment, built as ``Class(**config, **secrets)``."""

    kind: Literal["python"]
    factory: StrictStr = Field(pattern=rf"^{_PY_NAME}(\.{_PY_NAME})*:{_PY_NAME}(\.{_PY_NAME})*$",
                               description="package.module:ProviderClass (a subclass of AbstractProvider).")
    config: dict[StrictStr, JsonValue] = Field(default_factory=dict, description="Constructor keyword arguments.")
    secret_env: dict[StrictStr, EnvName] = Field(
        default_factory=dict, description="Constructor argument -> environment variable holding its value.")
    threaded: StrictBool = Field(True, description="Evaluate in worker threads (the provider blocks on I/O); "
                                                   "false = await its async methods on the event loop.")

    @model_validator(mode="after")
    def _no_overlap(self) -> PythonFlagProvider:
        both = sorted(set(self.config) & set(self.secret_env))
        if both:
            raise ValueError(f"{both} are set in both config and secret_env")
        return self


class FlagsPolicy(StrictModel):
    """Where flag values come from. ``flags.json`` stays the allow-list and the fallback:
    routes, variants, kill switches and thresholds are always the reviewed file's."""

    provider: Annotated[FileFlagProvider | OfrepFlagProvider | PythonFlagProvider,
                        Field(discriminator="kind")] = FileFlagProvider()


class MetricsPolicy(StrictModel):
    """Who may scrape ``/metrics`` on the main listener (CATALOGUE SEC-09)."""

    allow_from: tuple[StrictStr, ...] = Field(
        ("127.0.0.0/8", "::1/128"),
        description="Client networks (CIDR) allowed to read /metrics on the main listener; others get 403. "
                    "The client address is the socket peer, or X-Forwarded-For only through --trusted-proxy. "
                    "[] serves /metrics on --metrics-listen only.",
    )

    @field_validator("allow_from")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                net = ipaddress.ip_network(entry, strict=True)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not a network in CIDR form: {exc}") from exc
            if net.prefixlen == 0:
                # SECURITY: 0.0.0.0/0 would serve metrics to the whole internet.
                raise ValueError(f"{entry!r} allows every address; name the scraper's networks")
        return value


_HOST_NAME_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*")


class HttpPolicy(StrictModel):
    """The REST front's view of the hosts it serves (CATALOGUE HTTP-08)."""

    allowed_hosts: tuple[StrictStr, ...] = Field(
        (),
        description="Host names (or IP literals, IPv6 without brackets) authenticated requests may name in "
                    "their Host header, port ignored, case-insensitive; any other host gets 421. Health "
                    "probes and /metrics are not held to it (kubelets address pods by IP). () = any "
                    "well-formed Host; a malformed Host is a 400 either way.",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            ip_ok = True
            try:
                ipaddress.ip_address(entry)
            except ValueError:
                ip_ok = False
            if not ip_ok and not _HOST_NAME_RE.fullmatch(entry):
                raise ValueError(f"{entry!r} is not a lower-case host name or IP address (no port, no scheme)")
        return value


class GatewayPolicy(StrictModel):
    """``gateway.yaml``: limits, upstream deadlines and the models the gateway exposes."""

    audit: AuditPolicy = AuditPolicy()
    metrics: MetricsPolicy = MetricsPolicy()
    http: HttpPolicy = HttpPolicy()
    limits: LimitsPolicy = LimitsPolicy()
    upstream: UpstreamPolicy = UpstreamPolicy()
    stages: StagesPolicy = StagesPolicy()
    flags: FlagsPolicy = FlagsPolicy()
    models: dict[StrictStr, ModelPolicy] = Field(
        default_factory=dict,
        description="Models the gateway exposes; any other name is answered like an unknown model.",
    )

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelPolicy]) -> dict[str, ModelPolicy]:
        for name in value:
            if not _NAME_RE.match(name):
                raise ValueError(f"model name {name!r} must match {NAME_PATTERN}")
        return value


Algorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
                    "HS256", "HS384", "HS512"]
_FAMILIES = ({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}, {"ES256"}, {"ES384"}, {"EdDSA"},
             {"HS256", "HS384", "HS512"})


class JwksSettings(StrictModel):
    refresh_cooldown_s: Seconds = Field(30, description="At most one refresh for an unknown kid per this.")
    fetch_timeout_s: Seconds = Field(2, description="Deadline of one JWKS or discovery fetch.")
    allow_http: StrictBool = Field(False, description="Allow plain http URLs (loopback tests only).")
    max_stale_s: Annotated[StrictFloat | StrictInt, Field(ge=0, le=604_800)] = Field(
        86_400, description="While the JWKS cannot be fetched, how long past their TTL cached keys are still used; "
                            "after that requests get 503 (fail closed). 0 = never past the TTL.",
    )


class IssuerKeys(StrictModel):
    """Where the issuer's keys come from: exactly one source."""

    pem: StrictStr | None = Field(None, description="A PEM SubjectPublicKeyInfo (asymmetric issuers).")
    jwks: dict[StrictStr, Any] | None = Field(None, description="A static JWK set {keys: [...]}.")
    jwks_url: StrictStr | None = Field(None, description="A JWKS URL, fetched and cached.")
    oidc_discovery: StrictStr | None = Field(None, description="An OIDC discovery URL naming the JWKS.")
    hs_secret_env: StrictStr | None = Field(
        None, description="Name of the environment variable holding an HS shared secret (>= 32 bytes). "
                          "Secrets never live in policy files.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> IssuerKeys:
        given = [n for n in ("pem", "jwks", "jwks_url", "oidc_discovery", "hs_secret_env") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(f"give exactly one key source, got {given or 'none'}")
        return self


class IssuerPolicy(StrictModel):
    """A trusted token issuer. One key family per issuer: the token never chooses it."""

    issuer: StrictStr = Field(min_length=1)
    audiences: tuple[StrictStr, ...] = Field(min_length=1)
    algorithms: tuple[Algorithm, ...] = Field(min_length=1)
    keys: IssuerKeys
    jwks_settings: JwksSettings = JwksSettings()
    subject_claim: StrictStr = "sub"
    tenant_claim: StrictStr = "tenant"
    roles_claim: StrictStr = "roles"
    required_claims: tuple[StrictStr, ...] = ("exp", "iat", "sub")
    leeway_s: Annotated[StrictInt, Field(ge=0, le=300)] = 30
    max_lifetime_s: Annotated[StrictInt, Field(gt=0, le=86_400 * 7)] = 86_400
    token_types: tuple[StrictStr, ...] | None = Field(
        None, description="Accepted JOSE `typ` values (e.g. [at+jwt], RFC 9068); omitted = any. Stops ID and "
                          "refresh tokens of the same issuer being replayed as access tokens.",
    )
    required_scope: StrictStr | None = Field(
        None, description="A scope the token's `scope` claim must hold for inference (403 otherwise).",
    )
    allowed_roles: tuple[StrictStr, ...] | None = Field(
        None, description="Roles this issuer may grant; others in its tokens are dropped. Omitted = any.",
    )

    @model_validator(mode="after")
    def _one_family(self) -> IssuerPolicy:
        algs = set(self.algorithms)
        if not any(algs <= family for family in _FAMILIES):
            raise ValueError("algorithms must all belong to one key family (e.g. only RS*/PS*, or only ES256)")
        symmetric = algs <= _FAMILIES[-1]
        if symmetric != (self.keys.hs_secret_env is not None):
            raise ValueError("HS* algorithms need keys.hs_secret_env, and hs_secret_env needs HS* algorithms")
        return self


class ApiKeyPolicy(StrictModel):
    """A service account. Only the SHA-256 of the key is stored; delete the entry to revoke."""

    id: StrictStr = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: StrictStr = Field(min_length=1)
    roles: tuple[StrictStr, ...] = Field(min_length=1)


class IdentityPolicy(StrictModel):
    """``identity.yaml``: who may call. The dev issuer is added by ``--dev`` only."""

    issuers: tuple[IssuerPolicy, ...] = ()
    api_keys: tuple[ApiKeyPolicy, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> IdentityPolicy:
        names = [i.issuer for i in self.issuers]
        if len(names) != len(set(names)):
            raise ValueError("an issuer is listed twice")
        ids = [k.id for k in self.api_keys]
        hashes = [k.sha256 for k in self.api_keys]
        if len(ids) != len(set(ids)) or len(hashes) != len(set(hashes)):
            raise ValueError("an API key id or hash is listed twice")
        return self


Action = Literal["infer", "metadata", "audit:read", "audit:erase", "budget:admin", "pii:unmask", "policy:read",
                 "drift:read"]
MODEL_ACTIONS = frozenset({"infer", "metadata"})
# An output tensor name as the fronts accept it: printable ASCII without spaces.
OUTPUT_NAME_PATTERN = r"^[!-~]{1,256}$"


class Grant(StrictModel):
    actions: tuple[Action | Literal["*"], ...] = Field(min_length=1)
    models: tuple[StrictStr, ...] = Field(("*",), description="Model names, or * for every model of the tenant.")
    versions: tuple[Annotated[StrictStr, Field(pattern=r"^[0-9]{1,19}$")], ...] | None = Field(
        None, description="Versions that may be called; a call naming no version goes to the newest granted one "
                          "the upstream serves (404 if none). Omitted = any.",
    )
    outputs: tuple[Annotated[StrictStr, Field(pattern=OUTPUT_NAME_PATTERN)], ...] | None = Field(
        None, min_length=1,
        description="Output tensors of the grant's models this grant releases on inference (OWASP API3, BOPLA). "
                    "A request naming any other output is refused (403, authz_output_denied); a request naming "
                    "none receives only these; any other output the model returns is dropped before the answer "
                    "is built. Names may come from any model of the grant; `policy check` refuses a name no "
                    "model declares and a model none of the names belongs to (when its config.pbtxt is "
                    "known). Roles add up: the union over the caller's matching grants. Omitted = every output.",
    )

    @model_validator(mode="after")
    def _outputs_need_infer(self) -> Grant:
        if self.outputs is None:
            return self
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError("outputs: a name is listed twice")
        if "infer" not in self.actions and "*" not in self.actions:
            raise ValueError("outputs restrict inference answers, but this grant does not grant infer")
        return self


class TenantPolicy(StrictModel):
    models: tuple[StrictStr, ...] = Field(description="Models this tenant may see at all.")


class AccessPolicy(StrictModel):
    """``access.yaml``: tenants, and what each role may do within its own tenant. Deny by default."""

    non_enumeration: StrictBool = Field(
        True, description="A model outside the caller's reach is answered exactly like an unknown model (404).",
    )
    tenants: dict[StrictStr, TenantPolicy] = Field(default_factory=dict)
    roles: dict[StrictStr, tuple[Grant, ...]] = Field(default_factory=dict)
