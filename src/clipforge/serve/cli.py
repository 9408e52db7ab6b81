"""``clipforge serve``: arguments only (FastAPI is imported when the command runs)."""
from __future__ import annotations

import argparse

from ..argtypes import port, positive_float
from ..inference import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve an indexed collection: a web page at / (search, drag-and-drop classification and, with "
                     "--mapping, captions and questions), a JSON API (/search, /search/image, /classify, /embed, "
                     "/health, and /caption, /ask with --mapping; schema at /docs), and clip-retrieval's back-end API "
                     "(/knn-service, /metadata, /indices-list: its ClipClient works unchanged). Binds 127.0.0.1 unless "
                     "--host says otherwise.")
    p.add_argument("folder", help="a folder written by clipforge embed + clipforge index build")
    add_model_arguments(p, recorded=True)
    p.add_argument("--host", default="127.0.0.1", help="[127.0.0.1: this machine only]")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--max-upload-mb", type=positive_float, default=10.0)
    p.add_argument("--index-in-memory", action="store_true",
                   help="read the IVF-PQ index into RAM instead of memory-mapping it (faster first queries, more RSS)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from this origin call the API from a browser (CORS), e.g. "
                        "http://localhost:8080 for a `clip-retrieval front` pointed at this server; repeatable "
                        "[none: only this server's own page]")
    p.add_argument("--mapping", help="a LiMBer map (the --output folder of clipforge caption train): adds /caption "
                                     "for uploads, /item/ID/caption for the collection, /ask (a question about an "
                                     "upload), and both on the page")
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from ..inference import load_from_args
    from .app import create_app

    captioner = None
    if args.mapping:  # first: a bad map fails before the collection's model loads
        from ..captioning.captioner import Captioner

        captioner = Captioner.load(args.mapping, args.device)
    model = load_from_args(args, collection=args.folder)
    app = create_app(args.folder, *model, max_upload_bytes=int(args.max_upload_mb * 2**20),
                     index_in_memory=args.index_in_memory, captioner=captioner, allow_origins=args.allow_origin)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
