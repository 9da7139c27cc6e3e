"""Child processes that must not outlive their parent (the service's workers, ``visage prepare``'s pool)."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys

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
