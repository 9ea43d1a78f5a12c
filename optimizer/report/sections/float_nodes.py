"""Mixed precision: the layers each candidate kept in float, and why (``candidates[].float_nodes``)."""

from __future__ import annotations

from typing import Any

from dlopt.report.sections.base import Section, html_table, markdown_table, terminal_table

HEADERS = ["candidate", "node kept in float", "op", "own INT8 output error (nmse)", "why"]


def rows(report) -> list[list[Any]]:
    def error(n: dict) -> str:
        value = n.get("error", n.get("nmse"))  # "nmse": reports written before the per-layer ranking
        return "-" if value is None else f"{value:.2e}"

    return [[c.key, n["name"], n["op_type"], error(n), f"feeds {n['feeds']}" if n.get("feeds") else "sensitive"]
            for c in report.candidates for n in c.float_nodes]


class FloatNodes(Section):
    def markdown(self, report):
        found = rows(report)
        return ["## Layers kept in float", "", markdown_table(found, HEADERS), ""] if found else []

    def html(self, report):
        found = rows(report)
        return ["<h2>Layers kept in float</h2>", html_table(HEADERS, found, numeric={3}, table_id="float")] if found else []

    def terminal(self, report):
        found = rows(report)
        return ["", terminal_table(found, HEADERS)] if found else []
