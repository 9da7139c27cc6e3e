"""Batch enrollment of ``DIR/<subject>/<image>``: into the local store (the same ``FaceService.enroll`` as
``POST /enroll``) or through a running service's API.

Idempotent and therefore resumable: an image already enrolled for its subject is recognised by its sha256
before the model runs, so re-running after an interruption only does what is missing. Safe while the service
runs: the service sees the new faces through the store's change log, without a restart.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import Overloaded, StorageUnavailable
from app.files import private_dir
from app.names import clean_name
from app.service import FaceSelector, FaceService
from app.store import SubjectRef
from model import files
from model.decode import DEFAULT_MAX_BYTES, IMAGE_SUFFIXES, read_limited
from model.errors import VisageError

FAILURE_COLUMNS = ("file", "subject", "error", "detail")
CONNECTION_ATTEMPTS = 6  # a service being restarted (a supervisor, a deploy) refuses connections: 1 + 2 + ... + 16 s
NOT_READY_ATTEMPTS = 6  # a service still loading its model answers 503: wait for it (1 + 2 + ... + 16 s)
OVERLOADED_ATTEMPTS = 300  # a busy service answers 503 overloaded, Retry-After: 1: wait up to ~5 minutes


@dataclass(frozen=True)
class Item:
    path: Path
    subject: str


INTERRUPTED = "interrupted"


@dataclass
class BatchReport:
    files: int = 0
    created: int = 0
    existing: int = 0
    attempted: int = 0  # files done before the run stopped (all of them unless it stopped early)
    in_flight: int = 0  # the file being enrolled when Ctrl-C came: stored or not, the next run knows
    failures: list[dict[str, str]] = field(default_factory=list)
    subjects: set[str] = field(default_factory=set)
    aborted: str | None = None  # why the run stopped early (service unreachable, bad key, INTERRUPTED)
    seconds: float = 0.0

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C: no failure row says so, and the exit status must not read as success."""
        return self.aborted == INTERRUPTED

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def not_attempted(self) -> int:
        return self.files - self.attempted - self.in_flight

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "created": self.created,
            "existing": self.existing,
            "failed": self.failed,
            "not_attempted": self.not_attempted,
            "in_flight": self.in_flight,
            "subjects": len(self.subjects),
            "aborted": self.aborted,
            "seconds": round(self.seconds, 2),
            "failures": self.failures,
        }


def shown(path: Path | str) -> str:
    """A path as printable UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogate escapes, which
    neither JSON, CSV nor an HTTP header can carry) are written as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class Abort(Exception):
    """Stop the whole batch (the service is unreachable or refuses the key): per-file errors do not."""


@dataclass(frozen=True)
class Scan:
    items: list[Item]
    skipped: list[str]  # what is not read, and why: a photo format not taken, a folder inside a subject's...


def _broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _why_not_read(path: Path, in_subject_folder: bool) -> str:
    """The line ``scan`` lists for an entry it does not read (beside the subject folders, or in one)."""
    if _broken_link(path):
        return f"{shown(path)}: a broken link (its target is missing): not read"
    if path.is_dir():
        return f"{shown(path)}/: a folder inside a subject folder (not read)"
    if not path.is_file():
        return f"{shown(path)}: not a regular file (a pipe, socket or device): not read"
    if in_subject_folder:
        return f"{shown(path)}: not a photo format this reads ({path.suffix or 'no suffix'})"
    return f"{shown(path)}: not in a subject folder"


def scan(root: Path) -> Scan:
    """Every image under ``root/<subject>/``, sorted; the folder name is the subject name. A folder holding no
    such image is an error: a mistyped path or layout must not end as "0 images, success". What is not read
    (other files, deeper folders, files beside the subject folders, empty subject folders) is listed, not
    passed over in silence (a HEIC photo, a year's subfolder); hidden files and folders are counted there. A
    photo that is a broken link is an item, so that it is a failure of the batch (a photo library linked from an
    unmounted disk must not end "every file enrolled")."""
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}" if not root.exists() else f"{root} is a file, not a folder")
    items: list[Item] = []
    skipped: list[str] = []
    hidden = 0
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            hidden += 1
        elif not entry.is_dir():
            skipped.append(_why_not_read(entry, in_subject_folder=False))
        else:
            found = 0
            for path in sorted(entry.iterdir()):
                if path.name.startswith("."):
                    hidden += 1
                elif path.suffix.lower() in IMAGE_SUFFIXES and (path.is_file() or _broken_link(path)):
                    items.append(Item(path, entry.name))
                    found += 1
                else:
                    skipped.append(_why_not_read(path, in_subject_folder=True))
            if not found:
                skipped.append(f"{shown(entry)}/: no photos")
    if hidden:
        skipped.append(f"{hidden} hidden file{'s' if hidden > 1 else ''} or folder{'s' if hidden > 1 else ''} (names "
                       "starting with '.'): not read")
    if not items:
        raise FileNotFoundError(
            f"no images in {root}: expected one folder per subject, DIR/<subject>/<photo>, with photos ending in "
            + ", ".join(sorted(IMAGE_SUFFIXES))
        )
    return Scan(items, skipped)


# An enroller takes (image bytes, subject name, file name) and returns created: bool, or raises
# VisageError/Abort.
Enroller = Callable[[bytes, str, str], bool]


def local_enroller(service: FaceService, face: str) -> Enroller:
    selector = FaceSelector.parse(face)

    def enroll(data: bytes, subject: str, filename: str) -> bool:
        try:
            return service.enroll(data, SubjectRef(name=clean_name(subject)), selector).created
        except StorageUnavailable as exc:  # every later image would fail alike: stop, the batch resumes later
            raise Abort(exc.detail) from exc

    return enroll


class RemoteError(VisageError):
    """An error answered by the service, carrying its code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def _error_of(response: Any) -> tuple[str, str]:
    """(code, detail) of a Visage error body; for any other body, ``http_<status>`` and its first characters."""
    try:
        body = response.json()
        return str(body["error"]), str(body["detail"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}", response.text[:200]


def _retry_after(response: Any) -> float:
    """The response's ``Retry-After`` in seconds (1 to 30; 1 when absent or not a number of seconds)."""
    try:
        return min(max(float(response.headers.get("retry-after", 1)), 1.0), 30.0)
    except ValueError:
        return 1.0


def remote_enroller(client: Any, face: str) -> Enroller:
    """POST /enroll through an ``httpx.Client`` (base URL and key set); retries connection errors briefly."""
    import httpx

    FaceSelector.parse(face)  # refuse a bad --face before the first request

    def post(data: bytes, subject: str, filename: str) -> httpx.Response:
        """One upload, retried while the service is unreachable (briefly), overloaded (503 overloaded, as its
        Retry-After says) or still loading (other 503s, with a growing back-off)."""
        transport_errors = not_ready = overloaded = 0
        while True:
            try:
                response = client.post(
                    "/enroll", files={"image": (shown(filename), data)}, data={"subject": subject, "face": face}
                )
            except httpx.TransportError as exc:
                transport_errors += 1
                if transport_errors == CONNECTION_ATTEMPTS:
                    raise Abort(f"the service at {client.base_url} is unreachable ({exc})") from exc
                time.sleep(0.5 * 2**transport_errors)
                continue
            if response.status_code != 503:
                return response
            if _error_of(response)[0] == Overloaded.code:  # busy with other clients' images: wait as it says
                overloaded += 1
                if overloaded == OVERLOADED_ATTEMPTS:
                    raise Abort(f"the service at {client.base_url} stayed overloaded for {overloaded} tries")
                time.sleep(_retry_after(response))
                continue
            not_ready += 1
            if not_ready == NOT_READY_ATTEMPTS:
                raise Abort(f"the service at {client.base_url} is not ready: {response.text[:200]}")
            time.sleep(0.5 * 2**not_ready)

    answered = False  # the service has answered as Visage does (a face stored, or one of its JSON errors)

    def enroll(data: bytes, subject: str, filename: str) -> bool:
        nonlocal answered
        subject = clean_name(subject)  # the service's own check, here: a name it cannot take is not sent
        response = post(data, subject, filename)
        if response.status_code in (200, 201):
            answered = True
            return bool(response.json()["created"])
        code, detail = _error_of(response)
        if response.status_code in (401, 403):
            raise Abort(f"the service refused the API key: {detail}")
        visage = not (code.startswith("http_") or detail.startswith("no route "))  # one of its JSON errors
        if not visage and not answered:  # a wrong URL or another server: every later file would fail alike
            raise Abort(f"{client.base_url} does not look like a Visage service (POST /enroll answered "
                        f"{response.status_code} {code}: {detail[:100]}); check --url")
        answered = answered or visage  # (later, a proxy's page for one file is that file's failure)
        raise RemoteError(code, detail)

    return enroll


def run_batch(
    items: list[Item], enroll: Enroller, progress: Iterator[Item] | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> BatchReport:
    """Enroll every item, collecting failures instead of stopping (except on ``Abort``)."""
    report = BatchReport(files=len(items))
    start = time.perf_counter()
    for item in progress if progress is not None else iter(items):
        try:
            report.attempted += 1
            data = read_limited(item.path, max_bytes)
            if enroll(data, item.subject, item.path.name):
                report.created += 1
            else:
                report.existing += 1
            report.subjects.add(clean_name(item.subject))  # ("José" in two Unicode spellings is one subject)
        except KeyboardInterrupt:
            report.aborted = INTERRUPTED  # still print the summary and write the failures so far
            report.attempted -= 1  # this one may or may not have been stored (its request may have reached the
            report.in_flight = 1  # service): neither done nor "not attempted"; the next run knows
            break
        except Abort as exc:
            report.aborted = str(exc)
            report.failures.append(
                {"file": shown(item.path), "subject": shown(item.subject), "error": "aborted", "detail": str(exc)}
            )
            break
        except VisageError as exc:
            report.failures.append(
                {"file": shown(item.path), "subject": shown(item.subject), "error": exc.code, "detail": exc.detail}
            )
        except OSError as exc:
            report.failures.append(
                {
                    "file": shown(item.path),
                    "subject": shown(item.subject),
                    "error": "unreadable_file",
                    "detail": shown(str(exc)),
                }
            )
    report.seconds = time.perf_counter() - start
    return report


def check_writable(path: Path, what: str) -> None:
    """``model.files.check_writable`` for the failures CSV, whose folder (the data folder, by default) is made
    private (``private_dir``) when this makes it: before the batch runs rather than after it."""
    with contextlib.suppress(OSError):  # (what stands in the way is said, naming ``what``, just below)
        private_dir(path.parent)
    files.check_writable(path, what)


def write_failures(path: Path, failures: list[dict[str, str]]) -> None:
    """Write the failures CSV atomically (header only when nothing failed, so an old list never lingers)."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FAILURE_COLUMNS)
            writer.writeheader()
            writer.writerows(failures)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
