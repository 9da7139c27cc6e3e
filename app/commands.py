"""``visage serve``, ``visage enroll``, ``visage reindex``: the service package's subcommands."""

from __future__ import annotations


def register(sub) -> None:
    pass
