"""The ``visage`` command: a thin dispatcher. Each package registers its own subcommands.

Subcommands come from the ``visage.commands`` entry points (see pyproject.toml): ``model.commands``,
``training.commands`` and ``app.commands`` each add parsers to the one argparse tree, so this module imports
nothing of ours and the package arrows (app -> model <- training) hold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import sqlite3
import sys
import threading
import tomllib
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, NoReturn

from model.errors import VisageError
from model.numbers import DECIMAL_HELP, parse_decimal

EXIT_USER_ERROR = 2


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def positive_int(text: str) -> int:
    """argparse type for counts (workers, steps): a whole number >= 1, refused with the option's name."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def decimal(text: str) -> float:
    """argparse type for scores and rates: a plain decimal number (``model.numbers``; ``float()`` read 1_0 as 10)."""
    value = parse_decimal(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected {DECIMAL_HELP}, got {text!r}")
    return value


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    class Console(Console):  # type: ignore[no-redef]
        def on_broken_pipe(self) -> None:  # rich's own exits with status 1, which scripts read as "done in part"
            raise BrokenPipeError

    table = Table()
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")  # paths whole, not "..."
    for row in rows:
        table.add_row(*[f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v) for v in row])
    console = Console(width=max(100, Console().width))
    # title and caption on lines of their own: inside the table they wrapped to its width, cutting a path or a
    # model version in two ("enroll_fa" / "ilures.csv")
    console.print(title, style="bold", markup=False, highlight=False, soft_wrap=True)
    console.print(table)
    if caption:
        console.print(caption, markup=False, highlight=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    """One JSON object on stdout, strict JSON: a NaN or an infinity (a metric with nothing to measure) is null."""
    print(json.dumps(_finite(obj), indent=2, default=float, allow_nan=False))


def _finite(obj: Any) -> Any:
    import numpy as np  # (here: numpy at import time made a Ctrl-C while the command loads a traceback)

    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


class UsageError(Exception):
    """A command line argparse refused, raised instead of argparse's exit so that ``--json`` can say why too."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """argparse, except that a usage error raises ``UsageError`` (its subparsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="visage",
        description="Visage: MobileNet face embeddings, training and a face recognition service.",
        epilog="Run 'visage COMMAND --help' for the options of one command. Exit status, for every command: 0 done; "
        "1 done in part (some files failed, each listed; the rest done); 2 refused or failed (usage, a missing or "
        "unreadable file, bad weights, no service, a locked gallery: one line on stderr, and with --json one "
        '{"error", "detail"} object on stdout); 130 interrupted (Ctrl-C, or SIGTERM for batch commands); 141 '
        "output closed early.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in command_registrars():
        register(sub)
    parser.set_defaults(_commands=sub.choices)  # each command's parser, to report its own usage errors
    return parser


def command_registrars() -> list[Callable[[Any], None]]:
    """Each package's ``register(subparsers)``, from the ``visage.commands`` entry points; in a source checkout
    that was never pip-installed (``python -m model.console`` on a GPU machine's own PyTorch, say), from the same
    table in the checkout's pyproject.toml."""
    found = [ep.load() for ep in entry_points(group="visage.commands")]
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if found or not pyproject.exists():
        return found
    table = tomllib.loads(pyproject.read_text())["project"]["entry-points"]["visage.commands"]
    return [EntryPoint(name, value, "visage.commands").load() for name, value in table.items()]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv))
        if sys.stdout is not None:  # (None when started with stdout closed: `visage cost >&-`)
            sys.stdout.flush()  # here, not at exit: a buffered stdout meets a closed pipe only when it is flushed
        return code
    except BrokenPipeError:  # the reader went away (`visage cost --json | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout again at exit)
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:  # while the commands load, before any command runs: no traceback either
        print("interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's parser (its usage), not the top level's "visage [-h] COMMAND ..."
            args._commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except UsageError as exc:  # argparse's own output, plus the JSON object a script asked for
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc}", file=sys.stderr)
        if "--json" in argv:
            print(json.dumps({"error": "usage", "detail": str(exc)}))
        return EXIT_USER_ERROR
    on_main_thread = threading.current_thread() is threading.main_thread()  # (handlers can be set only there)
    wants = getattr(args, "sigterm_interrupts", False) and on_main_thread
    previous = signal.signal(signal.SIGTERM, _interrupt) if wants else None
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        raise
    except VisageError as exc:
        _fail(args, exc.code, exc.detail)
    except (OSError, ValueError) as exc:  # a missing file, a folder given for a file, a bad value...
        _fail(args, error_code(exc), str(exc))
    except sqlite3.Error as exc:  # the gallery's database: locked past the busy timeout, disk full, damaged
        _fail(args, "database_error", f"database error: {exc}")
    except KeyboardInterrupt:
        if getattr(args, "json", False):  # a script reading stdout gets its one object here too
            print(json.dumps({"error": "interrupted", "detail": "interrupted (Ctrl-C or SIGTERM)"}))
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_USER_ERROR


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a timeout, systemd, docker stop) as Ctrl-C, for the commands that set ``sigterm_interrupts``:
    they report what was done and clean up, and exit 130. Installed for the whole command: only around its main
    loop, a SIGTERM while it loaded killed it with 143 and no JSON."""
    raise KeyboardInterrupt


def error_code(exc: Exception) -> str:
    """A stable snake_case code for a Python exception, like the API's: FileNotFoundError -> file_not_found."""
    if type(exc) is ValueError:
        return "invalid_value"
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", type(exc).__name__).lower()
    return name.removesuffix("_error") or "error"


def _fail(args: argparse.Namespace, code: str, detail: str) -> None:
    print(f"visage {args.command}: error: {detail}", file=sys.stderr)
    if getattr(args, "json", False):
        with contextlib.suppress(OSError):  # stdout may be what failed (a full disk): stderr has said it
            print(json.dumps({"error": code, "detail": detail}))


if __name__ == "__main__":
    sys.exit(main())
