"""Helpers shared by the benchmark scripts."""

from __future__ import annotations


def target_line(name: str, value: float, op: str, goal: float) -> str:
    met = value >= goal if op == ">=" else value <= goal
    return f"TARGET {name} value={value:.3g} goal={op}{goal:g} met={'yes' if met else 'no'}"
