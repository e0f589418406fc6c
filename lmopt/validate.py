"""Checklists of [ok]/[FAIL] lines shared by the stages' self-checks (optimum-onnx's validation style)."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass


@dataclass
class Check:
    name: str
    passed: bool
    value: float | int | str | None = None
    limit: float | int | str | None = None
    detail: str = ""


class Checklist:
    def __init__(self, title: str):
        self.title = title
        self.checks: list[Check] = []

    def add(self, name: str, passed: bool, value=None, limit=None, detail: str = "") -> Check:
        c = Check(name, bool(passed), value, limit, detail)
        self.checks.append(c)
        return c

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def lines(self) -> list[str]:
        out = [self.title]
        for c in self.checks:
            v = "" if c.value is None else f" = {_fmt(c.value)}"
            lim = "" if c.limit is None else f" (limit {_fmt(c.limit)})"
            d = f"  {c.detail}" if c.detail else ""
            out.append(f"  [{'ok' if c.passed else 'FAIL'}] {c.name}{v}{lim}{d}")
        return out

    def print(self, log: logging.Logger | None = None) -> None:
        for line in self.lines():
            print(line, flush=True)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
