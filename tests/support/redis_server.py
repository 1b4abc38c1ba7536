"""Real ``redis-server`` processes for tests: one server, or a Redis Cluster, on loopback.

Uses the Debian ``redis-server``/``redis-cli`` binaries (``tools/test.sh`` installs them).
Every server gets a free 127.0.0.1 port, its own temporary directory, no persistence
unless asked (``--save '' --appendonly no``), and dies with the test process: each child
is started with ``PR_SET_PDEATHSIG`` = SIGKILL, and :func:`stop_all` (registered with
``atexit``) kills whatever a test forgot, so no server outlives a run. (The death signal
follows the *thread* that started the server: start servers from the main thread, not
from ``asyncio.to_thread``.)

Usage::

    server = RedisServer.start(tmp_path)
    server.url                     # redis://127.0.0.1:PORT/0
    server.pause(); server.resume()  # SIGSTOP / SIGCONT
    server.stop(); server.restart()  # same port, same directory
    server.kill()                  # SIGKILL
    RedisServer.start_sentinel(tmp_path, server.port)   # a Sentinel watching it

    cluster = RedisClusterProcess.start(tmp_path, masters=3, replicas=1)
    cluster.url                    # redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...
    cluster.master_for_key("ig:{tag}:...")  # the RedisServer serving that key's slot
    heirs = cluster.replicas_of(master); master.kill()
    cluster.wait_failover(heirs)   # until one of them took over the killed master's slots
    cluster.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
HOST = "127.0.0.1"

_LIVE: set[subprocess.Popen[bytes]] = set()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stop_all() -> None:
    """Kill every server still running (also registered with ``atexit``)."""
    for proc in list(_LIVE):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        _LIVE.discard(proc)


atexit.register(stop_all)


def available() -> bool:
    return os.access(REDIS_SERVER, os.X_OK) and os.access(REDIS_CLI, os.X_OK)


def free_port(*, with_bus: bool = False) -> int:
    """A free loopback port (and port + 10000 for a cluster bus, when asked)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind((HOST, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def cli(port: int, *args: str, timeout: float = 5.0) -> str:
    out = subprocess.run([REDIS_CLI, "-h", HOST, "-p", str(port), *args], capture_output=True,
                         timeout=timeout, check=False)
    return out.stdout.decode(errors="replace").strip()


@dataclass
class RedisServer:
    port: int
    directory: Path
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    config: Path | None = None  # a config file, first on the command line (Sentinel needs one)

    @classmethod
    def start(cls, directory: Path, *, port: int | None = None, appendonly: bool = False,
              cluster: bool = False, extra: tuple[str, ...] = ()) -> RedisServer:
        directory.mkdir(parents=True, exist_ok=True)
        # Replicas sync at once (Redis 7 waits 5 s for more replicas before a diskless sync).
        args = ["--appendonly", "yes" if appendonly else "no", "--repl-diskless-sync-delay", "0"]
        if cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0",
                     "--cluster-require-full-coverage", "yes"]
        # A free port can be taken between the probe and the bind (another process on the
        # machine): pick a fresh one and try again rather than failing the suite.
        for attempt in range(4):
            server = cls(port or free_port(with_bus=cluster), directory, (*args, *extra))
            try:
                server.launch()
            except RuntimeError:
                server.stop()
                if port is not None or attempt == 3:
                    raise
                (directory / "nodes.conf").unlink(missing_ok=True)  # a half-born cluster identity
                continue
            return server
        raise AssertionError("unreachable")

    @classmethod
    def start_sentinel(cls, directory: Path, master_port: int, *, service: str = "mymaster",
                       down_after_ms: int = 500) -> RedisServer:
        """A Sentinel (quorum 1) watching the master on ``master_port``."""
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"
        config.write_text(f"sentinel monitor {service} {HOST} {master_port} 1\n"
                          f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                          f"sentinel failover-timeout {service} 2000\n")
        server = cls(free_port(), directory, ("--sentinel",), config=config)
        server.launch()
        return server

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launch(self, timeout: float = 10.0) -> None:
        """Start (or start again) on the same port and directory; returns once it answers PING."""
        cmd = [REDIS_SERVER, *([str(self.config)] if self.config else []),
               "--port", str(self.port), "--bind", HOST, "--protected-mode", "yes",
               "--save", "", "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"),
               "--daemonize", "no", *self.extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        _LIVE.add(self.proc)
        self.paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            try:
                answer = cli(self.port, "PING", timeout=1)
            except subprocess.TimeoutExpired:
                # A loaded host, or something else that accepts on this port and never
                # answers: not ready; past the deadline start() tries a fresh port.
                continue
            if answer == "PONG" or answer.startswith("NOAUTH"):
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {self.port} did not answer: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        path = self.directory / "redis.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def cli(self, *args: str) -> str:
        return cli(self.port, *args)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts TCP connections; nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: a clean shutdown (connections refused afterwards)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _LIVE.discard(self.proc)

    def kill(self) -> None:
        """SIGKILL: the process vanishes mid-whatever (a crashed host)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait()
        _LIVE.discard(self.proc)
        self.paused = False

    def restart(self) -> None:
        self.stop()
        self.launch()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class RedisClusterProcess:
    """A Redis Cluster made by ``redis-cli --cluster create`` on loopback ports."""

    nodes: list[RedisServer] = field(default_factory=list)

    @classmethod
    def start(cls, directory: Path, *, masters: int = 3, replicas: int = 1,
              timeout: float = 30.0) -> RedisClusterProcess:
        cluster = cls()
        try:
            for i in range(masters * (1 + replicas)):
                cluster.nodes.append(RedisServer.start(directory / f"node{i}", cluster=True))
            addrs = [f"{HOST}:{n.port}" for n in cluster.nodes]
            out = subprocess.run([REDIS_CLI, "--cluster", "create", *addrs, "--cluster-replicas", str(replicas),
                                  "--cluster-yes"], capture_output=True, timeout=timeout, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"cluster create failed: {out.stdout.decode()[-2000:]} {out.stderr.decode()[-500:]}")
            cluster.wait_healthy(timeout=timeout, replicas=replicas)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def url(self) -> str:
        live = [n for n in self.nodes if n.running]
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in live)

    def by_port(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def topology(self) -> list[dict[str, str]]:
        """``CLUSTER NODES`` as seen by a live node: id, port, flags, master id, slot ranges."""
        rows = []
        for line in self.any_node().cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            rows.append({"id": fields[0], "port": fields[1].split("@")[0].rsplit(":", 1)[1],
                         "flags": fields[2], "master": fields[3], "slots": " ".join(fields[8:])})
        return rows

    def masters(self) -> list[RedisServer]:
        """Nodes that hold slots as masters and are not marked failed."""
        return [self.by_port(int(r["port"])) for r in self.topology()
                if "master" in r["flags"] and "fail" not in r["flags"] and r["slots"]]

    def master_for_key(self, key: str) -> RedisServer:
        slot = int(self.any_node().cli("CLUSTER", "KEYSLOT", key))
        for row in self.topology():
            if "master" not in row["flags"] or "fail" in row["flags"]:
                continue
            for span in row["slots"].split():
                lo, _, hi = span.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return self.by_port(int(row["port"]))
        raise LookupError(f"no master serves slot {slot}")

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        rows = self.topology()
        master_id = next(r["id"] for r in rows if int(r["port"]) == master.port)
        return [self.by_port(int(r["port"])) for r in rows if r["master"] == master_id]

    def any_node(self) -> RedisServer:
        return next(n for n in self.nodes if n.running and not n.paused)

    def wait_healthy(self, *, timeout: float = 30.0, replicas: int = 0) -> None:
        """Until every running node says ``cluster_state:ok`` and masters have their replicas."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.running and not n.paused]
            ok = all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in live)
            if ok and replicas:
                ok = all("master_link_status:up" in n.cli("INFO", "replication")
                         for n in live if "role:slave" in n.cli("INFO", "replication"))
                ok = ok and all(f"connected_slaves:{replicas}" in m.cli("INFO", "replication")
                                for m in self.masters())
            if ok:
                return
            time.sleep(0.05)
        raise RuntimeError("redis cluster did not become healthy in time")

    def wait_failover(self, candidates: list[RedisServer], *, timeout: float = 20.0) -> RedisServer:
        """Until one of ``candidates`` (the dead master's replicas) is a master and the cluster is ok."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in candidates:
                if node.running and "role:master" in node.cli("INFO", "replication") and all(
                        "cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes if n.running):
                    return node
            time.sleep(0.05)
        raise RuntimeError("no failover happened in time")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
