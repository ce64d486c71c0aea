"""Fault injection for the reliability tests: named points where a test can kill or break a run.

Set ``INCR_FAULT=<point>[@<n>]:<action>`` (several separated by ","): when the run reaches the
named point for the n-th time (default 1st), the action happens. Actions: ``kill`` (SIGKILL
itself, like ``kill -9``), ``term`` / ``int`` (send itself SIGTERM / SIGINT), ``raise`` (an
OSError, like a failing disk), ``nan`` (``fault_value`` returns NaN). Unset in normal use: each
point then costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_counts: Counter[str] = Counter()


def _parse(spec: str) -> dict[str, tuple[int, str]]:
    rules = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, action = item.rpartition(":")
        name, _, nth = point.partition("@")
        rules[name] = (int(nth) if nth else 1, action)
    return rules


def fault_point(name: str) -> None:
    """Mark a point of a run; under ``INCR_FAULT`` the matching action happens here."""
    spec = os.environ.get("INCR_FAULT")
    if not spec:
        return
    rule = _parse(spec).get(name)
    if rule is None:
        return
    _counts[name] += 1
    nth, action = rule
    if _counts[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "int":
        os.kill(os.getpid(), signal.SIGINT)
    elif action == "raise":
        raise OSError(28, f"No space left on device (injected at {name})")


def fault_value(name: str, value: float) -> float:
    """Return ``value``, or NaN when ``INCR_FAULT`` asks for ``<name>[@n]:nan`` at this call."""
    spec = os.environ.get("INCR_FAULT")
    if not spec:
        return value
    rule = _parse(spec).get(name)
    if rule is None or rule[1] != "nan":
        return value
    _counts[name] += 1
    return float("nan") if _counts[name] == rule[0] else value
