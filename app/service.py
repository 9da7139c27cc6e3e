"""What the API and the CLI do with an image: enroll, verify, identify, compare, embed, reindex.

One implementation for both: ``visage enroll`` calls ``FaceService.enroll``, and ``POST /enroll`` runs its steps
(``find_enrolled``, ``one_face`` / ``repeat_face``, ``store_face`` / ``repeated``), each on its own threads.
Every method here is blocking (detection and the network run on the CPU): the API calls them from worker
threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.errors import BadParameter, FaceOfImageEnrolled, LowQualityFace, SubjectNotFound
from app.gallery import Gallery, SubjectHit
from app.names import clean_name
from app.store import FaceRow, SubjectRef, SubjectRow, sha256
from model.decode import decode_image
from model.detect import DetectedFace, box_iou, choose_face, face_at
from model.errors import NoFaceFound, VisageError
from model.faces import Face, FacePipeline, align_faces
from model.numbers import parse_decimal

log = logging.getLogger("visage.service")
SAME_FACE_IOU = 0.5  # a detection of the stored face again (same bytes, same detector) overlaps it ~1.0


@dataclass(frozen=True)
class FaceSelector:
    """Which face of a photo to use: ``single`` (refuse several), ``largest``, or the one at a box."""

    policy: str = "single"
    box: tuple[float, float, float, float] | None = None

    @classmethod
    def parse(cls, text: str | None, default: str = "single", field: str = "face") -> FaceSelector:
        """``field``'s text: a policy, or a box of four plain decimal numbers (``float()`` also took "1_0" and
        other scripts' digits)."""
        text = (text or default).strip().lower()
        if text in ("single", "largest"):
            return cls(text)
        numbers = [parse_decimal(p) for p in text.split(",")]
        box = tuple(numbers) if None not in numbers else ()
        if len(box) != 4 or box[0] >= box[2] or box[1] >= box[3]:
            raise BadParameter(
                f"{field} must be 'single', 'largest' or a box 'left,top,right,bottom' "
                f"with left < right and top < bottom; got {text!r}"
            )
        return cls("box", box)  # type: ignore[arg-type]

    def choose(self, faces: list[DetectedFace]) -> DetectedFace:
        if self.box is not None:
            return face_at(faces, self.box)
        return choose_face(faces, self.policy)


def subject_ref(name: str | None = None, subject_id: int | None = None) -> SubjectRef:
    """Validate "a subject by name or by id" (exactly one of them)."""
    if (name is None or not name.strip()) == (subject_id is None):
        if name is not None and subject_id is None:  # sent, but blank: say so rather than "give one of"
            raise BadParameter(f"subject is blank ({name!r}): a subject name needs a visible character")
        raise BadParameter("give exactly one of subject (a name) or subject_id")
    if subject_id is not None:
        return SubjectRef(id=subject_id)
    return SubjectRef(name=clean_name(name or ""))


@dataclass(frozen=True)
class Threshold:
    value: float
    far: str | None  # the operating point it was calibrated for; None when the caller gave a number


@dataclass
class EnrollResult:
    face: FaceRow
    subject: SubjectRow
    created: bool
    detected: Face | None = None  # None when the image was already enrolled (and not re-embedded)


@dataclass
class VerifyResult:
    match: bool
    similarity: float
    threshold: Threshold
    subject: SubjectRow
    face: Face
    matched_face_id: int


@dataclass
class CompareResult:
    match: bool
    similarity: float
    threshold: Threshold
    face1: Face
    face2: Face


@dataclass
class ReindexReport:
    redone: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)  # face_id, subject_id, error, detail
    skipped: int = 0  # deleted or re-embedded by someone else meanwhile
    interrupted: bool = False  # stopped by Ctrl-C (or SIGTERM): what was redone is kept, a re-run does the rest


class FaceService:
    """A face pipeline and a gallery for the same model version."""

    def __init__(
        self,
        pipeline: FacePipeline,
        gallery: Gallery,
        store_images: bool = True,
        default_far: str = "1e-3",
        min_enroll_quality: float = 0.0,
    ) -> None:
        self.pipeline, self.gallery = pipeline, gallery
        self.store_images, self.default_far = store_images, default_far
        self.min_enroll_quality = min_enroll_quality
        if gallery.model_version != self.model_version:
            raise ValueError(f"gallery is for {gallery.model_version}, the model is {self.model_version}")

    @property
    def model_version(self) -> str:
        return self.pipeline.embedder.model_version

    @property
    def thresholds(self) -> dict[str, float]:
        return self.pipeline.embedder.bundle.thresholds

    def threshold(self, value: float | None = None, far: str | None = None) -> Threshold:
        """An explicit threshold, else the bundle's calibrated one for ``far`` (default: settings)."""
        if value is not None:
            if not -2.0 <= value <= 2.0:
                raise BadParameter("threshold is a similarity score in [-2, 2]")
            return Threshold(float(value), None)
        bundle = self.pipeline.embedder.bundle
        far = (far or self.default_far).strip()
        known = self.thresholds
        if known:
            key = bundle.calibrated_far(far)
            if key is None:
                raise BadParameter(f"far must be one of {', '.join(sorted(known))} (calibrated in the weights)")
            far = key
        return Threshold(bundle.threshold(far), far)

    # -- faces from bytes ------------------------------------------------------------------------------------

    def detect(self, data: bytes) -> tuple[Any, list[DetectedFace]]:
        image = decode_image(data, self.pipeline.limits)
        return image, self.pipeline.detector.detect(image)

    def one_face(self, data: bytes, selector: FaceSelector) -> Face:
        """Decode, detect, pick one face, align and embed only that one."""
        image, detected = self.detect(data)
        return self._embedded(image, selector.choose(detected))

    def _embedded(self, image: Any, detected: DetectedFace) -> Face:
        """Align and embed one detected face (only that one: the image's other faces cost nothing)."""
        face = align_faces(image, [detected])[0]
        face.embedding = self.pipeline.embedder.embed(np.stack([face.crop]))[0]
        return face

    def embed(self, data: bytes) -> list[Face]:
        return self.pipeline.faces(data)

    # -- use cases -------------------------------------------------------------------------------------------

    def enroll(
        self,
        data: bytes,
        ref: SubjectRef,
        selector: FaceSelector | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> EnrollResult:
        """Store one face of ``data`` for the subject (created if named and new). Idempotent per (subject,
        image bytes): a repeat returns the stored face with ``created=False`` without embedding again (unless it
        was embedded by other weights: then it is re-embedded in place), or a 409 if its ``face`` box points at
        another face of the image (one face per image and subject)."""
        selector = selector or FaceSelector()
        digest = sha256(data)
        found = self.find_enrolled(ref, digest)
        if found is not None:
            redone = self.repeat_face(found, data, selector) if self.repeat_needs_model(found, selector) else None
            return self.repeated(ref, digest, data, found, redone, metadata)
        return self.store_face(ref, digest, data, self.one_face(data, selector), metadata)

    # The steps of ``enroll``, for the API to run the store's on the store's threads and the model's on
    # the inference threads: a write waiting for SQLite's lock (another process writing, up to the busy timeout)
    # must not hold the only inference thread, and with it every /verify, /identify and /embed of the worker.

    def find_enrolled(self, ref: SubjectRef, digest: str) -> tuple[FaceRow, SubjectRow] | None:
        """The face stored from these image bytes for this subject, if any (store only; 404 for an unknown id)."""
        return self.gallery.store.find_face(ref, digest)

    def repeat_needs_model(self, found: tuple[FaceRow, SubjectRow], selector: FaceSelector) -> bool:
        """Whether a repeat has model work to do (``repeat_face``): a box to check, or a stale embedding."""
        return selector.box is not None or found[0].model_version != self.model_version

    def repeat_face(self, found: tuple[FaceRow, SubjectRow], data: bytes, selector: FaceSelector) -> Face | None:
        """The model's work for a repeat: a ``face`` box must name the stored face (409), and a face embedded
        by other weights is embedded again by these, found at its stored box (returned; None when current). A
        batch enroll run again after new weights so brings its faces back into the index, even where the
        originals were not stored for ``visage reindex``."""
        stored, subject = found
        image, detected = self.detect(data)
        if selector.box is not None:  # which face the box names, by face_at's own rule (422 if none)
            self._check_same_face(stored, subject, face_at(detected, selector.box).box)
        if stored.model_version == self.model_version:
            return None
        try:
            return self._embedded(image, face_at(detected, stored.box))
        except VisageError as exc:  # still the idempotent 200 it always was; reindex lists the face too
            log.warning("face %d (%s) could not be re-embedded by %s: %s", stored.id, stored.model_version,
                        self.model_version, exc.detail)
            return None

    def repeated(
        self,
        ref: SubjectRef,
        digest: str,
        data: bytes,
        found: tuple[FaceRow, SubjectRow],
        redone: Face | None,
        metadata: dict[str, Any] | None = None,
    ) -> EnrollResult:
        """The stored face of a repeat (store only), its embedding replaced by ``redone`` when there is one. The
        model ran since ``found`` was read: a face re-embedded meanwhile is answered as it is now, and one deleted
        meanwhile is stored again (the request came after the delete; answering with the deleted face's id would
        acknowledge a face that is not there)."""
        stored, subject = found
        if redone is None:
            return EnrollResult(stored, subject, created=False)
        if self.gallery.store.reembed_face(
            stored.id, stored.model_version, redone.embedding, self.model_version, redone.box, redone.quality
        ):
            self.gallery.sync()
        try:
            now = self.gallery.store.find_face(SubjectRef(id=subject.id), digest)
        except SubjectNotFound:
            now = None
        if now is None:
            return self.store_face(ref, digest, data, redone, metadata)
        return EnrollResult(*now, created=False, detected=redone)

    def store_face(
        self, ref: SubjectRef, digest: str, data: bytes, face: Face, metadata: dict[str, Any] | None = None
    ) -> EnrollResult:
        """Store an embedded face in one transaction and bring the index up to date (store only); a face under
        ``min_enroll_quality`` is refused first."""
        if face.quality < self.min_enroll_quality:
            width, height = face.box[2] - face.box[0], face.box[3] - face.box[1]
            raise LowQualityFace(
                f"the face's quality is {face.quality:g} ({width:.0f}x{height:.0f} px, detection score "
                f"{face.score:.2f}); enrollment needs at least {self.min_enroll_quality:g} "
                "(VISAGE_MIN_ENROLL_QUALITY): send a larger, sharper photo of the face"
            )
        row, subject, created = self.gallery.store.add_face(
            ref,
            digest,
            data if self.store_images else None,
            face.embedding,
            self.model_version,
            face.box,
            face.quality,
            metadata,
        )
        if not created:  # another request stored this image for the subject meanwhile: the same face?
            self._check_same_face(row, subject, face.box)
        self.gallery.sync()
        return EnrollResult(row, subject, created, face)

    @staticmethod
    def _check_same_face(stored: FaceRow, subject: SubjectRow, box: tuple[float, float, float, float]) -> None:
        if box_iou(stored.box, box) < SAME_FACE_IOU:
            raise FaceOfImageEnrolled(
                f"this image is already enrolled for subject {subject.name!r} as face {stored.id} at box "
                f"{list(stored.box)}, and the face box points at another face; a subject holds one face per "
                f"image: delete face {stored.id} first to enroll another face of it"
            )

    def verify(self, data: bytes, ref: SubjectRef, selector: FaceSelector, threshold: Threshold) -> VerifyResult:
        subject = self.gallery.store.subject(ref)  # unknown subject: 404 before any image work
        face = self.one_face(data, selector)
        similarity, face_id = self.gallery.best_match(subject.id, face.embedding)
        return VerifyResult(similarity >= threshold.value, similarity, threshold, subject, face, face_id)

    def identify(self, data: bytes, k: int) -> list[tuple[Face, list[SubjectHit]]]:
        faces = self.pipeline.faces(data)
        if not faces:
            raise NoFaceFound("no face was found in the image")
        hits = self.gallery.identify(np.stack([f.embedding for f in faces]), k)
        return list(zip(faces, hits, strict=True))

    def compare(
        self,
        data1: bytes,
        data2: bytes,
        selector1: FaceSelector,
        selector2: FaceSelector,
        threshold: Threshold,
    ) -> CompareResult:
        a, b = (self._nth_face(n, data, selector) for n, data, selector in ((1, data1, selector1),
                                                                            (2, data2, selector2)))
        similarity = self.pipeline.embedder.bundle.scorer.score(a.embedding, b.embedding)
        return CompareResult(similarity >= threshold.value, similarity, threshold, a, b)

    def _nth_face(self, n: int, data: bytes, selector: FaceSelector) -> Face:
        """``one_face`` of the n-th of several uploads, its errors prefixed with which one it was."""
        try:
            return self.one_face(data, selector)
        except VisageError as err:
            raise err.prefixed(f"image{n}") from None

    def reindex(self, progress: Callable[[int, int], None] | None = None) -> ReindexReport:
        """Re-embed every face stored under another model version from its stored original image.

        The face is found again at its stored box. Faces without a stored image, or where the detector no
        longer finds a face there, are reported and left as they are (they stay out of the index).
        """
        report = ReindexReport()
        stale = self.gallery.store.stale_faces(self.model_version)
        stale.sort(key=lambda f: f.image_sha256)  # faces sharing an image: decode and detect it once
        cache: tuple[str, Any, list[DetectedFace]] | None = None
        for done, row in enumerate(stale, 1):
            try:
                if cache is None or cache[0] != row.image_sha256:
                    data = self.gallery.store.image(row.image_sha256)
                    if data is None:
                        raise _NoImage(
                            "the original image is not stored (VISAGE_STORE_IMAGES was off, or it "
                            "was deleted); enroll the face again"
                        )
                    cache = (row.image_sha256, *self.detect(data))
                _, image, detected = cache
                face = self._embedded(image, face_at(detected, row.box))
                if self.gallery.store.reembed_face(
                    row.id, row.model_version, face.embedding, self.model_version, face.box, face.quality
                ):
                    report.redone += 1
                else:
                    report.skipped += 1
            except VisageError as exc:
                report.failed.append(
                    {
                        "face_id": row.id,
                        "subject_id": row.subject_id,
                        "model_version": row.model_version,
                        "error": exc.code,
                        "detail": exc.detail,
                    }
                )
            except KeyboardInterrupt:  # each face is its own transaction: report what was done, not a bare stop
                report.interrupted = True
                break
            if progress:
                progress(done, len(stale))
        self.gallery.sync()
        return report


class _NoImage(VisageError):
    code = "image_not_stored"
    status = 409
