"""Policy files: strict validation with file/line errors, and the shipped set loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy.loader import PolicyError, build_policy_set, load_policy_dir, revision_of

from .conftest import POLICIES


def test_shipped_policies_load() -> None:
    policy = load_policy_dir(POLICIES)
    assert set(policy.gateway.models) == {"digits", "text_echo", "risk"}
    assert len(policy.revision) == 12


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        # a misspelt key is an error with its line, never a silent default
        (b"limits:\n  max_body_bytez: 3\n", 2, "max_body_bytez"),
        # anchors/aliases are refused (billion laughs, hidden sharing)
        (b"models:\n  digits: &a {}\n  risk: *a\n", 2, "anchors"),
        # duplicate keys: a reviewer would read one value, the loader take the other
        (b"models:\n  digits: {}\n  digits: {}\n", 3, "duplicate key"),
        # YAML 1.1 reads `no` as False: it must not become a model called "False"
        (b"models:\n  no: {}\n", 2, "models"),
        # wrong type
        (b"limits:\n  max_dims: many\n", 2, "max_dims"),
        # a zero limit makes no sense
        (b"limits:\n  max_inputs: 0\n", 2, "max_inputs"),
        # broken YAML
        (b"limits: [\n", 2, "invalid YAML"),
        # invalid model name
        (b"models:\n  ../etc: {}\n", 2, "model name"),
    ],
)
def test_invalid_gateway_policy_is_refused_with_location(text: bytes, line: int, needle: str) -> None:
    with pytest.raises(PolicyError) as info:
        build_policy_set({"gateway.yaml": text})
    issue = info.value.issues[0]
    assert issue.file == "gateway.yaml"
    assert issue.line == line, str(info.value)
    assert needle in str(info.value)


def test_unknown_policy_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "gatway.yaml").write_text("models: {}\n")
    with pytest.raises(PolicyError, match="unknown policy file"):
        load_policy_dir(tmp_path)


def test_non_utf8_policy_is_refused() -> None:
    with pytest.raises(PolicyError, match="UTF-8"):
        build_policy_set({"gateway.yaml": b"models:\n  \xff: {}\n"})


def test_revision_depends_on_bytes_only() -> None:
    a = {"gateway.yaml": b"models: {}\n", "identity.yaml": b"issuers: []\n"}
    b = dict(reversed(list(a.items())))
    assert revision_of(a) == revision_of(b)
    assert revision_of(a) != revision_of({**a, "gateway.yaml": b"models: {} \n"})


ISSUER = "issuers:\n  - issuer: x\n    audiences: [gw]\n"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        # no audience
        ("issuers:\n  - issuer: x\n    audiences: []\n    algorithms: [RS256]\n    keys: {pem: k}\n", "audiences"),
        # two key families for one issuer: the token would choose the key type
        (ISSUER + "    algorithms: [RS256, ES256]\n    keys: {pem: k}\n", "one key family"),
        # HS with a public key: the classic confusion
        (ISSUER + "    algorithms: [HS256]\n    keys: {pem: k}\n", "hs_secret_env"),
        # an asymmetric alg with an HS secret
        (ISSUER + "    algorithms: [RS256]\n    keys: {hs_secret_env: X}\n", "hs_secret_env"),
        # two key sources
        (ISSUER + "    algorithms: [RS256]\n    keys: {pem: k, jwks_url: 'https://x'}\n", "exactly one"),
        # alg none is not an algorithm
        (ISSUER + "    algorithms: [none]\n    keys: {pem: k}\n", "algorithms"),
        # the old inline key field is unknown
        (ISSUER + "    algorithms: [RS256]\n    public_key_pem: k\n", "public_key_pem"),
        # an API key stored in clear is not a hash
        ("api_keys:\n  - {id: bot, sha256: igk_secret, tenant: acme, roles: [analyst]}\n", "sha256"),
    ],
)
def test_invalid_identity_policy(text: str, needle: str) -> None:
    with pytest.raises(PolicyError) as info:
        build_policy_set({"identity.yaml": text.encode()})
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        # a tenant model the gateway does not expose
        ({"access.yaml": b"tenants:\n  acme: {models: [ghost]}\n"}, "not exposed"),
        # a role granting a model no tenant has
        ({"gateway.yaml": b"models: {digits: {}}\n",
          "access.yaml": b"tenants:\n  acme: {models: [digits]}\nroles:\n  r: [{actions: [infer], models: [risk]}]\n"},
         "belongs to no tenant"),
        # an API key for an unknown tenant and role
        ({"identity.yaml": b"api_keys:\n  - {id: bot, sha256: '" + b"a" * 64 + b"', tenant: nope, roles: [x]}\n"},
         "unknown tenant"),
    ],
)
def test_cross_file_contradictions(files: dict[str, bytes], needle: str) -> None:
    with pytest.raises(PolicyError, match=needle):
        build_policy_set(files)


def test_squeezing_on_a_dp_protected_model_is_refused(tmp_path: Path) -> None:
    """s8 probe (DP-09): feature squeezing scores the answer against a second upstream call's
    raw answer, and its score (audit record, detector metric) and flag/block decision are
    released without noise or charge; on a model of privacy.yaml it is a policy error."""
    import shutil

    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target, ignore=shutil.ignore_patterns("tests", "schema"))
    inputs = (target / "inputs.yaml").read_text(encoding="utf-8")
    squeezing = "    risk:\n      mode: flag\n      squeezing: {action: flag, bits: 3, threshold: 0.11}\n"
    assert "    risk:\n      mode: flag\n" in inputs
    (target / "inputs.yaml").write_text(inputs.replace("    risk:\n      mode: flag\n", squeezing), encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy_dir(target)
    [issue] = [i for i in info.value.issues if "squeezing" in i.message]
    assert issue.file == "inputs.yaml" and "DP-protected" in issue.message and issue.line > 1
    # the same check on a model without output noise is fine
    (target / "privacy.yaml").write_text("models: {}\n", encoding="utf-8")
    load_policy_dir(target)
