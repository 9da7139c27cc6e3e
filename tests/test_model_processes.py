"""model.processes.stop_with_parent under each start method multiprocessing offers (its kill -9 case, end to end:
tests/test_app_e2e.py's workers and tests/test_training_prepare.py's pool)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from model.processes import stop_with_parent


def _pid() -> int:
    return os.getpid()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_worker_with_a_living_parent_keeps_working(method):
    """Under forkserver (Python 3.14's default) the OS parent of a worker is the fork server, not the pool's
    process: comparing pids made every worker kill itself at start (a BrokenProcessPool for prepare)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method), initializer=stop_with_parent) as pool:
        assert pool.submit(_pid).result(timeout=60) != os.getpid()


def test_outside_a_multiprocessing_child_it_does_nothing():
    stop_with_parent()  # the test process itself: no parent to follow, and still alive after the call
