"""CATALOGUE §1.9 query caps (EV-02, EX-01): the per-principal cap on a model, outsider variants.

The ML attacks themselves run in security_tests/ml/; here only the cap's edges: a
routing flag that sends the capped model name to another model (blue-green) must not
open an uncapped path, and the cap counts rows, not calls. And the stateful
query-pattern detector's edges: a search diluted with ordinary queries, or padded into
batches of ordinary rows, is still refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from security_tests.conftest import Tokens
from security_tests.support.side import SideGateway
from security_tests.support.world import DIGIT_ZERO, PUB_BODY, World
from tests.adversarial import digits_split

CAP = """  - name: pub_clf_queries_per_principal
    kind: cost
    unit: elements
    per: [tenant, subject]
    models: [pub_clf]
    limit: 12
    period_s: 86400
    burst: 12
"""


def capped_side(make: Callable[..., SideGateway], name: str) -> SideGateway:
    """A side gateway whose pub_clf has a cap of 3 rows (12 elements) per principal per day."""
    side = make(name)
    side.edit_policy("limits.yaml", "limits:\n", "limits:\n" + CAP)
    return side


def route_to_other_model(world: World, side: SideGateway) -> None:
    """Blue-green: every pub_clf call is served by the model alpha_fraud (version 1)."""
    assert side.settings is not None and side.service is not None
    path = side.settings.policies / "flags.json"
    doc = json.loads(path.read_text())
    doc["flags"]["pub-clf-version"].update({
        "variants": {"stable": {"model": "pub_clf", "version": "1"}, "green": {"model": "alpha_fraud", "version": "1"}},
        "targeting": {"fractional": [["stable", 0], ["green", 100]]}})
    path.write_text(json.dumps(doc))
    assert world.loop.run(side.service.store.reload("test")) is True
    side.install_clock()


async def test_cap_follows_the_capped_name_through_a_routing_flag(side_gateways: Callable[..., SideGateway],
                                                                   world: World, tokens: Tokens) -> None:
    side = capped_side(side_gateways, "routed")
    route_to_other_model(world, side)
    client, token = side.client(), tokens.u1()
    answers = [await client.infer("pub_clf", PUB_BODY, token=token) for _ in range(5)]
    assert [r.status for r in answers] == [200, 200, 200, 429, 429]
    # The flag did route (the upstream served alpha_fraud), and the answer names what the
    # client asked for: a route-only model's own name is never announced (AUTHZ-17).
    assert [q.model_name for q in world.fake.requests] == ["alpha_fraud"] * 3
    assert answers[0].json()["model_name"] == "pub_clf"
    assert side.audit_for(answers[3])[0]["reason"] == "cost_limit_exceeded"
    assert world.upstream_calls() == 3


async def test_cap_counts_rows_not_calls(side_gateways: Callable[..., SideGateway], world: World,
                                         tokens: Tokens) -> None:
    side = capped_side(side_gateways, "rows")
    client, token = side.client(), tokens.u1()
    two_rows = {"inputs": [{**PUB_BODY["inputs"][0], "shape": [2, 4], "data": [0.1, 0.2, 0.3, 0.4] * 2}]}
    four_rows = {"inputs": [{**PUB_BODY["inputs"][0], "shape": [4, 4], "data": [0.1, 0.2, 0.3, 0.4] * 4}]}
    assert (await client.infer("pub_clf", four_rows, token=token)).status == 413  # more than the whole cap
    assert (await client.infer("pub_clf", two_rows, token=token)).status == 200
    assert (await client.infer("pub_clf", two_rows, token=token)).status == 429  # 4 rows > 3
    assert (await client.infer("pub_clf", PUB_BODY, token=token)).status == 200  # the third row
    assert (await client.infer("pub_clf", PUB_BODY, token=token)).status == 429
    assert world.upstream_calls() == 2


# -- EV-02 / EX-03: the stateful query-pattern detector against a diluted search ----------

QUERY_PATTERN = """      grid:
        action: block
      query_pattern:
        action: block
        seed: 7
      output: {}"""


def detector_side(make: Callable[..., SideGateway], name: str) -> SideGateway:
    """digits_clf with the query-pattern detector at its policy defaults (the count rule
    included), and rate limits far above the stream so only the detector can refuse."""
    side = make(name)
    side.edit_policy("inputs.yaml", "      grid:\n        action: block\n      output: {}", QUERY_PATTERN)
    side.edit_policy("limits.yaml", "  rate: 20\n  burst: 20\n", "  rate: 100000\n  burst: 100000\n")
    side.edit_policy("limits.yaml", "    rate: 1\n    burst: 10\n", "    rate: 100000\n    burst: 100000\n")
    return side


def digits_rows(rows: list[list[float]]) -> dict[str, object]:
    return {"inputs": [{"name": "pixels", "shape": [len(rows), 64], "datatype": "FP32",
                        "data": [v for row in rows for v in row]}]}


def near_duplicates(n: int, seed: int) -> list[list[float]]:
    """A search around one digit: each query moves 3 pixels by one grey level (on the grid)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = np.array(DIGIT_ZERO, dtype=np.float64)
        idx = rng.choice(64, 3, replace=False)
        x[idx] = np.clip(x[idx] + rng.choice([-1.0, 1.0], 3), 0, 16)
        out.append(x.tolist())
    return out


def ordinary_digits(n: int) -> list[list[float]]:
    x_train, _ = digits_split()
    return [row.tolist() for row in x_train[:n]]


async def test_search_interleaved_with_ordinary_queries_is_still_blocked(
        side_gateways: Callable[..., SideGateway], world: World, tokens: Tokens) -> None:
    """Three ordinary digits after each search query (two tokens of the user, with and
    without the version in the path) keep the suspicious share at 25%: the count of
    suspicious queries still fires, within 100 search queries, as a 429 with Retry-After."""
    side = detector_side(side_gateways, "diluted")
    client, tokens_used = side.client(), (tokens.u1(), tokens.u1(scope="models:infer"))
    search, ordinary = near_duplicates(100, seed=3), ordinary_digits(300)
    refused = None
    for i, row in enumerate(search):
        for j, r in enumerate([row, *ordinary[3 * i:3 * i + 3]]):
            resp = await client.infer("digits_clf", digits_rows([r]), token=tokens_used[j % 2],
                                      version="1" if i % 2 else None)
            if resp.status != 200:
                refused = (i, resp)
                break
        if refused is not None:
            break
    assert refused is not None, "the diluted search was never refused"
    searched, resp = refused
    assert searched <= 100 and resp.status == 429 and int(resp.headers["Retry-After"]) > 0
    assert side.audit_for(resp)[0]["reason"] == "query_pattern_blocked"
    # the whole tenant cools down, an ordinary digit from a fresh token included
    after = await client.infer("digits_clf", digits_rows([ordinary[-1]]), token=tokens.u1())
    assert after.status == 429


async def test_search_padded_into_batches_of_ordinary_rows_is_still_blocked(
        side_gateways: Callable[..., SideGateway], world: World, tokens: Tokens) -> None:
    side = detector_side(side_gateways, "padded")
    client, token = side.client(), tokens.u1()
    search, ordinary = near_duplicates(100, seed=4), ordinary_digits(700)
    answers = []
    for i, row in enumerate(search):
        answers.append(await client.infer("digits_clf", digits_rows([row, *ordinary[7 * i:7 * i + 7]]), token=token))
        if answers[-1].status != 200:
            break
    assert answers[-1].status == 429 and len(answers) <= 100
    assert side.audit_for(answers[-1])[0]["reason"] == "query_pattern_blocked"
