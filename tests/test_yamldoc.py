"""reporter.yamldoc's one-pass reader of plainly written YAML gives what the node-tree reader gives."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from reporter.errors import ConfigError
from reporter.yamldoc import MAX_DEPTH, MAX_VALUES, _read_nodes, _read_plain, read_yaml

# Strings YAML 1.1 resolves to something else when written plain, and some it leaves alone.
TRICKY = ["yes", "No", "off", "ON", "y", "~", "null", "", "1_000", "0x1F", "0o17", "017", "1:30", "190:20:30", "-.inf", ".NaN"]
TRICKY += ["2026-01-01", "2026-01-01 10:00:00", "2026-1-1", "1e3", "1.5e+3", "+12", "=", "<<", "0 6 * * 1-5", "a: b", "- x", "#x"]
SCALARS = st.one_of(
    st.sampled_from(TRICKY),
    st.text(max_size=12),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.dates(),
)
KEYS = st.one_of(st.sampled_from(TRICKY), st.text(max_size=8), st.integers(-5, 5))
DATA = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=25)


@settings(max_examples=400, deadline=None)
@given(data=DATA, flow=st.sampled_from([None, True, False]), width=st.sampled_from([80, 20]))
def test_plain_documents_read_in_one_pass_as_through_the_node_tree(data: Any, flow: bool | None, width: int) -> None:
    text = yaml.safe_dump({"reports": data}, default_flow_style=flow, width=width, allow_unicode=True)
    plain = _read_plain(text, "f.yaml")
    nodes = _read_nodes(text, "f.yaml")
    if plain is None:
        # A dump has no anchors or tags; only keys 5 and '5', both written 5, make a duplicate to report.
        assert {p.message.split(" (")[0] for p in nodes[2]} == {"duplicate key"}
    else:
        assert plain == nodes


UNUSUAL = [
    ("anchor and alias", "a: &x [1, 2]\nb: *x\n"),
    ("merge key", "base: &b {x: 1}\nr:\n  <<: *b\n  y: 2\n"),
    ("merge key without alias", "r:\n  <<: {x: 1}\n  x: 2\n"),
    ("explicit tag", "a: !!int '3'\nb: !!str 4\n"),
    ("bad tagged value", "a: !!int three\n"),
    ("local tag", "a: !thing x\n"),
    ("duplicate key", "a: 1\nb: 2\na: 3\n"),
    ("list as a key", "? [1, 2]\n: x\n"),
    ("mapping as a key", "? {a: 1}\n: x\n"),
    ("two documents", "a: 1\n---\nb: 2\n"),
    ("impossible date", "a: 2026-02-30\n"),
    ("value tag", "a: =\n"),
]


@pytest.mark.parametrize("text", [t for _, t in UNUSUAL], ids=[n for n, _ in UNUSUAL])
def test_unusual_documents_are_left_to_the_node_tree_reader(text: str) -> None:
    assert _read_plain(text, "f.yaml") is None
    try:
        expected: Any = _read_nodes(text, "f.yaml")
    except ConfigError as exc:
        expected = exc.problems
    try:
        got: Any = read_yaml(text, "f.yaml")
    except ConfigError as exc:
        got = exc.problems
    assert got == expected


PLAIN = [
    ("empty file", ""),
    ("comments only", "# nothing\n"),
    ("empty document", "---\n"),
    ("document end", "a: 1\n...\n"),
    ("a scalar", "just text\n"),
    ("a list", "- a\n- b: [1, {c: d}]\n"),
    ("quoted merge-looking key", '"<<": x\n'),
    ("keys stay as written", "off: 1\nyes: [on, 'on']\n3: x\nnull: ~\n"),
    ("multi-line values", "a: |\n  one\n  two\nb: >\n  folded\n  text\nc: 'it''s'\n"),
]


@pytest.mark.parametrize("text", [t for _, t in PLAIN], ids=[n for n, _ in PLAIN])
def test_plain_edge_cases_read_in_one_pass_the_same(text: str) -> None:
    plain = _read_plain(text, "f.yaml")
    assert plain is not None
    assert plain == _read_nodes(text, "f.yaml")


BAD = [
    ("syntax error", "a: [1, 2\nb: 3\n"),
    ("tab", "a:\n\tb: 1\n"),
    ("too many values", "x: [" + ", ".join(["1"] * MAX_VALUES) + "]\n"),
    ("too deep", "x: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n"),
    ("too deep after an alias", "a: &x 1\nb: *x\nx: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n"),
    ("syntax error after a duplicate key", "a: 1\na: 2\nb: [\n"),
]


@pytest.mark.parametrize("text", [t for _, t in BAD], ids=[n for n, _ in BAD])
def test_files_past_the_limits_or_not_yaml_are_refused_with_the_same_message(text: str) -> None:
    with pytest.raises(ConfigError) as slow:
        _read_nodes(text, "f.yaml")
    with pytest.raises(ConfigError) as fast:
        read_yaml(text, "f.yaml")
    assert fast.value.problems == slow.value.problems
