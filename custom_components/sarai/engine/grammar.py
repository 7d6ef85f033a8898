"""JSON schemas for constrained decoding: an allow-list validator and our own GBNF writer and checker.

What a user or an automation sends as a structure never reaches llama.cpp as such. ``safe_schema``
accepts only a subset of JSON Schema whose every construct we can prove satisfiable (objects,
arrays, strings, numbers, booleans, null, enum/const, anyOf/oneOf, allOf that merges, local
``$ref``), bounded in size and depth, and returns a normalised copy; anything else is refused with
``InvalidInput`` (``structure_invalid``). ``json_grammar`` writes the GBNF for that copy itself
(pure ASCII, every literal escaped, no empty rule) instead of llama-cpp-python's converter, which
writes broken literals for keys or values holding quotes, backslashes or NUL and an empty rule for
an empty enum (llama.cpp then fails to parse the grammar and the sampler is NULL: a segfault).
``check_gbnf`` proves the text parses, defines every rule it uses and that every rule derives a
finite string, before llama.cpp sees it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from .errors import InvalidInput
from .types import ChatRequest

MAX_SCHEMA_CHARS = 64 * 1024  # the schema as JSON
MAX_DEPTH = 12
MAX_NODES = 400  # sub-schemas, $refs expanded
MAX_PROPERTIES = 64
MAX_ENUM = 1000
MAX_ALTERNATIVES = 16
MAX_TEXT = 512  # characters of a property name or an enum/const string
MAX_LENGTH_BOUND = 1000  # minLength above it is refused; maxLength above it is not enforced by the grammar
MAX_ITEMS_BOUND = 100  # same for minItems / maxItems
MAX_GRAMMAR_CHARS = 256 * 1024

TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
# Keywords that say nothing about the shape the grammar builds (checked afterwards by the caller).
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "example",
        "$schema",
        "$id",
        "$comment",
        "format",
        "pattern",
        "readOnly",
        "writeOnly",
        "deprecated",
        "uniqueItems",
        "multipleOf",
        "$defs",
        "definitions",
    }
)
OBJECT_KEYS = frozenset({"properties", "required", "additionalProperties"})
ARRAY_KEYS = frozenset({"items", "minItems", "maxItems"})
STRING_KEYS = frozenset({"minLength", "maxLength"})
NUMBER_KEYS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
SHAPE_KEYS = (
    OBJECT_KEYS
    | ARRAY_KEYS
    | STRING_KEYS
    | NUMBER_KEYS
    | {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "nullable"}
)


def _refuse(why: str) -> InvalidInput:
    return InvalidInput(f"structure refused: {why}", key="structure_invalid")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_text(text: str, what: str) -> None:
    if len(text) > MAX_TEXT:
        raise _refuse(f"{what} longer than {MAX_TEXT} characters")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        raise _refuse(f"{what} holds a lone surrogate")


def _scalar_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The intersection of two schemas as one schema (allOf, or anyOf's siblings into each branch)."""
    out = dict(a)
    for key, value in b.items():
        if key not in out or key in ANNOTATIONS:
            out.setdefault(key, value)
        elif key == "properties":
            if not isinstance(value, dict) or not isinstance(out[key], dict):
                raise _refuse("properties is not an object")
            props = dict(out[key])
            for name, sub in value.items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            out[key] = props
        elif key == "required":
            if not isinstance(value, list) or not isinstance(out[key], list):
                raise _refuse("required is not a list")
            out[key] = list(out[key]) + [name for name in value if name not in out[key]]
        elif key in ("minLength", "minItems", "minimum"):
            out[key] = max(out[key], value) if _is_number(out[key]) and _is_number(value) else value
        elif key in ("maxLength", "maxItems", "maximum"):
            out[key] = min(out[key], value) if _is_number(out[key]) and _is_number(value) else value
        elif key == "type":
            mine, theirs = _type_set(out[key]), _type_set(value)
            both = mine & theirs
            if ("integer" in mine and "number" in theirs) or ("number" in mine and "integer" in theirs):
                both.add("integer")
            if not both:
                raise _refuse("allOf asks for two different types")
            out[key] = sorted(both)
        elif key == "enum":
            if not isinstance(value, list) or not isinstance(out[key], list):
                raise _refuse("enum is not a list")
            theirs_keys = {_scalar_key(v) for v in value}
            out[key] = [v for v in out[key] if _scalar_key(v) in theirs_keys]
        elif key == "items":
            out[key] = {"allOf": [out[key], value]}
        elif out[key] != value:
            raise _refuse(f"allOf holds two different values of {key}")
    return out


def _type_set(value: Any) -> set[str]:
    types = [value] if isinstance(value, str) else value
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise _refuse("type is not a name or a list of names")
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise _refuse(f"unknown type {unknown[0][:40]!r}")
    return set(types)


class _Normalizer:
    """Walks a schema and returns the normalised copy, refusing what it cannot prove."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.nodes = 0
        self.resolving: list[str] = []

    def resolve(self, ref: Any) -> dict[str, Any]:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise _refuse("only local $refs (#/...) are supported")
        if ref in self.resolving:
            raise _refuse("recursive $ref")
        target: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise _refuse("a $ref points nowhere")
            target = target[part]
        if not isinstance(target, dict):
            raise _refuse("a $ref points to something that is not a schema")
        return target

    def visit(self, schema: Any, depth: int) -> dict[str, Any]:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _refuse(f"more than {MAX_NODES} sub-schemas")
        if depth > MAX_DEPTH:
            raise _refuse(f"nested deeper than {MAX_DEPTH}")
        if schema is True:
            return {}
        if not isinstance(schema, dict):
            raise _refuse("a sub-schema is not an object")
        unknown = [k for k in schema if k not in SHAPE_KEYS and k not in ANNOTATIONS]
        if unknown:
            raise _refuse(f"unsupported keyword {str(unknown[0])[:40]!r}")
        shape = {k: v for k, v in schema.items() if k in SHAPE_KEYS}
        if "$ref" in shape:
            ref = shape.pop("$ref")
            target = self.resolve(ref)
            self.resolving.append(ref)
            try:
                return self.visit(_merge(target, shape) if shape else target, depth + 1)
            finally:
                self.resolving.pop()
        if "allOf" in shape:
            parts = shape.pop("allOf")
            if not isinstance(parts, list) or not parts or len(parts) > MAX_ALTERNATIVES:
                raise _refuse("allOf is not a list of 1 to 16 schemas")
            merged = shape
            for part in parts:
                if isinstance(part, dict) and "$ref" in part:
                    ref = part["$ref"]
                    part = _merge(self.resolve(ref), {k: v for k, v in part.items() if k != "$ref"})
                if not isinstance(part, dict) or "anyOf" in part or "oneOf" in part:
                    raise _refuse("allOf of alternatives is not supported")
                merged = _merge(merged, part)
            return self.visit(merged, depth + 1)
        if "anyOf" in shape or "oneOf" in shape:
            if "anyOf" in shape and "oneOf" in shape:
                raise _refuse("both anyOf and oneOf")
            alternatives = shape.pop("anyOf") if "anyOf" in shape else shape.pop("oneOf")
            if not isinstance(alternatives, list) or not alternatives or len(alternatives) > MAX_ALTERNATIVES:
                raise _refuse("anyOf/oneOf is not a list of 1 to 16 schemas")
            branches: list[dict[str, Any]] = []
            for alt in alternatives:
                if alt is True:
                    alt = {}
                if not isinstance(alt, dict):
                    raise _refuse("an alternative is not an object")
                branches.append(self.visit(_merge(shape, alt) if shape else alt, depth + 1))
            return branches[0] if len(branches) == 1 else {"anyOf": branches}
        if shape.pop("nullable", False) is True:
            return {"anyOf": [self.visit(shape, depth + 1), {"type": "null"}]}
        types = _type_set(shape["type"]) if "type" in shape else None
        if "enum" in shape or "const" in shape:
            return self.values(shape, types)
        if types is None:
            types = self.implied_type(shape)
        if types is not None and len(types) > 1:
            return {"anyOf": [self.visit({**shape, "type": t}, depth + 1) for t in sorted(types)]}
        kind = next(iter(types)) if types else None
        if kind == "object":
            return self.object(shape, depth)
        if kind == "array":
            return self.array(shape, depth)
        if kind == "string":
            return self.string(shape)
        if kind in ("number", "integer"):
            return self.number(shape, kind)
        if kind is None:
            return {}
        return {"type": kind}

    @staticmethod
    def implied_type(shape: dict[str, Any]) -> set[str] | None:
        """A schema without a type: what its keywords imply (JSON Schema would apply them per type)."""
        implied = [
            kind
            for kind, keys in (
                ("object", OBJECT_KEYS),
                ("array", ARRAY_KEYS),
                ("string", STRING_KEYS),
                ("number", NUMBER_KEYS),
            )
            if keys & shape.keys()
        ]
        if len(implied) > 1:
            raise _refuse("keywords of several types without a type")
        return set(implied) if implied else None

    def values(self, shape: dict[str, Any], types: set[str] | None) -> dict[str, Any]:
        """enum / const: scalars only, filtered by the type; none left is unsatisfiable."""
        if "enum" in shape:
            values = shape["enum"]
            if not isinstance(values, list):
                raise _refuse("enum is not a list")
            if len(values) > MAX_ENUM:
                raise _refuse(f"enum of more than {MAX_ENUM} values")
        else:
            values = [shape["const"]]
        if "const" in shape and "enum" in shape:
            values = [v for v in values if _scalar_key(v) == _scalar_key(shape["const"])]
        kept: dict[str, Any] = {}
        for value in values:
            if isinstance(value, str):
                _check_text(value, "an enum value")
            elif not (value is None or isinstance(value, bool) or _is_number(value)):
                raise _refuse("an enum value is not a string, number, boolean or null")
            if types is None or _json_type(value) in types or (_json_type(value) == "integer" and "number" in types):
                kept.setdefault(_scalar_key(value), value)
        if not kept:
            raise _refuse("no allowed value (empty enum, or none of the type asked)")
        return {"enum": list(kept.values())}

    def object(self, shape: dict[str, Any], depth: int) -> dict[str, Any]:
        props = shape.get("properties", {})
        if not isinstance(props, dict) or len(props) > MAX_PROPERTIES:
            raise _refuse(f"properties is not an object of at most {MAX_PROPERTIES} entries")
        required = shape.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            raise _refuse("required is not a list of names")
        missing = [name for name in required if name not in props]
        if missing:
            raise _refuse("a required property has no schema")
        out_props: dict[str, Any] = {}
        for name, sub in props.items():
            if not isinstance(name, str):
                raise _refuse("a property name is not a string")
            _check_text(name, "a property name")
            out_props[name] = self.visit(sub, depth + 1)
        extra = shape.get("additionalProperties", True)
        if isinstance(extra, dict):
            extra = self.visit(extra, depth + 1)
        elif not isinstance(extra, bool):
            raise _refuse("additionalProperties is not a boolean or a schema")
        out: dict[str, Any] = {"type": "object"}
        if out_props:  # the grammar writes the declared properties only (extra ones are allowed, not needed)
            out["properties"] = out_props
            out["required"] = list(dict.fromkeys(required))
        elif extra is False:
            out["properties"] = {}
        elif isinstance(extra, dict):
            out["additionalProperties"] = extra
        return out

    def array(self, shape: dict[str, Any], depth: int) -> dict[str, Any]:
        items = shape.get("items", True)
        if not isinstance(items, dict) and items is not True:
            raise _refuse("items is not one schema (tuples are not supported)")
        low, high = _bounds(shape, "minItems", "maxItems", MAX_ITEMS_BOUND)
        out: dict[str, Any] = {"type": "array", "items": self.visit(items, depth + 1)}
        if low:
            out["minItems"] = low
        if high is not None:
            out["maxItems"] = high
        return out

    @staticmethod
    def string(shape: dict[str, Any]) -> dict[str, Any]:
        low, high = _bounds(shape, "minLength", "maxLength", MAX_LENGTH_BOUND)
        out: dict[str, Any] = {"type": "string"}
        if low:
            out["minLength"] = low
        if high is not None:
            out["maxLength"] = high
        return out

    @staticmethod
    def number(shape: dict[str, Any], kind: str) -> dict[str, Any]:
        """Bounds are checked for satisfiability here and enforced by the caller's validation, not the grammar."""
        low, high = shape.get("minimum"), shape.get("maximum")
        ex_low, ex_high = shape.get("exclusiveMinimum"), shape.get("exclusiveMaximum")
        low_open = high_open = False
        if ex_low is True or ex_high is True:  # OpenAPI 3.0: booleans next to minimum / maximum
            low_open, high_open = ex_low is True, ex_high is True
            ex_low = ex_high = None
        for value in (low, high, ex_low, ex_high):
            if value is not None and value is not False and not _is_number(value):
                raise _refuse("a numeric bound is not a finite number")
        if _is_number(ex_low) and (low is None or ex_low >= low):
            low, low_open = ex_low, True
        if _is_number(ex_high) and (high is None or ex_high <= high):
            high, high_open = ex_high, True
        if low is not None and high is not None:
            if kind == "integer":
                first = math.floor(low) + 1 if low_open and float(low).is_integer() else math.ceil(low)
                last = math.ceil(high) - 1 if high_open and float(high).is_integer() else math.floor(high)
                empty = first > last
            else:
                empty = low > high or (low == high and (low_open or high_open))
            if empty:
                raise _refuse("minimum above maximum")
        return {"type": kind}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    return "integer" if _is_int(value) or float(value).is_integer() else "number"


def _bounds(shape: dict[str, Any], low_key: str, high_key: str, limit: int) -> tuple[int, int | None]:
    low, high = shape.get(low_key, 0), shape.get(high_key)
    if not _is_int(low) or low < 0 or (high is not None and (not _is_int(high) or high < 0)):
        raise _refuse(f"{low_key}/{high_key} is not a non-negative integer")
    if high is not None and low > high:
        raise _refuse(f"{low_key} above {high_key}")
    if low > limit:
        raise _refuse(f"{low_key} above {limit}")
    return low, (high if high is not None and high <= limit else None)


def safe_schema(schema: Any) -> dict[str, Any]:
    """Validate ``schema`` against the supported subset and return its normalised copy (or raise InvalidInput)."""
    if not isinstance(schema, dict):
        raise _refuse("the schema is not an object")
    try:
        size = len(json.dumps(schema, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as err:
        raise _refuse(f"the schema is not plain JSON ({type(err).__name__})") from err
    if size > MAX_SCHEMA_CHARS:
        raise _refuse(f"the schema is larger than {MAX_SCHEMA_CHARS} characters")
    return _Normalizer(schema).visit(schema, 0)


def with_safe_schema(request: ChatRequest) -> ChatRequest:
    """``request`` with its JSON schema validated and normalised (refused with InvalidInput before any work)."""
    if request.json_schema is None:
        return request
    return dataclasses.replace(request, json_schema=safe_schema(request.json_schema))


# -- GBNF ------------------------------------------------------------------------------------

_JSON_ESCAPE_RE = re.compile(r'["\\\x00-\x1f\x7f-\x9f<>\u2028\u2029\ufffd\u200b]')
PRIMITIVES = {
    "space": '" "?',
    "char": r'[^"\\\x00-\x1F\x7F] | "\\" (["\\/bfnrt] | "u" hex hex hex hex)',
    "hex": "[0-9a-fA-F]",
    "string": r'"\"" char* "\"" space',
    "int": '"-"? ("0" | [1-9] [0-9]{0,15})',
    "integer": "int space",
    "number": 'int ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,4})? space',
    "boolean": '("true" | "false") space',
    "null": '"null" space',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space (string ":" space value ("," space string ":" space value)*)? "}" space',
    "array": '"[" space (value ("," space value)*)? "]" space',
}
_DEPENDENCIES = {
    "char": ["hex"],
    "string": ["char", "space"],
    "integer": ["int", "space"],
    "number": ["int", "space"],
    "boolean": ["space"],
    "null": ["space"],
    "value": ["object", "array", "string", "number", "boolean", "null"],
    "object": ["space", "string", "value"],
    "array": ["space", "value"],
}


def json_text(value: Any) -> str:
    """A scalar as JSON text that the output sanitizer leaves intact (quotes, controls, ``<`` escaped)."""
    if isinstance(value, str):
        return '"' + _JSON_ESCAPE_RE.sub(lambda m: _json_escape(m.group()), value) + '"'
    return json.dumps(value, allow_nan=False)


def _json_escape(ch: str) -> str:
    return "\\" + ch if ch in '"\\' else f"\\u{ord(ch):04x}"


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal of printable ASCII (everything else escaped)."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04X}")
        else:
            out.append(f"\\U{code:08X}")
    return '"' + "".join(out) + '"'


class _GrammarWriter:
    """Normalised schema -> GBNF rules; identical rules are shared."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self.by_body: dict[str, str] = {}

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = PRIMITIVES[name]
            for dep in _DEPENDENCIES.get(name, []):
                self.primitive(dep)
        return name

    def rule(self, body: str) -> str:
        name = self.by_body.get(body)
        if name is None:
            name = self.by_body[body] = f"r{len(self.by_body)}"
            self.rules[name] = body
        return name

    def visit(self, schema: dict[str, Any]) -> str:
        if "anyOf" in schema:
            return self.rule(" | ".join(self.visit(alt) for alt in schema["anyOf"]))
        if "enum" in schema:
            self.primitive("space")
            literals = " | ".join(gbnf_literal(json_text(v)) for v in schema["enum"])
            return self.rule(f"({literals}) space")
        kind = schema.get("type")
        if kind == "object":
            return self.object(schema)
        if kind == "array":
            return self.array(schema)
        if kind == "string" and ("minLength" in schema or "maxLength" in schema):
            self.primitive("char")
            self.primitive("space")
            return self.rule(f'"\\"" char{_repeat(schema.get("minLength", 0), schema.get("maxLength"))} "\\"" space')
        return self.primitive(kind if isinstance(kind, str) else "value")

    def object(self, schema: dict[str, Any]) -> str:
        if "properties" not in schema:
            if "additionalProperties" not in schema:
                return self.primitive("object")
            self.primitive("string")
            kv = self.rule(f'string ":" space {self.visit(schema["additionalProperties"])}')
            return self.rule(f'"{{" space ({kv} ("," space {kv})*)? "}}" space')
        self.primitive("space")
        props: dict[str, Any] = schema["properties"]
        kvs = {
            name: self.rule(f'{gbnf_literal(json_text(name))} space ":" space {self.visit(sub)}')
            for name, sub in props.items()
        }
        required = [kvs[name] for name in schema.get("required", [])]
        optional = [kv for name, kv in kvs.items() if name not in schema.get("required", [])]
        body = ' "," space '.join(required)
        if required:
            body += "".join(f' ("," space {kv})?' for kv in optional)
        elif optional:
            rest = ""  # the optional properties after this one, each with its comma
            chains = []
            for i, kv in enumerate(reversed(optional)):
                chains.append(f"{kv} {rest}".strip())
                if i < len(optional) - 1:
                    rest = self.rule(f'("," space {kv})? {rest}'.strip())
            body = "(" + " | ".join(reversed(chains)) + ")?"
        return self.rule(f'"{{" space {body} "}}" space')

    def array(self, schema: dict[str, Any]) -> str:
        self.primitive("space")
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if high == 0:
            return self.rule('"[" space "]" space')
        item = self.visit(schema["items"])
        more = f'("," space {item}){_repeat(max(low - 1, 0), None if high is None else high - 1)}'
        inner = f"{item} {more}" if low else f"({item} {more})?"
        return self.rule(f'"[" space {inner} "]" space')


def _repeat(low: int, high: int | None) -> str:
    if high is None:
        return "*" if low == 0 else ("+" if low == 1 else f"{{{low},}}")
    return f"{{{low},{high}}}"


def json_grammar(schema: Any) -> str:
    """Validate ``schema`` and return the checked GBNF grammar (root rule ``root``) that constrains JSON to it."""
    writer = _GrammarWriter()
    top = writer.visit(safe_schema(schema))
    writer.rules["root"] = top
    text = "\n".join(f"{name} ::= {body}" for name, body in writer.rules.items()) + "\n"
    check_gbnf(text)
    return text


# -- checking a GBNF text --------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""
    (?P<space>[ \t]+)
  | (?P<literal>"(?:[^"\\]|\\.)*")
  | (?P<cls>\[(?:[^\]\\]|\\.)*\])
  | (?P<name>[a-zA-Z0-9-]+)
  | (?P<repeat>\{[0-9]+(?:,[0-9]*)?\})
  | (?P<op>[()|*+?.])
    """,
    re.VERBOSE,
)
_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[tnr\\\"\[\]-])")
_RULE_RE = re.compile(r"^([a-zA-Z0-9-]+) ::= (.*)$")
MAX_CODE = 0x10FFFF


def _unescape(text: str) -> list[tuple[int, bool]]:
    """(code point, written as a plain "-") of a literal's or class's inside; ValueError on what llama.cpp refuses."""
    out: list[tuple[int, bool]] = []
    pos = 0
    while pos < len(text):
        if text[pos] != "\\":
            out.append((ord(text[pos]), text[pos] == "-"))
            pos += 1
            continue
        match = _ESCAPE_RE.match(text, pos)
        if match is None:
            raise ValueError("unknown escape")
        esc = match.group(1)
        code = int(esc[1:], 16) if esc[0] in "xuU" else ord({"t": "\t", "n": "\n", "r": "\r"}.get(esc, esc))
        if code > MAX_CODE:
            raise ValueError("an escape beyond U+10FFFF")
        out.append((code, False))
        pos = match.end()
    return out


def _class_nonempty(inner: str) -> bool:
    negated = inner.startswith("^")
    chars = _unescape(inner[1:] if negated else inner)
    ranges: list[tuple[int, int]] = []
    i = 0
    while i < len(chars):
        if i + 2 < len(chars) and chars[i + 1][1]:
            if chars[i][0] > chars[i + 2][0]:
                raise ValueError("a character class has a reversed range")
            ranges.append((chars[i][0], chars[i + 2][0]))
            i += 3
        else:
            ranges.append((chars[i][0], chars[i][0]))
            i += 1
    if not negated:
        return any(high >= 1 for _, high in ranges)  # code point 0 never matches
    covered = 1  # code point 0 never matches; the rest must not all be excluded
    for low, high in sorted(ranges):
        if low > covered:
            return True
        covered = max(covered, high + 1)
    return covered <= MAX_CODE


class _Expr:
    """A parsed rule body: alternatives of sequences of (atom, may_be_absent)."""

    def __init__(self, alternatives: list[list[tuple[Any, bool]]]) -> None:
        self.alternatives = alternatives

    def productive(self, known: set[str]) -> bool:
        return any(
            all(optional or _atom_productive(atom, known) for atom, optional in seq) for seq in self.alternatives
        )


def _atom_productive(atom: Any, known: set[str]) -> bool:
    if isinstance(atom, _Expr):
        return atom.productive(known)
    return atom is True or atom in known


def _parse_body(tokens: list[tuple[str, str]], pos: int, refs: set[str], depth: int) -> tuple[_Expr, int]:
    if depth > 64:
        raise ValueError("groups nested too deep")
    alternatives: list[list[tuple[Any, bool]]] = [[]]
    while pos < len(tokens):
        kind, text = tokens[pos]
        if text == "|":
            alternatives.append([])
            pos += 1
            continue
        if text == ")":
            break
        atom: Any
        if text == "(":
            atom, pos = _parse_body(tokens, pos + 1, refs, depth + 1)
            if pos >= len(tokens) or tokens[pos][1] != ")":
                raise ValueError("unclosed group")
        elif kind == "literal":
            if any(code == 0 for code, _ in _unescape(text[1:-1])):
                raise ValueError("a literal holds NUL, which no text can contain")
            atom = True
        elif kind == "cls":
            if not _class_nonempty(text[1:-1]):
                raise ValueError("a character class matches nothing")
            atom = True
        elif kind == "name":
            refs.add(text)
            atom = text
        elif text == ".":
            atom = True
        else:
            raise ValueError(f"unexpected {text!r}")
        pos += 1
        optional = False
        while pos < len(tokens) and (tokens[pos][0] == "repeat" or tokens[pos][1] in "*+?"):
            mark = tokens[pos][1]
            if mark in "*?" or mark.startswith("{0"):
                optional = True
            elif mark.startswith("{"):
                low, _, high = mark[1:-1].partition(",")
                if high and int(high) < int(low):
                    raise ValueError("a repetition has its maximum below its minimum")
                if int(low) > MAX_ITEMS_BOUND * 20:
                    raise ValueError("a repetition is too long")
            pos += 1
        alternatives[-1].append((atom, optional))
    return _Expr(alternatives), pos


def check_gbnf(text: str, root: str = "root") -> None:
    """Refuse (InvalidInput) a grammar llama.cpp could choke on, or one whose rules cannot all complete.

    It must be printable ASCII, one ``name ::= body`` per line, define ``root`` and every rule it
    names once, use only escapes llama.cpp knows, no empty character class, and every rule must
    derive at least one finite string (so that sampling never reaches a state where no token fits).
    """
    try:
        if not text.strip() or len(text) > MAX_GRAMMAR_CHARS:
            raise ValueError("empty or too large")
        if not text.isascii() or any(ch < " " and ch != "\n" for ch in text):
            raise ValueError("not printable ASCII")
        rules: dict[str, _Expr] = {}
        refs: set[str] = set()
        for line in text.splitlines():
            if not line.strip():
                continue
            match = _RULE_RE.match(line)
            if match is None:
                raise ValueError("a line is not a rule")
            name, body = match.groups()
            if name in rules:
                raise ValueError(f"rule {name} is defined twice")
            tokens: list[tuple[str, str]] = []
            pos = 0
            while pos < len(body):
                token = _TOKEN_RE.match(body, pos)
                if token is None:
                    raise ValueError(f"rule {name} cannot be read")
                if token.lastgroup != "space":
                    tokens.append((token.lastgroup or "", token.group()))
                pos = token.end()
            if not tokens or tokens[-1][1] == "|":  # llama.cpp would read the next line as this rule's end
                raise ValueError(f"rule {name} ends with an empty alternative")
            expr, end = _parse_body(tokens, 0, refs, 0)
            if end != len(tokens):
                raise ValueError(f"rule {name} has an unbalanced ')'")
            rules[name] = expr
        if root not in rules:
            raise ValueError("no root rule")
        undefined = refs - rules.keys()
        if undefined:
            raise ValueError(f"undefined rule {sorted(undefined)[0]}")
        productive: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name, expr in rules.items():
                if name not in productive and expr.productive(productive):
                    productive.add(name)
                    changed = True
        if len(productive) != len(rules):
            raise ValueError(f"rule {sorted(rules.keys() - productive)[0]} can never complete")
    except ValueError as err:
        raise _refuse(f"grammar check failed: {err}") from err
