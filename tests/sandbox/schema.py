"""A tiny JSON Schema checker for the contracts' subset (type, properties, required, enum,
items, $ref, anyOf, oneOf), so the contract tests need no extra dependency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Copies of ../shared/contract/*.json (OpenAI's OpenAPI extracts), so the tests run where the
# shared folder is absent; the contract tests check each copy is current when it is present.
CONTRACT_DIR = Path(__file__).parent / "contract"
SHARED_CONTRACT_DIR = Path(__file__).resolve().parents[3] / "shared/contract"
EDITS = "openapi-images-edits.json"
FILES_BATCHES = "openapi-files-batches.json"
USAGE_COSTS = "openapi-usage-costs.json"
CONTRACT = CONTRACT_DIR / EDITS
SHARED_CONTRACT = SHARED_CONTRACT_DIR / EDITS
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def load_contract(name: str = EDITS) -> dict[str, Any]:
    return dict(json.loads((CONTRACT_DIR / name).read_text()))


def errors(
    value: Any,
    schema: dict[str, Any],
    root: dict[str, Any],
    at: str = "$",
    null_when_unset: bool = False,
) -> list[str]:
    """Every place where `value` breaks `schema` (empty list = valid).

    `null_when_unset`: an optional (not required) property may be null. The files/batches
    extract types unset fields such as `Batch.output_file_id` as plain strings, while its own
    examples and the live API send them as null.
    """
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        return errors(value, node, root, at, null_when_unset)
    if "anyOf" in schema:
        if any(not errors(value, o, root, at, null_when_unset) for o in schema["anyOf"]):
            return []
        return [f"{at}: matches none of anyOf"]
    if "oneOf" in schema:
        matching = sum(not errors(value, o, root, at, null_when_unset) for o in schema["oneOf"])
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
        required = schema.get("required", [])
        found += [f"{at}: missing {k}" for k in required if k not in value]
        for key, sub in schema.get("properties", {}).items():
            if key not in value or (null_when_unset and value[key] is None and key not in required):
                continue
            found += errors(value[key], sub, root, f"{at}.{key}", null_when_unset)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += errors(item, schema["items"], root, f"{at}[{i}]", null_when_unset)
    return found


def check(value: Any, schema_name: str, contract: str = EDITS) -> list[str]:
    """Errors of `value` against a schema of the contract (FILES_BATCHES: unset fields null)."""
    return errors(
        value,
        {"$ref": f"#/components/schemas/{schema_name}"},
        load_contract(contract),
        null_when_unset=contract == FILES_BATCHES,
    )
