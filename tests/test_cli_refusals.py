"""Outsider probes of the ``infergate`` commands: a bad value or path is one line on stderr
and exit 2, never a traceback; the printed API-key entry cannot be bent by its inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.cli import main


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize("ttl", ["0", "-5", "86401", "999999999999999999999"])
def test_token_ttl_out_of_range_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], ttl: str) -> None:
    line = _refused(capsys, ["token", "--sub", "a", "--tenant", "t", "--state-dir", str(tmp_path), "--ttl", ttl])
    assert line.startswith("infergate token: error:") and "ttl" in line


def test_token_state_dir_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("x")
    line = _refused(capsys, ["token", "--sub", "a", "--tenant", "t", "--state-dir", str(tmp_path / "f" / "sub")])
    assert line.startswith("infergate token: error:")
    assert not any(p.name.endswith(".pem") for p in tmp_path.rglob("*"))


def test_policy_test_bad_regex_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(capsys, ["policy", "test", "policies", "--run", "("])
    assert line.startswith("infergate policy test: error:")


def test_policy_test_missing_repo_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m").mkdir()
    line = _refused(capsys, ["policy", "test", "policies", "--repo", str(tmp_path)])
    assert line.startswith("infergate policy test: error:")


@pytest.mark.parametrize("command", [["policy", "schema", "--out"], ["policy", "keygen", "--out"]])
def test_output_directory_under_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  command: list[str]) -> None:
    (tmp_path / "f").write_text("x")
    line = _refused(capsys, [*command, str(tmp_path / "f" / "out")])
    assert "error:" in line


def test_ctrl_c_is_exit_130_without_traceback(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import gateway.devissuer

    def interrupted(*_a: object, **_k: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(gateway.devissuer, "issue_token", interrupted)
    assert main(["token", "--sub", "a", "--tenant", "t"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err


def test_apikey_entry_cannot_be_bent_by_its_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apikey", "new", "--id", "x: y", "--tenant", "t\nroles: [admin]", "--roles", 'a], "x, ü']) == 0
    out = capsys.readouterr().out
    entry = out.split("identity.yaml:\n", 1)[1]
    parsed = yaml.safe_load(entry)
    assert parsed == [{"id": "x: y", "sha256": parsed[0]["sha256"], "tenant": "t\nroles: [admin]",
                       "roles": ["a]", '"x', "ü"]}]


@pytest.mark.parametrize("extra", [["--tls-cert", "cert.pem"], ["--tls-key", "key.pem"],
                                   ["--upstream-tls-cert", "c.pem"], ["--upstream-tls-key", "k.pem"]])
def test_serve_half_a_tls_pair_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          extra: list[str]) -> None:
    line = _refused(capsys, ["serve", "--state-dir", str(tmp_path), "--audit-dir", str(tmp_path / "a"), *extra])
    assert line.startswith("infergate: refusing to start:") and "go together" in line


@pytest.mark.parametrize("workers", ["0", "-3", "100000", "two"])
def test_serve_worker_count_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str], workers: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--workers", workers])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--workers" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["policy", "sign", "policies", "--key"],
                                     ["policy", "verify", "policies", "--trusted-key"]])
@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_key_file_that_is_a_fifo_or_dev_zero_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        command: list[str], special: str) -> None:
    import os

    from tests.support.liveness import no_hang_sync

    path = special
    if special == "fifo":
        path = str(tmp_path / "key.pem")
        os.mkfifo(path)
    with no_hang_sync("reading a special file as a key"):
        assert main([*command, path]) == 1
    err = capsys.readouterr().err
    assert "not a regular file" in err and "Traceback" not in err


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_drift_samples_that_are_a_fifo_or_dev_zero_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              special: str) -> None:
    """``drift report --samples`` reads a bounded regular file: a FIFO hung it, /dev/zero
    filled memory."""
    import os

    from tests.support.liveness import no_hang_sync

    path = special
    if special == "fifo":
        path = str(tmp_path / "rows.json")
        os.mkfifo(path)
    with no_hang_sync("reading a special file as samples"):
        assert main(["drift", "report", "--model", "digits", "--samples", path]) == 1
    err = capsys.readouterr().err
    assert "not a regular file" in err and "Traceback" not in err


@pytest.mark.parametrize(("flag", "value"), [("--sub", ""), ("--sub", " alice"), ("--tenant", ""),
                                             ("--tenant", "acme\n"), ("--sub", "a\x00b"), ("--sub", "alice\u200b"),
                                             ("--tenant", "ac\u202eme")])
def test_token_with_an_unusable_subject_or_tenant_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   flag: str, value: str) -> None:
    """The gateway refuses a token whose sub or tenant is empty, padded or holds control
    characters: the dev issuer does not mint one (no token printed, no key created)."""
    argv = {"--sub": "alice", "--tenant": "acme", flag: value}
    with pytest.raises(SystemExit) as exit_info:
        main(["token", "--sub", argv["--sub"], "--tenant", argv["--tenant"], "--state-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert flag in captured.err and "Traceback" not in captured.err and captured.out == ""
    assert not any(tmp_path.iterdir())


async def _write_trail(audit_dir: Path) -> None:
    from gateway.audit import AuditConfig, AuditLog

    log = AuditLog(AuditConfig.for_dir(audit_dir, checkpoint_every=1))
    for n in range(5):
        await log.append({"request_id": f"r{n}", "decision": "allow", "status": 200})
    await log.close()


def test_serve_on_a_truncated_audit_trail_is_refused_in_one_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """s8 probe: the trail behind its signed checkpoints stopped startup (as it should) with
    an AuditIntegrityError traceback and exit status 1."""
    import asyncio

    from tests.support.gateway_proc import free_port

    audit = tmp_path / "audit"
    asyncio.run(_write_trail(audit))
    [segment] = sorted(audit.glob("seg-*.jsonl"))
    segment.write_bytes(b"".join(segment.read_bytes().splitlines(keepends=True)[:-2]))
    capsys.readouterr()
    line = _refused(capsys, ["serve", "--dev", "--listen", f"127.0.0.1:{free_port()}", "--audit-dir", str(audit),
                             "--state-dir", str(tmp_path / "state"), "--log-level", "error"])
    assert line.startswith("infergate: refusing to start: the audit trail does not verify:")


@pytest.mark.parametrize("argv", [
    ["erase", "--subject", "alice"],
    ["export", "--subject", "alice", "--out", "{tmp}/out"],
    ["export", "--client-addr", "192.0.2.1", "--tenant", "acme", "--out", "{tmp}/out"],
    ["erase", "--subject", "alice", "--tenant", "ac\x1fme"],
])
def test_audit_subject_without_its_tenant_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           argv: list[str]) -> None:
    """s8 probe: ``audit erase --subject alice`` shredded alice of every tenant (one owner per
    sub). A sub names a person only within a tenant: --subject needs --tenant, an address
    takes none; exit 2 with the reason, and nothing erased, recorded or written."""
    import asyncio

    from gateway.audit import AuditConfig, AuditLog

    audit = tmp_path / "audit"

    async def write() -> None:
        log = AuditLog(AuditConfig.for_dir(audit))
        for n, tenant in enumerate(("acme", "globex")):
            await log.append({"request_id": f"r{n}", "tenant": tenant, "subject_id": "alice",
                              "subject_tenant": tenant, "decision": "allow", "status": 200})
        await log.close()

    asyncio.run(write())
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*"))
    line = _refused(capsys, ["audit", argv[0], str(audit), *(a.format(tmp=tmp_path) for a in argv[1:])])
    assert line.startswith("error: ")
    if "--tenant" not in argv:
        assert "--subject needs --tenant" in line
    elif "--client-addr" in argv:
        assert "--tenant goes with --subject only" in line
    assert sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*")) == before
