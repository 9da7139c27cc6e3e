"""Child processes that must not outlive their parent (the service's workers, ``visage prepare``'s pool), and
signals held off while a step that must not be cut short runs."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
log = logging.getLogger("visage.processes")


def stop_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a process started by ``multiprocessing``: have Linux send it ``sig`` when its parent dies. A parent
    killed with kill -9 (or SIGTERM, where the pool is not told) left its children running, adopted by init:
    the service's workers serving unsupervised and holding the port, ``prepare``'s workers holding ~850 MB each
    and the caller's stdout (a ``$(visage prepare ...)`` waited for ever). Elsewhere (not a child, not Linux) it
    does nothing. (Linux sends it when the thread that started the child ends: call it only in children started
    from a thread that lives as long as the parent, as uvicorn's supervisor and a process pool start theirs.)"""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig) != 0:
        log.warning("cannot ask to be stopped with the parent process (prctl: %s)", os.strerror(ctypes.get_errno()))
    elif not parent.is_alive():  # it died before the call (not os.getppid() != parent.pid: under the forkserver
        os.kill(os.getpid(), sig)  # start method, Python 3.14's default, the OS parent is the server, not it)


@contextmanager
def interrupts_deferred(then_raise: bool = True) -> Iterator[None]:
    """SIGINT and SIGTERM noted, not acted on, meanwhile (in the main thread only: Python allows signal handlers
    nowhere else). At the end, one that came is raised as KeyboardInterrupt (``then_raise``; ignoring SIGINT
    instead lost a Ctrl-C that came while ``prepare``'s workers started: the run went on and exited 0), or
    dropped with a log line (a step whose end is the command's result: ``visage restore``'s swap)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught and then_raise:
        raise KeyboardInterrupt
    if caught:
        log.warning("%s came while a step that must not be cut short ran: it ran to its end",
                    signal.Signals(caught[0]).name)
