"""One way to tell the user something that is not the answer: a line on stderr, at once."""

import sys

__all__ = ["say"]


def say(text: str) -> None:
    """Print text to stderr and flush (stdout carries only answers and results)."""
    print(text, file=sys.stderr, flush=True)
