"""Just enough PromQL reading to check a dashboard against an exporter.

``series(expr)`` finds every metric an expression selects and the labels it
relies on: the label names of its selector (with the values of ``=``
matchers) and those of each ``by (...)`` clause of an aggregation around it.
``kept_labels(expr)`` lists the labels the ``by`` clauses keep, which is what
a legend may print. Grafana's ``$variables`` are left alone: they only occur
in label values and range durations here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
    | (?P<range>\[[^\]]*\])
    | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)
    | (?P<variable>\$[A-Za-z0-9_]+)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^(){},=<>])
    | (?P<space>\s+)
    """,
    re.VERBOSE,
)
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "atan2",
}
GROUPING = {"by", "without"}


@dataclass
class Series:
    """One metric selected by an expression and the labels the expression uses on it."""

    metric: str
    labels: set[str] = field(default_factory=set)
    # label -> values required by `=` matchers
    values: dict[str, set[str]] = field(default_factory=dict)


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(expr):
        match = TOKEN.match(expr, position)
        if not match:
            raise ValueError(f"cannot read PromQL at {expr[position:]!r}")
        position = match.end()
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
    return tokens


def _closing(tokens: list[tuple[str, str]], start: int) -> int:
    """Index of the ')' matching the '(' at ``start``."""
    depth = 0
    for index in range(start, len(tokens)):
        if tokens[index] == ("op", "("):
            depth += 1
        elif tokens[index] == ("op", ")"):
            depth -= 1
            if depth == 0:
                return index
    raise ValueError("unbalanced parentheses")


def _opening(tokens: list[tuple[str, str]], end: int) -> int:
    """Index of the '(' matching the ')' at ``end``."""
    depth = 0
    for index in range(end, -1, -1):
        if tokens[index] == ("op", ")"):
            depth += 1
        elif tokens[index] == ("op", "("):
            depth -= 1
            if depth == 0:
                return index
    raise ValueError("unbalanced parentheses")


def _names_in_parentheses(tokens, start: int) -> tuple[list[str], int]:
    end = _closing(tokens, start)
    return [value for kind, value in tokens[start + 1 : end] if kind == "name"], end


def _selector(tokens, start: int) -> tuple[set[str], dict[str, set[str]], int]:
    """Label names and `=` values of the selector whose '{' is at ``start``."""
    labels: set[str] = set()
    values: dict[str, set[str]] = {}
    index = start + 1
    while tokens[index] != ("op", "}"):
        kind, value = tokens[index]
        if kind == "name":
            operator, literal = tokens[index + 1][1], tokens[index + 2][1]
            labels.add(value)
            if operator == "=":
                values.setdefault(value, set()).add(literal[1:-1])
            index += 3
        else:
            index += 1
    return labels, values, index


def series(expr: str) -> list[Series]:
    tokens = tokenize(expr)
    found: list[tuple[int, Series]] = []
    # (first token, last token, labels) of every `by (...)` aggregation
    groupings: list[tuple[int, int, list[str]]] = []
    index = 0
    while index < len(tokens):
        kind, value = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if kind == "name" and value in GROUPING:
            labels, end = _names_in_parentheses(tokens, index + 1)
            if value == "by":
                if end + 1 < len(tokens) and tokens[end + 1] == ("op", "("):
                    # sum by (l) (expr)
                    groupings.append((end + 1, _closing(tokens, end + 1), labels))
                else:
                    # sum (expr) by (l)
                    groupings.append((_opening(tokens, index - 1), index - 1, labels))
            index = end + 1
            continue
        if kind == "name" and value in {"on", "ignoring", "group_left", "group_right"}:
            # Vector matching: its label list (optional after group_*) selects nothing.
            index = _closing(tokens, index + 1) + 1 if following == ("op", "(") else index + 1
            continue
        aggregation_or_call = following == ("op", "(") or (
            following is not None and following[0] == "name" and following[1] in GROUPING
        )
        if kind == "name" and value not in KEYWORDS and not aggregation_or_call:
            selected = Series(value)
            found.append((index, selected))
            if following == ("op", "{"):
                selected.labels, selected.values, index = _selector(tokens, index + 1)
        index += 1
    for position, selected in found:
        for first, last, labels in groupings:
            if first <= position <= last:
                selected.labels.update(labels)
    return [selected for _, selected in found]


def kept_labels(expr: str) -> set[str]:
    """Labels named by the expression's ``by`` clauses."""
    tokens = tokenize(expr)
    kept: set[str] = set()
    for index, (kind, value) in enumerate(tokens):
        if kind == "name" and value == "by":
            kept.update(_names_in_parentheses(tokens, index + 1)[0])
    return kept
