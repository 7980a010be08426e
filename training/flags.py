"""argparse types that turn a nonsensical flag into a one-line error naming it."""

from __future__ import annotations

import argparse


def _checked(cast, ok, what: str):
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, not {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{what}, not {text}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v > 0, "must be a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "must be an integer >= 0")
positive_float = _checked(float, lambda v: v > 0, "must be a number > 0")
non_negative_float = _checked(float, lambda v: v >= 0, "must be a number >= 0")
fraction = _checked(float, lambda v: 0 <= v < 1, "must be in [0, 1)")
probability = _checked(float, lambda v: 0 <= v <= 1, "must be in [0, 1]")
