"""The OpenAPI document at /openapi.json: complete (every route kind), true (each path
resolves to the kind it documents) and served without credentials.

Schemathesis drives the running gateway from this same document
(security_tests/fuzz/test_schemathesis.py); these tests keep the document itself honest.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from gateway.fronts.http import routes
from gateway.fronts.http.openapi import OPENAPI_PATH, openapi_bytes, openapi_document
from tests.conftest import DIGITS_BODY, Client

DOC = openapi_document()
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
SAMPLE_PARAMS = {"model_name": "digits", "model_version": "1"}


def _route_kinds_in_source() -> set[str]:
    """Every ``Route("<kind>", ...)`` constructed in routes.py, so a new route cannot hide."""
    tree = ast.parse(Path(routes.__file__).read_text())
    kinds: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Route"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            kinds.add(node.args[0].value)
    return kinds


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in DOC["paths"].items()
            for method, op in item.items() if method in METHODS]


def _concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLE_PARAMS[m.group(1)], path)


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    # "#/components/..." references resolve inside the root schema: carry the components along
    # (an unknown keyword to JSON Schema, so it changes nothing else).
    return Draft202012Validator({**schema, "components": DOC["components"]})


def test_every_route_kind_has_an_operation() -> None:
    kinds = _route_kinds_in_source()
    assert {"infer", "metrics", "openapi", "privacy_budget"} <= kinds  # the AST walk works
    documented = {op["x-route-kind"] for _p, _m, op in _operations()}
    assert kinds - documented == set(), "routes.py has route kinds the OpenAPI document does not describe"
    assert documented - kinds == set(), "the OpenAPI document describes route kinds routes.py does not have"


def test_every_fixed_path_is_documented() -> None:
    assert set(routes._FIXED) <= set(DOC["paths"])


@pytest.mark.parametrize(("path", "method", "op"), _operations(), ids=lambda v: v if isinstance(v, str) else "")
def test_operation_resolves_to_its_route(path: str, method: str, op: dict[str, Any]) -> None:
    """The documented path and method reach the documented route kind, with the documented auth."""
    route = routes.resolve(method.upper(), _concrete(path))
    assert route.kind == op["x-route-kind"]
    documented_open = op.get("security") == []
    assert documented_open == (not route.authenticated)
    if route.authenticated:
        assert "401" in op["responses"] and "403" in op["responses"]


def test_operation_ids_are_unique() -> None:
    ids = [op["operationId"] for _p, _m, op in _operations()]
    assert len(ids) == len(set(ids))


def test_schemas_are_valid_and_references_resolve() -> None:
    assert DOC["openapi"].startswith("3.1.")
    assert DOC["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": DOC["components"]["securitySchemes"]["bearerAuth"]["description"]}
    for schema in DOC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    text = json.dumps(DOC)
    for ref in set(re.findall(r'"\$ref": "#/components/schemas/(\w+)"', text)):
        assert ref in DOC["components"]["schemas"], ref


def test_request_schema_accepts_the_example_and_refuses_unknown_fields() -> None:
    request = _validator({"$ref": "#/components/schemas/InferRequest"})
    assert request.is_valid(DIGITS_BODY)
    assert not request.is_valid({**DIGITS_BODY, "evil": {}})
    assert not request.is_valid({"inputs": [{**DIGITS_BODY["inputs"][0], "parameters": {"sequence_id": 1}}]})


async def test_served_without_credentials(client: Client) -> None:
    resp = await client.get(OPENAPI_PATH)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert await resp.read() == openapi_bytes()
    assert json.loads(openapi_bytes()) == DOC
    refused = await client.post(OPENAPI_PATH, data=b"{}")
    assert refused.status == 405


async def test_live_responses_match_the_document(client: Client, auth: dict[str, str]) -> None:
    """Each GET route answers a dev principal with a body its documented schema accepts."""
    checked = 0
    for path, method, op in _operations():
        if method != "get" or path == "/metrics":
            continue
        resp = await client.get(_concrete(path), headers=auth)
        documented = op["responses"].get(str(resp.status))
        assert documented is not None, f"{path}: undocumented status {resp.status}"
        schema = documented["content"]["application/json"]["schema"]
        errors = list(_validator(schema).iter_errors(await resp.json()))
        assert not errors, f"{path} {resp.status}: {errors[0].message}"
        checked += 1
    resp = await client.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=auth)
    assert resp.status == 200
    assert _validator({"$ref": "#/components/schemas/InferResponse"}).is_valid(await resp.json())
    assert checked >= 12
