"""Python's garbage collector, paused while indigrad computes a step's quantities.

A clipped step creates a few thousand short-lived Python objects (a record per module
call, a rule's inputs, dicts of results), all freed by reference counting before the
step ends. Python's collector does not know that: it runs a collection whenever 700 more
objects are alive than at its last one, so that most clipped steps ran one, a tenth of
them a second-generation one, and one in a few hundred a full collection over every
object of the process (hundreds of thousands once PyTorch is imported). Paused for the
backward and the quantities, the collector finds after them about as many objects
alive as before, and runs no collection for them.

Only the collector's automatic runs are paused, and only where it was running: a
program that turned it off keeps it off, and ``gc.collect()`` works as always.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def gc_paused(fn: F) -> F:
    """Run ``fn`` with the garbage collector's automatic runs paused.

    Example:
        >>> import gc
        >>> @gc_paused
        ... def busy():
        ...     return gc.isenabled()
        >>> busy(), gc.isenabled()
        (False, True)
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not gc.isenabled():  # paused already (an outer call), or off by the program's choice
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return wrapper  # type: ignore[return-value]
