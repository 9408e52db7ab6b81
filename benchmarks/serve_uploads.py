"""Uploads of large photos to the server: decoded off the event loop (and reduced for the model, as `embed` decodes)
against decoding each on the event loop in full, which every other request waited on.

    git worktree add /tmp/clipforge-before 81b69fe      # the code before, for the peer rows
    python benchmarks/serve_uploads.py runs/flickr8k/checkpoints/step-00002400 --before /tmp/clipforge-before \\
        --json runs/bench/serve-uploads.json

Flickr8k test (1,000 photos) embedded with the checkpoint and indexed in a temporary folder; `clipforge serve` on it
in a process of its own, once per source tree (this one; `--before`'s `src`, taking precedence on PYTHONPATH).
Queries over loopback: 12-megapixel JPEG uploads (coco-mini mosaics, as in benchmarks/reduced_decode.py) to
`/search/image`, and text queries (dev captions) to `/search`; first each kind alone, one at a time, then the text
queries while two clients upload without pause. Medians and 99th percentiles, milliseconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from report import finish, free_port, machine
from reduced_decode import phone_photos

REPO = Path(__file__).resolve().parents[1]


def percentiles(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"p50": round(statistics.median(ordered), 1), "p99": round(ordered[int(0.99 * (len(ordered) - 1))], 1),
            "n": len(ordered)}


def measure(src: Path, collection: Path, photos: list[bytes], queries: list[str]) -> dict:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(src / "src")}
    server = subprocess.Popen([sys.executable, "-m", "clipforge.cli", "serve", str(collection), "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            for _ in range(600):
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)

            def upload(client, i: int) -> float:
                started = time.perf_counter()
                client.post("/search/image", files={"file": ("photo.jpg", photos[i % len(photos)])},
                            data={"k": "10"}).raise_for_status()
                return 1000 * (time.perf_counter() - started)

            def text(client, q: str) -> float:
                started = time.perf_counter()
                client.get("/search", params={"q": q, "k": 10}).raise_for_status()
                return 1000 * (time.perf_counter() - started)

            for i in range(3):  # warm: the batchers' threads, the model's first calls
                upload(client, i), text(client, queries[i])
            report = {"upload alone": percentiles([upload(client, i) for i in range(24)]),
                      "text alone": percentiles([text(client, q) for q in queries])}
            stop, uploads = threading.Event(), []

            def uploader(offset: int):
                with httpx.Client(base_url=base, timeout=60) as own:
                    i = offset
                    while not stop.is_set():
                        uploads.append(upload(own, i))
                        i += 1

            threads = [threading.Thread(target=uploader, args=(k,)) for k in range(2)]
            for thread in threads:
                thread.start()
            time.sleep(0.5)
            report["text during uploads"] = percentiles([text(client, q) for q in queries])
            stop.set()
            for thread in threads:
                thread.join()
            report["uploads during text"] = percentiles(uploads)
        return report
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--before", help="a checkout of the code to compare with (its src/ is run)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--coco", default=str(REPO.parent / "shared" / "data" / "coco-mini" / "test"))
    p.add_argument("--photos", type=int, default=8)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args()
    from clipforge.data.sources import open_source
    from clipforge.preprocess import open_image
    from clipforge.retrieval.collection import item_captions, item_image_bytes

    report = {"machine": machine()}
    queries = [item_captions(item)[0]
               for item in open_source(str(Path(args.data) / "dev"), shuffle_buffer=0).catalogue()[:args.queries]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        coco = [open_image(item_image_bytes(item)[0]).convert("RGB")
                for item in open_source(args.coco, shuffle_buffer=0).catalogue()]
        photos = [path.read_bytes() for path in phone_photos(work / "photos", coco, args.photos)]
        collection = work / "collection"
        subprocess.run([sys.executable, "-m", "clipforge.cli", "end2end", str(Path(args.data) / "test"),
                        str(collection), "--pretrained", args.checkpoint, "--no-serve", "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        report["now"] = measure(REPO, collection, photos, queries)
        if args.before:
            report["before"] = measure(Path(args.before), collection, photos, queries)
    finish(report, args.json)


if __name__ == "__main__":
    main()
