"""Reading config YAML in bounded memory, and describing config values in bounded text.

A config is small and written by people, so anything huge is a mistake or an attack:
- a 424-byte "billion laughs" alias bomb loads cheaply (PyYAML shares the aliased
  objects), but anything that walks or `repr`s the result expands ~9^10 values, so the
  expanded size is computed from the node graph (each node once) and refused past
  `MAX_VALUES`, before anything is built from it;
- a mapping nested 10,000 deep made PyYAML's composer raise RecursionError, so nesting is
  counted on the event stream (no recursion) and refused past `MAX_DEPTH`;
- a file over `MAX_BYTES` is refused unread.
`short_repr` is what error messages show of a value: at most `MAX_REPR` characters.
"""
from __future__ import annotations

import reprlib
from typing import Any, Callable

import yaml

MAX_BYTES = 1 << 20  # a recipe is a few KB
MAX_DEPTH = 32  # sections are 2 deep; lists in values add one or two
MAX_VALUES = 100_000  # scalars, lists and mappings after expanding aliases
MAX_REPR = 200

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict = 3, 6, 6, 6
_repr.maxstring, _repr.maxother = MAX_REPR, MAX_REPR


def short_repr(value: Any) -> str:
    """`repr(value)` cut to `MAX_REPR` characters, without ever building the full text."""
    text = _repr.repr(value)
    return text if len(text) <= MAX_REPR else text[:MAX_REPR - 3] + "..."


def _check_depth(text: str, fail: Callable[[str], Exception]) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise fail(f"is nested more than {MAX_DEPTH} levels deep (line {event.start_mark.line + 1}); "
                           "a config has sections of keys, not deep structures")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _check_expanded_size(root: yaml.Node, fail: Callable[[str], Exception]) -> None:
    """Count the values `root` expands to (aliases expanded), visiting each node once: no expansion happens."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in size:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                    list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if not children_done:
            if key in on_path:
                raise fail(f"holds an alias that refers to itself (line {node.start_mark.line + 1})")
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in size)
            continue
        on_path.discard(key)
        size[key] = 1 + sum(size[id(c)] for c in children)
        depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
        if size[key] > MAX_VALUES:
            raise fail(f"expands to more than {MAX_VALUES} values through YAML aliases (&anchor / *alias, "
                       f"near line {node.start_mark.line + 1}); write the values out, or use fewer aliases")
        if depth[key] > MAX_DEPTH:
            raise fail(f"is nested more than {MAX_DEPTH} levels deep through YAML aliases "
                       f"(near line {node.start_mark.line + 1})")


def load_bounded(text: str, what: str, fail: Callable[[str], Exception]) -> Any:
    """`yaml.safe_load(text)`, refusing (with `fail(what + " ...")`) text, nesting or alias expansion past the limits."""
    def refuse(message: str) -> Exception:
        return fail(f"{what} {message}")

    if len(text) > MAX_BYTES:
        raise refuse(f"is {len(text)} characters long, more than {MAX_BYTES}: is it really a config?")
    try:
        _check_depth(text, refuse)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_expanded_size(node, refuse)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise refuse(f"is not valid YAML: {e}") from None


def read_bounded(path: str, fail: Callable[[str], Exception]) -> Any:
    """The YAML file at `path`, loaded with `load_bounded` after reading at most `MAX_BYTES` + 1 bytes."""
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read(MAX_BYTES + 1)
        except UnicodeDecodeError as e:
            raise fail(f"config file {path!r} is not UTF-8 text: {e}") from None
    return load_bounded(text, f"config file {path!r}", fail)
