"""The one wait loop of the backends: ask until there is an answer, within a time bound."""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic, sleep
from typing import TypeVar

T = TypeVar("T")


def poll(check: Callable[[], T | None], *, interval: float,
         timeout: float | Callable[[], float],
         on_timeout: Callable[[float], BaseException]) -> T:
    """Calls ``check`` every ``interval`` seconds until it returns something other than None,
    and returns that; ``check`` raises to give up early. Past ``timeout`` seconds (a number, or
    a function read after each check, for a bound that the first answer sets), raises
    ``on_timeout(elapsed seconds)``."""
    started = monotonic()
    while True:
        result = check()
        if result is not None:
            return result
        elapsed = monotonic() - started
        if elapsed > (timeout() if callable(timeout) else timeout):
            raise on_timeout(elapsed)
        sleep(interval)
