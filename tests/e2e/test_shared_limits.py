"""Two gateway processes sharing one real redis-server: a limit holds in total, not per process."""

from __future__ import annotations

import concurrent.futures
import shutil
from pathlib import Path

from tests.support.gateway_proc import post_json, start_gateway
from tests.support.redis_server import RedisServer

from ..conftest import DIGITS_BODY, POLICIES, TRITON_REPO

BURST = 10


def _post(url: str, token: str) -> int:
    return post_json(url, "/v2/models/digits/infer", DIGITS_BODY, token)


def test_two_gateways_share_one_limit(tmp_path: Path) -> None:
    redis = RedisServer.start(tmp_path / "redis")
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    limits = policies / "limits.yaml"
    text = limits.read_text()
    start = text.index("  - name: subject_rate")
    end = text.index("  - name:", start + 5)
    # one request per minute per subject after a burst of 10: the burst is all a test can spend
    limits.write_text(text[:start] + "  - name: subject_rate\n    kind: rate\n    per: [tenant, subject]\n"
                      f"    rate: 1\n    period_s: 60\n    burst: {BURST}\n" + text[end:])
    gateways = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            gateways.append(start_gateway(tmp_path / name, backend=f"local:{TRITON_REPO}", policies=policies,
                                          extra=["--redis", redis.url]))
        # the same subject on both (the dev key of the first gateway signs for both)
        shutil.copy(gateways[0].state_dir / "dev-issuer-ed25519.pem", gateways[1].state_dir)
        gateways[1].stop()
        gateways[1] = start_gateway(tmp_path / "b", backend=f"local:{TRITON_REPO}", policies=policies,
                                    extra=["--redis", redis.url])
        token = gateways[0].token()
        urls = [f"http://{gw.url}" for gw in gateways] * 20
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda u: _post(u, token), urls))
        assert statuses.count(200) in (BURST, BURST + 1), statuses  # +1: one token may refill
        assert statuses.count(429) == len(urls) - statuses.count(200)
    finally:
        for gw in gateways:
            gw.stop()
        redis.stop()
