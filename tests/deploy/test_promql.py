"""The PromQL reader the dashboard test relies on: what it finds, it must find right."""

from __future__ import annotations

import pytest

from tests.deploy.promql import kept_labels, series


def found(expr: str) -> list[tuple[str, list[str], dict]]:
    return [(s.metric, sorted(s.labels), s.values) for s in series(expr)]


def test_a_selector_gives_its_label_names_and_the_values_of_equality_matchers():
    assert found('rate(m_total{a="x", b=~"$var", c!="y"}[$__rate_interval])') == [
        ("m_total", ["a", "b", "c"], {"a": {"x"}})
    ]


def test_by_labels_apply_to_the_metrics_inside_the_aggregation_only():
    expr = "max by (t) (rate(a_total[5m])) / on (t) group_left sum(b) + c"
    assert found(expr) == [("a_total", ["t"], {}), ("b", [], {}), ("c", [], {})]


def test_a_trailing_by_clause_applies_to_the_preceding_group():
    assert found("sum(rate(h_bucket[5m])) by (le, step)") == [("h_bucket", ["le", "step"], {})]


def test_functions_aggregations_keywords_and_numbers_are_not_metrics():
    expr = "histogram_quantile(0.95, max by (le) (rate(h_bucket[1m]))) or vector(0) * 60"
    assert found(expr) == [("h_bucket", ["le"], {})]
    assert kept_labels(expr) == {"le"}


def test_an_unreadable_expression_is_an_error():
    with pytest.raises(ValueError, match="cannot read"):
        series("rate(a[5m]) ? b")
