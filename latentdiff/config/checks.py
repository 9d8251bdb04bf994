"""Validation helpers of the config dataclasses: a ``ValueError`` that names the bad value."""

from __future__ import annotations

from typing import Any


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    check(value in choices, f"{name}={value!r} is not one of {list(choices)}")


def check_positive(name: str, value: float) -> None:
    check(value > 0, f"{name}={value!r} must be > 0")
