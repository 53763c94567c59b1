"""ReLU backward rules (placeholder: the full implementation lands with the pixel-methods issue)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

RULES = ("backprop", "deconvnet", "guided")


class RuleSwitch:
    def __init__(self) -> None:
        self.rule = "backprop"
        self.relu_calls = 0

    @contextlib.contextmanager
    def use(self, rule: str) -> Iterator[None]:
        if rule != "backprop":
            raise NotImplementedError(rule)
        yield


@contextlib.contextmanager
def relu_rules(model=None) -> Iterator[RuleSwitch]:
    yield RuleSwitch()
