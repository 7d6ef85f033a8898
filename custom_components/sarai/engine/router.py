"""Decide local (Omni GGUF) or remote (SOLAR) for a turn; a circuit breaker for the remote."""

from __future__ import annotations

from dataclasses import asdict, dataclass
import re
import time
from typing import Any, Literal

Route = Literal["local", "remote"]
MODES = ("local", "remote", "auto")


@dataclass(slots=True)
class RoutingRules:
    """The rule set, as data: testable on its own and shown in diagnostics."""

    prefixes: tuple[str, ...] = ("piensa:", "think:", "razona:")
    long_words: int = 60
    reasoning_patterns: tuple[str, ...] = (
        r"\bexplica(?:me)? por qu[eé]\b",
        r"\bpor qu[eé]\b.*\?",
        r"\bcalcula\b",
        r"\bplanifica\b",
        r"\bplanea\b",
        r"\bcompara\b",
        r"\bpaso a paso\b",
        r"\bexplain why\b",
        r"\bcalculate\b",
        r"\bplan\b",
        r"\bcompare\b",
        r"\bstep by step\b",
        r"\banaly[sz]e\b",
        r"\banaliza\b",
    )
    multi_step_markers: tuple[str, ...] = (r"\b(?:y luego|después|and then|after that|primero|first)\b",)


@dataclass(slots=True)
class Decision:
    """Where a turn goes and why."""

    route: Route
    reason: str
    text: str


def decide(text: str, mode: str, rules: RoutingRules, remote_configured: bool) -> Decision:
    """Apply the rules to a user's text. Strips an explicit prefix."""
    stripped = text.strip()
    lowered = stripped.lower()
    for prefix in rules.prefixes:
        if lowered.startswith(prefix):
            stripped = stripped[len(prefix) :].strip()
            if remote_configured and mode != "local":
                return Decision("remote", f"prefix {prefix!r}", stripped)
            return Decision("local", f"prefix {prefix!r} but no remote", stripped)
    if mode == "local" or not remote_configured:
        return Decision("local", "mode local" if mode == "local" else "no SOLAR server configured", stripped)
    if mode == "remote":
        return Decision("remote", "mode remote", stripped)
    if len(stripped.split()) >= rules.long_words:
        return Decision("remote", f"long request (>= {rules.long_words} words)", stripped)
    for pattern in rules.reasoning_patterns:
        if re.search(pattern, lowered):
            return Decision("remote", f"reasoning pattern {pattern}", stripped)
    markers = sum(len(re.findall(p, lowered)) for p in rules.multi_step_markers)
    if markers >= 2:
        return Decision("remote", "multi-step request", stripped)
    return Decision("local", "everyday request", stripped)


@dataclass(slots=True)
class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; half-opens after ``cooldown_s``."""

    threshold: int = 3
    cooldown_s: float = 60.0
    failures: int = 0
    opened_at: float | None = None
    last_error: str | None = None

    def allow(self, now: float | None = None) -> bool:
        """Whether a request may go remote now (a probe is allowed after the cool-down)."""
        if self.opened_at is None:
            return True
        now = time.monotonic() if now is None else now
        return now - self.opened_at >= self.cooldown_s

    def success(self) -> None:
        """Close the breaker."""
        self.failures = 0
        self.opened_at = None

    def failure(self, error: str, now: float | None = None) -> bool:
        """Count a failure; return True when this failure opened the breaker."""
        self.failures += 1
        self.last_error = error
        if self.failures >= self.threshold:
            was_open = self.opened_at is not None
            self.opened_at = time.monotonic() if now is None else now
            return not was_open
        return False

    @property
    def state(self) -> str:
        """closed, open or half_open."""
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.allow() else "open"

    def as_dict(self) -> dict[str, Any]:
        """Diagnostics view."""
        return {
            "state": self.state,
            "failures": self.failures,
            "threshold": self.threshold,
            "cooldown_s": self.cooldown_s,
            "last_error": self.last_error,
        }


def rules_as_dict(rules: RoutingRules) -> dict[str, Any]:
    """Diagnostics view of the rules."""
    return asdict(rules)
