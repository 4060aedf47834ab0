"""Uploads: a researcher's own responses files (the public ``1_generate.py`` JSONL), put in
the artifact store so a job's ``--responses`` can read them wherever its workers run.

``PUT /uploads/responses/{upload}/{persona}`` takes one persona's file as the raw body, checks
every line (a 422 names the file, line and field) and stores it as
``uploads/<upload>/<persona>.jsonl`` (:func:`app.responses.store_upload`); the job is then
submitted with ``params.responses = "uploads/<upload>"``, which the submit checks covers
every persona of the job. The upload id is a digest of the files (``upload_id``), so a
retried upload is a no-op and other content under the same name is refused (409).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.concurrency import run_in_threadpool

from app import responses
from app.api.deps import Auth, StoreDep
from app.api.schemas import UploadOut
from app.errors import UploadTooLarge

router = APIRouter(prefix="/uploads", tags=["uploads"], dependencies=[Auth])

Upload = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$",
                             description="app.responses.upload_id of the upload's files")]
Persona = Annotated[str, Path(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$",
                              description="the persona the file holds responses of")]


async def _body(request: Request, *, name: str, limit: int) -> bytes:
    """The raw body, refused as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise UploadTooLarge(f"{name} is over {limit} bytes", field=name,
                                 hint=f"at most {limit} bytes a persona")
        chunks.append(chunk)
    return b"".join(chunks)


@router.put("/responses/{upload}/{persona}", response_model=UploadOut, responses={
    401: {"description": "no or bad token"}, 409: {"description": "other content there"},
    413: {"description": "too large"},
    422: {"description": "a bad line: `message` names the file, line and field"}})
async def put_responses(upload: Upload, persona: Persona, request: Request,
                        store: StoreDep) -> UploadOut:
    data = await _body(request, name=f"{persona}.jsonl", limit=responses.MAX_UPLOAD_BYTES)
    out = await run_in_threadpool(responses.store_upload, store, upload=upload,
                                  persona=persona, data=data)
    return UploadOut(**out)
