"""Bounded, alias-free loading of small YAML/JSON documents written by users (annotation values) or
by the platform (the policy file).

Pure: text in, plain Python values out (dict, list, str, int, float, bool, None), or
:class:`~diskplan.errors.Refused` naming the field. What is refused, and why:

- text larger than ``max_bytes`` (checked before any parsing);
- YAML anchors and aliases (``&a``/``*a``): an alias "bomb" expands a few hundred bytes into
  gigabytes when a normal loader builds the objects; this loader never expands anything;
- explicit tags (``!!python/object``, ``!!binary``, ``!foo``...) and merge keys (``<<``): nothing
  diskhooks reads needs them, and each is a way to smuggle a surprising type;
- nesting deeper than ``max_depth``, more than ``max_nodes`` values, several documents,
  non-scalar or duplicate mapping keys, NaN/Infinity, integers of more than 4300 digits.

**Plain scalars resolve by the YAML 1.2 core schema** (as YAML 1.2 readers do), not by PyYAML's
YAML 1.1 rules. Kubernetes' own manifest reader (go-yaml v2) still follows 1.1, but it never parses an
annotation's value, and 1.2 is the set of rules under which an unquoted value means what it looks
like (the policy, rendered by Helm's ``toYaml``, reads the same under both): null is ``null``/``Null``/``NULL``/``~``/empty;
a bool is ``true``/``True``/``TRUE``/``false``/``False``/``FALSE``; an integer is decimal
``[-+]?[0-9]+`` (``017`` is 17, not octal 15), ``0o17`` or ``0x1F``; everything else is a string, so
``yes``/``no``/``on``/``off``/``y``/``n``, ``1:20`` (not sexagesimal 80), ``1_000``, ``0b101`` and
timestamps (``2024-01-01``) stay the text they are, and the field's own check (quantity, integer,
choice...) refuses or reads that text. A float is a YAML 1.2 core float that YAML 1.1 read as a
float too: a decimal point, and an exponent only with its sign (``1.5``, ``.5``, ``1.0e+10``,
``.inf``, ``.nan``); ``1e10`` and ``1.5e9``, which YAML 1.2 calls floats, still read as text here,
so a quantity field reads them exactly (``size: 1e10`` is 10**10 bytes), as it always has. This is
PyYAML's own mechanism: :class:`CoreResolver` (a ``Resolver`` with its implicit resolvers replaced)
and :class:`CoreConstructor` (decimal, ``0o`` and ``0x`` integers).

JSON (the usual form of an annotation written by a tool) takes a fast path through :mod:`json`
(JSON is YAML 1.2, so both paths agree); anything that is not JSON goes through libyaml's event
parser (or PyYAML's pure-Python parser where libyaml is missing) and a small composer here that
builds values from the events.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from diskplan.errors import Refused

MAX_ANNOTATION_BYTES = 16 * 1024
MAX_DEPTH = 8
MAX_NODES = 2000
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\Z")

_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"

_Parser: Any = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader


class CoreResolver(Resolver):
    """PyYAML's resolver with the YAML 1.1 implicit types replaced by the YAML 1.2 core schema
    (see the module docstring), plus ``<<`` as a merge key so that one is still refused by name
    (Kubernetes' go-yaml merges it; diskhooks does not)."""

    yaml_implicit_resolvers = {}  # noqa: RUF012 - PyYAML's class-level table, filled below


for _tag, _regexp, _first in (
    (_NULL, r"(?:~|null|Null|NULL|)\Z", ["~", "n", "N", ""]),
    (_BOOL, r"(?:true|True|TRUE|false|False|FALSE)\Z", list("tTfF")),
    (_INT, r"(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z", list("-+0123456789")),
    # YAML 1.2 core floats that YAML 1.1 read as floats as well (``1e10``, ``1.5e9`` stay text)
    (_FLOAT, (r"(?:[-+]?[0-9]+\.[0-9]*(?:[eE][-+][0-9]+)?|\.[0-9]+(?:[eE][-+][0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z"), list("-+0123456789.")),
    (_MERGE, r"<<\Z", ["<"]),
):
    CoreResolver.add_implicit_resolver(_tag, re.compile(_regexp), _first)
del _tag, _regexp, _first


class CoreConstructor(SafeConstructor):
    """Integers as the YAML 1.2 core schema writes them: decimal (leading zeros are still
    decimal), ``0o`` octal, ``0x`` hexadecimal; :class:`CoreResolver` sends nothing else here."""

    def construct_yaml_int(self, node: Any) -> int:
        value = str(self.construct_scalar(node))
        return int(value, 0 if value[:2] in ("0o", "0x") else 10)


CoreConstructor.add_constructor(_INT, CoreConstructor.construct_yaml_int)  # type: ignore[type-var]

_resolver = CoreResolver()
_constructor = CoreConstructor()
# first characters of plain scalars that may resolve to something else than a string
_FIRST_CHARS = frozenset(k for k in CoreResolver.yaml_implicit_resolvers if k is not None)


def load_document(text: str, *, field: str, max_bytes: int = MAX_ANNOTATION_BYTES,
                  max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES,
                  key_paths: bool = False) -> Any:
    """Parse one YAML or JSON document. Raises :class:`Refused` with ``field`` and the reason.

    With ``key_paths`` (the policy file), a problem at a place in the document (an anchor, an
    alias, a tag, a number that is not finite, a duplicate key...) is named by its key path
    instead, ``sizing.cpuAllocationRatio`` or ``sidecar.allowedImages[1]``; ``field`` names the
    document as a whole."""
    if not isinstance(text, str):
        raise Refused(field, f"must be a string, not {type(text).__name__}")
    size = len(text.encode("utf-8", "surrogatepass")) if len(text) * 4 > max_bytes else len(text)
    if size > max_bytes:
        raise Refused(field, f"is {size} bytes long; the limit is {max_bytes} bytes")
    if _WORD.match(text):
        # a bare word or number (``medium``, ``8Gi``, ``4``): no YAML structure is possible, so
        # resolve it as the one plain scalar it is (anything else takes the general path below)
        if text[0] not in _FIRST_CHARS:
            return text
        tag = _resolve(text, (True, False))
        if tag == _STR:
            return text
        if tag == _INT:
            return _constructor.construct_yaml_int(yaml.ScalarNode(tag, text))
    stripped = text.lstrip()
    if stripped[:1] in ("[", "{"):
        value = _try_json(text, field)
        if value is not _NOT_JSON:
            _check_shape(value, field=field, max_depth=max_depth, max_nodes=max_nodes)
            return value
    return _Composer(text, field=field, max_depth=max_depth, max_nodes=max_nodes,
                     key_paths=key_paths).document()


# ------------------------------------------------------------------------------------------------
# JSON fast path
# ------------------------------------------------------------------------------------------------
_NOT_JSON = object()


class _Duplicate(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number diskhooks accepts")


def _try_json(text: str, field: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except _Duplicate as dup:
        raise Refused(field, f"the key {str(dup)[:60]!r} appears twice") from None
    except RecursionError:
        raise Refused(field, "is nested too deeply") from None
    except ValueError:
        return _NOT_JSON  # maybe YAML flow style, e.g. [{name: a, size: 1Gi}]


def _check_shape(value: Any, *, field: str, max_depth: int, max_nodes: int) -> None:
    count = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise Refused(field, f"has more than {max_nodes} values")
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise Refused(field, f"is nested more than {max_depth} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, float) and not math.isfinite(item):
            raise Refused(field, "contains a number that is not finite")


# ------------------------------------------------------------------------------------------------
# YAML: events -> values, refusing what is not plain data
# ------------------------------------------------------------------------------------------------
class _Composer:
    def __init__(self, text: str, *, field: str, max_depth: int, max_nodes: int,
                 key_paths: bool = False) -> None:
        self.field = field
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.nodes = 0
        self.parser = _Parser(text)
        self.key_paths = key_paths
        self.path: list[Any] = []  # keys and indices down to the value being composed

    @property
    def where(self) -> str:
        """What an error here is named: ``field``, or with ``key_paths`` the key path."""
        if not self.key_paths or not self.path:
            return self.field
        out = "".join(f"[{p}]" if isinstance(p, int) else f".{str(p)[:60]}" for p in self.path)
        return out[1:] if out.startswith(".") else f"{self.field}{out}"  # a list: policy[0]

    def _event(self) -> Any:
        try:
            return self.parser.get_event()
        except yaml.YAMLError as exc:
            raise Refused(self.field, f"is not valid YAML or JSON: {_describe(exc)}") from None

    def document(self) -> Any:
        try:
            self._event()  # StreamStart
            event = self._event()
            if isinstance(event, yaml.StreamEndEvent):
                return None  # empty text
            value = self._value(self._event(), depth=1)
            self._event()  # DocumentEnd
            end = self._event()
            if not isinstance(end, yaml.StreamEndEvent):
                raise Refused(self.field, "must hold exactly one YAML document")
            return value
        finally:
            dispose = getattr(self.parser, "dispose", None)
            if dispose is not None:
                dispose()

    def _value(self, event: Any, *, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise Refused(self.field, f"has more than {self.max_nodes} values")
        cls = type(event)
        if cls is yaml.AliasEvent:
            raise Refused(self.where, "YAML aliases (*name) are not accepted")
        if getattr(event, "anchor", None) is not None:
            raise Refused(self.where, "YAML anchors (&name) are not accepted")
        if cls is yaml.ScalarEvent:
            return self._scalar(event)
        if depth > self.max_depth:
            raise Refused(self.where, f"is nested more than {self.max_depth} levels deep")
        if event.tag is not None:
            raise Refused(self.where, f"YAML tags ({event.tag}) are not accepted")
        if cls is yaml.SequenceStartEvent:
            items: list[Any] = []
            while True:
                nxt = self._event()
                if type(nxt) is yaml.SequenceEndEvent:
                    return items
                self.path.append(len(items))
                items.append(self._value(nxt, depth=depth + 1))
                self.path.pop()
        if cls is yaml.MappingStartEvent:
            out: dict[Any, Any] = {}
            while True:
                nxt = self._event()
                kind = type(nxt)
                if kind is yaml.MappingEndEvent:
                    return out
                if kind is not yaml.ScalarEvent:
                    if kind is yaml.AliasEvent:
                        raise Refused(self.where, "YAML aliases (*name) are not accepted")
                    raise Refused(self.where, "mapping keys must be plain strings")
                key = self._value(nxt, depth=depth + 1)
                if not isinstance(key, (str, int, bool)) and key is not None:
                    raise Refused(self.where, "mapping keys must be plain strings")
                if key in out:
                    raise Refused(self.where, f"the key {str(key)[:60]!r} appears twice")
                self.path.append(key)
                out[key] = self._value(self._event(), depth=depth + 1)
                self.path.pop()
        raise Refused(self.where, f"unexpected YAML content ({cls.__name__})")  # pragma: no cover

    def _scalar(self, event: Any) -> Any:
        if event.tag is not None:
            raise Refused(self.where, f"YAML tags ({event.tag}) are not accepted")
        value = event.value
        if not event.implicit[0] or (value and value[0] not in _FIRST_CHARS):
            return value  # quoted, or a plain scalar no implicit type can start with: text
        tag = _resolve(value, event.implicit)
        if tag == _STR:
            return value
        node = yaml.ScalarNode(tag, value)
        if tag == _NULL:
            return None
        if tag == _BOOL:
            return _constructor.construct_yaml_bool(node)
        if tag == _INT:
            try:
                return _constructor.construct_yaml_int(node)
            except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
                raise Refused(self.where, f"{value[:20]!r}... is a number of {len(value)} "
                              "digits; that is too long") from None
        if tag == _FLOAT:
            number = _constructor.construct_yaml_float(node)
            if not math.isfinite(number):
                raise Refused(self.where, f"{value[:20]!r} is not a finite number")
            return number
        kind = tag.rsplit(":", 1)[-1]
        raise Refused(self.where, f"{value[:40]!r} reads as a YAML {kind}; quote it if it is text")


def _resolve(value: str, implicit: tuple[bool, bool]) -> str:
    """The YAML 1.2 core schema tag of a plain scalar (:class:`CoreResolver`, untyped)."""
    return str(_resolver.resolve(yaml.ScalarNode, value, implicit))  # type: ignore[no-untyped-call]


def _describe(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"[:200]
