"""A caption search's results show the caption line that matched: on a collection embedded with `--all-captions`
(each image's caption vector the mean of its five), what that costs the server, and how often the first caption,
which was shown before, is not the line that matched.

    python benchmarks/matched_captions.py runs/flickr8k/checkpoints/step-00002400 --json runs/bench/matched-captions.json

Flickr8k test (1,000 photos x 5 captions) embedded with `--all-captions` and indexed (flat) in a temporary folder;
queries: the first caption of each of 100 dev photos (other photos' words, as a user's). Each query is sent to
`/search?modality=text&k=24` (a page of the web page) three times through the app: the first time its results' lines
are embedded, then they are kept; the peer, the same app with the matching turned off (the first caption shown, as
before). Medians over the queries, milliseconds.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from report import finish, machine

REPO = Path(__file__).resolve().parents[1]


def page_times(app, queries: list[str]) -> tuple[list[float], list[float], list[list[dict]]]:
    """(first request ms, repeated request ms, the results) of each query's first page of caption matches."""
    first, again, results = [], [], []
    for query in queries:
        for store in (first, again, again):
            started = time.perf_counter()
            answer = app.get("/search", params={"q": query, "k": 24, "modality": "text"})
            store.append(1000 * (time.perf_counter() - started))
            answer.raise_for_status()
        results.append(answer.json()["results"])
    return first, again, results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k" / "test"))
    p.add_argument("--dev", default=str(REPO.parent / "shared" / "data" / "flickr8k" / "dev"))
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    import clipforge
    from fastapi.testclient import TestClient

    from clipforge.data.sources import open_source
    from clipforge.retrieval import search
    from clipforge.retrieval.collection import item_captions
    from clipforge.serve.app import create_app

    queries = [item_captions(item)[0] for item in open_source(args.dev, shuffle_buffer=0).catalogue()[:100]]
    cli = [sys.executable, "-m", "clipforge.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "emb")
        subprocess.run(cli + ["embed", args.data, folder, "--pretrained", args.checkpoint, "--all-captions",
                              "--no-progress"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(cli + ["index", "build", folder, "--quiet"], check=True, stdout=subprocess.DEVNULL)
        loaded = clipforge.load(args.checkpoint)
        matched_first, matched_again, matched = page_times(TestClient(create_app(folder, *loaded)), queries)
        search.Searcher.mean_captions = property(lambda self: False)  # the peer: the first caption, as before
        plain_first, plain_again, plain = page_times(TestClient(create_app(folder, *loaded)), queries)
    shown = [(m["caption"], p["caption"]) for ms, ps in zip(matched, plain) for m, p in zip(ms, ps)]
    assert [[m["id"] for m in ms] for ms in matched] == [[p["id"] for p in ps] for ps in plain]  # same ranking
    report = {"machine": machine(), "checkpoint": args.checkpoint, "queries": len(queries), "page": 24,
              "matched lines, first request ms": round(statistics.median(matched_first), 1),
              "matched lines, repeated ms": round(statistics.median(matched_again), 1),
              "peer: first caption, first request ms": round(statistics.median(plain_first), 1),
              "peer: first caption, repeated ms": round(statistics.median(plain_again), 1),
              "results whose matched line is not their first caption":
                  round(sum(m != p for m, p in shown) / len(shown), 3)}
    finish(report, args.json)


if __name__ == "__main__":
    main()
