"""``visage serve`` start-up: what the command sets up before uvicorn takes over (the request paths themselves are
tested against a real uvicorn in test_app_e2e.py)."""

from __future__ import annotations

import os

import pytest
import uvicorn

from model.console import main

PASSED_ON = ("VISAGE_DATA_DIR", "VISAGE_WEIGHTS", "VISAGE_HOST", "VISAGE_PORT", "VISAGE_WORKERS")


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_serve_lets_idle_openmp_threads_sleep_unless_told_otherwise(monkeypatch, tmp_path, given, expected):
    """Workers inherit the environment uvicorn starts with: OMP_WAIT_POLICY must be set by then (spinning OpenMP
    teams cost /verify ~35 ms p50 on 2 cores), and an operator's own choice wins."""
    # serve hands its settings to the workers through the environment: setenv first records each variable's
    # original state (absent included), so that the test leaves the environment as it found it
    for name in (*PASSED_ON, "OMP_WAIT_POLICY"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("VISAGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VISAGE_API_KEYS", "test-key")
    if given is not None:
        monkeypatch.setenv("OMP_WAIT_POLICY", given)
    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: seen.update(app=app, policy=os.getenv("OMP_WAIT_POLICY")))
    assert main(["serve", "--port", "8765"]) == 0
    assert seen == {"app": "app.main:create_app", "policy": expected}
