"""The FastAPI app: search by text or image, zero-shot classification, embeddings, thumbnails, a web page, and
with a LiMBer map (``serve --mapping``) generated captions of uploads and of the collection's images and answers to
questions about an upload. One server may hold several collections (``create_collections_app``): each request names
one with ``?collection=NAME`` (clip-retrieval's ``indice_name``), the first by default; collections embedded by the
same model share it.

Every input is bounded (query length, k, number of labels, upload bytes, decoded pixels) and every bad request gets
a 4xx JSON error naming the problem. Thumbnails are addressed by index id, never by path, so nothing outside the
indexed collection can be read. Concurrent requests are batched on the model by small asyncio queues.
"""
from __future__ import annotations

import asyncio
import io
import re
import threading
from collections import OrderedDict
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import quote

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from ..preprocess import BadImageError, Decoding, open_image
from ..prompts import parse_templates, prompt_texts
from ..retrieval.collection import item_captions, item_from_path, load_item, other_fields
from ..retrieval.search import Searcher
from ..zeroshot import class_probabilities, class_weights
from .clip_retrieval_api import add_routes as add_clip_retrieval_routes
from .limits import (CAPTION_TOKENS, CAPTIONS_KEPT, MAX_ANSWER_TOKENS, MAX_DEPTH, MAX_K, MAX_LABELS, MAX_NEW_TOKENS,
                     MAX_PIXELS, MAX_PROMPT_CHARS, MAX_QUERY_CHARS, MAX_QUESTION_CHARS, MAX_TEXTS, THUMB_SIZES)

DEDUP_HELP = "leave out near-duplicates of better results at this cosine similarity or more, e.g. 0.95"
MODALITY_HELP = ("image: search the images; text: the captions (a collection embedded with --captions, its caption "
                 "index built), each result the image whose caption matches")
COLLECTION_HELP = "which collection, where the server holds several (/health lists them) [the first]"
COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # safe in a URL and a file name as it is


def check_collection_name(name: str) -> str:
    if not COLLECTION_NAME.fullmatch(name):
        raise ValueError(f"collection name {name!r}: letters, digits, '_', '.' and '-' only (at most 64, the first "
                         "a letter or digit)")
    return name


def default_collection_name(folder: str | Path) -> str:
    """A collection's name when none is given: its folder's, other characters as '-' ("my photos" -> "my-photos")."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(folder).resolve().name).lstrip("_.-")[:64]
    return name or "collection"


class Hit(BaseModel):
    id: int
    score: float
    caption: str
    width: int
    height: int
    name: str
    thumbnail: str = Field(description="where to see the image: this server's view of it, or for an image the "
                                       "collection does not hold (adopted from clip-retrieval) its web address")


class SearchResponse(BaseModel):
    results: list[Hit]


class Item(BaseModel):
    id: int
    name: str
    width: int
    height: int
    captions: list[str]
    url: str = Field("", description="the image's web address where the collection holds no copy of it")
    metadata: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="its other fields, where the collection keeps some (adopted from "
                                          "clip-retrieval: status, exif, ...)")


class LabelProbability(BaseModel):
    label: str
    probability: float


class ClassifyResponse(BaseModel):
    labels: list[LabelProbability]


class CaptionResponse(BaseModel):
    caption: str


class AnswerResponse(BaseModel):
    answer: str


class EmbedRequest(BaseModel):
    texts: list[str] = Field(..., min_length=1, max_length=MAX_TEXTS)


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]


class Served(NamedTuple):
    """One collection on the server: its searcher, and the batched coroutines its requests go through."""
    name: str
    searcher: Searcher
    embed_text: object  # async (str) -> vector, batched per model
    embed_image: object  # async (PIL image) -> vector, batched per model
    search: object  # async ((vector, k, dedup, offset, modality)) -> hits, batched per collection
    batchers: dict  # "text", "image", "search" -> Batcher


class Batcher:
    """Collects concurrent calls for a few milliseconds and runs them through ``fn`` as one batch, in a thread.

    A worker task runs only while calls are waiting and ends when the queue is empty, so no task is left pending
    when an event loop closes (test clients, reloads).
    """

    def __init__(self, fn, max_batch: int = 64, wait_s: float = 0.005):
        self.fn, self.max_batch, self.wait_s = fn, max_batch, wait_s
        self.batch_sizes: list[int] = []  # observability: how well concurrent requests were batched
        self.queue: asyncio.Queue | None = None
        self.loop = self.worker = None

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # first call, or a new event loop
            self.loop, self.queue, self.worker = loop, asyncio.Queue(), None
        future = loop.create_future()
        self.queue.put_nowait((item, future))
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._drain(self.queue))
        return await future

    async def _drain(self, queue: asyncio.Queue):
        loop = asyncio.get_running_loop()
        while not queue.empty():
            batch = [queue.get_nowait()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            self.batch_sizes.append(len(batch))
            try:
                results = await loop.run_in_executor(None, self.fn, [item for item, _ in batch])
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
            except Exception as exc:  # hand the error to every waiting request
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)


def create_app(folder: str | Path, model, preprocess, tokenizer, max_upload_bytes: int = 10 * 2**20,
               index_in_memory: bool = False, captioner=None, allow_origins: list[str] = ()) -> FastAPI:
    """The app over one collection, named after its folder (``default_collection_name``). ``captioner``: a ``captioning.Captioner`` (a trained
    LiMBer map) to serve /caption, /item/{id}/caption and /ask; without one those endpoints answer 404 saying how to
    turn them on. ``allow_origins``: the web origins whose pages may call the API from a browser (CORS); none by
    default, so other sites cannot read the collection."""
    return create_collections_app({default_collection_name(folder): (folder, (model, preprocess, tokenizer))},
                                  max_upload_bytes, index_in_memory, captioner, allow_origins)


def create_collections_app(collections: dict, max_upload_bytes: int = 10 * 2**20, index_in_memory: bool = False,
                           captioner=None, allow_origins: list[str] = ()) -> FastAPI:
    """The app over several collections: ``{name: (folder, (model, preprocess, tokenizer))}``, the first the
    default. Collections given the same model object share its batchers (one model call embeds queries for all)."""
    if not collections:
        raise ValueError("no collection to serve")
    for name in collections:
        check_collection_name(name)
    app = FastAPI(title="clipforge", description="Search, classify and caption images with a CLIP model.")
    if allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    lock = threading.Lock()  # one model call at a time; batching keeps it busy

    def search_batch(searcher):
        def run(requests):
            """One index search for concurrent queries (FAISS scans faster in batches), off the event loop; queries
            are searched together per modality and de-duplication threshold. A request is (vector, k, dedup,
            offset, modality, shown): results offset .. offset + k of the ranking, the first ``shown`` of them
            (those whose metadata is shown) with the caption line that matched a caption search."""
            out = [None] * len(requests)
            for dedup, modality in {(r[2], r[4]) for r in requests}:
                group = [n for n, r in enumerate(requests) if (r[2], r[4]) == (dedup, modality)]
                vectors = np.stack([requests[n][0] for n in group])
                depth = max(requests[n][1] + requests[n][3] for n in group)
                for n, found in zip(group, searcher.search_vectors(vectors, depth, dedup, modality,
                                                                   matched_lines=False)):
                    vector, k, _, offset, _, shown = requests[n]
                    found = found[offset:offset + k]
                    out[n] = searcher.with_matched_lines(vector, found[:shown]) + found[shown:] \
                        if modality == "text" else found
            return out
        return run

    def encoders(searcher):
        def texts(batch):
            with lock:
                return list(searcher.embed_texts(batch))

        def images(batch):
            with lock:
                return list(searcher.embed_images(batch))
        return Batcher(texts), Batcher(images, max_batch=16)

    served: dict[str, Served] = {}
    by_model: dict[int, tuple[Batcher, Batcher]] = {}
    for name, (folder, (model, preprocess, tokenizer)) in collections.items():
        searcher = Searcher(folder, model, preprocess, tokenizer, in_memory=index_in_memory)
        searcher.model_lock = lock  # its caption lines are embedded under the server's one model lock
        if id(model) not in by_model:
            by_model[id(model)] = encoders(searcher)
        text_batcher, image_batcher = by_model[id(model)]
        search_batcher = Batcher(search_batch(searcher), max_batch=64, wait_s=0.002)
        served[name] = Served(name, searcher, text_batcher.submit, image_batcher.submit, search_batcher.submit,
                              {"text": text_batcher, "image": image_batcher, "search": search_batcher})
    default = next(iter(served.values()))
    several = len(served) > 1

    def in_groups(requests, key, run):
        """``run(group)`` once per group of requests sharing ``key(request)`` (one language-model call each),
        results back in request order. Only a batcher's one worker calls this, so no lock is needed."""
        out = [None] * len(requests)
        for value in dict.fromkeys(map(key, requests)):
            group = [n for n, request in enumerate(requests) if key(request) == value]
            for n, result in zip(group, run([requests[n] for n in group])):
                out[n] = result
        return out

    def caption_batch(requests):  # (image, prompt, max_new_tokens): one call per prompt and length
        return in_groups(requests, lambda r: r[1:], lambda g: captioner.caption([r[0] for r in g], *g[0][1:]))

    def answer_batch(requests):  # (image, question, max_new_tokens): questions of any length together
        return in_groups(requests, lambda r: r[2],
                         lambda g: captioner.answer([r[0] for r in g], [r[1] for r in g], g[0][2]))

    caption_batcher, answer_batcher = Batcher(caption_batch, max_batch=8), Batcher(answer_batch, max_batch=8)
    app.state.batchers = {**default.batchers, "caption": caption_batcher, "answer": answer_batcher}
    app.state.collections = served
    generated: OrderedDict[tuple[str, int], str] = OrderedDict()  # (collection, image id) -> caption, oldest first

    def pick(collection: str | None) -> Served:
        if collection is None:
            return default
        if collection not in served:
            raise HTTPException(404, f"no collection named {collection!r}: this server holds "
                                     f"{', '.join(served)}")
        return served[collection]

    def collection_query():
        return Query(None, max_length=64, description=COLLECTION_HELP)

    def thumb_url(name: str, index: int, size: int | None = None) -> str:
        """A result's image on this server; it names its collection where there are several."""
        params = ([f"size={size}"] if size else []) + ([f"collection={quote(name)}"] if several else [])
        return f"/thumb/{index}" + ("?" + "&".join(params) if params else "")

    def decode_image(data: bytes, name: str, decoding: Decoding | None = None):
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"image larger than the {max_upload_bytes} byte limit")
        if not data:
            raise HTTPException(400, "empty image upload")
        try:
            return open_image(data, name=name, max_pixels=MAX_PIXELS, decoding=decoding).convert("RGB")
        except BadImageError as exc:
            raise HTTPException(400, str(exc)) from None

    async def decoded(data: bytes, name: str, where: Served | None = None):
        """``data`` decoded in a worker thread, not on the event loop, which every other request would wait on (a
        12-megapixel photo takes ~100 ms); upright, and for ``where``'s model a large JPEG reduced, as ``embed``
        decodes it (``Decoding.for_model``)."""
        decoding = Decoding.for_model(where.searcher.preprocess) if where is not None else Decoding()
        return await asyncio.get_running_loop().run_in_executor(None, decode_image, data, name, decoding)

    async def read_image(upload: UploadFile, where: Served | None = None):
        return await decoded(await upload.read(max_upload_bytes + 1), upload.filename or "upload", where)

    def hits(results, where: Served) -> dict:
        return {"results": [{"id": h["id"], "score": h["score"], "caption": h.get("caption") or "",
                             "width": int(h.get("width") or 0), "height": int(h.get("height") or 0),
                             "name": Path(str(h["path"])).name,
                             "thumbnail": h.get("url") or thumb_url(where.name, h["id"])}
                            for h in results]}

    def summary(where: Served) -> dict:
        return {"images": where.searcher.index.ntotal, "index": where.searcher.info.get("kind"),
                "captions_indexed": where.searcher.captions_indexed}

    @app.get("/health")
    def health() -> dict:
        """The server's state: the default collection's size, index kind and caption index at the top level (as
        with one collection), every collection under ``collections``, and whether captioning is on."""
        return {"status": "ok", **summary(default), "captioning": captioner is not None,
                "collections": [{"name": where.name, **summary(where)} for where in served.values()]}

    def check_modality(where: Served, modality: str) -> str:
        if modality not in where.searcher.indexes:
            raise HTTPException(400, f"modality {modality!r}: this collection has no caption index (embed it with "
                                     "--captions, then clipforge index build FOLDER)")
        return modality

    def require_captioner() -> None:
        if captioner is None:
            raise HTTPException(404, "captioning is off: start clipforge serve with --mapping (the output folder "
                                     "of clipforge caption train)")

    def check_depth(offset: int, k: int) -> None:
        if offset + k > MAX_DEPTH:
            raise HTTPException(422, f"offset + k: at most {MAX_DEPTH} results deep")

    def known(where: Served, index: int) -> int:
        if not 0 <= index < where.searcher.index.ntotal:
            raise HTTPException(404, f"no image with id {index} in the collection")
        return index

    def collection_image(where: Served, index: int, decoding: Decoding = Decoding()):
        """Image ``index`` of the collection in RGB, upright (``decoding``: a JPEG reduced too), or a 404 when its
        file or shard can no longer be read."""
        try:
            image, _ = load_item(item_from_path(str(where.searcher.rows[index]["path"])), decoding)
            return image.convert("RGB")
        except (BadImageError, OSError, KeyError, StopIteration):
            raise HTTPException(404, f"image {index} is no longer readable") from None

    @app.get("/search", response_model=SearchResponse)
    async def search(q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS),
                     k: int = Query(10, ge=1, le=MAX_K),
                     offset: int = Query(0, ge=0, le=MAX_DEPTH, description="skip this many results (paging)"),
                     dedup: float | None = Query(None, gt=0, le=1, description=DEDUP_HELP),
                     modality: Literal["image", "text"] = Query("image", description=MODALITY_HELP),
                     collection: str | None = collection_query()):
        if not q.strip():
            raise HTTPException(400, "q: the query is blank; give words to search for")
        where = pick(collection)
        check_depth(offset, k)
        check_modality(where, modality)
        vector = await where.embed_text(q)
        return hits(await where.search((vector, k, dedup, offset, modality, k)), where)

    @app.get("/search/similar", response_model=SearchResponse)
    async def search_similar(id: int = Query(..., description="an image of the collection: find more like it"),
                             k: int = Query(10, ge=1, le=MAX_K),
                             offset: int = Query(0, ge=0, le=MAX_DEPTH, description="skip this many results"),
                             dedup: float | None = Query(None, gt=0, le=1, description=DEDUP_HELP),
                             collection: str | None = collection_query()):
        where = pick(collection)
        check_depth(offset, k)
        vector = where.searcher.stored.get([known(where, id)])[0]  # its own stored embedding: nothing to embed
        return hits(await where.search((vector, k, dedup, offset, "image", k)), where)

    @app.post("/search/image", response_model=SearchResponse)
    async def search_image(file: UploadFile = File(...), k: int = Form(10, ge=1, le=MAX_K),
                           dedup: float | None = Form(None, gt=0, le=1, description=DEDUP_HELP),
                           modality: Literal["image", "text"] = Form("image", description=MODALITY_HELP),
                           collection: str | None = collection_query()):
        where = pick(collection)
        check_modality(where, modality)
        vector = await where.embed_image(await read_image(file, where))
        return hits(await where.search((vector, k, dedup, 0, modality, k)), where)

    @app.get("/item/{index}", response_model=Item)
    def item(index: int, collection: str | None = collection_query()):
        """One image of the collection with every caption it has (a sample's text lines, or its sidecar file)."""
        where = pick(collection)
        row = where.searcher.rows[known(where, index)]
        try:
            captions = item_captions(item_from_path(str(row["path"]))) or [row.get("caption") or ""]
        except (OSError, KeyError):  # the file moved since embedding: what the metadata kept
            captions = [row.get("caption") or ""]
        return {"id": index, "name": Path(str(row["path"])).name, "width": int(row.get("width") or 0),
                "height": int(row.get("height") or 0), "captions": [c for c in captions if c],
                "url": row.get("url") or "", "metadata": other_fields(row)}

    @app.post("/classify", response_model=ClassifyResponse)
    async def classify(file: UploadFile = File(...), labels: str = Form(..., max_length=20_000),
                       templates: str = Form("a photo of a {}.", max_length=5_000),
                       collection: str | None = Query(None, max_length=64,
                                                      description="classify with this collection's model")):
        where = pick(collection)
        names = [name.strip() for name in labels.replace("\n", ",").split(",") if name.strip()]
        if not names:
            raise HTTPException(400, "labels: give at least one class name (comma-separated)")
        if len(names) > MAX_LABELS:
            raise HTTPException(400, f"labels: at most {MAX_LABELS} class names")
        try:
            prompts = parse_templates(templates.split("\n"), "templates")
        except ValueError as exc:
            raise HTTPException(400, f"{exc}; one per line, each with {{}} where the label goes") from None
        image_vector = await where.embed_image(await read_image(file, where))
        text_vectors = await asyncio.gather(*(where.embed_text(t) for t in prompt_texts(names, prompts)))
        weights = class_weights(torch.from_numpy(np.stack(text_vectors)), len(names))
        probs = class_probabilities(where.searcher.model, torch.from_numpy(image_vector)[None], weights)[0].tolist()
        ranked = sorted(zip(names, probs), key=lambda pair: -pair[1])
        return {"labels": [{"label": n, "probability": p} for n, p in ranked]}
    @app.post("/caption", response_model=CaptionResponse)
    async def caption(file: UploadFile = File(...),
                      prompt: str | None = Form(None, max_length=MAX_PROMPT_CHARS,
                                                description="text after the image, e.g. 'A picture of' [the map's "
                                                            "own training prompt]"),
                      max_new_tokens: int = Form(CAPTION_TOKENS, ge=1, le=MAX_NEW_TOKENS)):
        """A caption of the uploaded image, generated by the LiMBer map's language model."""
        require_captioner()
        image = await read_image(file)
        return {"caption": await caption_batcher.submit((image, prompt, max_new_tokens))}

    @app.post("/ask", response_model=AnswerResponse)
    async def ask(file: UploadFile = File(...), question: str = Form(..., max_length=MAX_QUESTION_CHARS),
                  max_new_tokens: int = Form(5, ge=1, le=MAX_ANSWER_TOKENS)):
        """A short answer to a question about the uploaded image (zero-shot, asked as "Q: ... A:" after it)."""
        require_captioner()
        if not question.strip():
            raise HTTPException(400, "question: ask something about the image")
        image = await read_image(file)
        return {"answer": await answer_batcher.submit((image, question.strip(), max_new_tokens))}

    @app.get("/item/{index}/caption", response_model=CaptionResponse)
    async def item_caption(index: int, collection: str | None = collection_query()):
        """A generated caption of one image of the collection (its own prompt and length; kept once made)."""
        require_captioner()
        where = pick(collection)
        key = (where.name, known(where, index))
        if key in generated:
            generated.move_to_end(key)
            return {"caption": generated[key]}
        image = await asyncio.get_running_loop().run_in_executor(None, collection_image, where, index)
        text = await caption_batcher.submit((image, None, CAPTION_TOKENS))
        generated[key] = text
        while len(generated) > CAPTIONS_KEPT:
            generated.popitem(last=False)
        return {"caption": text}

    @app.post("/embed", response_model=EmbedResponse)
    async def embed(request: EmbedRequest, collection: str | None = Query(
            None, max_length=64, description="embed with this collection's model")):
        where = pick(collection)
        if any(len(t) > MAX_QUERY_CHARS for t in request.texts):
            raise HTTPException(400, f"texts: each at most {MAX_QUERY_CHARS} characters")
        vectors = await asyncio.gather(*(where.embed_text(t) for t in request.texts))
        return {"embeddings": [v.tolist() for v in vectors]}

    @app.post("/embed/image", response_model=EmbedResponse)
    async def embed_image(file: UploadFile = File(...), collection: str | None = Query(
            None, max_length=64, description="embed with this collection's model")):
        where = pick(collection)
        return {"embeddings": [(await where.embed_image(await read_image(file, where))).tolist()]}

    @lru_cache(maxsize=2048)
    def thumbnail(name: str, index: int, size: int) -> bytes:
        image = collection_image(served[name], index, Decoding(2 * size))  # as Image.thumbnail's draft (gap 2)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    @app.get("/thumb/{index}", responses={200: {"content": {"image/jpeg": {}}},
                                           307: {"description": "to the image's web address (no copy here)"}})
    def thumb(index: int, size: int = Query(THUMB_SIZES[0], description=f"one of {THUMB_SIZES} pixels"),
              collection: str | None = collection_query()):
        where = pick(collection)
        if not 0 <= index < len(where.searcher.rows):
            raise HTTPException(404, f"no image with id {index} in the collection")
        if size not in THUMB_SIZES:
            raise HTTPException(422, f"size: one of {', '.join(map(str, THUMB_SIZES))}")
        url = str(where.searcher.rows[index].get("url") or "")
        if url.startswith(("https://", "http://")):  # an adopted image kept only as its web address: no copy here
            return RedirectResponse(url, status_code=307)
        return Response(thumbnail(where.name, index, size), media_type="image/jpeg")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return (resources.files(__package__) / "index.html").read_text()

    add_clip_retrieval_routes(app, served, thumb_url, decoded, max_upload_bytes)
    return app
