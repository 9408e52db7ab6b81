"""``clipforge serve``: arguments only (FastAPI is imported when the command runs)."""
from __future__ import annotations

import argparse
import json
import os

from ..argtypes import port, positive_float
from ..inference import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve an indexed collection: a web page at / (search, drag-and-drop classification and, with "
                     "--mapping, captions and questions), a JSON API (/search, /search/image, /classify, /embed, "
                     "/health, and /caption, /ask with --mapping; schema at /docs), and clip-retrieval's back-end API "
                     "(/knn-service, /metadata, /indices-list: its ClipClient works unchanged). Binds 127.0.0.1 unless "
                     "--host says otherwise. Several collections: one server, a collection chosen per request "
                     "(?collection=NAME, clip-retrieval's indice_name, a menu on the page), the first by default; "
                     "each is searched with the model that embedded it, loaded once for all that share it.")
    p.add_argument("folders", nargs="+", metavar="[NAME=]FOLDER",
                   help="a folder written by clipforge embed + clipforge index build; several for several "
                        "collections, each named after its folder unless NAME= says otherwise")
    add_model_arguments(p, recorded=True)
    add_server_arguments(p)
    p.set_defaults(func=run)


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """Where the server listens and what it adds besides search (serve's options, end2end's too)."""
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


def add_end2end_arguments(p: argparse.ArgumentParser) -> None:
    from ..argtypes import fraction
    from ..retrieval.cli import add_embed_arguments

    add_embed_arguments(p)
    p.description = ("clip-retrieval's end2end for images you have: embed them (a folder, a CSV or shards) into\n"
                     "OUTPUT, build its index, and serve it (the page, the JSON API, clip-retrieval's back end), as\n"
                     "`clipforge embed`, `index build` and `serve` would one after another. Run it again after adding\n"
                     "images: only those are embedded and added to the index. Interrupted, it loses nothing: embed\n"
                     "continues at its first missing shard.")
    p.epilog = ("examples:\n"
                "  clipforge end2end photos/ photos-search/ --pretrained CKPT          then open http://127.0.0.1:8000\n"
                "  clipforge end2end shards/{000000..000009}.tar emb/ --pretrained CKPT --captions --no-serve")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--target-recall", type=fraction, default=0.95,
                   help="the index's recall@10 against exact search (index build's) [0.95]")
    p.add_argument("--no-serve", dest="serve", action="store_false", help="embed and index, then stop")
    add_server_arguments(p)
    p.set_defaults(func=run_end2end)


def check_port_free(host: str, port: int) -> None:
    """A clear error now where another server holds ``host:port`` (uvicorn would say so only once serving)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no bar
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); another server may "
                             "hold it: choose another --port") from None


def run_end2end(args) -> int:
    """embed, index build, serve: each step as its own command runs it (index build with its defaults), the model
    loaded once for the embedding and the server."""
    from ..inference import load_from_args
    from ..retrieval.cli import add_index_arguments, run_embed, run_index

    if args.serve:  # what would stop the server, found before the embedding rather than after it
        if args.mapping and not os.path.isdir(args.mapping):
            raise ValueError(f"--mapping {args.mapping}: no such folder (the --output folder of clipforge caption "
                             "train)")
        check_port_free(args.host, args.port)
    loaded = load_from_args(args)
    run_embed(args, loaded)
    index_parser = argparse.ArgumentParser(prog="clipforge end2end")
    add_index_arguments(index_parser)
    run_index(index_parser.parse_args(["build", args.output, "--target-recall", str(args.target_recall),
                                       *([] if args.progress else ["--quiet"])]))
    if not args.serve:
        return 0
    args.folders = [args.output]
    return run(args, loaded)


def named_folders(values: list[str]) -> dict[str, str]:
    """``[NAME=]FOLDER`` arguments as {name: folder}, in order: an existing path is a folder even with a "=" in it;
    a name defaults to the folder's own (``default_collection_name``). Two collections of one name are an error
    naming the fix."""
    from .app import check_collection_name, default_collection_name

    collections: dict[str, str] = {}
    for value in values:
        name, given, folder = value.partition("=")
        if not given or os.path.exists(value):
            name, folder = default_collection_name(value), value
        if name in collections:
            raise ValueError(f"two collections named {name!r}: name them, e.g. {name}-2={folder}")
        collections[check_collection_name(name)] = folder
    return collections


def load_models(args, folders: dict[str, str], given: tuple | None = None) -> dict[str, tuple]:
    """Each collection's (model, preprocess, tokenizer): the --model/--pretrained given (``given``: that model,
    loaded already), else what it recorded; loaded once for all the collections that name the same one."""
    from ..inference import load_from_args
    from ..retrieval.collection import check_collection, model_spec
    from ..retrieval.probe import warn_if_other_weights

    for folder in folders.values():  # every folder checked before any model loads
        check_collection(folder)
    loaded: dict[str, tuple] = {} if given is None else {"given": given}
    models = {}
    for name, folder in folders.items():
        key = "given" if given is not None or args.model or args.pretrained else \
            json.dumps(model_spec(folder), sort_keys=True)
        if key in loaded:
            warn_if_other_weights(folder, *loaded[key])
        else:
            loaded[key] = load_from_args(args, collection=folder)
        models[name] = loaded[key]
    return models


def run(args, loaded: tuple | None = None) -> int:
    """``loaded``: the model the flags name, already loaded (end2end's, which embedded the one collection)."""
    import uvicorn

    from .app import create_collections_app

    folders = named_folders(args.folders)
    if loaded is None:  # end2end checked before embedding; here before any model loads (uvicorn says so only after)
        check_port_free(args.host, args.port)
    captioner = None
    if args.mapping:  # first: a bad map fails before the collection's model loads
        from ..captioning.captioner import Captioner

        captioner = Captioner.load(args.mapping, args.device)
    models = load_models(args, folders, loaded)
    app = create_collections_app({name: (folder, models[name]) for name, folder in folders.items()},
                                 max_upload_bytes=int(args.max_upload_mb * 2**20),
                                 index_in_memory=args.index_in_memory, captioner=captioner,
                                 allow_origins=args.allow_origin)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
