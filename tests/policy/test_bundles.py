"""Signed policy bundles: signing, verification, every kind of tampering, the CLI, startup."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.app import build_app
from gateway.cli import main
from gateway.observability.metrics import Metrics
from gateway.policy.bundle import BUNDLE_FILE, BundleError, BundleVerifier, load_bundle
from gateway.policy.compile import CompileEnv
from gateway.policy.loader import PolicyError, load_policy_dir
from gateway.policy.store import PolicyStore
from gateway.settings import Settings
from tests.support.gateway_proc import ROOT, free_port
from tests.support.policy_bundles import (
    BROKEN_GATEWAY,
    KeyPair,
    flip_one_byte,
    force_sign,
    make_keys,
    signed_copy,
    valid_edit,
)

from ..conftest import TRITON_REPO


@pytest.fixture
def key(tmp_path: Path) -> KeyPair:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def other_key(tmp_path: Path) -> KeyPair:
    return make_keys(tmp_path / "other-keys")


@pytest.fixture
def bundle(tmp_path: Path, key: KeyPair) -> Path:
    return signed_copy(tmp_path / "policies", key)


def verify(directory: Path, *keys: KeyPair) -> Any:
    return load_bundle(directory, BundleVerifier.from_files([k.public_path for k in keys]))


class TestSignAndVerify:
    def test_a_signed_bundle_verifies_and_names_its_signer(self, bundle: Path, key: KeyPair) -> None:
        policy, info = verify(bundle, key)
        assert info.key_id == key.key_id
        assert info.revision == policy.revision == load_policy_dir(bundle).revision
        manifest = json.loads((bundle / BUNDLE_FILE).read_text())["manifest"]
        # every file the loader reads is listed with its hash; the test cases are not loaded, so not listed
        assert sorted(manifest["files"]) == ["access.yaml", "flags.json", "gateway.yaml", "identity.yaml",
                                             "inputs.yaml", "limits.yaml", "pii.yaml", "privacy.yaml"]

    def test_the_signature_file_does_not_change_the_revision(self, bundle: Path, tmp_path: Path) -> None:
        plain = tmp_path / "plain"
        shutil.copytree(bundle, plain, ignore=shutil.ignore_patterns(BUNDLE_FILE))
        assert load_policy_dir(plain).revision == load_policy_dir(bundle).revision

    def test_private_key_is_0600_and_never_overwritten(self, key: KeyPair) -> None:
        assert stat.S_IMODE(key.private_path.stat().st_mode) == 0o600
        before = key.private_path.read_bytes()
        with pytest.raises(FileExistsError):
            make_keys(key.private_path.parent)
        assert key.private_path.read_bytes() == before

    def test_several_trusted_keys_allow_rotation(self, tmp_path: Path, key: KeyPair, other_key: KeyPair) -> None:
        old = signed_copy(tmp_path / "old", key)
        new = signed_copy(tmp_path / "new", other_key)
        assert verify(old, key, other_key)[1].key_id == key.key_id
        assert verify(new, key, other_key)[1].key_id == other_key.key_id

    def test_signing_refuses_an_invalid_policy(self, bundle: Path, key: KeyPair) -> None:
        (bundle / "gateway.yaml").write_text(BROKEN_GATEWAY)
        before = (bundle / BUNDLE_FILE).read_bytes()
        assert main(["policy", "sign", str(bundle), "--key", str(key.private_path)]) == 1
        assert (bundle / BUNDLE_FILE).read_bytes() == before

    def test_a_signed_but_invalid_policy_is_still_invalid(self, bundle: Path, key: KeyPair) -> None:
        (bundle / "gateway.yaml").write_text(BROKEN_GATEWAY)
        force_sign(bundle, key)
        with pytest.raises(PolicyError) as info:
            verify(bundle, key)
        assert not isinstance(info.value, BundleError)
        assert info.value.reason == "invalid"
        assert "duplicate key" in str(info.value)


def _remove_signature(d: Path, _k: KeyPair, _o: KeyPair) -> None:
    (d / BUNDLE_FILE).unlink()


def _flip_byte(d: Path, _k: KeyPair, _o: KeyPair) -> None:
    flip_one_byte(d / "limits.yaml")


def _remove_file(d: Path, _k: KeyPair, _o: KeyPair) -> None:
    (d / "limits.yaml").unlink()


def _add_unknown_file(d: Path, _k: KeyPair, _o: KeyPair) -> None:
    (d / "extra.yaml").write_text("x: 1\n")


def _untrusted_signer(d: Path, _k: KeyPair, other: KeyPair) -> None:
    valid_edit(d)
    force_sign(d, other)


def _manifest_rewritten(d: Path, _k: KeyPair, _o: KeyPair) -> None:
    """The attacker edits a file and fixes its hash in the manifest: the signature no longer matches."""
    import hashlib

    valid_edit(d)
    document = json.loads((d / BUNDLE_FILE).read_text())
    document["manifest"]["files"]["gateway.yaml"] = hashlib.sha256((d / "gateway.yaml").read_bytes()).hexdigest()
    (d / BUNDLE_FILE).write_text(json.dumps(document))


def _claims_trusted_key(d: Path, key: KeyPair, other: KeyPair) -> None:
    """Signed by an untrusted key while naming a trusted key id: still no trusted signature."""
    force_sign(d, other)
    document = json.loads((d / BUNDLE_FILE).read_text())
    document["manifest"]["key_id"] = key.key_id
    (d / BUNDLE_FILE).write_text(json.dumps(document))


def _garbage_signature(d: Path, _k: KeyPair, _o: KeyPair) -> None:
    (d / BUNDLE_FILE).write_text('{"manifest": {}, "signature": "not base64!"}')


def _duplicate_key_in_signature_file(d: Path, _k: KeyPair, _o: KeyPair) -> None:
    text = (d / BUNDLE_FILE).read_text()
    (d / BUNDLE_FILE).write_text(text.replace('"signature":', '"signature": "AAAA", "signature":'))


Mutation = Callable[[Path, KeyPair, KeyPair], None]


@pytest.mark.parametrize(
    ("mutate", "reason", "needle"),
    [
        (_remove_signature, "unsigned", "not signed"),
        (_flip_byte, "tampered", "limits.yaml:1:1: file differs from the signed bundle"),
        (_remove_file, "tampered", "limits.yaml:1:1: file of the signed bundle is missing"),
        # the loader would refuse an unknown file anyway; the signature check says why first
        (_add_unknown_file, "tampered", "extra.yaml:1:1: file is not in the signed bundle"),
        (_untrusted_signer, "untrusted", "not a trusted policy key"),
        (_manifest_rewritten, "tampered", "signature does not match"),
        (_claims_trusted_key, "tampered", "signature does not match"),
        (_garbage_signature, "tampered", "malformed"),
        (_duplicate_key_in_signature_file, "tampered", "malformed"),
    ],
)
def test_tampering_is_refused_with_its_reason(
    bundle: Path, key: KeyPair, other_key: KeyPair, mutate: Mutation, reason: str, needle: str
) -> None:
    mutate(bundle, key, other_key)
    with pytest.raises(BundleError) as info:
        verify(bundle, key)
    assert info.value.reason == reason
    assert needle in str(info.value)


def test_a_file_added_after_signing_is_refused(tmp_path: Path, key: KeyPair) -> None:
    """limits.yaml is a known, valid file: unsigned mode would load it; signed mode refuses it."""
    bundle = signed_copy(tmp_path / "policies", key, without=("limits.yaml",))
    shutil.copy(ROOT / "policies" / "limits.yaml", bundle / "limits.yaml")
    load_policy_dir(bundle)  # valid without signatures
    with pytest.raises(BundleError) as info:
        verify(bundle, key)
    assert (info.value.reason, str(info.value)) == ("tampered", "limits.yaml:1:1: file is not in the signed bundle")


def test_each_policy_file_is_read_once_and_parsed_from_those_bytes(
    bundle: Path, key: KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No second read: the bytes that were hashed are the bytes that are parsed."""
    opened: list[str] = []
    real_open = Path.open

    def spy(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.parent == bundle:
            opened.append(self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spy)
    env = CompileEnv(repo_dir=TRITON_REPO, pii_hmac_key=bytes(32), pii_token_key=bytes(32))
    store = PolicyStore(bundle, Metrics(), env, verifier=BundleVerifier.from_files([key.public_path]))
    snapshot = store.build()
    # each policy file and the signature opened exactly once
    assert sorted(opened) == sorted([BUNDLE_FILE, "access.yaml", "flags.json", "gateway.yaml", "identity.yaml",
                                     "inputs.yaml", "limits.yaml", "pii.yaml", "privacy.yaml"])
    assert snapshot.bundle is not None
    assert snapshot.bundle.key_id == key.key_id


def test_bytes_changed_after_the_read_do_not_reach_the_parser(bundle: Path, key: KeyPair) -> None:
    """Verification and parsing share one in-memory copy: what was verified is what is loaded."""
    from gateway.policy.loader import load_policy_bytes, read_policy_dir

    raw = read_policy_dir(bundle)
    (bundle / "gateway.yaml").write_text(BROKEN_GATEWAY)  # swapped on disk after the read
    info = BundleVerifier.from_files([key.public_path]).verify(bundle, raw)
    assert load_policy_bytes(raw).revision == info.revision
    with pytest.raises(BundleError):
        verify(bundle, key)  # a fresh load reads the swapped file and refuses it


class TestCli:
    def test_keygen_sign_verify(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        keys, policies = tmp_path / "k", tmp_path / "p"
        shutil.copytree(ROOT / "policies", policies, ignore=shutil.ignore_patterns("tests", BUNDLE_FILE))
        assert main(["policy", "keygen", "--out", str(keys)]) == 0
        assert "policy-signing.pub" in capsys.readouterr().out
        assert main(["policy", "verify", str(policies), "--trusted-key", str(keys / "policy-signing.pub")]) == 1
        assert "not signed" in capsys.readouterr().err
        assert main(["policy", "sign", str(policies), "--key", str(keys / "policy-signing.key")]) == 0
        assert main(["policy", "verify", str(policies), "--trusted-key", str(keys / "policy-signing.pub")]) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith("ok: revision ")
        flip_one_byte(policies / "pii.yaml")
        assert main(["policy", "verify", str(policies), "--trusted-key", str(keys / "policy-signing.pub")]) == 1
        err = capsys.readouterr().err
        assert "(tampered)" in err
        assert "pii.yaml:1:1: file differs from the signed bundle" in err

    def test_keygen_refuses_to_overwrite(self, key: KeyPair, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["policy", "keygen", "--out", str(key.private_path.parent)]) == 1
        assert "not overwriting" in capsys.readouterr().err

    def test_a_public_key_cannot_sign(self, bundle: Path, key: KeyPair, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["policy", "sign", str(bundle), "--key", str(key.public_path)]) == 1
        assert "cannot use" in capsys.readouterr().err


class TestStartup:
    def _settings(self, tmp_path: Path, policies: Path, *keys: Path) -> Settings:
        return Settings(policies=policies, backend=f"local:{TRITON_REPO}", audit_dir=tmp_path / "audit",
                        state_dir=tmp_path / "state", dev=True, policy_trusted_keys=keys)

    def test_an_unsigned_bundle_does_not_start(self, tmp_path: Path, key: KeyPair, bundle: Path) -> None:
        (bundle / BUNDLE_FILE).unlink()
        with pytest.raises(BundleError) as info:
            build_app(self._settings(tmp_path, bundle, key.public_path))
        assert info.value.reason == "unsigned"

    def test_a_missing_trusted_key_does_not_start(self, tmp_path: Path, bundle: Path) -> None:
        with pytest.raises(PolicyError, match="cannot use as a trusted policy key"):
            build_app(self._settings(tmp_path, bundle, tmp_path / "nope.pem"))

    @pytest.mark.parametrize(("mutate", "message"), [
        (_remove_signature, "the policy bundle is not signed, not starting"),
        (_flip_byte, "the policy bundle does not match its signature, not starting"),
        (_untrusted_signer, "the policy bundle is not signed by a trusted key, not starting"),
    ])
    def test_serve_exits_2_with_a_clear_message(
        self, tmp_path: Path, key: KeyPair, other_key: KeyPair, bundle: Path, mutate: Mutation, message: str
    ) -> None:
        mutate(bundle, key, other_key)
        proc = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--dev", "--listen", f"127.0.0.1:{free_port()}",
             "--backend", f"local:{TRITON_REPO}", "--policies", str(bundle), "--state-dir", str(tmp_path / "s"),
             "--audit-dir", str(tmp_path / "a"), "--policy-trusted-key", str(key.public_path)],
            capture_output=True, cwd=ROOT, timeout=120, check=False)
        assert proc.returncode == 2, proc.stderr.decode()
        assert message in proc.stderr.decode()
