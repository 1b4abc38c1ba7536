"""CATALOGUE §1.9 query caps (EV-02, EX-01): the per-principal cap on a model, outsider variants.

The ML attacks themselves run in security_tests/ml/; here only the cap's edges: a
routing flag that sends the capped model name to another model (blue-green) must not
open an uncapped path, and the cap counts rows, not calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from security_tests.conftest import Tokens
from security_tests.support.side import SideGateway
from security_tests.support.world import PUB_BODY, World

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
    assert answers[0].json()["model_name"] == "alpha_fraud"  # the flag did route
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
