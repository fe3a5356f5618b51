"""Is a store's job alive? The one place that decides, for listing, recovery, cleanup and writes."""
from __future__ import annotations

import os
import socket
import time

from .metadata import ExtractionMeta, Heartbeat

STALE_AFTER_S = 60.0  # another host's job is alive while its heartbeat is younger than this


def _proc_start(pid: int) -> str | None:
    """The kernel's start tick of a process (guards against pid reuse), or None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def heartbeat() -> dict:
    """This process, now: what a running job writes every few seconds."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
            "time": time.time()}


def _process_alive(beat: Heartbeat) -> bool:
    """Same host: by pid and start tick; other host: by the heartbeat's freshness."""
    if beat.pid is None:
        return False
    if beat.host != socket.gethostname():
        return time.time() - beat.time < STALE_AFTER_S
    try:
        os.kill(beat.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return beat.proc_start is None or _proc_start(beat.pid) in (None, beat.proc_start)


def this_process(beat: Heartbeat) -> bool:
    return beat.pid == os.getpid() and beat.host == socket.gethostname() \
        and beat.proc_start == _proc_start(os.getpid())


def live_owner(meta: ExtractionMeta, live_here: bool) -> str | None:
    """Who owns this store's live job: "this kernel", "pid N on HOST", or None when nobody does.

    ``live_here`` says whether this process's runner holds the job. A live status written by this
    process but not held by its runner is a leftover (e.g. a crash inside the runner): nobody owns it.
    """
    if live_here:
        return "this kernel"
    if not meta.live or this_process(meta.heartbeat):
        return None
    if _process_alive(meta.heartbeat):
        return f"pid {meta.heartbeat.pid} on {meta.heartbeat.host}"
    return None
