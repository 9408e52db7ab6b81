"""Captions through `clipforge serve --mapping`: latency and throughput of POST /caption on real photos, one client and
several at once (the caption batcher waiting 5 or 50 ms for more requests), beside the same map called directly
in-process (one image at a time, and eight per call); and a few questions about the first photos, answered as /ask
answers them and as `caption vqa` would (``--rounds 0``: the questions only).

    clipforge embed ../shared/data/flickr8k/test runs/flickr8k-test-emb --pretrained CKPT
    clipforge index build runs/flickr8k-test-emb
    python benchmarks/serve_captions.py runs/flickr8k-test-emb --mapping runs/limber-minilm-map \\
        --json runs/bench/serve-captions.json --screenshot docs/img/caption-viewer.jpg

The uploads are the collection's own first photos, re-encoded as JPEG. --screenshot (system Chromium + playwright)
opens the page's larger view of the first result for --query once its generated caption has arrived.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

from search_page import chromium_path, free_port  # beside this script


def percentiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"p50_ms": 1000 * statistics.median(ordered), "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))]}


def collection_photos(folder: str, count: int) -> list:
    from clipforge.retrieval.collection import Metadata, item_from_path, load_item

    rows = Metadata(folder)
    return [load_item(item_from_path(str(rows[i]["path"])))[0].convert("RGB") for i in range(count)]


def jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


QUESTIONS = ["What animal is in the picture?", "What colour is the dog?", "Is it indoors or outdoors?",
             "How many people are there?"]


def ask_both_ways(captioner, images: list, questions: list[str]) -> dict:
    """Each question about every image: answers as /ask gives them, and as caption vqa's rule would (the LM may end
    the text at once), with how many of each are empty."""
    from clipforge.captioning.vqa import answer_batch

    out = {}
    for question in questions:
        served = captioner.answer(images, [question] * len(images))
        features = captioner.encoder.features(images)
        plain = answer_batch(captioner.mapping, captioner.lm, captioner.tokenizer,
                             [(f, question, ()) for f in features], min_new_tokens=0)
        out[question] = {"served": served, "end_allowed_first": plain,
                         "empty_served": served.count(""), "empty_end_allowed_first": plain.count("")}
        print(f"{question}: empty {out[question]['empty_end_allowed_first']}/{len(images)} -> "
              f"{out[question]['empty_served']}/{len(images)}; {served}", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("collection", help="a folder written by clipforge embed + index build")
    parser.add_argument("--mapping", required=True, help="a clipforge caption train output folder")
    parser.add_argument("--images", type=int, default=32, help="photos captioned in each setting [32]")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the loaded setting [8]")
    parser.add_argument("--wait-ms", type=float, nargs="+", default=[5, 50],
                        help="how long the caption batcher waits for more requests, each measured [5 50]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every setting, interleaved [3]")
    parser.add_argument("--questions", nargs="*", default=QUESTIONS, help="each asked about the first "
                        "--question-images photos, answered as /ask does (no end of text before the first token) and "
                        "as caption vqa does (allowed)")
    parser.add_argument("--question-images", type=int, default=6, help="[6]")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--screenshot", type=Path, help="JPEG of the page's larger view with its generated caption")
    parser.add_argument("--query", default="a dog running through water")
    args = parser.parse_args()

    import httpx
    import uvicorn

    from clipforge.captioning.captioner import Captioner
    from clipforge.inference import load_for_inference
    from clipforge.serve.app import create_app

    captioner = Captioner.load(args.mapping)
    model = load_for_inference(None, None, "cpu", False, collection=args.collection)
    photos = collection_photos(args.collection, args.images)
    uploads = [jpeg(photo) for photo in photos]
    from PIL import Image

    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in uploads]  # what the server will see
    questions = ask_both_ways(captioner, photos[:args.question_images], args.questions)

    app = create_app(args.collection, *model, captioner=captioner)
    batcher = app.state.batchers["caption"]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"

    def post(http, data):
        started = time.perf_counter()
        response = http.post("/caption", files={"file": ("photo.jpg", data, "image/jpeg")}, timeout=600)
        response.raise_for_status()
        return response.json()["caption"], time.perf_counter() - started

    def concurrent_clients() -> dict:
        """``--clients`` clients, started together, each sending its share of the uploads one after another."""
        first_batch, times = len(batcher.batch_sizes), []
        ready = threading.Barrier(args.clients + 1)

        def client(share):
            with httpx.Client(base_url=base) as http:
                ready.wait()
                for data in share:
                    times.append(post(http, data)[1])

        threads = [threading.Thread(target=client, args=(uploads[c::args.clients],)) for c in range(args.clients)]
        for t in threads:
            t.start()
        ready.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        sizes = batcher.batch_sizes[first_batch:]
        return {**percentiles(times), "captions_per_s": len(times) / (time.perf_counter() - start),
                "mean_batch": statistics.mean(sizes), "batch_sizes": sizes}

    captioner.caption(decoded[:2])  # warm-up: first-call allocations out of the timings
    rounds, direct = [], None
    for round_ in range(args.rounds):  # the settings interleaved, so that a slow spell of the machine hits all
        times, captions = [], []
        for image in decoded:
            start = time.perf_counter()
            captions += captioner.caption([image])
            times.append(time.perf_counter() - start)
        direct = direct or captions
        row = {"direct_one_at_a_time": {**percentiles(times), "captions_per_s": len(times) / sum(times)}}
        start = time.perf_counter()
        for first in range(0, len(decoded), 8):
            captioner.caption(decoded[first:first + 8])
        row["direct_eight_per_call"] = {"captions_per_s": len(decoded) / (time.perf_counter() - start)}
        for wait_ms in args.wait_ms:
            batcher.wait_s = wait_ms / 1000
            with httpx.Client(base_url=base) as http:
                sequential = [post(http, data) for data in uploads]
            row[f"http_one_client_wait{wait_ms:g}ms"] = {
                **percentiles([t for _, t in sequential]),
                "captions_per_s": len(sequential) / sum(t for _, t in sequential),
                "captions_differing_from_direct": sum(text != d for (text, _), d in zip(sequential, direct))}
            row[f"http_{args.clients}_clients_wait{wait_ms:g}ms"] = concurrent_clients()
        rounds.append(row)
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {figures['captions_per_s']:.2f}/s"
                                                  for name, figures in row.items()), flush=True)

    if args.screenshot:
        take_screenshot(base, args.query, args.screenshot)
    server.should_exit = True
    thread.join(timeout=30)

    medians = {name: {key: statistics.median(r[name][key] for r in rounds) for key in ("p50_ms", "captions_per_s")
                      if key in rounds[0][name]} for name in (rounds[0] if rounds else [])}
    result = {"images": len(uploads), "clients": args.clients, "rounds": rounds, "medians": medians,
              "examples": (direct or [])[:5], "questions": questions}
    print(json.dumps(medians, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def take_screenshot(base: str, query: str, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    browser_path = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(f"{base}/?{urlencode({'q': query})}")
        page.wait_for_selector("#results .result .view")
        page.locator("#results .result .view").first.click()
        page.wait_for_function("document.querySelector('#viewer-generated').textContent.startsWith('generated:')",
                               timeout=120_000)
        page.wait_for_function("document.querySelector('#viewer-image').complete")
        path.parent.mkdir(parents=True, exist_ok=True)
        page.locator("#viewer .panel").screenshot(path=str(path), type="jpeg", quality=82)
        print(f"{query}: {path}")
        browser.close()


if __name__ == "__main__":
    main()
