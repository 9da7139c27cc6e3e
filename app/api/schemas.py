"""Request and response models for every endpoint: they are the API contract and the OpenAPI document."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Json, field_validator, model_validator
from pydantic_core import PydanticCustomError

from app.gallery import SubjectHit
from app.names import MAX_NAME_LENGTH, canonical_prefix
from app.service import Threshold
from app.store import MAX_ROW_ID, FaceRow, SubjectRow
from model.faces import Face
from model.numbers import DECIMAL_HELP, parse_decimal


def _written_in_digits(value: Any) -> Any:
    """Pydantic reads text as Python's ``int()`` does: "1_1" was 11, so ``DELETE /subjects/1_1`` deleted
    subject 11. An id or a count sent as text is digits (and a sign), nothing else."""
    if isinstance(value, str) and not re.fullmatch(r"[-+]?[0-9]+", value):
        raise PydanticCustomError("int_parsing", "Input should be a whole number written with the digits 0-9")
    return value


Whole = Annotated[int, BeforeValidator(_written_in_digits)]


def _written_as_decimal(value: Any) -> Any:
    """Pydantic reads "0_1" as 1.0: a threshold sent as text is a plain decimal number (``model.numbers``)."""
    if isinstance(value, str) and parse_decimal(value) is None:
        raise PydanticCustomError("float_parsing", f"Input should be {DECIMAL_HELP}")
    return value


PlainDecimal = Annotated[float, BeforeValidator(_written_as_decimal)]
MAX_METADATA_BYTES = 16 * 1024
# a bound on the name as sent; the limit that counts (MAX_NAME_LENGTH) is app.names' on the stored form: an NFD
# name or one padded with spaces is longer as sent (a 150-letter name in NFD was refused at 300 code points)
RAW_NAME_LENGTH = 4 * MAX_NAME_LENGTH
FACE_HELP = "which face: 'single' (refuse several), 'largest', or a box 'left,top,right,bottom' in pixels"


MAX_METADATA_DEPTH = 32


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion: the input may be deep on purpose."""
    depth, level = 0, [value]
    while level:
        level = [c for v in level if isinstance(v, dict | list) for c in (v.values() if isinstance(v, dict) else v)]
        depth += 1
    return depth - 1


def _check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """Metadata that is stored must also be answerable: standard JSON, valid UTF-8 text, bounded in size and
    depth (what passes here is what every later ``GET`` can serialise)."""
    if value is None:
        return value
    if _depth(value) > MAX_METADATA_DEPTH:
        raise ValueError(f"metadata may nest at most {MAX_METADATA_DEPTH} levels deep")
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except ValueError:
        raise ValueError("metadata must be standard JSON (NaN and Infinity are not)") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("metadata must be valid Unicode text (a lone surrogate such as \\ud800 is not)") from None
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is limited to {MAX_METADATA_BYTES} bytes of JSON")
    return value


# -- shared pieces -------------------------------------------------------------------------------------------


class ErrorResponse(BaseModel):
    """Every error, whatever its cause."""

    error: str = Field(description="stable machine-readable code, e.g. no_face_found", examples=["no_face_found"])
    detail: str = Field(description="human-readable explanation")


class DetectedFaceOut(BaseModel):
    box: list[float] = Field(description="left, top, right, bottom in original-image pixels")
    score: float = Field(description="detector confidence")
    size: float = Field(description="shorter side of the box in pixels")
    quality: float = Field(description="0..1: confidence scaled down for small faces")
    landmarks: list[list[float]] = Field(description="eyes, nose, mouth corners (x, y)")

    @classmethod
    def of(cls, face: Face) -> DetectedFaceOut:
        return cls(**face.summary())


class SubjectOut(BaseModel):
    id: int
    name: str

    @classmethod
    def of(cls, row: SubjectRow) -> SubjectOut:
        return cls(id=row.id, name=row.name)


class ThresholdParams(BaseModel):
    threshold: PlainDecimal | None = Field(
        None, ge=-2.0, le=2.0, allow_inf_nan=False,
        description="explicit score threshold (see similarity); overrides far"
    )
    far: str | None = Field(
        None,
        max_length=16,
        description="false-accept rate whose calibrated threshold to "
        "use, e.g. 1e-3 or 1e-4 (default: VISAGE_DEFAULT_FAR)",
    )


class SubjectParams(BaseModel):
    subject: str | None = Field(None, max_length=RAW_NAME_LENGTH, description="subject name")
    subject_id: Whole | None = Field(None, ge=1, le=MAX_ROW_ID, description="subject id (instead of the name)")


# -- faces: enroll, verify, identify, compare, embed ---------------------------------------------------------


class EnrollForm(SubjectParams):
    face: str = Field("single", max_length=100, description=FACE_HELP)
    metadata: Json[dict[str, Any]] | None = Field(None, description="JSON object stored on a new subject")

    _metadata = field_validator("metadata")(_check_metadata)


class EnrollResponse(BaseModel):
    face_id: int
    created: bool = Field(description="false when these image bytes were already enrolled for this subject")
    subject: SubjectOut
    box: list[float]
    quality: float
    model_version: str
    image_sha256: str


class VerifyForm(SubjectParams, ThresholdParams):
    face: str = Field("largest", max_length=100, description=FACE_HELP)


class VerifyResponse(BaseModel):
    match: bool
    similarity: float = Field(
        description="score against the subject's best-matching face: the cosine minus the mean of the two faces' "
        "offsets (each one's mean cosine to its nearest cohort faces, model.score_norm), the thresholds' scale"
    )
    threshold: float
    far: str | None = Field(description="operating point of the threshold; null for an explicit one")
    subject: SubjectOut
    face: DetectedFaceOut = Field(description="the face used from the uploaded image")
    matched_face_id: int = Field(description="the subject's stored face that was most similar")
    model_version: str


class IdentifyForm(ThresholdParams):
    k: Whole = Field(5, ge=1, le=50, description="subjects to return per face")


class Candidate(BaseModel):
    subject_id: int
    name: str
    similarity: float
    face_id: int = Field(description="the subject's most similar stored face")

    @classmethod
    def of(cls, hit: SubjectHit) -> Candidate:
        return cls(subject_id=hit.subject_id, name=hit.name, similarity=round(hit.similarity, 4), face_id=hit.face_id)


class IdentifiedFace(BaseModel):
    face: DetectedFaceOut
    match: bool = Field(description="whether the best candidate reaches the threshold")
    best: Candidate | None = Field(description="the best candidate if it reaches the threshold")
    candidates: list[Candidate] = Field(description="top-k subjects, most similar first")


class IdentifyResponse(BaseModel):
    faces: list[IdentifiedFace] = Field(description="every face in the image, largest first")
    threshold: float
    far: str | None
    model_version: str


class CompareForm(ThresholdParams):
    face1: str = Field("largest", max_length=100, description=FACE_HELP)
    face2: str = Field("largest", max_length=100, description=FACE_HELP)


class CompareResponse(BaseModel):
    match: bool
    similarity: float
    threshold: float
    far: str | None
    face1: DetectedFaceOut
    face2: DetectedFaceOut
    model_version: str


class EmbeddedFace(DetectedFaceOut):
    embedding: list[float] = Field(description="unit vector; compare two with a dot product")


class EmbedResponse(BaseModel):
    model_version: str
    dim: int
    faces: list[EmbeddedFace]


def threshold_fields(threshold: Threshold) -> dict[str, Any]:
    return {"threshold": round(threshold.value, 4), "far": threshold.far}


# -- subjects ------------------------------------------------------------------------------------------------


class SubjectSummary(SubjectOut):
    metadata: dict[str, Any]
    face_count: int
    created_at: str

    @classmethod
    def of(cls, row: SubjectRow) -> SubjectSummary:
        return cls(
            id=row.id,
            name=row.name,
            metadata=row.metadata,
            face_count=row.face_count,
            created_at=row.created_at,
        )


class StoredFace(BaseModel):
    id: int
    subject_id: int
    box: list[float]
    quality: float
    model_version: str
    current: bool = Field(description="embedded by the loaded model (searchable); false: run visage reindex")
    image_sha256: str
    image_stored: bool
    created_at: str

    @classmethod
    def of(cls, row: FaceRow, model_version: str) -> StoredFace:
        return cls(
            id=row.id,
            subject_id=row.subject_id,
            box=list(row.box),
            quality=row.quality,
            model_version=row.model_version,
            current=row.model_version == model_version,
            image_sha256=row.image_sha256,
            image_stored=row.has_image,
            created_at=row.created_at,
        )


class SubjectDetail(SubjectSummary):
    faces: list[StoredFace]


class SubjectQuery(BaseModel):
    """``GET /subjects``'s query: an unknown parameter (``?limt=5``) is a 422 naming it, not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    offset: Whole = Field(0, ge=0, le=MAX_ROW_ID)
    limit: Whole = Field(50, ge=1, le=500)
    name: str | None = Field(None, max_length=RAW_NAME_LENGTH, description="name prefix")

    @field_validator("name")
    @classmethod
    def _canonical(cls, name: str | None) -> str | None:
        """Stored names are canonical (app.names): so is the prefix that is matched against them."""
        return None if name is None else canonical_prefix(name)


class SubjectPage(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[SubjectSummary]


class SubjectUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})  # tells clients: not {}

    name: str | None = Field(None, min_length=1, max_length=RAW_NAME_LENGTH)
    metadata: dict[str, Any] | None = Field(None, description="replaces the stored metadata")

    _metadata = field_validator("metadata")(_check_metadata)

    @model_validator(mode="after")
    def _something(self) -> SubjectUpdate:
        if self.name is None and self.metadata is None:
            raise ValueError("give a new name, new metadata, or both")
        return self


class DeletedSubject(BaseModel):
    subject_id: int
    deleted_faces: int


class DeletedFace(BaseModel):
    face_id: int
    subject_id: int


# -- health --------------------------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model_version: str
    thresholds: dict[str, float] = Field(description="calibrated score thresholds by false-accept rate")
    scoring: str = Field(description="how faces are scored: 'cosine', or the weights' cohort (model/score_norm.py)")
    index_kind: str
    index_state: str = Field(
        description="how the index was opened: 'loaded', 'built (new gallery)' or 'built (no saved index file)' "
        "when there was no index file, or 'rebuilt (why)'"
    )
    subjects: int
    faces: int
    current_faces: int
    stale_faces: int = Field(description="faces of other model versions, not searchable until reindexed")
    indexed_faces: int
