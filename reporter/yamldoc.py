"""YAML text -> plain data and the line of every field, with bounded effort.

At most MAX_VALUES values written in the file, at most MAX_NODES more from expanding aliases and
merge keys, and MAX_DEPTH levels: a few hundred bytes of nested aliases (a "billion laughs") cannot
take minutes and gigabytes, while a config of tens of thousands of reports, written out, still reads.
Keys stay as written (YAML 1.1 would turn a report called `off:` into a boolean); a duplicate key
is a problem, except where a key overrides one merged in with `<<`.
"""

from __future__ import annotations

from typing import Any

import yaml

from reporter.errors import ConfigError, Problem

Path_ = tuple[str | int, ...]
"""Where a field is: keys and list indexes from the top of the document."""

MAX_VALUES = 1_000_000
"""Values (scalars, lists, mappings) a schedules.yaml may have written in it: about 40 MB of YAML,
50,000 reports of 20 values each. Reading costs time in proportion to the file, so this only stops
a file that is not a config at all."""
MAX_NODES = 50_000
"""Values that aliases and merge keys may add to those written: expansion is what can turn a few
hundred bytes into gigabytes, so it has a budget of its own, independent of the file's size."""
MAX_DEPTH = 50
"""How deeply lists and mappings may nest."""


def dotted(loc: Path_) -> str:
    """('reports', 'r1', 'recipients', 0) -> 'reports.r1.recipients[0]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _LineLoader(yaml.SafeLoader):
    """Safe loader; we walk its node tree ourselves to keep the line of every key."""


# libyaml (the C parser PyYAML wheels ship) reads a megabyte in well under a second; the pure-Python
# parser takes many seconds. Both give the same nodes and tags, so use C where it exists.
_FastLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_MERGE = "tag:yaml.org,2002:merge"

_ALIAS_HINT = "write the values out, or use fewer aliases"


def _yaml_error(exc: yaml.YAMLError, file: str, text: str) -> ConfigError:
    if not isinstance(exc, yaml.MarkedYAMLError):
        return ConfigError([Problem(file, None, "", f"YAML error: {exc}")])
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    if exc.problem == "exceeded maximum nesting depth":
        # libyaml 0.2.6 (in PyYAML 6.0.4's wheels) stops at 1,000 levels, and its scanner looks that far
        # ahead in a flow collection before the events reach our own count: the same refusal.
        return ConfigError([Problem(file, line, "", f"lists and mappings nested more than {MAX_DEPTH} levels deep")])
    what = exc.problem or exc.context or "invalid YAML"
    if exc.context and exc.problem and exc.context_mark and exc.context_mark.line + 1 != line:
        what = f"{exc.problem} ({exc.context} that starts on line {exc.context_mark.line + 1})"
    if line is not None and "\t" in (text.splitlines()[line - 1 : line] or [""])[0]:
        what += "; this line has a tab: indent with spaces"
    return ConfigError([Problem(file, line, "", f"YAML syntax error: {what}")])


def _measure(text: str, file: str) -> None:
    """Refuse, before building anything, a document with too many values or nested too deeply.

    The events are a flat stream (an alias is one event, however much it stands for), so this is
    cheap and safe; the C composer that comes next recurses once per level of nesting.
    """
    loader = _FastLoader(text)
    depth = count = 0
    try:
        while (event := loader.get_event()) is not None:
            line = event.start_mark.line + 1 if event.start_mark else None
            if isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.CollectionStartEvent)):
                count += 1
                if count > MAX_VALUES:
                    raise ConfigError([Problem(file, line, "", f"more than {MAX_VALUES:,} values; is this the right file?")])
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError([Problem(file, line, "", f"lists and mappings nested more than {MAX_DEPTH} levels deep")])
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file, text) from None
    finally:
        loader.dispose()


def read_yaml(text: str, file: str) -> tuple[Any, dict[Path_, int], list[Problem], set[Path_]]:
    """(data, line of every field, problems, fields whose YAML value could not be read).

    A duplicate key, a bad tag or merge key is a problem but the rest is still read, so the checks
    after it see everything else; a file too big, too deep or not YAML at all raises ConfigError.
    """
    plain = _read_plain(text, file)
    if plain is not None:
        return plain
    return _read_nodes(text, file)


_RESOLVERS: dict[str | None, list[tuple[str, Any]]] = _LineLoader.yaml_implicit_resolvers
_UNSURE = (_MERGE, "tag:yaml.org,2002:value")
_NO_VALUE: Any = object()
"""What _resolved returns for a value the one pass leaves to _read_nodes."""


def _resolved(value: str, event: Any, constructor: Any) -> Any:
    """The value of plain scalar VALUE (str if no implicit resolver matches), as _read_nodes makes it."""
    for tag, regexp in _RESOLVERS.get(value[:1], ()):
        if regexp.match(value):
            if tag in _UNSURE:
                return _NO_VALUE
            try:
                return constructor.construct_object(yaml.ScalarNode(tag, value, event.start_mark, event.end_mark), deep=True)
            except (yaml.YAMLError, ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError):
                return _NO_VALUE  # a date that does not exist, say: _read_nodes says so
    return value


def _read_plain(text: str, file: str) -> tuple[Any, dict[Path_, int], list[Problem], set[Path_]] | None:
    """What `_read_nodes` returns, in one pass over the C parser's events, for a document written
    plainly; None for one that is not: anchors, aliases, tags, merge keys, duplicate keys, keys that
    are not plain values, several documents or a value its tag cannot be made from.

    `_read_nodes` builds PyYAML's node tree, resolves every scalar's tag through PyYAML's Python
    resolver and walks the tree again: about 1 ms per report of a large config. A config is almost
    always written plainly, and then the events say everything: every value is a string unless the
    resolver's first-character table says it may be something else (a number, true, null, a date).
    The limits are checked on the same events, in the same order, with the same messages as
    `_measure`; anything unusual is left to `_read_nodes`, which says what is wrong with it.
    """
    if None in _RESOLVERS:
        return None  # a resolver for every first character: not PyYAML's default, so not this shortcut
    loader = _FastLoader(text)
    constructor = _LineLoader("")
    lines: dict[Path_, int] = {}
    # The collection being filled (None: the document's top), whether it is a mapping, its path, the
    # key waiting for its value (None: a key comes next); the enclosing ones' are on the stack.
    stack: list[tuple[Any, bool, Path_, Any]] = []
    container: Any = None
    is_map = False
    path: Path_ = ()
    key: Any = None
    root: Any = None
    count = depth = documents = 0
    scalar_event, mapping_start, sequence_start = yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent
    ends = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
    resolvers = _RESOLVERS
    try:
        get = loader.get_event
        while True:
            event = get()
            kind = type(event)
            if kind is scalar_event or kind is mapping_start or kind is sequence_start:
                count += 1
                if count > MAX_VALUES:
                    line = event.start_mark.line + 1
                    raise ConfigError([Problem(file, line, "", f"more than {MAX_VALUES:,} values; is this the right file?")])
                if event.anchor is not None or event.tag is not None:
                    return None
                if kind is scalar_event:
                    value = event.value
                    if is_map and key is None:
                        # A key, kept as written (never resolved: a report called `off:` stays 'off').
                        if value in container or (value == "<<" and event.implicit[0]):
                            return None
                        key = value
                        lines[(*path, value)] = event.start_mark.line + 1
                        continue
                    if event.implicit[0] and value[:1] in resolvers:
                        value = _resolved(value, event, constructor)
                        if value is _NO_VALUE:
                            return None
                    if is_map:
                        container[key] = value
                        key = None
                    elif container is not None:
                        lines[(*path, len(container))] = event.start_mark.line + 1
                        container.append(value)
                    else:
                        root = value
                        lines[()] = event.start_mark.line + 1
                    continue
                depth += 1
                if depth > MAX_DEPTH:
                    line = event.start_mark.line + 1
                    raise ConfigError([Problem(file, line, "", f"lists and mappings nested more than {MAX_DEPTH} levels deep")])
                if is_map and key is None:
                    return None  # a list or mapping as a key
                child: Any = {} if kind is mapping_start else []
                if is_map:
                    container[key] = child
                    inner = (*path, key)
                elif container is not None:
                    inner = (*path, len(container))
                    lines[inner] = event.start_mark.line + 1
                    container.append(child)
                else:
                    root = child
                    inner = ()
                    lines[()] = event.start_mark.line + 1
                stack.append((container, is_map, path, None))
                container, is_map, path, key = child, kind is mapping_start, inner, None
            elif kind in ends:
                depth -= 1
                container, is_map, path, key = stack.pop()
            elif kind is yaml.AliasEvent:
                return None
            elif kind is yaml.DocumentStartEvent:
                documents += 1
                if documents > 1:
                    return None  # get_single_node refuses a second document: _read_nodes says so
            elif kind is yaml.StreamEndEvent:
                break
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file, text) from None
    finally:
        loader.dispose()
    return root, lines, [], set()


def _read_nodes(text: str, file: str) -> tuple[Any, dict[Path_, int], list[Problem], set[Path_]]:
    """`read_yaml` for any document: through PyYAML's node tree, which has anchors, aliases and tags resolved."""
    lines: dict[Path_, int] = {}
    _measure(text, file)
    try:
        loader = _FastLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file, text) from None
    if node is None:
        return None, lines, [], set()
    problems: list[Problem] = []
    broken: set[Path_] = set()
    constructor = _LineLoader("")
    # Aliases make a tree out of a graph: count every value walked a second time (an alias's copy:
    # everything under a node seen before was seen before too), and stop at MAX_NODES of them.
    # Values walked once are bounded by MAX_VALUES already.
    budget = [MAX_NODES]
    seen: set[int] = set()
    merged: dict[int, int] = {}
    written: dict[int, set[int]] = {}

    def key_of(path: Path_) -> Path_:
        """The nearest mapping key on PATH: its line is where an alias is used, not where its anchor is."""
        while path and not isinstance(path[-1], str):
            path = path[:-1]
        return path

    def walk(n: yaml.Node, path: Path_, depth: int) -> Any:
        if id(n) in seen:
            budget[0] -= 1
        else:
            seen.add(id(n))
        if budget[0] < 0:
            why = f"aliases expand this file to more than {MAX_NODES:,} values; {_ALIAS_HINT}"
            raise ConfigError([Problem(file, lines.get(key_of(path)), dotted(key_of(path)), why)])
        lines.setdefault(path, n.start_mark.line + 1)
        if depth > MAX_DEPTH:
            problems.append(Problem(file, n.start_mark.line + 1, dotted(path), "nested too deeply"))
            broken.add(path)
            return None
        if isinstance(n, yaml.MappingNode):
            # Only a mapping with a merge key of its own expands: a long one written out (reports:) is not checked.
            if any(k.tag == _MERGE for k, _ in n.value) and _merged_size(n, merged, set()) > MAX_NODES:
                why = f"merge keys (<<) expand to more than {MAX_NODES:,} values (or merge a mapping into itself); {_ALIAS_HINT}"
                raise ConfigError([Problem(file, lines.get(key_of(path)), dotted(key_of(path)), why)])
            # The keys written in this mapping itself, before merging (flattening changes the node in place).
            own = written.setdefault(id(n), {id(k) for k, _ in n.value if k.tag != _MERGE})
            try:
                constructor.flatten_mapping(n)
            except yaml.YAMLError as exc:
                problems.append(
                    Problem(file, n.start_mark.line + 1, dotted(path), f"bad merge key: {getattr(exc, 'problem', None) or exc}")
                )
                broken.add(path)
                return None
            out: dict[Any, Any] = {}
            origin: dict[Any, yaml.Node] = {}
            for key_node, value_node in n.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    problems.append(Problem(file, key_node.start_mark.line + 1, dotted(path), "a key must be a plain value"))
                    continue
                # Keys as written: YAML 1.1 would turn a report called `off:` or `yes:` into a boolean.
                key = key_node.value
                if key in out and not (id(key_node) in own and id(origin[key]) in own):
                    # A merged key (<<) is overridden by one written here, or by an earlier merge source: as YAML says.
                    del out[key]
                elif key in out:
                    first = lines.get((*path, key))
                    problems.append(
                        Problem(
                            file,
                            key_node.start_mark.line + 1,
                            dotted((*path, key)),
                            f"duplicate key (first defined on line {first}); YAML would silently keep only the last",
                        )
                    )
                    continue
                lines[(*path, key)] = key_node.start_mark.line + 1
                origin[key] = key_node
                out[key] = walk(value_node, (*path, key), depth + 1)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(item, (*path, i), depth + 1) for i, item in enumerate(n.value)]
        try:
            return constructor.construct_object(n, deep=True)
        except (yaml.YAMLError, ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError) as exc:
            # A tagged scalar that does not fit its tag (`!!int three`, `!!bool nah`).
            detail = getattr(exc, "problem", None) or f"{n.value!r} is not a valid {n.tag.rsplit(':', 1)[-1]}"
            problems.append(Problem(file, n.start_mark.line + 1, dotted(path), f"bad value: {detail}"))
            broken.add(path)
            return None

    data = walk(node, (), 0)
    return data, lines, problems, broken


def _merged_size(node: yaml.MappingNode, memo: dict[int, int], open_: set[int]) -> int:
    """How many key-value pairs NODE has once its merge keys (<<) are flattened, without flattening.

    Flattening copies every merged pair, so nested merges of merges grow exponentially; this counts
    first (each mapping once). A mapping that merges itself counts as too many.
    """
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_:
        return MAX_NODES + 1
    open_.add(id(node))
    size = 0
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE:
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            size += sum(_merged_size(m, memo, open_) for m in sources if isinstance(m, yaml.MappingNode))
        else:
            size += 1
        if size > MAX_NODES:
            break
    open_.discard(id(node))
    memo[id(node)] = size
    return size
