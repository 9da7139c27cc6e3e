"""Subject endpoints: list (paged), get, rename / update metadata, delete with its faces, delete one face."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from app.api.deps import (
    GalleryDep,
    ServiceDep,
    no_query,
    require_api_key,
    run_db,
    run_write,
    single_valued_query,
)
from app.api.schemas import (
    DeletedFace,
    DeletedSubject,
    ErrorResponse,
    StoredFace,
    SubjectDetail,
    SubjectPage,
    SubjectQuery,
    SubjectSummary,
    SubjectUpdate,
    Whole,
)
from app.gallery import Gallery
from app.names import clean_name
from app.store import MAX_ROW_ID

router = APIRouter(
    prefix="/subjects",
    tags=["subjects"],
    dependencies=[Depends(require_api_key)],
    responses={
        401: {"model": ErrorResponse, "description": "missing or wrong X-API-Key"},
        404: {"model": ErrorResponse, "description": "unknown subject or face"},
        413: {"model": ErrorResponse, "description": "body over the limit (2 x VISAGE_MAX_UPLOAD_BYTES + 1 MiB)"},
        422: {"model": ErrorResponse, "description": "bad parameter"},
        503: {"model": ErrorResponse, "description": "still loading, or the gallery cannot be read or written"},
    },
)
SubjectId = Annotated[Whole, Path(ge=1, le=MAX_ROW_ID, description="subject id")]


def _detail(gallery: Gallery, subject_id: int) -> SubjectDetail:
    subject = gallery.store.subject(subject_id)
    faces = gallery.store.subject_faces(subject_id)
    return SubjectDetail(
        **SubjectSummary.of(subject).model_dump(),
        faces=[StoredFace.of(f, gallery.model_version) for f in faces],
    )


# HEAD beside every GET (RFC 9110 9.3.2: a monitor's probe, a cache checking a resource; it was a 405)
@router.head("", include_in_schema=False, dependencies=[Depends(single_valued_query)])
@router.get("", response_model=SubjectPage, summary="List subjects, by id", dependencies=[Depends(single_valued_query)])
async def list_subjects(gallery: GalleryDep, query: Annotated[SubjectQuery, Query()]) -> SubjectPage:
    total, rows = await run_db(gallery.store.list_subjects, query.offset, query.limit, query.name)
    return SubjectPage(
        total=total, offset=query.offset, limit=query.limit, items=[SubjectSummary.of(r) for r in rows]
    )


@router.head("/{subject_id}", include_in_schema=False, dependencies=[Depends(no_query)])
@router.get("/{subject_id}", response_model=SubjectDetail, summary="One subject with its faces",
            dependencies=[Depends(no_query)])
async def get_subject(gallery: GalleryDep, subject_id: SubjectId) -> SubjectDetail:
    return await run_db(_detail, gallery, subject_id)


@router.patch(
    "/{subject_id}",
    response_model=SubjectDetail,
    responses={
        400: {"model": ErrorResponse, "description": "a body that is not JSON"},
        409: {"model": ErrorResponse, "description": "the new name is taken"},
    },
    summary="Rename a subject and/or replace its metadata",
    dependencies=[Depends(no_query)],
)
async def update_subject(
    request: Request, gallery: GalleryDep, subject_id: SubjectId, update: SubjectUpdate
) -> SubjectDetail:
    name = clean_name(update.name) if update.name is not None else None
    await run_write(request, gallery.store.update_subject, subject_id, name, update.metadata)
    return await run_db(_detail, gallery, subject_id)


@router.delete("/{subject_id}", response_model=DeletedSubject, summary="Delete a subject, its faces and images",
                dependencies=[Depends(no_query)])
async def delete_subject(request: Request, service: ServiceDep, subject_id: SubjectId) -> DeletedSubject:
    def work() -> int:
        count = service.gallery.store.delete_subject(subject_id)
        service.gallery.sync()
        return count

    return DeletedSubject(subject_id=subject_id, deleted_faces=await run_write(request, work))


@router.delete("/{subject_id}/faces/{face_id}", response_model=DeletedFace, summary="Delete one face",
                dependencies=[Depends(no_query)])
async def delete_face(
    request: Request, service: ServiceDep, subject_id: SubjectId, face_id: Annotated[Whole, Path(ge=1, le=MAX_ROW_ID)]
) -> DeletedFace:
    def work() -> None:
        service.gallery.store.delete_face(face_id, subject_id)
        service.gallery.sync()

    await run_write(request, work)
    return DeletedFace(face_id=face_id, subject_id=subject_id)
