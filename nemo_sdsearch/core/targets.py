"""The machine-readable line every benchmark ends with, one per target."""


def target_line(name: str, value: float, op: str, goal: float) -> str:
    """`TARGET <name> value=<number> goal=<op><number> met=<yes|no>` with op `>=` or `<=`."""
    if op not in (">=", "<="):
        raise ValueError(f"op must be >= or <=, not {op!r}")
    met = value >= goal if op == ">=" else value <= goal
    return f"TARGET {name} value={value:.3g} goal={op}{goal:g} met={'yes' if met else 'no'}"
