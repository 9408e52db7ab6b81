"""Screenshots of the search page over real photos: `clipforge serve` on an embedded collection, free-text queries
typed into the page in headless Chromium, one JPEG per query.

    clipforge embed ../shared/data/flickr8k/test runs/flickr8k-test-emb --pretrained CKPT
    clipforge index build runs/flickr8k-test-emb
    python benchmarks/search_page.py runs/flickr8k-test-emb --output docs/img \\
        --queries "a dog running through water" "a child on a swing" "a man climbing a rock"

Needs the system Chromium (Debian package ``chromium``) and playwright (the test extras).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

from report import free_port


def chromium_path() -> str:
    """The system Chromium for playwright (its own browser download is not reachable here)."""
    path = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if path is None:
        raise SystemExit("no system Chromium: apt-get install chromium")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("collection", help="a folder written by clipforge embed + index build")
    parser.add_argument("--queries", nargs="+", default=["a dog running through water", "a child on a swing",
                                                         "a man climbing a rock", "two people on a beach at sunset"])
    parser.add_argument("--output", type=Path, default=Path("docs/img"))
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=760)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    browser_path = chromium_path()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "clipforge.cli", "serve", args.collection, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # the model loads first
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        args.output.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            for query in args.queries:
                page.goto(f"{base}/?{urlencode({'q': query})}")
                page.wait_for_selector("#results .result img")
                page.wait_for_function("[...document.querySelectorAll('#results .result img')].slice(0, 12)"
                                       ".every(img => img.complete && img.naturalWidth > 0)")
                path = args.output / f"search-{re.sub(r'[^a-z0-9]+', '-', query.lower()).strip('-')}.jpg"
                page.screenshot(path=str(path), type="jpeg", quality=82)  # photos: a fifth of the PNG's size
                print(f"{query}: {path}")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
