"""What every part of `pdmix bench` shares: its progress lines on stderr and the rounding of
the numbers it reports."""

import sys


def log(msg: str) -> None:
    print(f"[pdmix bench] {msg}", file=sys.stderr, flush=True)


def sig(x: float) -> float:
    """Four significant digits: readable JSON that never rounds a small positive time to 0."""
    return float(f"{x:.4g}")
