"""``visage serve``, ``visage enroll``, ``visage reindex``, ``visage backup``, ``visage restore``: the service package's
subcommands."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from model.console import add_json_flag, positive_int, print_json, print_table


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the face recognition service (REST API)",
        description="Start uvicorn with app.main:create_app. Settings come from VISAGE_* "
        "environment variables (docs/SERVICE.md); the options here override them. With no API key "
        "configured, one is generated and kept in the data folder; it is printed on that first start only, "
        "later starts print the file's path.",
    )
    p.add_argument("--host", help="bind address (default: VISAGE_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: VISAGE_PORT or 8000)")
    p.add_argument(
        "--workers", type=positive_int, help="worker processes, each with its own model (default: VISAGE_WORKERS or 1)"
    )
    _add_common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "enroll",
        help="enroll a folder of photos: DIR/<subject>/*.jpg",
        description="Enroll every image in DIR/<subject>/ as a face of <subject>, into the local "
        "store (safe while the service runs: it sees the new faces without a restart) or, with "
        "--url, through a running service. Idempotent and resumable: images already enrolled are "
        "skipped before the model runs. What is not read (files directly in DIR, other formats, deeper "
        "folders, hidden entries) is listed; a photo that is a broken link is a failure.",
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument(
        "--face",
        default="single",
        help="photos with several faces: 'single' refuses them (default), 'largest' takes the biggest",
    )
    p.add_argument("--url", help="enroll through the service at this URL instead of the local store")
    p.add_argument(
        "--api-key",
        default=os.environ.get("VISAGE_API_KEY"),
        help="API key for --url (default: $VISAGE_API_KEY)",
    )
    _add_new_model(p)
    p.add_argument("--failures", type=Path, help="CSV of failed files (default: <data dir>/enroll_failures.csv; "
                   "with --url and no data folder named, enroll_failures.csv in the current folder)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none either when stderr is not a terminal)")
    _add_common(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_enroll, sigterm_interrupts=True)  # (model.console)

    p = sub.add_parser(
        "reindex",
        help="re-embed faces stored with an older model version",
        description="Re-embed, from the stored original images, every face whose embedding was made "
        "by another model version than the loaded weights, and report the faces that cannot be "
        "redone (original not stored, or no face found at the stored box any more).",
    )
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none either when stderr is not a terminal)")
    _add_new_model(p)
    _add_common(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_reindex, sigterm_interrupts=True)  # (model.console)

    p = sub.add_parser(
        "backup",
        help="copy the gallery's database while the service runs",
        description="Write a consistent copy of the gallery (subjects, faces and stored original images: "
        "all in visage.db) to DEST, safe while the service and batch enrollments write. DEST is a new file, "
        "or an existing folder to get a time-stamped visage-YYYYmmddTHHMMSSZ.db in it; an existing file is "
        "never overwritten. The FAISS index needs no backup (it is rebuilt from the store). To put a backup "
        "back: visage restore.",
    )
    p.add_argument("dest", metavar="DEST", help="the new backup file, or a folder to put a time-stamped one in")
    p.add_argument("--data-dir", type=Path, help="data folder (default: VISAGE_DATA_DIR or ./data)")
    add_json_flag(p)
    p.set_defaults(func=cmd_backup, sigterm_interrupts=True)  # (model.console)

    p = sub.add_parser(
        "restore",
        help="make a backup the gallery again (stop the service first)",
        description="Replace the gallery's database with a copy of BACKUP (a file written by visage backup; it "
        "is checked and left untouched). Refused while any process has the gallery open: stop the service, its "
        "workers and any visage enroll, reindex or backup first, or what they write next would be lost. The data "
        "folder must exist (on a new machine, create it, owned by the service's user). The replaced "
        "database is kept beside the new one as visage.db.replaced-<stamp> (delete it when you no longer need "
        "it); the FAISS index is rebuilt when the service starts. Subjects deleted since the backup come back: "
        "for erasure requests, delete them again.",
    )
    p.add_argument("backup", metavar="BACKUP", type=Path, help="the backup file to restore")
    p.add_argument("--data-dir", type=Path, help="data folder (default: VISAGE_DATA_DIR or ./data)")
    add_json_flag(p)
    p.set_defaults(func=cmd_restore, sigterm_interrupts=True)  # (model.console)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="data folder (default: VISAGE_DATA_DIR or ./data)")
    p.add_argument("--weights", type=Path, help="weights bundle (default: VISAGE_WEIGHTS or the shipped one)")


def _add_new_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--new-model", action="store_true",
                   help="embed with these weights and settings even though the last service on this gallery used "
                   "another model version (moving the gallery to this model: restart the service with them too)")


class ModelMismatch(ValueError):
    """A batch writer whose model differs from the one the gallery's service searches with."""


def check_served_model(service: Any, new_model: bool) -> None:
    """Refuse to write faces the gallery's service would not search: its index holds only faces of its own model
    version, so a shell without the service's VISAGE_WEIGHTS / VISAGE_FLIP once re-embedded acknowledged faces
    out of its sight, and reported success."""
    served = service.gallery.store.served_model_version()
    if served is not None and served != service.model_version and not new_model:
        raise ModelMismatch(
            f"the service on this gallery embeds with model version {served}, and these settings with "
            f"{service.model_version}: faces written now would be out of that service's search. Give this command "
            "the service's settings (VISAGE_WEIGHTS, VISAGE_FLIP, --weights), or add --new-model to move the "
            "gallery to these (then restart the service with them)")


def _settings(args: argparse.Namespace, **extra: Any):
    from app.settings import load_settings

    overrides = {"data_dir": args.data_dir, "weights": getattr(args, "weights", None), **extra}
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from app.logs import log_config, startup_line
    from model.console import EXIT_USER_ERROR
    from model.errors import VisageError

    log_format = _requested_log_format()  # until the settings are read (they may be what is wrong)
    try:
        settings = _settings(args, host=args.host, port=args.port, workers=args.workers)
        log_format = settings.log_format
        if settings.port == 0:  # any free port: chosen here, so that the banner says which (it said ":0")
            settings = settings.model_copy(update={"port": free_port(settings.host)})
        _prepare_serve(settings)
    except (VisageError, OSError, ValueError) as exc:
        if log_format != "json":
            raise  # the command's usual one line: "visage serve: error: ..."
        # every line in the log's format, a refusal to start too: a log collector parsing JSON would drop a
        # plain "invalid settings" line, the one line that says why the service is down
        startup_line(str(getattr(exc, "detail", exc)), "json", logging.ERROR, sys.stderr)
        return EXIT_USER_ERROR
    raise_open_file_limit()
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level.lower(),
        log_config=log_config(settings.log_level, settings.log_format),
        timeout_graceful_shutdown=30,
    )
    return 0


def _requested_log_format() -> str:
    """VISAGE_LOG_FORMAT as the environment spells it, for the error when the settings as a whole are invalid."""
    import os

    return next((v.strip().lower() for k, v in os.environ.items() if k.upper() == "VISAGE_LOG_FORMAT"), "text")


class AddressUnavailable(OSError):
    """``visage serve``'s address cannot be listened on (in use, not this host's, a privileged port)."""


def raise_open_file_limit(wanted: int = 65536) -> None:
    """Raise the soft limit on open files towards the hard one (usually 1,024 soft): each connection is a file,
    and 250 idle connections (a slowloris client: uvicorn has no timeout before a first request) used up a
    256-file limit, after which /healthz stopped answering. A reverse proxy with client timeouts is the real
    guard (docs/SERVICE.md, Operations); this only makes the margin wide."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def free_port(host: str) -> int:
    """A port the OS has free on ``host`` now (another process may take it before uvicorn binds: rare, and then
    uvicorn's own error says so)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError:  # not an address of this host: check_bindable says so, naming the setting
            return 0
        return sock.getsockname()[1]


def check_bindable(host: str, port: int) -> None:
    """Bind (and release) each address uvicorn would listen on for ``host``, as uvicorn does (``SO_REUSEADDR``, so
    a port left in TIME_WAIT by the last run is free), and raise ``AddressUnavailable`` with one line saying what
    to change when one cannot be: found before the banner, the key and the model, not after them."""
    import errno
    import socket

    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AddressUnavailable(f"cannot listen on {shown}: {exc.strerror} (check --host / VISAGE_HOST)") from exc
    bound = 0
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # a family this host lacks (no IPv6): asyncio's create_server skips it too
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
                bound += 1
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise AddressUnavailable(
                        f"{shown} is already in use (another Visage, or another server, listens there): "
                        "choose another port with --port or VISAGE_PORT"
                    ) from exc
                if exc.errno == errno.EADDRNOTAVAIL:  # a family not enabled here: let uvicorn decide
                    continue
                hint = "--port / VISAGE_PORT" if exc.errno == errno.EACCES else "--host / VISAGE_HOST"
                raise AddressUnavailable(f"cannot listen on {shown}: {exc.strerror} (check {hint})") from exc
    if not bound:
        raise AddressUnavailable(f"cannot listen on {shown}: no such address on this host (check --host / VISAGE_HOST)")


def _prepare_serve(settings: Any) -> None:
    """Everything ``visage serve`` checks and says before uvicorn starts."""
    from app.files import private_dir
    from app.logs import startup_line
    from app.settings import resolve_api_keys
    from model.bundle import DEFAULT_WEIGHTS, load_bundle
    from model.errors import InvalidConfig, WeightsError

    check_bindable(settings.host, settings.port)  # first: a busy port is the most common failure, and the cheapest
    weights = settings.weights or DEFAULT_WEIGHTS
    if not Path(weights).is_file():  # fail here, not in every worker's background loader
        raise WeightsError(f"weights file not found: {weights}")
    bundle = load_bundle(weights)  # ... and so for a bad bundle or a default far it has no threshold for (a
    if bundle.thresholds and bundle.calibrated_far(settings.default_far) is None:  # /readyz 503 for ever)
        raise InvalidConfig(f"VISAGE_DEFAULT_FAR={settings.default_far} is not calibrated in {weights} (it has "
                            f"{', '.join(sorted(bundle.thresholds))})")
    del bundle
    private_dir(settings.data_dir)
    keys, generated = resolve_api_keys(settings)
    fmt = settings.log_format
    if settings.api_keys:
        startup_line(f"API keys: {len(keys)} from VISAGE_API_KEYS", fmt)
    elif generated:  # the one time the key is shown: logs (journald, docker) are kept, and read, more widely
        startup_line(f"API key (generated and stored in {settings.key_path.resolve()}; shown only this once): "
                     f"{keys[0]}", fmt)
    else:
        startup_line(f"API key: stored in {settings.key_path.resolve()} (not printed: read it from that file)", fmt)
    # The workers build their own Settings from the environment: pass the command-line overrides on.
    for name in ("data_dir", "weights", "host", "port", "workers"):
        value = getattr(settings, name)
        if value is not None:
            os.environ[f"VISAGE_{name.upper()}"] = str(Path(value).resolve() if name == "data_dir" else value)
    startup_line(
        f"Visage on http://{settings.host}:{settings.port} (docs at /docs), data in {settings.data_dir.resolve()}", fmt
    )


def _progress(items: list, disable: bool, desc: str):
    from tqdm import tqdm

    # None: on a terminal only; redirected (cron, a log file) its \r updates were hundreds of lines of noise
    return tqdm(items, desc=desc, unit="img", disable=True if disable else None, file=sys.stderr)


def cmd_enroll(args: argparse.Namespace) -> int:
    from app.enroll import check_writable, remote_enroller, run_batch, scan, shown, write_failures
    from app.settings import FAILURES_CSV

    settings = _settings(args)
    found = scan(args.dir)
    items = found.items
    # a batch posted to a service has nothing to do with ./data: unless a data folder was named (--data-dir,
    # VISAGE_DATA_DIR: the Docker image's /data, where its working folder is not writable), the list goes where
    # the command was run
    named = "data_dir" in settings.model_fields_set
    failures_path = args.failures or (Path(FAILURES_CSV) if args.url and not named else settings.failures_path)
    whose = ("--failures" if args.failures else "the failures list in the current folder (give --failures)"
             if args.url and not named else "the failures list in the data folder (--data-dir / VISAGE_DATA_DIR)")
    check_writable(failures_path, whose)  # found now, not after the whole batch
    max_bytes = settings.max_upload_bytes
    if args.url:
        import httpx

        if not args.api_key:
            raise ValueError("--url needs --api-key (or $VISAGE_API_KEY)")
        try:
            url = httpx.URL(args.url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"--url {args.url!r}: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:  # not three retries of "unreachable" later
            raise ValueError(f"--url {args.url!r} is not an http(s) URL; e.g. http://127.0.0.1:8000")
        with httpx.Client(base_url=args.url, headers={"X-API-Key": args.api_key}, timeout=300.0) as client:
            report = run_batch(
                items, remote_enroller(client, args.face), _progress(items, args.no_progress, "enroll"), max_bytes
            )
        target = args.url
    else:
        from app.enroll import local_enroller
        from app.runtime import open_service

        service = open_service(settings, with_index=False)
        try:
            check_served_model(service, args.new_model)
            report = run_batch(
                items, local_enroller(service, args.face), _progress(items, args.no_progress, "enroll"), max_bytes
            )
        finally:
            service.gallery.close()
        target = str(settings.db_path)
    try:
        write_failures(failures_path, report.failures)
        failures_csv: str | None = str(failures_path)
    except OSError as exc:  # the batch is done and stored: still report it (the failures are in --json too)
        print(f"could not write the failures CSV {shown(failures_path)}: {exc}", file=sys.stderr)
        failures_csv = None
    if args.json:
        print_json({**report.to_dict(), "target": target, "failures_csv": failures_csv, "skipped": found.skipped})
    else:
        rows = [
            ("images", report.files),
            ("enrolled", report.created),
            ("already enrolled", report.existing),
            ("failed", report.failed),
            ("not attempted", report.not_attempted),
            *([("in flight when stopped (may be stored)", report.in_flight)] if report.in_flight else []),
            ("subjects", len(report.subjects)),
        ]
        caption = (
            f"{report.seconds:.1f} s; failures in {failures_csv}"
            if report.failures and failures_csv
            else f"{report.seconds:.1f} s"
        )
        print_table(f"enroll {shown(args.dir)} -> {target}", ["", "count"], rows, caption=caption)
        if found.skipped:
            print(f"not read ({len(found.skipped)}): " + "; ".join(found.skipped[:5])
                  + (f"; ... ({len(found.skipped) - 5} more: --json lists them)" if len(found.skipped) > 5 else ""),
                  file=sys.stderr)
    if report.aborted:  # (with --json too: stderr is where a script's operator looks for why)
        left = report.not_attempted
        print(f"stopped early: {report.aborted}."
              + (f" {left} of {report.files} images were not attempted." if left else "")
              + " Run the same command again" + ("" if report.interrupted else " (once that is fixed)")
              + " to go on: it skips what is enrolled.", file=sys.stderr)
    if report.interrupted:
        return 130  # the shell's status for Ctrl-C: a script must not read a cut-short batch as done
    if report.aborted:
        return 2  # stopped by what every later image would meet too (a refused key, no service, a locked store)
    return 1 if report.failures else 0


def cmd_reindex(args: argparse.Namespace) -> int:
    from app.runtime import open_service

    settings = _settings(args)
    if not settings.db_path.is_file():  # a mistyped --data-dir would otherwise get a new, empty gallery
        raise FileNotFoundError(f"no gallery at {settings.db_path}: check --data-dir / VISAGE_DATA_DIR")
    service = open_service(settings, with_index=False)
    bar = None
    try:
        check_served_model(service, args.new_model)
        stale = service.gallery.store.counts(service.model_version)["stale_faces"]
        bar = _progress([], args.no_progress or not stale, "reindex")
        bar.total = stale

        def progress(done: int, total: int) -> None:
            bar.update(1)

        report = service.reindex(progress)
    finally:
        if bar is not None:
            bar.close()
        service.gallery.close()
    out = {
        "model_version": service.model_version,
        "redone": report.redone,
        "skipped": report.skipped,
        "failed": report.failed,
        "interrupted": report.interrupted,
    }
    if args.json:
        print_json(out)
    else:
        print_table(
            f"reindex to {service.model_version}",
            ["", "faces"],
            [
                ("re-embedded", report.redone),
                ("changed meanwhile", report.skipped),
                ("cannot redo", len(report.failed)),
            ],
        )
        if report.failed:
            print_table(
                "faces that cannot be re-embedded",
                ["face", "subject", "version", "error", "detail"],
                [(f["face_id"], f["subject_id"], f["model_version"], f["error"], f["detail"]) for f in report.failed],
            )
    if report.interrupted:
        print(f"interrupted: {report.redone} faces were re-embedded and are kept; run the same command again to "
              "finish", file=sys.stderr)
        return 130
    return 1 if report.failed else 0


def cmd_backup(args: argparse.Namespace) -> int:
    from app.backup import backup_database, backup_into_folder

    settings = _settings(args)
    if not settings.db_path.is_file():  # never back up a new, empty gallery made by a mistyped --data-dir
        raise FileNotFoundError(f"no gallery at {settings.db_path}: check --data-dir / VISAGE_DATA_DIR")
    if not args.dest.strip():
        raise ValueError("DEST is empty: give a file name or a folder")
    dest = Path(args.dest)
    if args.dest.endswith(("/", os.sep)) and not dest.is_dir():  # meant a folder: not a file named like it
        raise FileNotFoundError(f"no folder {args.dest}")
    report = backup_into_folder(settings.db_path, dest) if dest.is_dir() else backup_database(settings.db_path, dest)
    _print_report(args, f"backup of {settings.db_path.resolve()}", report)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from app.restore import restore_database

    settings = _settings(args)
    report = restore_database(args.backup, settings.db_path)
    _print_report(args, f"restored {Path(args.backup).resolve()}", report)
    if report.replaced and not args.json:
        print(f"the gallery it replaced is kept as {report.replaced}", file=sys.stderr)
    return 0


def _print_report(args: argparse.Namespace, title: str, report: Any) -> None:
    """A backup's or a restore's report (a dataclass): a table, or one JSON object with ``--json``."""
    out = {key: str(value) if isinstance(value, Path) else round(value, 3) if isinstance(value, float) else value
           for key, value in dataclasses.asdict(report).items()}
    if args.json:
        print_json(out)
    else:
        print_table(title, ["", "value"], list(out.items()))
