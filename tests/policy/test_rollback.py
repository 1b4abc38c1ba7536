"""Rollback protection that survives a restart: the newest accepted signing time is kept in
the state directory, so an older validly-signed bundle put back while the gateway was down
(or seen by another worker) is refused at startup (exit 2) and on reload (``replayed``)."""

from __future__ import annotations

import contextlib
import json
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.app import build_app, build_service
from gateway.policy.bundle import BUNDLE_FILE, BundleError, BundleInfo, sign_bundle
from gateway.policy.loader import PolicyError
from gateway.policy.rollback import HIGHWATER_FILE, RollbackGuard
from gateway.settings import Settings
from tests.support.gateway_proc import ROOT, free_port
from tests.support.policy_bundles import BROKEN_GATEWAY, KeyPair, force_sign, make_keys, signed_copy, valid_edit

from ..conftest import TRITON_REPO

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def _stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _info(t: datetime, revision: str = "r") -> BundleInfo:
    return BundleInfo(key_id="0123456789abcdef", signed_at=_stamp(t), revision=revision)


@pytest.fixture
def key(tmp_path: Path) -> KeyPair:
    return make_keys(tmp_path / "keys")


def _settings(tmp_path: Path, policies: Path, key: KeyPair) -> Settings:
    return Settings(policies=policies, backend=f"local:{TRITON_REPO}", audit_dir=tmp_path / "audit",
                    state_dir=tmp_path / "state", dev=True, policy_trusted_keys=(key.public_path,))


def _old_and_new(tmp_path: Path, key: KeyPair) -> tuple[Path, Path]:
    """Two signed copies: ``old`` signed at T0, ``new`` (one edit) signed an hour later."""
    old = signed_copy(tmp_path / "old", key)
    sign_bundle(old, key.private, now=T0)
    new = tmp_path / "policies"
    shutil.copytree(old, new)
    valid_edit(new, "removes a grant")
    sign_bundle(new, key.private, now=T0 + timedelta(hours=1))
    return old, new


def _put_back(old: Path, live: Path) -> None:
    shutil.rmtree(live)
    shutil.copytree(old, live)


class TestGuard:
    def test_first_bundle_is_recorded_0600_and_newer_ones_advance(self, tmp_path: Path) -> None:
        guard = RollbackGuard(tmp_path / "state")
        assert guard.read() is None
        guard.advance(_info(T0, "a"))
        path = tmp_path / "state" / HIGHWATER_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        guard.advance(_info(T0 + timedelta(seconds=1), "b"))
        mark = guard.read()
        assert mark is not None and (mark.revision, mark.signed_at) == ("b", _stamp(T0 + timedelta(seconds=1)))

    def test_an_older_bundle_is_refused_naming_both_signing_times(self, tmp_path: Path) -> None:
        guard = RollbackGuard(tmp_path)
        guard.advance(_info(T0, "new"))
        with pytest.raises(BundleError) as info:
            guard.advance(_info(T0 - timedelta(seconds=1), "old"))
        assert info.value.reason == "replayed"
        text = str(info.value)
        assert _stamp(T0) in text and _stamp(T0 - timedelta(seconds=1)) in text and "revision new" in text
        mark = guard.read()
        assert mark is not None and mark.revision == "new"  # the refusal did not move the mark

    def test_same_second_other_content_is_accepted_and_keeps_the_mark(self, tmp_path: Path) -> None:
        guard = RollbackGuard(tmp_path)
        guard.advance(_info(T0, "a"))
        guard.advance(_info(T0, "b"))
        mark = guard.read()
        assert mark is not None and mark.revision == "a"

    @pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"format": "x"}', b"\xff" * 10,
                                         b'{"format": "infergate-policy-highwater/1", "signed_at": "yesterday", '
                                         b'"revision": "r", "key_id": "k"}',
                                         b'{"format": "infergate-policy-highwater/1", "signed_at": 1, '
                                         b'"revision": "r", "key_id": "k"}',
                                         b" " * 5000])
    def test_a_corrupt_mark_fails_closed(self, tmp_path: Path, content: bytes) -> None:
        path = tmp_path / HIGHWATER_FILE
        path.write_bytes(content)
        path.chmod(0o600)
        with pytest.raises(PolicyError) as info:
            RollbackGuard(tmp_path).check(_info(T0))
        assert info.value.reason == "error" and "corrupt" in str(info.value)
        assert path.read_bytes() == content  # never silently reset

    def test_a_mark_others_can_write_is_refused_unless_allowed(self, tmp_path: Path) -> None:
        RollbackGuard(tmp_path).advance(_info(T0))
        (tmp_path / HIGHWATER_FILE).chmod(0o666)
        with pytest.raises(PolicyError, match="unsafe"):
            RollbackGuard(tmp_path).check(_info(T0))
        RollbackGuard(tmp_path, allow_insecure=True).check(_info(T0))

    def test_concurrent_advances_keep_the_newest(self, tmp_path: Path) -> None:
        """Workers sharing the state directory: no advance is lost, whatever the order."""
        times = [T0 + timedelta(seconds=s) for s in (5, 1, 9, 3, 7, 2, 8, 4, 6, 0) * 4]

        def advance(t: datetime) -> None:
            # An older one arriving after a newer one is refused: correct.
            with contextlib.suppress(BundleError):
                RollbackGuard(tmp_path).advance(_info(t, _stamp(t)))

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(advance, times))
        mark = RollbackGuard(tmp_path).read()
        assert mark is not None and mark.signed_at == _stamp(T0 + timedelta(seconds=9))
        assert sorted(p.name for p in tmp_path.iterdir()) == [".policy-highwater.lock", HIGHWATER_FILE]


class TestAcrossRestart:
    async def test_an_old_bundle_put_back_while_down_does_not_start(self, tmp_path: Path, key: KeyPair) -> None:
        old, live = _old_and_new(tmp_path, key)
        settings = _settings(tmp_path, live, key)
        build_service(settings)  # the newer bundle ran once: its signing time is recorded
        _put_back(old, live)
        with pytest.raises(BundleError) as info:
            build_app(settings)
        assert info.value.reason == "replayed"
        assert _stamp(T0) in str(info.value) and _stamp(T0 + timedelta(hours=1)) in str(info.value)
        # A deliberate return: the old content signed again (a newer signing time) starts.
        sign_bundle(live, key.private, now=T0 + timedelta(hours=2))
        service = build_service(settings)
        assert service.store.current.bundle is not None
        assert service.store.current.bundle.signed_at == _stamp(T0 + timedelta(hours=2))

    async def test_a_worker_on_an_older_revision_refuses_what_another_worker_superseded(
        self, tmp_path: Path, key: KeyPair
    ) -> None:
        """Worker B still serves T0; worker A accepted T0+2h. A bundle signed at T0+1h is newer
        than B's own revision, but older than what the shared state recorded: refused."""
        old, live = _old_and_new(tmp_path, key)  # live is signed at T0+1h
        middle = tmp_path / "middle"
        shutil.copytree(live, middle)
        _put_back(old, live)
        settings = _settings(tmp_path, live, key)
        worker_a, worker_b = build_service(settings), build_service(settings)
        valid_edit(live, "a later edit")
        sign_bundle(live, key.private, now=T0 + timedelta(hours=2))
        assert await worker_a.store.reload("test") is True
        _put_back(middle, live)
        assert await worker_b.store.reload("test") is False
        failure = worker_b.store.last_failure
        assert failure is not None and failure.reason == "replayed"
        assert "before the newest accepted bundle" in failure.error
        assert worker_b.store.current.bundle is not None
        assert worker_b.store.current.bundle.signed_at == _stamp(T0)  # last-known-good kept
        mark = json.loads((settings.state_dir / HIGHWATER_FILE).read_text())
        assert mark["signed_at"] == _stamp(T0 + timedelta(hours=2))

    async def test_a_candidate_that_does_not_compile_does_not_move_the_mark(
        self, tmp_path: Path, key: KeyPair
    ) -> None:
        old, live = _old_and_new(tmp_path, key)
        _put_back(old, live)
        settings = _settings(tmp_path, live, key)
        service = build_service(settings)
        (live / "gateway.yaml").write_text(BROKEN_GATEWAY)
        force_sign(live, key)  # trusted and newer, but the policy does not load
        assert await service.store.reload("test") is False
        assert service.store.last_failure is not None and service.store.last_failure.reason == "invalid"
        mark = json.loads((settings.state_dir / HIGHWATER_FILE).read_text())
        assert mark["signed_at"] == _stamp(T0)

    @pytest.mark.parametrize("workers", [1, 2])
    def test_serve_exits_2_naming_both_signing_times(self, tmp_path: Path, key: KeyPair, workers: int) -> None:
        old, live = _old_and_new(tmp_path, key)
        build_service(_settings(tmp_path, live, key))
        _put_back(old, live)
        proc = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--dev", "--listen", f"127.0.0.1:{free_port()}",
             "--backend", f"local:{TRITON_REPO}", "--policies", str(live), "--state-dir", str(tmp_path / "state"),
             "--audit-dir", str(tmp_path / "audit"), "--policy-trusted-key", str(key.public_path),
             "--workers", str(workers)],
            capture_output=True, cwd=ROOT, timeout=120, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 2, err
        assert "signed before the active one, not starting" in err
        assert _stamp(T0) in err and _stamp(T0 + timedelta(hours=1)) in err
        assert (live / BUNDLE_FILE).exists()


def test_an_unparseable_signing_time_is_refused_and_never_recorded(tmp_path: Path) -> None:
    guard = RollbackGuard(tmp_path)
    odd = BundleInfo(key_id="0123456789abcdef", signed_at="2026-01-01T12:00:00+00:00", revision="r")
    with pytest.raises(BundleError) as info:
        guard.advance(odd)
    assert info.value.reason == "replayed" and "not a signing time" in str(info.value)
    assert guard.read() is None


@pytest.mark.parametrize("kind", ["symlink_to_device", "directory"])
def test_a_mark_that_is_not_a_regular_file_fails_closed(tmp_path: Path, kind: str) -> None:
    path = tmp_path / HIGHWATER_FILE
    if kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/null")
    with pytest.raises(PolicyError) as info:
        RollbackGuard(tmp_path).advance(_info(T0))
    assert info.value.reason == "error"


def test_a_state_dir_that_cannot_be_written_refuses_with_a_clear_reason(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the state directory should be")
    with pytest.raises(PolicyError) as info:
        RollbackGuard(tmp_path / "state").advance(_info(T0))
    assert info.value.reason == "error" and "cannot lock the policy rollback state" in str(info.value)
