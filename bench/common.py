"""Helpers shared by the benchmark scripts: the machine line, bounded interleaved timing, percentiles, Markdown
tables, real test inputs, and writing one script's section of docs/BENCHMARKS.md.

Every script runs as ``python bench/NAME.py`` from the repository root (this folder is then on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.paths import shared_data, work_dir  # noqa: F401  (re-exported for the scripts)

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "BENCHMARKS.md"
PLACEHOLDER = "not yet measured on a quiet machine"


# -- where things are ----------------------------------------------------------------------------------------------


def photos_dir() -> Path:
    return shared_data() / "photos"


def default_weights() -> Path | None:
    """The shipped bundle when it exists, else None (callers then use a fresh ``ModelConfig()`` network)."""
    from model.bundle import DEFAULT_WEIGHTS

    return DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.is_file() else None


def load_default_bundle(weights: str | Path | None):
    """(bundle, description): ``weights`` if given, else the shipped bundle, else a fresh default network."""
    from model.bundle import bundle_from_model, load_bundle
    from model.errors import WeightsError
    from model.mobilenet import ModelConfig, build_model

    path = Path(weights) if weights else default_weights()
    if path is not None:
        try:
            return load_bundle(path), f"weights {path.name}"
        except WeightsError as exc:  # one line, not a traceback (the script has measured nothing yet)
            raise SystemExit(f"error: {exc.detail}") from None
    import torch

    torch.manual_seed(0)
    config = ModelConfig()
    net = build_model(config)
    recalibrate_bn(net, config.resolution)
    return bundle_from_model(net, config), "fresh ModelConfig() network (no shipped weights)"


def recalibrate_bn(net, resolution: int, batches: int = 2, batch_size: int = 32, seed: int = 0) -> None:
    """Give a randomly initialised network realistic BatchNorm statistics (a cumulative average over a few random
    batches in train mode), so its activations have trained-like magnitudes instead of vanishing towards
    denormals. Costs nothing at inference; only used for networks that have no trained weights."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    net.train()
    with torch.no_grad():
        for _ in range(batches):
            net(torch.rand(batch_size, 3, resolution, resolution, generator=gen) * 2 - 1)
    net.eval()


# -- the machine line ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine(threads: int | None = None, extra: str = "") -> dict[str, Any]:
    """What the numbers were measured on, including the load average at the start (a busy machine shows)."""
    import torch

    load = os.getloadavg()
    info = {
        "cpu": cpu_model(),
        "cores": core_count(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "python": platform.python_version(),
        "load_avg_1m": round(load[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if extra:
        info["extra"] = extra
    return info


def machine_line(info: dict[str, Any]) -> str:
    line = (
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['torch_threads']} torch "
        f"threads (OMP_NUM_THREADS={info['omp_num_threads']}), Python {info['python']}, load average "
        f"{info['load_avg_1m']} at start, {info['date']}"
    )
    if info.get("extra"):
        line += f"; {info['extra']}"
    if info["load_avg_1m"] > 0.5 * info["cores"]:
        line += " -- **the machine was busy: absolute times are contaminated, in-run ratios less so**"
    return line + "."


def set_threads(threads: int | None) -> int:
    """Apply ``--threads`` to torch (intra-op) and return the count in force."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# -- timing --------------------------------------------------------------------------------------------------------


def interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    min_rounds: int = 3,
    max_rounds: int = 50,
    budget_s: float = 30.0,
    label: str = "",
) -> dict[str, list[float]]:
    """Time every function round-robin (one call each per round, the order rotated each round), so a machine
    that gets busier or quieter affects all of them alike and their ratios stay meaningful.

    Bounded: at least ``min_rounds`` rounds, then stop once ``budget_s`` has passed or at ``max_rounds``.
    Returns seconds per call for each function.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(max_rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t)
        if r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
            break
    if label:
        progress(f"{label}: {len(samples[names[0]])} rounds in {time.perf_counter() - start:.1f} s")
    return samples


def stats(seconds: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """Median and percentiles of a list of durations, in ms by default."""
    a = np.asarray(seconds, dtype=np.float64) * scale
    if not len(a):
        return {"n": 0}
    return {
        "n": int(len(a)),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "min": float(a.min()),
        "mean": float(a.mean()),
    }


def held_out_scores(full: np.ndarray, iu: tuple, same: np.ndarray, pair_scores: np.ndarray, pair_same: np.ndarray,
                     pair_folds: np.ndarray) -> dict[str, float]:
    """Protocol accuracy on the protocol pairs' scores; ROC AUC and the TAR ladder at FAR 1e-2 / 1e-3 / 1e-4 over
    every held-out pair (``full[iu]``, genuine where ``same``)."""
    from sklearn.metrics import roc_auc_score

    from training.evaluate import tar_at_far, verify

    s = full[iu]
    out = {"accuracy": verify(pair_scores, pair_same, pair_folds).accuracy, "auc": float(roc_auc_score(same, s))}
    out.update({f"tar_{far:g}": tar_at_far(s, same, far) for far in (1e-2, 1e-3, 1e-4)})
    return out


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size (VmRSS) of a process, from /proc."""
    return _proc_status_kb(pid, "VmRSS") * 1024


def hwm_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a process, from /proc."""
    return _proc_status_kb(pid, "VmHWM") * 1024


def _proc_status_kb(pid: int | str, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def pss_bytes(pid: int | str = "self") -> int:
    """Proportional set size (shared pages divided among the processes sharing them), from smaps_rollup: the
    right sum for several worker processes that share library code."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


# -- formatting ----------------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not np.isfinite(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(c, digits) for c in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def mib(n: float) -> float:
    return n / 2**20


# -- command line and output ---------------------------------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke test of the script")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON instead of Markdown")
    ap.add_argument(
        "--out",
        type=out_file,
        metavar="FILE",
        help="also write this benchmark's section of FILE (e.g. docs/BENCHMARKS.md), replacing the previous one",
    )
    return ap


def out_file(text: str) -> Path:
    """``--out``, checked when the arguments are read: a folder or a missing folder was a traceback after the
    whole benchmark had run."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give the Markdown file's path")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent} is not a folder")
    return path


def emit(name: str, title: str, markdown: str, results: dict[str, Any], args: argparse.Namespace) -> None:
    """Print Markdown (or JSON with --json) and, with --out, replace this benchmark's section of the file."""
    if args.json:
        print(json.dumps(results, indent=2, default=_json_default))
    else:
        print(markdown)
    if args.out:
        write_section(args.out, name, title, markdown)
        progress(f"wrote section '{name}' of {args.out}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def write_section(path: Path, name: str, title: str, markdown: str) -> None:
    """Replace the text between this benchmark's markers in ``path``; append a new section if they are absent."""
    start, end = markers(name)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def command_line() -> str:
    """The command that produced a table, as it was typed (relative script path)."""
    argv = [Path(sys.argv[0]).as_posix()]
    if Path(argv[0]).is_absolute():
        with contextlib.suppress(ValueError):
            argv[0] = Path(argv[0]).relative_to(REPO).as_posix()
    return "python " + " ".join([argv[0], *sys.argv[1:]])


# -- real inputs ---------------------------------------------------------------------------------------------------


def real_crops(n: int, crops_dir: Path | None = None, offset: int = 0) -> tuple[np.ndarray, str]:
    """``n`` real aligned 112x112 face crops and where they came from.

    From ``crops_dir`` or ``$VISAGE_WORK_DIR/prepared/lfw/crops`` (``visage prepare`` output: aligned LFW crops),
    spread over the sorted file list (``offset`` 0 and 1 give disjoint sets: evaluation and calibration);
    otherwise detected and aligned here from the test photos (few faces, repeated and mirrored to make up ``n``;
    then both offsets give the same faces, so int8 calibration and evaluation overlap).
    """
    from PIL import Image

    folder = crops_dir or work_dir() / "prepared" / "lfw" / "crops"
    files = sorted(folder.rglob("*.png")) if folder.is_dir() else []
    if len(files) >= 2 * n:
        spread = files[:: max(1, len(files) // (2 * n))][: 2 * n]  # 2n files across all identities
        chosen = spread[offset % 2 :: 2][:n]  # offset 0 and 1 give disjoint sets
        crops = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in chosen])
        return crops, f"{len(crops)} aligned LFW crops from {folder}"
    from model.align import align_face
    from model.decode import read_image_file
    from model.detect import FaceDetector

    detector = FaceDetector()
    found = []
    for path in sorted(photos_dir().glob("*.jpg")) + sorted((photos_dir() / "multi").glob("*.jpg")):
        image = read_image_file(str(path))
        found += [align_face(image, f.landmarks) for f in detector.detect(image)]
    if not found:
        raise RuntimeError(f"no crops in {folder} and no faces found in {photos_dir()}")
    found += [c[:, ::-1] for c in found]
    crops = np.stack([found[i % len(found)] for i in range(n)])
    return np.ascontiguousarray(crops), f"{len(found) // 2} faces detected in {photos_dir()} (repeated, mirrored)"


# -- a real service in a subprocess --------------------------------------------------------------------------------

API_KEY = "bench-key"


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def weights_file(weights: str | Path | None, folder: Path) -> tuple[Path, str]:
    """A weights file the service can load: ``weights``, the shipped bundle, or a fresh default network saved
    into ``folder`` (``visage serve`` refuses to start without a weights file)."""
    from model.bundle import save_bundle

    if weights or default_weights():
        path = Path(weights) if weights else default_weights()
        return path, f"weights {path.name}"
    bundle, source = load_default_bundle(None)
    return save_bundle(bundle, folder / "fresh-default.pt"), source


def worker_threads(spec: str, workers: int) -> int | None:
    """``inherit``: leave OMP_NUM_THREADS as it is (None); ``auto``: the cores shared out among the workers (never
    more than an OMP_NUM_THREADS already set); a number: that."""
    if spec == "inherit":
        return None
    if spec == "auto":
        n = max(1, core_count() // workers)
        env = os.environ.get("OMP_NUM_THREADS")
        return min(n, int(env)) if env and env.isdigit() else n
    return int(spec)


class Server:
    """``visage serve`` on a free 127.0.0.1 port with its own data folder, in its own process group; a context
    manager that waits for ``/readyz`` and stops the whole group (uvicorn's workers too) on exit."""

    def __init__(
        self,
        data_dir: Path,
        weights: Path,
        workers: int = 1,
        threads: int | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 300.0,
    ) -> None:
        self.data_dir, self.weights, self.workers, self.threads = data_dir, weights, workers, threads
        self.extra_env, self.ready_timeout = env or {}, ready_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        self.ready_seconds = 0.0
        self.ready: dict[str, Any] = {}

    def __enter__(self) -> Server:
        import subprocess

        import httpx

        env = {**os.environ, "VISAGE_API_KEYS": API_KEY, "VISAGE_LOG_LEVEL": "warning", **self.extra_env}
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        cmd = [sys.executable, "-m", "model.console", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--workers", str(self.workers), "--data-dir", str(self.data_dir), "--weights", str(self.weights)]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            with httpx.Client(base_url=self.url, timeout=5.0) as client:
                while True:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"the service exited with {self.proc.returncode}:\n{self.log_tail()}")
                    if time.perf_counter() - start > self.ready_timeout:
                        why = f"the service was not ready in {self.ready_timeout:.0f} s"
                        raise RuntimeError(f"{why}:\n{self.log_tail()}")
                    try:
                        r = client.get("/readyz")
                        if r.status_code == 200:
                            self.ready = r.json()
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.2)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.ready_seconds = time.perf_counter() - start
        return self

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc is not None else []

    def rss(self) -> int:
        """VmRSS summed over the server process and its children (uvicorn workers; shared pages counted in each)."""
        return sum(rss_bytes(p) for p in self.pids())

    def pss(self) -> int:
        """PSS summed over the server process and its children (shared pages counted once)."""
        return sum(pss_bytes(p) for p in self.pids())

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __exit__(self, *exc: object) -> None:
        """SIGTERM to the server's process group (uvicorn saves the index and stops its workers), SIGKILL after
        30 s."""
        import signal
        import subprocess

        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if hasattr(self, "_log"):
            self._log.close()
