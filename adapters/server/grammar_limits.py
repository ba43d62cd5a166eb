"""Bounds on what a request may hand the grammar library, checked in Python before llguidance sees it.

llguidance compiles a JSON schema by recursion in native code: a flat chain of 3,000 `$ref`s (a
106 KB body) overflowed its stack and killed the process. So a schema is walked here first, without
recursion, and refused with a 400 that says which bound it breaks:

- size: at most `MAX_NODES` objects, arrays and values in all, nested at most `MAX_DEPTH` deep;
- references: at most `MAX_REFS` `$ref`s, each local (`#/...`) and pointing at something in the
  schema; followed through, no path of nesting and references is longer than `MAX_EXPANDED_DEPTH`
  (the depth the compiler recurses to), and references never loop without passing through a value
  (`a` -> `b` -> `a`, or `a: {anyOf: [{$ref: a}, ...]}` describes no finite JSON);
- regular expressions (`pattern`, `patternProperties`, TGI's `regex`): at most `MAX_REGEX` characters,
  counted repetitions at most `MAX_REPEAT`, and nested counted repetitions multiplying to at most
  `MAX_REPEAT` (`(a{100}){100}` is 10,000 states).

Recursion through a value (a tree node whose `children` items refer to the node) is allowed: the
compiler expands it lazily.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import bad_request

MAX_NODES = 20_000
MAX_DEPTH = 64
MAX_REFS = 512
MAX_EXPANDED_DEPTH = 256
MAX_REGEX = 2_000
MAX_REPEAT = 1_000

#: Keywords whose value is a value's schema: a reference loop through one of these is recursion in
#: the data (finite JSON can satisfy it), not a loop of names.
_VALUE_KEYWORDS = frozenset(
    {
        "properties",
        "patternProperties",
        "additionalProperties",
        "items",
        "prefixItems",
        "additionalItems",
        "contains",
        "unevaluatedItems",
        "unevaluatedProperties",
        "propertyNames",
    }
)


def check_schema(schema: Any, param: str) -> None:
    """Raise a 400 naming `param` when `schema` breaks one of the bounds above."""
    refs = _walk(schema, param)
    if refs:
        _check_references(schema, refs, param)


def check_regex(pattern: str, param: str) -> None:
    """Raise a 400 naming `param` when `pattern` is too long or repeats too much."""
    if len(pattern) > MAX_REGEX:
        raise bad_request(
            f"{param} is a regular expression of {len(pattern)} characters; at most {MAX_REGEX} are allowed", param
        )
    inner = [1]  # per open group: the largest repetition product found inside it so far
    last = (-1, 1)  # where the last repetition ended, and its product ({m}{n} multiplies)
    escaped = in_class = False
    for i, ch in enumerate(pattern):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(":
            inner.append(1)
        elif ch == ")" and len(inner) > 1:
            group = inner.pop() * (_repeat_at(pattern, i + 1) or 1)
            _check_repeat(group, param)
            inner[-1] = max(inner[-1], group)
            last = (_repeat_end(pattern, i + 1), group)
        elif ch == "{" and i > 0 and pattern[i - 1] != ")":
            count = _repeat_at(pattern, i)
            if count is not None:
                count *= last[1] if last[0] == i else 1
                _check_repeat(count, param)
                inner[-1] = max(inner[-1], count)
                last = (_repeat_end(pattern, i), count)


_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def _repeat_at(pattern: str, i: int) -> int | None:
    """The largest count of a `{m}` / `{m,n}` repetition starting at `pattern[i]`, if there is one."""
    match = _REPEAT.match(pattern, i)
    if match is None:
        return None
    low, high = match.group(1), match.group(2)
    return max(int(low[:9]), int(high[:9]) if high else 0)


def _repeat_end(pattern: str, i: int) -> int:
    """Where a repetition starting at `pattern[i]` ends (-1 when there is none)."""
    match = _REPEAT.match(pattern, i)
    return match.end() if match else -1


def _check_repeat(count: int, param: str) -> None:
    if count > MAX_REPEAT:
        raise bad_request(
            f"{param} repeats a part of its regular expression {count} times (nested repetitions multiply); "
            f"at most {MAX_REPEAT} are allowed",
            param,
        )


def _walk(schema: Any, param: str) -> list[tuple[str, tuple[str, ...]]]:
    """Count nodes and depth; check the regular expressions; return each `$ref` with where it is."""
    nodes, refs = 0, []
    todo: list[tuple[Any, int, tuple[str, ...]]] = [(schema, 1, ())]
    while todo:
        node, depth, path = todo.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise bad_request(f"{param} has more than {MAX_NODES} objects, arrays and values; simplify it", param)
        if depth > MAX_DEPTH:
            raise bad_request(f"{param} is nested more than {MAX_DEPTH} levels deep", param)
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    refs.append((value, path))
                    if len(refs) > MAX_REFS:
                        raise bad_request(f"{param} has more than {MAX_REFS} $refs", param)
                elif key == "pattern" and isinstance(value, str):
                    check_regex(value, param)
                elif key == "patternProperties" and isinstance(value, dict):
                    for pattern in value:
                        check_regex(pattern, param)
                todo.append((value, depth + 1, (*path, str(key))))
        elif isinstance(node, list):
            todo.extend((item, depth + 1, (*path, str(i))) for i, item in enumerate(node))
    return refs


def _target(schema: Any, ref: str, param: str) -> Any:
    """What a local reference points at (JSON pointer), or a 400."""
    if not ref.startswith("#"):
        raise bad_request(
            f"{param} refers to {ref[:80]!r}; only references inside the schema (#/...) are allowed", param
        )
    node = schema
    for raw in ref[1:].split("/")[1:] if ref != "#" else []:
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise bad_request(f"{param} refers to {ref[:80]!r}, which is not in the schema", param)
    return node


def _check_references(schema: Any, refs: list[tuple[str, tuple[str, ...]]], param: str) -> None:
    """Every reference resolves; no loop of references without a value between; the schema with its
    references followed is at most `MAX_EXPANDED_DEPTH` deep (back edges of recursion cut)."""
    for ref, _ in refs:
        _target(schema, ref, param)
    # Depth-first over (node, entered through a value keyword), iteratively: a frame is a node and
    # the iterator over its children (edges: nesting, and a $ref to its target).
    deepest: dict[int, int] = {}  # id(node) -> expanded depth below it, once finished
    on_path: dict[int, int] = {}  # id(node) -> its index in `stack`
    stack: list[tuple[Any, Any, bool]] = []  # (node, children iterator, reached through a value keyword)
    values_on_path: list[int] = []  # prefix count of value-keyword edges along the stack

    def children(node: Any):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    yield _target(schema, value, param), False
                elif isinstance(value, (dict, list)):
                    yield value, key in _VALUE_KEYWORDS
        elif isinstance(node, list):
            for item in node:
                if isinstance(item, (dict, list)):
                    yield item, False

    def push(node: Any, through_value: bool) -> None:
        on_path[id(node)] = len(stack)
        values_on_path.append((values_on_path[-1] if values_on_path else 0) + through_value)
        stack.append((node, children(node), through_value))
        if len(stack) > MAX_EXPANDED_DEPTH:
            raise bad_request(
                f"{param} is more than {MAX_EXPANDED_DEPTH} levels deep once its $refs are followed; "
                "flatten its chains of references",
                param,
            )

    push(schema, False)
    best = [0]  # deepest subtree found below each frame
    while stack:
        node, it, _ = stack[-1]
        child = next(it, None)
        if child is None:
            stack.pop()
            values_on_path.pop()
            del on_path[id(node)]
            below = best.pop()
            deepest[id(node)] = below
            if best:
                best[-1] = max(best[-1], below + 1)
            continue
        target, through_value = child
        key = id(target)
        if key in on_path:  # a loop: recursion through a value is fine, a loop of names is not
            start = on_path[key]
            values = values_on_path[-1] + through_value - values_on_path[start]
            if values == 0:
                raise bad_request(
                    f"{param} has $refs that loop without describing a value (a schema that refers back to "
                    "itself only through $ref, anyOf, allOf or oneOf); no JSON can match it",
                    param,
                )
            continue
        if key in deepest:
            best[-1] = max(best[-1], deepest[key] + 1)
            if len(stack) + deepest[key] > MAX_EXPANDED_DEPTH:
                raise bad_request(
                    f"{param} is more than {MAX_EXPANDED_DEPTH} levels deep once its $refs are followed; "
                    "flatten its chains of references",
                    param,
                )
            continue
        push(target, through_value)
        best.append(0)
