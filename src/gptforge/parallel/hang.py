"""A rank stuck in (or before) a collective: end the job within parallel.timeout_s, name the stuck rank and
show where every rank was.

Each rank of a distributed run (install) registers a faulthandler stack dump on SIGUSR2, publishes its host
and pid, and beats a heartbeat (time, training step) into the job's rendezvous store from a thread of its
own, on a connection of its own. When a collective times out (gloo / NCCL raise after the process group's
timeout, parallel.timeout_s), the ranks that waited call `explain`: the rank whose heartbeat stopped (a
frozen or SIGSTOPped process) or lags behind in steps is the stuck one; every rank on this machine is asked
for its stacks (SIGUSR2, then SIGCONT so a stopped one can answer), and the error names the stuck rank.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import signal
import socket
import sys
import threading
import time
import traceback

DUMP_SIGNAL = signal.SIGUSR2
MARK = "gptforge hang:"  # launch.failures finds the diagnosis by this
_state: dict = {"step": -1, "period": 5.0, "store": None, "world": 1}
_TIMEOUT_WORDS = ("timed out", "timeout", "Timeout", "Timed out")


def progress(step: int) -> None:
    """The training step this rank is at (the trainer calls this each step; cheap: no I/O)."""
    _state["step"] = step


def _connect(timeout_s: float):
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    store = dist.TCPStore(addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    run, restart = os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"gptforge/hang/{run}/{restart}/", store)


def install(rank: int, world: int, timeout_s: float) -> None:
    """Stack dumps on SIGUSR2 always; the heartbeat when the rendezvous store is reachable."""
    faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    _state.update(world=world, timeout=timeout_s)
    try:
        store = _connect(min(10.0, timeout_s))
    except Exception:  # noqa: BLE001 - no store, no heartbeat: the timeout still ends the job
        store = None
    if store is None:
        return
    period = max(1.0, min(5.0, timeout_s / 6))
    _state.update(store=store, period=period, world=world, rank=rank, timeout=timeout_s)
    store.set(f"pid/{rank}", f"{socket.gethostname()} {os.getpid()}")

    def beat():
        while True:
            try:
                store.set(f"hb/{rank}", f"{time.time():.3f} {_state['step']}")
            except Exception:  # noqa: BLE001 - the store went away: the job is ending
                return
            time.sleep(period)

    threading.Thread(target=beat, name="gptforge-heartbeat", daemon=True).start()


def is_timeout(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(w in text for w in _TIMEOUT_WORDS)


def _read(store, key: str):
    try:
        if not store.check([key]):
            return None
        return store.get(key).decode()
    except Exception:  # noqa: BLE001
        return None


def _stuck_ranks(store, world: int, me: int) -> tuple[list[int], dict[int, str]]:
    """(the stuck ranks, a note per rank): no heartbeat for 2 periods, none at all, or fewer steps."""
    now, period = time.time(), _state["period"]
    seen: dict[int, tuple[float, int]] = {}
    for r in range(world):
        v = _read(store, f"hb/{r}")
        if v:
            t, step = v.split()
            seen[r] = (float(t), int(step))
    notes, stale = {}, []
    for r in range(world):
        if r not in seen:
            notes[r] = "no heartbeat at all"
            stale.append(r)
            continue
        t, step = seen[r]
        age = now - t
        notes[r] = f"last heartbeat {age:.0f} s ago at step {step}"
        if age > 2 * period + 1 and r != me:
            stale.append(r)
    if stale:
        return stale, notes
    top = max(s for _, s in seen.values()) if seen else -1
    return [r for r, (_, s) in seen.items() if s < top], notes


def _dump_stacks(store, world: int, me: int) -> None:
    """SIGUSR2 (faulthandler dump) then SIGCONT to every other rank on this machine, once per job."""
    host = socket.gethostname()
    for r in range(world):
        v = _read(store, f"pid/{r}")
        if r == me or not v:
            continue
        h, pid = v.split()
        try:
            first = store.add(f"dumped/{r}", 1) == 1
        except Exception:  # noqa: BLE001
            first = True
        if h == host and first:
            print(f"{MARK} rank {me} asks rank {r} (pid {pid} on {h}) for its stacks:", file=sys.stderr, flush=True)
            try:
                os.kill(int(pid), DUMP_SIGNAL)
                os.kill(int(pid), signal.SIGCONT)  # a stopped process dumps only when it runs again
            except OSError:
                pass
            time.sleep(0.5)


def explain(exc: BaseException, rank: int, wait_s: float = 3.0) -> str | None:
    """After a collective timed out on this rank: print one line naming the stuck rank(s), dump every local
    rank's stacks, and return that line (None when exc is not a timeout)."""
    if not is_timeout(exc):
        return None
    store, world, timeout_s = _state["store"], _state["world"], _state.get("timeout", 0)
    step = _state["step"]
    found: dict = {}
    if store is not None:
        def look():  # in a thread: a store that stopped answering must not hold up the exit
            found["stuck"], found["notes"] = _stuck_ranks(store, world, rank)

        t = threading.Thread(target=look, daemon=True)
        t.start()
        t.join(5)
    stuck, notes = found.get("stuck") or [], found.get("notes") or {}
    who = ", ".join(f"rank {r} ({notes.get(r, '?')})" for r in stuck) or "no rank could be named"
    line = (f"{MARK} rank {rank} waited in a collective at step {step} for parallel.timeout_s={timeout_s:g} s; "
            f"stuck: {who}; stack dumps of the ranks follow; raise parallel.timeout_s if the ranks are only slow")
    print(line, file=sys.stderr, flush=True)  # first: the stuck rank may fail (and end the job) once woken
    print(f"{MARK} rank {rank} was here when its collective timed out (most recent call last):\n"
          + "".join(traceback.format_tb(exc.__traceback__)).rstrip(), file=sys.stderr, flush=True)
    print(f"{MARK} rank {rank}: its threads now:", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    if store is not None:
        t = threading.Thread(target=_dump_stacks, args=(store, world, rank), daemon=True)
        t.start()
        t.join(5)
        time.sleep(wait_s)  # the signalled ranks write their stacks meanwhile
    return line
