"""Image endpoints: enroll, verify, identify, compare, embed. Each reads the upload here and does the CPU work
(decode, detect, embed, search) in a worker thread, so the event loop keeps serving other requests."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile, status

from app.api.deps import (
    ServiceDep,
    SettingsDep,
    admitted,
    form_fields,
    read_upload,
    require_api_key,
    run_cpu,
    run_db,
    run_write,
)
from app.api.schemas import (
    Candidate,
    CompareForm,
    CompareResponse,
    DetectedFaceOut,
    EmbeddedFace,
    EmbedResponse,
    EnrollForm,
    EnrollResponse,
    ErrorResponse,
    IdentifiedFace,
    IdentifyForm,
    IdentifyResponse,
    SubjectOut,
    VerifyForm,
    VerifyResponse,
    threshold_fields,
)
from app.service import FaceSelector, subject_ref
from app.store import sha256

IMAGE_ERRORS: dict[int | str, dict] = {
    400: {"model": ErrorResponse, "description": "empty, corrupt or unreadable image"},
    401: {"model": ErrorResponse, "description": "missing or wrong X-API-Key"},
    413: {"model": ErrorResponse, "description": "file too large, or too many pixels"},
    415: {"model": ErrorResponse, "description": "image format not supported"},
    422: {"model": ErrorResponse, "description": "no face, several faces, a bad parameter, or (enroll) a face under "
          "VISAGE_MIN_ENROLL_QUALITY"},
    503: {
        "model": ErrorResponse,
        "description": "still loading, the gallery cannot be read or written, or too many image requests at once",
    },
}
SUBJECT_ERRORS: dict[int | str, dict] = {
    404: {"model": ErrorResponse, "description": "unknown subject"},
    409: {"model": ErrorResponse, "description": "the subject has no faces of the current model version"},
}

router = APIRouter(
    tags=["faces"],
    dependencies=[Depends(require_api_key), Depends(admitted)],
    responses=IMAGE_ERRORS,
)
ImageFile = Annotated[UploadFile, File(description="JPEG, PNG, WebP, BMP, TIFF, GIF or PGM/PPM")]


@router.post(
    "/enroll",
    response_model=EnrollResponse,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": EnrollResponse, "description": "already enrolled (created: false)"},
        404: SUBJECT_ERRORS[404],
        409: {"model": ErrorResponse, "description": "the image is enrolled for the subject with another face"},
    },
    summary="Add a face to a subject (created if new)",
    dependencies=[form_fields(EnrollForm, "image")],
)
async def enroll(
    request: Request,
    response: Response,
    service: ServiceDep,
    settings: SettingsDep,
    image: ImageFile,
    form: Annotated[EnrollForm, Form()],
) -> EnrollResponse:
    """Store one face of the image under the subject. A photo with several faces is refused unless ``face``
    says which. The same image bytes for the same subject return the stored face with ``created: false``
    (a subject holds one face per image: a ``face`` box pointing at another face of it is a 409)."""
    ref = subject_ref(form.subject, form.subject_id)
    selector = FaceSelector.parse(form.face, "single")
    data = await read_upload(image, settings)
    # FaceService.enroll's steps, the store's on the store's threads and the model's on the inference threads
    digest = await run_db(sha256, data)
    found = await run_db(service.find_enrolled, ref, digest)
    if found is not None:  # a repeat: the model only checks a face box or re-embeds a face of other weights
        redone = None
        if service.repeat_needs_model(found, selector):
            redone = await run_cpu(request, service.repeat_face, found, data, selector)
        result = await run_write(request, service.repeated, ref, digest, data, found, redone, form.metadata)
    else:
        face = await run_cpu(request, service.one_face, data, selector)
        result = await run_write(request, service.store_face, ref, digest, data, face, form.metadata)
    if not result.created:
        response.status_code = status.HTTP_200_OK
    return EnrollResponse(
        face_id=result.face.id,
        created=result.created,
        subject=SubjectOut.of(result.subject),
        box=list(result.face.box),
        quality=result.face.quality,
        model_version=result.face.model_version,
        image_sha256=result.face.image_sha256,
    )


@router.post("/verify", response_model=VerifyResponse, responses=SUBJECT_ERRORS, summary="1:1 - is this the subject?",
             dependencies=[form_fields(VerifyForm, "image")])
async def verify(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    image: ImageFile,
    form: Annotated[VerifyForm, Form()],
) -> VerifyResponse:
    """Compare the image's face (the largest by default) with the subject's most similar stored face, against
    the weights' calibrated threshold for ``far`` (or an explicit ``threshold``)."""
    ref = subject_ref(form.subject, form.subject_id)
    selector = FaceSelector.parse(form.face, "largest")
    threshold = service.threshold(form.threshold, form.far)
    data = await read_upload(image, settings)
    result = await run_cpu(request, service.verify, data, ref, selector, threshold)
    return VerifyResponse(
        match=result.match,
        similarity=round(result.similarity, 4),
        **threshold_fields(threshold),
        subject=SubjectOut.of(result.subject),
        face=DetectedFaceOut.of(result.face),
        matched_face_id=result.matched_face_id,
        model_version=service.model_version,
    )


@router.post("/identify", response_model=IdentifyResponse, summary="1:N - who are the faces in this image?",
             dependencies=[form_fields(IdentifyForm, "image")])
async def identify(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    image: ImageFile,
    form: Annotated[IdentifyForm, Form()],
) -> IdentifyResponse:
    """For every face in the image, the ``k`` most similar subjects (each ranked by its most similar face),
    and whether the best one reaches the threshold."""
    threshold = service.threshold(form.threshold, form.far)
    data = await read_upload(image, settings)
    results = await run_cpu(request, service.identify, data, form.k)
    faces = []
    for face, hits in results:
        candidates = [Candidate.of(h) for h in hits]
        match = bool(hits) and hits[0].similarity >= threshold.value
        faces.append(
            IdentifiedFace(
                face=DetectedFaceOut.of(face),
                match=match,
                best=candidates[0] if match else None,
                candidates=candidates,
            )
        )
    return IdentifyResponse(faces=faces, **threshold_fields(threshold), model_version=service.model_version)


@router.post("/compare", response_model=CompareResponse, summary="Are two photos the same person? (no gallery)",
             dependencies=[form_fields(CompareForm, "image1", "image2")])
async def compare(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    image1: ImageFile,
    image2: ImageFile,
    form: Annotated[CompareForm, Form()],
) -> CompareResponse:
    threshold = service.threshold(form.threshold, form.far)
    sel1, sel2 = FaceSelector.parse(form.face1, "largest", "face1"), FaceSelector.parse(form.face2, "largest", "face2")
    data1, data2 = await read_upload(image1, settings, "image1"), await read_upload(image2, settings, "image2")
    result = await run_cpu(request, service.compare, data1, data2, sel1, sel2, threshold)
    return CompareResponse(
        match=result.match,
        similarity=round(result.similarity, 4),
        **threshold_fields(threshold),
        face1=DetectedFaceOut.of(result.face1),
        face2=DetectedFaceOut.of(result.face2),
        model_version=service.model_version,
    )


@router.post("/embed", response_model=EmbedResponse, summary="Every face in an image with its embedding",
             dependencies=[form_fields("image")])
async def embed(request: Request, service: ServiceDep, settings: SettingsDep, image: ImageFile) -> EmbedResponse:
    """Detected faces (an empty list if none) with their unit-vector embeddings; nothing is stored."""
    data = await read_upload(image, settings)
    faces = await run_cpu(request, service.embed, data)
    return EmbedResponse(
        model_version=service.model_version,
        dim=service.pipeline.embedder.dim,
        faces=[EmbeddedFace(**f.summary(), embedding=[round(float(v), 6) for v in f.embedding]) for f in faces],
    )
