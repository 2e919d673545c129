"""Validate Kubernetes objects against CustomResourceDefinitions, offline.

Without an API server, a custom resource is checked in two layers, as the API server
would on create:

1. OpenAPI: the CRD's ``openAPIV3Schema`` is converted to JSON Schema and checked with
   ``jsonschema``. Unknown fields are rejected (the server would prune them silently,
   which hides typos), ``x-kubernetes-int-or-string`` accepts both types,
   ``x-kubernetes-preserve-unknown-fields`` keeps any field and ``nullable`` admits null.
2. CEL: every ``x-kubernetes-validations`` rule is evaluated with cel-python, bound to
   the value at its schema node. A thin layer adds what cel-python lacks against the
   Kubernetes CEL environment: values typed by the schema's ``format`` (duration,
   date-time), escaped property names (``__namespace__``, ``__dash__``, ...) next to the raw
   ones, heterogeneous ``==``/``!=`` (as cel-go), a ``has()`` that errors when the object
   path before the last field is missing, and the function ``isURL``. Rules that use
   ``oldSelf`` are transition rules that the server runs only on update, so they are
   skipped. A rule that cannot be compiled or evaluated is reported as a violation, so a
   CRD upgrade with new rules fails loudly instead of passing.

Usage:
    registry = CrdRegistry.from_directory(CRD_DIR)
    problems = registry.validate(obj)        # [] when valid
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import lark
import yaml
from celpy import celtypes
from celpy.evaluation import CELEvalError, Evaluator

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = Path(os.environ.get("DISTILL_CRD_DIR", REPO_ROOT / "tests" / "crds"))

# CEL reserved words that Kubernetes escapes as __word__ in property names.
_CEL_RESERVED = {
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function",
    "if", "import", "let", "loop", "package", "namespace", "return", "var", "void", "while",
}


def escape_property_name(name: str) -> str:
    """Return the CEL spelling of a property name, following Kubernetes' escaping rules."""
    if name in _CEL_RESERVED:
        return f"__{name}__"
    escaped = name.replace("__", "__underscores__")
    escaped = escaped.replace(".", "__dot__").replace("-", "__dash__").replace("/", "__slash__")
    return escaped


# --- OpenAPI v3 (structural schema) to JSON Schema -------------------------------------

def openapi_to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """Convert one structural-schema node (recursively) to a JSON Schema node."""
    result: dict[str, Any] = {}
    for key in ("enum", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
                "required", "uniqueItems", "multipleOf"):
        if key in node:
            result[key] = node[key]

    # OpenAPI v3.0 booleans become draft 2020-12 numbers.
    if node.get("exclusiveMinimum") is True:
        result["exclusiveMinimum"] = node["minimum"]
        result.pop("minimum")
    if node.get("exclusiveMaximum") is True:
        result["exclusiveMaximum"] = node["maximum"]
        result.pop("maximum")

    if node.get("x-kubernetes-int-or-string"):
        result["type"] = ["integer", "string"]
    elif "type" in node:
        result["type"] = node["type"]

    if "properties" in node:
        result["properties"] = {name: openapi_to_jsonschema(child) for name, child in node["properties"].items()}
    if "items" in node:
        result["items"] = openapi_to_jsonschema(node["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            result[key] = [openapi_to_jsonschema(child) for child in node[key]]
    if "not" in node:
        result["not"] = openapi_to_jsonschema(node["not"])

    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        result["additionalProperties"] = openapi_to_jsonschema(additional)
    elif additional is not None:
        result["additionalProperties"] = additional
    elif node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        result["additionalProperties"] = False

    if node.get("nullable") and "type" in result:
        types = result["type"] if isinstance(result["type"], list) else [result["type"]]
        result["type"] = [*types, "null"]
    return result


# --- CEL layer --------------------------------------------------------------------------

_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> datetime.timedelta:
    """Parse a Go/Prometheus duration such as ``30s`` or ``1h30m``; raise ValueError otherwise."""
    body = text[1:] if text.startswith("-") else text
    matches = list(_GO_DURATION.finditer(body))
    if not matches or "".join(match.group(0) for match in matches) != body:
        raise ValueError(f"invalid duration {text!r}")
    seconds = sum(float(match.group(1)) * _GO_DURATION_UNITS[match.group(2)] for match in matches)
    return datetime.timedelta(seconds=-seconds if text.startswith("-") else seconds)


def to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """Convert a JSON value to CEL types, guided by its schema node (formats, escaped names)."""
    if value is None:
        return None
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        converted = {}
        for key, item in value.items():
            child = properties.get(key) or (additional if isinstance(additional, dict) else {})
            converted[celtypes.StringType(key)] = to_cel(item, child)
            # The API server unescapes a field name before the lookup, so a declared property
            # resolves under its raw and its escaped spelling (`namespace` and `__namespace__`).
            # NOTE: size() or iteration over such an object counts the alias as well.
            escaped = escape_property_name(key)
            if key in properties and escaped != key:
                converted[celtypes.StringType(escaped)] = to_cel(item, child)
        return celtypes.MapType(converted)
    if isinstance(value, list):
        return celtypes.ListType([to_cel(item, schema.get("items", {})) for item in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        value_format = schema.get("format")
        if value_format == "duration":
            try:
                return celtypes.DurationType(parse_go_duration(value))
            except ValueError:
                return celtypes.StringType(value)
        if value_format == "date-time":
            return celtypes.TimestampType(value)
        return celtypes.StringType(value)
    raise TypeError(f"cannot convert {type(value).__name__} to CEL")


def _is_number(value: Any) -> bool:
    return isinstance(value, (celtypes.IntType, celtypes.UintType, celtypes.DoubleType)) and not isinstance(
        value, celtypes.BoolType
    )


def _heterogeneous_equal(left: Any, right: Any) -> celtypes.BoolType:
    """cel-go equality: values of different types are unequal, numbers compare by value."""
    if _is_number(left) and _is_number(right):
        return celtypes.BoolType(float(left) == float(right))
    if type(left) is not type(right) and not (isinstance(left, type(right)) or isinstance(right, type(left))):
        return celtypes.BoolType(False)
    return celtypes.BoolType(left == right)


def _heterogeneous_not_equal(left: Any, right: Any) -> celtypes.BoolType:
    return celtypes.BoolType(not _heterogeneous_equal(left, right))


def _is_url(text: Any) -> celtypes.BoolType:
    """Kubernetes isURL(): an absolute URL with a scheme and host (Go's url.Parse, approximated)."""
    try:
        parsed = urllib.parse.urlparse(str(text))
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(bool(parsed.scheme) and bool(parsed.netloc))


_FUNCTIONS = {
    "_==_": _heterogeneous_equal,
    "_!=_": _heterogeneous_not_equal,
    "isURL": _is_url,
}


class _StrictEvaluator(Evaluator):
    """has(e.f) is false only when `f` is missing from an existing `e`; other errors propagate."""

    def macro_has_eval(self, exprlist: lark.Tree) -> Any:
        values = self.visit_children(exprlist)
        value = values[0]
        if not isinstance(value, CELEvalError):
            return celtypes.BoolType(True)
        identifiers = [token for token in exprlist.scan_values(lambda item: isinstance(item, lark.Token) and item.type == "IDENT")]
        last_field = str(identifiers[-1]) if identifiers else None
        if last_field is not None and f"no such member in mapping: {last_field!r}" in str(value.args[0]):
            return celtypes.BoolType(False)
        return value


class _StrictRunner(celpy.InterpretedRunner):
    def evaluate(self, context: dict[str, Any]) -> Any:
        evaluator = _StrictEvaluator(ast=self.ast, activation=self.new_activation())
        return evaluator.evaluate(context)


@dataclass(frozen=True)
class CelRule:
    """One x-kubernetes-validations rule and the schema node it is attached to."""

    rule: str
    message: str
    schema: dict[str, Any]

    @property
    def update_only(self) -> bool:
        return re.search(r"\boldSelf\b", self.rule) is not None


def evaluate_rule(rule: CelRule, value: Any) -> str | None:
    """Return None when `value` satisfies the rule, else the violation (or why it could not run)."""
    environment = celpy.Environment(runner_class=_StrictRunner)
    try:
        program = environment.program(environment.compile(rule.rule), functions=_FUNCTIONS)
    except Exception as error:  # cel-python raises several parser exception types
        return f"rule {rule.rule!r} could not be compiled: {error}"
    try:
        result = program.evaluate({"self": to_cel(value, rule.schema)})
    except Exception as error:  # an evaluation error fails the rule, as on the API server
        return f"rule {rule.rule!r} could not be evaluated: {error}"
    if isinstance(result, CELEvalError):
        return f"rule {rule.rule!r} could not be evaluated: {result.args[0]}"
    if not isinstance(result, celtypes.BoolType):
        return f"rule {rule.rule!r} returned {result!r}, not a bool"
    if not result:
        return rule.message or f"failed rule: {rule.rule}"
    return None


def _walk_rules(schema: dict[str, Any], value: Any, path: str) -> Iterator[tuple[str, CelRule, Any]]:
    """Yield (path, rule, value) for every rule whose schema node has a value in the object."""
    for entry in schema.get("x-kubernetes-validations", []):
        yield path, CelRule(rule=entry["rule"], message=entry.get("message", ""), schema=schema), value
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            child = properties.get(key) or (additional if isinstance(additional, dict) else None)
            if child is not None:
                yield from _walk_rules(child, item, f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from _walk_rules(schema["items"], item, f"{path}[{index}]")


def count_rules(schema: dict[str, Any]) -> int:
    """Count the x-kubernetes-validations rules anywhere in a schema."""
    total = len(schema.get("x-kubernetes-validations", []))
    for child in schema.get("properties", {}).values():
        total += count_rules(child)
    if isinstance(schema.get("items"), dict):
        total += count_rules(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        total += count_rules(schema["additionalProperties"])
    return total


# --- CRD registry -----------------------------------------------------------------------

@dataclass
class CrdVersion:
    """One served version of a CRD, with its schema in both forms."""

    group: str
    version: str
    kind: str
    openapi: dict[str, Any]
    validator: jsonschema.protocols.Validator = field(repr=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


class CrdRegistry:
    """CRDs keyed by (apiVersion, kind)."""

    def __init__(self, versions: list[CrdVersion]) -> None:
        self._versions = {(entry.api_version, entry.kind): entry for entry in versions}

    @classmethod
    def from_directory(cls, directory: Path = CRD_DIR) -> CrdRegistry:
        """Load every CRD (*.yaml, several documents allowed) under `directory`."""
        versions = []
        for path in sorted(directory.glob("*.yaml")):
            for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                if not document or document.get("kind") != "CustomResourceDefinition":
                    continue
                versions.extend(_crd_versions(document))
        if not versions:
            raise FileNotFoundError(f"no CustomResourceDefinition found under {directory}; set DISTILL_CRD_DIR")
        return cls(versions)

    def kinds(self) -> list[tuple[str, str]]:
        return sorted(self._versions)

    def get(self, api_version: str, kind: str) -> CrdVersion:
        try:
            return self._versions[(api_version, kind)]
        except KeyError:
            known = ", ".join(f"{a} {k}" for a, k in self.kinds())
            raise KeyError(f"no CRD for {api_version} {kind}; known: {known}") from None

    def validate(self, obj: dict[str, Any]) -> list[str]:
        """Return one line per problem (OpenAPI schema, then CEL rules); [] when the object is valid."""
        crd = self.get(obj.get("apiVersion", ""), obj.get("kind", ""))
        problems = []
        for error in sorted(crd.validator.iter_errors(obj), key=lambda item: list(item.absolute_path)):
            location = "/".join(str(part) for part in error.absolute_path) or "(root)"
            problems.append(f"{location}: {error.message}")
        if problems:
            # The API server skips CEL rules when the schema check fails.
            return problems

        for path, rule, value in _walk_rules(crd.openapi, obj, crd.kind):
            if rule.update_only:
                continue
            violation = evaluate_rule(rule, value)
            if violation is not None:
                problems.append(f"{path}: {violation}")
        return problems


def _crd_versions(document: dict[str, Any]) -> list[CrdVersion]:
    spec = document["spec"]
    versions = []
    for entry in spec["versions"]:
        if not entry.get("served", True):
            continue
        openapi = entry["schema"]["openAPIV3Schema"]
        schema = openapi_to_jsonschema(openapi)
        # apiVersion and kind are fixed for this version; metadata is checked by the server itself.
        schema.setdefault("properties", {})
        schema["properties"]["apiVersion"] = {"const": f"{spec['group']}/{entry['name']}"}
        schema["properties"]["kind"] = {"const": spec["names"]["kind"]}
        schema["properties"]["metadata"] = {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}},
        }
        validator_class = jsonschema.validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})
        versions.append(
            CrdVersion(
                group=spec["group"],
                version=entry["name"],
                kind=spec["names"]["kind"],
                openapi=openapi,
                validator=validator_class(schema),
            )
        )
    return versions
