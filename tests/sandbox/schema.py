"""A tiny JSON Schema checker for the contracts' subset (type, properties, required, enum,
items, $ref, anyOf, oneOf), so the contract tests need no extra dependency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# A copy of ../shared/contract/openapi-images-edits.json (OpenAI's OpenAPI extract), so the test
# runs where the shared folder is absent; test_contract checks the copy is current when present.
CONTRACT = Path(__file__).parent / "contract" / "openapi-images-edits.json"
SHARED_CONTRACT = Path(__file__).resolve().parents[3] / "shared/contract/openapi-images-edits.json"
# The same for the organization usage and costs endpoints.
USAGE_CONTRACT = Path(__file__).parent / "contract" / "openapi-usage-costs.json"
SHARED_USAGE_CONTRACT = (
    Path(__file__).resolve().parents[3] / "shared/contract/openapi-usage-costs.json"
)
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def load_contract(path: Path = CONTRACT) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def errors(value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "$") -> list[str]:
    """Every place where `value` breaks `schema` (empty list = valid)."""
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        return errors(value, node, root, at)
    if "anyOf" in schema:
        if any(not errors(value, option, root, at) for option in schema["anyOf"]):
            return []
        return [f"{at}: matches none of anyOf"]
    if "oneOf" in schema:
        matching = sum(not errors(value, option, root, at) for option in schema["oneOf"])
        return [] if matching == 1 else [f"{at}: matches {matching} of oneOf, not exactly 1"]
    found: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _TYPES[kind]) and not (
            kind in ("integer", "number") and isinstance(value, bool)
        )
        if not ok:
            return [f"{at}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{at}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        found += [f"{at}: missing {k}" for k in schema.get("required", []) if k not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                found += errors(value[key], sub, root, f"{at}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += errors(item, schema["items"], root, f"{at}[{i}]")
    return found


def check(value: Any, schema_name: str, path: Path = CONTRACT) -> list[str]:
    contract = load_contract(path)
    return errors(value, {"$ref": f"#/components/schemas/{schema_name}"}, contract)
