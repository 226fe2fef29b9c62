"""Ending a distributed (gloo) worker process without the "terminate called without an active
exception" abort.

Cause (found with gdb on torch 2.13, Python 3.11): ProcessGroupGloo runs each collective on a
``pt_gloo_runloop`` thread, which drops its reference to the finished work object *after* the Python
side has returned from ``wait()``. When that reference is the last one to a tensor owned by Python,
the thread must take the GIL to decref it. If the main thread has meanwhile reached interpreter
finalization (``Py_FinalizeEx``), Python makes any thread that asks for the GIL exit via
``pthread_exit``; the forced unwind passes through the noexcept ``~AsyncWork`` destructor, so C++ calls
``std::terminate`` -> SIGABRT, exit code -6, after the run itself succeeded. ``destroy_process_group``
does not help by itself: it shuts the backends down but the runloop threads live as long as the C++
process-group objects, which DeviceMesh / FSDP / DTensor keep referenced until finalization.

Handling, in this order (mesh.shutdown, then here):
  1. barrier on the default group, so no peer still waits on this rank,
  2. drop model / optimizer / loaders, gc.collect(), destroy_process_group(),
  3. flush stdout/stderr and leave with ``os._exit(rc)``: interpreter finalization, the only place the
     race can fire, never runs. Everything the run writes is closed before (metrics, checkpoints).

``run_main`` does 3 for ``python -m gptforge`` (what torchrun and ``gptforge launch`` start) once a
process group was initialised in this process; single-process runs exit normally.
No torch import here: ``python -m gptforge --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

_distributed_used = False


def mark_distributed() -> None:
    """Called by init_distributed when this process joins a process group."""
    global _distributed_used
    _distributed_used = True


def distributed_used() -> bool:
    return _distributed_used


def _flush() -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not change the exit code
            pass


def hard_exit(rc: int) -> None:
    """Flush and leave without interpreter finalization."""
    _flush()
    try:
        import logging

        logging.shutdown()
    except Exception:  # noqa: BLE001
        pass
    _flush()
    os._exit(rc)


def _code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def run_main(main: Callable[[], int | None]) -> int:
    """Run a CLI main; in a distributed worker end with os._exit (see the module doc)."""
    try:
        rc = int(main() or 0)
    except SystemExit as e:
        rc = _code(e)
    except BaseException:
        if not _distributed_used:
            raise
        sys.excepthook(*sys.exc_info())  # torch's hook prefixes the lines with [rankN]:
        rc = 130 if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 1
    if _distributed_used:
        hard_exit(rc)
    return rc
