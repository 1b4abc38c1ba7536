"""Request and trace identifiers: unique, right length, and not shared with a forked worker."""

from __future__ import annotations

import os
import re
import threading

from gateway.context import new_request_id, traceparent_for
from gateway.ids import random_hex


def test_ids_are_hex_of_the_asked_length_and_never_repeat() -> None:
    seen = {random_hex(16) for _ in range(20_000)}  # crosses many 4 KiB refills
    assert len(seen) == 20_000
    assert all(re.fullmatch(r"[0-9a-f]{32}", s) for s in seen)
    assert len(random_hex(5000)) == 10_000  # larger than one batch


def test_threads_never_get_the_same_bytes() -> None:
    out: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [random_hex(8) for _ in range(5000)]
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == len(out) == 20_000


def test_a_forked_child_does_not_replay_the_parents_pool() -> None:
    random_hex(8)  # the parent now holds a partly used batch
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.write(write, random_hex(16).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    assert child != random_hex(16)  # the parent's next slice is not what the child got


def test_generated_traceparent_and_request_id_are_valid() -> None:
    tp = traceparent_for(None)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", tp)
    kept = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert traceparent_for(kept).startswith("00-" + "a" * 32 + "-")
    assert re.fullmatch(r"[0-9a-f]{32}", new_request_id("bad id with spaces"))


def test_request_id_holding_pii_is_replaced() -> None:
    # Well-formed by the charset rule, but an SSN / card number / IP would reach every log line.
    for offered in ("078-05-1120", "4111111111111111", "id-4111111111111111", "10.0.0.1"):
        assert re.fullmatch(r"[0-9a-f]{32}", new_request_id(offered)), offered
    assert new_request_id("550e8400-e29b-41d4-a716-446655440000") == "550e8400-e29b-41d4-a716-446655440000"
    assert new_request_id("req-1") == "req-1"
