"""clip-retrieval's back-end API over a clipforge collection: ``POST /knn-service``, ``POST /metadata`` and
``GET /indices-list``, the calls ``clip_retrieval.clip_client.ClipClient`` and scripts written for ``clip-retrieval
back`` make, so they run against ``clipforge serve`` unchanged. Each collection the server holds is one of its
indices, chosen by ``indice_name`` (the first where none is given).

Where it differs, on purpose: ``modality`` "text" searches the captions only where the collection has a caption
index (embedded with ``--captions``: its captioned images), and is refused otherwise; ``image_url`` is not fetched,
since the server makes no outbound requests (send the image itself, base64, as ``image``); clipforge has no safety,
violence or aesthetic models, so those fields are accepted and change nothing; a result's ``url`` is the image's
address on this server (a 512 px view; for an image the collection holds no copy of, adopted from clip-retrieval,
the web address it recorded), and it carries ``name``, ``width`` and ``height`` beside ``caption``, never a file
path; the other metadata fields an adopted collection kept (``--enable_metadata``'s) come with it, as clip-retrieval
returns its columns, ``similarity`` always the query's.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..retrieval.collection import other_fields
from .limits import MAX_DEPTH, MAX_K, MAX_METADATA_IDS, MAX_QUERY_CHARS

DEDUP_COSINE = 0.94  # clip-retrieval's threshold for "deduplicate"
MAX_RESULT_IDS = MAX_DEPTH  # how deep a ranking is returned (its page asks for 3,000)


class KnnRequest(BaseModel):
    """A ``/knn-service`` query as ClipClient sends it: exactly one of text, image or embedding_input."""

    model_config = ConfigDict(extra="ignore")
    text: str | None = Field(None, max_length=MAX_QUERY_CHARS)
    image: str | None = Field(None, description="the query image's file bytes, base64")
    image_url: str | None = Field(None, description="not fetched: send the image itself as `image`")
    embedding_input: list[float] | None = Field(None, max_length=8192)
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1, le=MAX_K)
    num_result_ids: int | None = Field(None, ge=1, description=f"ranked ids returned, at most {MAX_RESULT_IDS}; "
                                                                 "the first num_images with their metadata")
    indice_name: str | None = None
    use_mclip: bool = False
    deduplicate: bool = False
    use_safety_model: bool = False  # accepted, no effect (no safety model here)
    use_violence_detector: bool = False  # accepted, no effect
    aesthetic_score: int | str | None = None  # accepted, no effect (no aesthetic embeddings here)
    aesthetic_weight: float | str | None = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: list[int] = Field(..., max_length=MAX_METADATA_IDS)
    indice_name: str | None = None


def _json_body(model: type[BaseModel]) -> dict:
    """The OpenAPI entry of a JSON body read by hand (the schema at /docs, and what schemathesis fuzzes)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def _read_body(request: Request, model: type[BaseModel], limit: int):
    """The request's JSON body as ``model``. ClipClient posts JSON without a Content-Type header, which FastAPI's
    own body parsing refuses, so it is read here: bounded, then validated (a 422 like FastAPI's own)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body over the limit of {limit} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, "the request body is not JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None


def add_routes(app: FastAPI, served: dict, thumb_url, decoded, max_upload_bytes: int) -> None:
    """``served``: the app's collections by name (``app.Served``: a searcher and its batched coroutines), the first
    the default; ``thumb_url(name, id, size)`` an image's address on the server; ``await decoded(bytes, name,
    served_collection)`` the app's bounded image decoder (off the event loop; an HTTP 400 on bad bytes)."""
    import numpy as np

    body_limit = (max_upload_bytes + 2) // 3 * 4 + 65536  # a base64 image at the upload limit, and the other fields

    def pick(indice_name: str | None):
        if indice_name is None:
            return next(iter(served.values()))
        if indice_name not in served:
            raise HTTPException(400, f"indice_name {indice_name!r}: this server holds {', '.join(map(repr, served))} "
                                     "(GET /indices-list)")
        return served[indice_name]

    def fields(request: Request, name: str, row: dict, index: int) -> dict:
        url = row.get("url") or str(request.base_url).rstrip("/") + thumb_url(name, index, 512)
        return {**other_fields(row), "url": url, "caption": row.get("caption") or "",
                "name": Path(str(row["path"])).name, "width": int(row.get("width") or 0),
                "height": int(row.get("height") or 0)}

    @app.get("/indices-list", tags=["clip-retrieval"])
    def indices_list() -> list[str]:
        """The collections this server searches, each named as `clipforge serve` was told (its folder's name by
        default), the default first."""
        return list(served)

    @app.post("/knn-service", tags=["clip-retrieval"], openapi_extra=_json_body(KnnRequest))
    async def knn_service(request: Request) -> list[dict]:
        """Nearest images to a text, an image or an embedding, as clip-retrieval's back-end answers: each result's
        metadata with ``id`` and ``similarity`` (cosine)."""
        query = await _read_body(request, KnnRequest, body_limit)
        where = pick(query.indice_name)
        searcher = where.searcher
        if query.modality not in searcher.indexes:
            raise HTTPException(400, "modality 'text': this collection has no caption index (embed it with "
                                     "--captions, then clipforge index build FOLDER); use 'image'")
        if query.use_mclip:
            raise HTTPException(400, "use_mclip: multilingual CLIP is not available here")
        if query.image_url:
            raise HTTPException(400, "image_url: this server makes no outbound requests; send the image's bytes, "
                                     "base64, as `image`")
        given = [value for value in (query.text, query.image, query.embedding_input) if value not in (None, "", [])]
        if len(given) != 1:
            raise HTTPException(400, "give exactly one of text, image (base64) or embedding_input")
        if query.text:
            vector = await where.embed_text(query.text)
        elif query.image:
            if len(query.image) > (max_upload_bytes + 2) // 3 * 4 + 4:
                raise HTTPException(413, f"image larger than the {max_upload_bytes} byte limit")
            try:
                data = base64.b64decode(query.image, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPException(400, "image: not valid base64") from None
            vector = await where.embed_image(await decoded(data, "image", where))
        else:
            vector = np.asarray(query.embedding_input, dtype=np.float64)
            if vector.shape != (searcher.index.d,) or not all(map(math.isfinite, query.embedding_input)):
                raise HTTPException(400, f"embedding_input: {searcher.index.d} finite numbers expected, got "
                                         f"{len(query.embedding_input)}")
            largest = float(np.abs(vector).max())
            if largest == 0:
                raise HTTPException(400, "embedding_input: a zero vector has no direction to search")
            vector = vector / largest  # first, so that squaring huge values cannot overflow
            vector = (vector / np.linalg.norm(vector)).astype(np.float32)
        # as clip-retrieval: num_result_ids ranked ids (its page fetches their metadata as one scrolls), the first
        # num_images of them with their metadata
        depth = min(max(query.num_result_ids or 0, query.num_images), MAX_RESULT_IDS)
        found = await where.search((vector, depth, DEDUP_COSINE if query.deduplicate else None, 0, query.modality,
                                    query.num_images))
        return [{**(fields(request, where.name, hit, hit["id"]) if rank < query.num_images else {}), "id": hit["id"],
                 "similarity": hit["score"]} for rank, hit in enumerate(found)]

    @app.post("/metadata", tags=["clip-retrieval"], openapi_extra=_json_body(MetadataRequest))
    async def metadata(request: Request) -> list[dict]:
        """The metadata of images by id, as clip-retrieval's back-end returns it."""
        query = await _read_body(request, MetadataRequest, 65536)
        where = pick(query.indice_name)
        unknown = [i for i in query.ids if not 0 <= i < where.searcher.index.ntotal]
        if unknown:
            raise HTTPException(404, f"no image with id {unknown[0]} in the collection")
        return [{"id": i, "metadata": fields(request, where.name, where.searcher.rows[i], i)} for i in query.ids]
