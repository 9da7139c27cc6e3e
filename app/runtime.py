"""Building the service from settings: the pipeline, the store and the gallery, for the API and the CLI
alike."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading

from app.errors import NotReady, StillLoading, StorageUnavailable
from app.gallery import Gallery
from app.index import IndexConfig, set_faiss_threads
from app.service import FaceService
from app.settings import Settings, resolve_api_keys
from app.store import Store, may_pass
from model.errors import InvalidConfig
from model.faces import FacePipeline, load_pipeline

log = logging.getLogger("visage.runtime")
LOAD_RETRY_MAX_S = 30.0


def trim_heap() -> None:
    """Hand the heap that loading freed (rebuilding the index reads every stored vector) back to the OS.
    glibc keeps freed memory for reuse; at 100k faces this is ~60 MiB of the service's resident set."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def set_blas_threads(threads: int) -> None:
    """Threads of the pthreads BLAS libraries loaded (numpy's and scipy's OpenBLAS), for this whole process (0 leaves
    them be).

    A request's BLAS work is a few small matrix products (cohort scores), which gain nothing from a second thread;
    but OpenBLAS's idle threads spin for a while after each call and took a core from the MTCNN that follows.
    FAISS's own OpenBLAS is an OpenMP build: its threads are FAISS's OpenMP threads (``set_faiss_threads``), left
    alone here.
    """
    if threads <= 0:
        return
    from threadpoolctl import ThreadpoolController

    for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
        if lib.info().get("threading_layer") != "openmp":
            lib.set_num_threads(threads)


def index_config(settings: Settings) -> IndexConfig:
    return IndexConfig(
        kind=settings.index_type,
        hnsw_m=settings.hnsw_m,
        hnsw_ef_search=settings.hnsw_ef_search,
        ivf_nlist=settings.ivf_nlist,
        ivf_nprobe=settings.ivf_nprobe,
    )


def load_service_pipeline(settings: Settings) -> FacePipeline:
    """The detector and the embedder the settings name."""
    return load_pipeline(
        str(settings.weights) if settings.weights else None, flip=settings.flip, limits=settings.decode_limits,
        backend=settings.backend,
    )


def open_service(settings: Settings, with_index: bool = True, pipeline: FacePipeline | None = None) -> FaceService:
    """Load the model (unless given) and open the gallery in ``settings.data_dir``.

    ``with_index=False`` opens the store only: enough for a writer (batch enrollment, reindex) whose changes a
    running service picks up from the store's change log.
    """
    pipeline = pipeline or load_service_pipeline(settings)
    set_blas_threads(settings.blas_threads)
    set_faiss_threads(settings.faiss_threads)
    store = Store(settings.db_path)
    try:
        gallery = Gallery(
            store,
            settings.index_path,
            pipeline.embedder.model_version,
            pipeline.embedder.dim,
            index_config(settings),
            pipeline.embedder.bundle.scorer,
        )
        if with_index:
            gallery.open()
            store.set_served_model_version(pipeline.embedder.model_version)  # what batch writers must match
        service = FaceService(
            pipeline,
            gallery,
            store_images=settings.store_images,
            default_far=settings.default_far,
            min_enroll_quality=settings.min_enroll_quality,
        )
    except BaseException:
        store.close()
        raise
    thresholds = pipeline.embedder.bundle.thresholds
    if not thresholds:
        log.warning(
            "weights %s carry no calibrated thresholds: using the fallback %.2f",
            service.model_version,
            pipeline.embedder.bundle.threshold(),
        )
    stale = gallery.store.counts(service.model_version)["stale_faces"] if with_index else 0  # the service's warning
    if stale:
        log.warning(
            "%d stored faces were embedded by another model version and are not searchable; run `visage reindex`",
            stale,
        )
    return service


class Runtime:
    """The app's state: settings and keys at once, the service once loaded (in a background thread, so
    ``/healthz`` answers while the model loads and ``/readyz`` says when it is done)."""

    def __init__(self, settings: Settings, pipeline: FacePipeline | None = None) -> None:
        self.settings = settings
        self.api_keys, generated = resolve_api_keys(settings)
        if generated:
            log.warning("no API key configured: generated one and stored it in %s", settings.key_path)
        self.service: FaceService | None = None
        self.error: str | None = None  # the load failed for good (bad weights, a damaged database)
        self.retrying: str | None = None  # the gallery could not be opened yet (locked, disk full): trying again
        self._pipeline = pipeline
        self._loader: threading.Thread | None = None
        self._closed = threading.Event()

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load, name="visage-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            service = self._open_service()
            if service is None:
                return  # closed while retrying
            known = service.thresholds
            if known and service.pipeline.embedder.bundle.calibrated_far(self.settings.default_far) is None:
                service.gallery.close()
                raise InvalidConfig(
                    f"VISAGE_DEFAULT_FAR={self.settings.default_far} is not calibrated in the weights "
                    f"(they have {', '.join(sorted(known))})"
                )
        except Exception as exc:  # reported on /readyz and in the log; the process stays up for inspection
            self.error = f"{type(exc).__name__}: {getattr(exc, 'detail', exc)}"
            log.exception("the service failed to load")
            return
        if self._closed.is_set():
            service.gallery.close()
            return
        self.service = service
        trim_heap()
        log.info("ready: model %s, %s", service.model_version, service.gallery.opened_by)

    def _open_service(self) -> FaceService | None:
        """``open_service``, opening the gallery again with a growing pause (up to ``LOAD_RETRY_MAX_S``) while
        it fails for a reason that may pass (``may_pass``: another process holding the write lock past the busy
        timeout, a full disk). Failing for good on the first such error left the worker unready until someone
        restarted it, while /healthz said it was alive; a read-only file or a folder in its place still fails at
        once."""
        pipeline = self._pipeline or load_service_pipeline(self.settings)
        pause = 1.0
        while True:
            try:
                service = open_service(self.settings, pipeline=pipeline)
            except (StorageUnavailable, OSError) as exc:
                if not may_pass(exc):
                    raise
                self.retrying = str(getattr(exc, "detail", exc))
                log.warning("the gallery cannot be opened (%s): trying again in %.0f s", self.retrying, pause)
                if self._closed.wait(pause):
                    return None
                pause = min(2 * pause, LOAD_RETRY_MAX_S)
                continue
            self.retrying = None
            return service

    def not_ready(self) -> NotReady:
        """What a request that needs the service is told while there is none."""
        if self.error:
            return NotReady(f"failed to load: {self.error}")
        if self.retrying:
            return StillLoading(f"the gallery cannot be opened yet, retrying: {self.retrying}")
        return StillLoading("loading the model and the index")

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.service is not None

    def close(self) -> None:
        self._closed.set()
        if self._loader is not None:
            self._loader.join(timeout=60)
        if self.service is not None:
            self.service.gallery.close()
            self.service = None
