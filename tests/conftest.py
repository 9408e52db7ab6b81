import http.server
import os
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CLIPFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; the test skips (with the reason) when that data set is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data set not found at {path} (set CLIPFORGE_SHARED_DATA)")
    return path


def transformers4_peer() -> Path:
    """transformers 4.56 (with the hub client and tokenizers it needs), installed apart from the venv's own 5.x by the
    README's test command, for peer code that needs it: open_clip's beam search uses ``BeamSearchScorer``, which
    transformers 5 removed. Put first on a subprocess's PYTHONPATH. Skips with a reason when absent."""
    folder = Path(sys.prefix) / "peers" / "transformers-4"
    if not (folder / "transformers").is_dir():
        pytest.skip(f"transformers 4.56 is not installed in {folder}: the README's test command installs it there "
                    "(pip install --no-deps --upgrade --target ...)")
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (a torchrun rendezvous, a test server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """What the tests cache (eval features, text-feature tables, fetched files) goes to a folder of the session's own,
    not the user's ~/.cache/clipforge, unless $CLIPFORGE_CACHE names one; the de-quantised language model (~500 MB,
    slow to make) is shared through a link to the user's cache, where a second session finds it."""
    if os.environ.get("CLIPFORGE_CACHE"):
        yield
        return
    user = Path.home() / ".cache" / "clipforge" / "language-models"
    cache = tmp_path_factory.mktemp("clipforge-cache")
    user.mkdir(parents=True, exist_ok=True)
    (cache / "language-models").symlink_to(user, target_is_directory=True)
    os.environ["CLIPFORGE_CACHE"] = str(cache)  # subprocesses (the CLI tests) inherit it
    yield
    os.environ.pop("CLIPFORGE_CACHE", None)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    # Under pytest-xdist each worker gets its share of the cores, so workers do not oversubscribe them.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


def forced_size_gap(open_clip, name: str, weights, size: int) -> float:
    """Largest difference between clipforge's and open_clip's image features of ``name`` with ``weights`` loaded at
    ``force_image_size=size`` (position grids resized: open_clip's rule for its ViT, timm's ``set_input_size`` for
    its trunks), on a random batch."""
    from clipforge.open_clip_api import create_model

    theirs = open_clip.create_model(name, pretrained=str(weights), force_image_size=size).eval()
    ours = create_model(name, pretrained=str(weights), force_image_size=size).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return (ours.encode_image(images) - theirs.encode_image(images)).abs().max().item()


def assert_same_outputs(theirs: dict, ours: dict, tolerance: float = 1e-5) -> None:
    """Two ``forward_intermediates`` dicts: the same keys, shapes and values, to ``tolerance`` relative to each
    tensor's largest magnitude (float32 rounding: the blocks' outputs reach magnitudes of ~10)."""
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        got = ours[key]
        if isinstance(expected, list):
            assert isinstance(got, list) and len(got) == len(expected), key
            pairs = zip(expected, got)
        else:
            pairs = [(expected, got)]
        for a, b in pairs:
            assert a.shape == b.shape, key
            assert (a - b).abs().max().item() <= tolerance * max(1.0, a.abs().max().item()), key


def random_tokens(n: int, context_length: int = 77, generator=None) -> torch.Tensor:
    """Token rows shaped like real ones: <sot> random ids <eot> then zero padding."""
    tokens = torch.zeros(n, context_length, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, context_length - 1, (1,), generator=generator))
        tokens[i, 0] = 49406
        tokens[i, 1 : length + 1] = torch.randint(0, 49000, (length,), generator=generator)
        tokens[i, length + 1] = 49407
    return tokens


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A WebDataset tar shard: each sample is {"__key__": ..., ext: bytes | str}."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                data = value.encode() if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_open_clip_folder(folder: Path, model: torch.nn.Module, model_cfg: dict) -> Path:
    """An open_clip model folder (what its ``local-dir:`` reads): ``model``'s weights and ``model_cfg``."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return folder


def onnx_feature_differences(model, folder: Path, images: torch.Tensor, tokens: torch.Tensor | None = None):
    """Export ``model`` (with its ``config``) to ONNX in ``folder`` and return the largest differences of the exported
    graphs' normalised image (and text) features from eager PyTorch's."""
    from clipforge.onnx_backend import export_onnx, load_onnx

    export_onnx(model, folder)
    exported = load_onnx(folder)[0]

    def diff(encode_exported, encode_eager, inputs):
        return (encode_exported(inputs, normalize=True) - encode_eager(inputs, normalize=True)).abs().max().item()

    with torch.no_grad():
        image = diff(exported.encode_image, model.encode_image, images)
        return image if tokens is None else (image, diff(exported.encode_text, model.encode_text, tokens))


def shapes_shard(path: Path, n: int, seed: int = 0, corrupt_every: int = 0) -> Path:
    """A shard of generated shapes with multi-line captions; every ``corrupt_every``-th image is garbage bytes."""
    import io

    from clipforge.data import ShapesSource

    source = ShapesSource(n, seed=seed)
    samples = []
    for raw in source.samples(0, 1, 0, seed, {}):
        buffer = io.BytesIO()
        raw["image"].save(buffer, format="PNG")
        image = buffer.getvalue()
        if corrupt_every and len(samples) % corrupt_every == corrupt_every - 1:
            image = image[:40]  # truncated PNG
        samples.append({"__key__": raw["__key__"], "png": image, "txt": raw["txt"]})
    return write_shard(path, samples)


def colour_dataset(root: Path, n: int = 24):
    """A labelled split in the CLIP_benchmark layout: solid colour images (image + .cls, no text)."""
    import io

    from PIL import Image

    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    (root / "classnames.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(colours) + "\n")
    samples = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), colours[i % len(colours)]).save(buffer, format="PNG")
        samples.append({"__key__": f"c{i:04d}", "png": buffer.getvalue(), "cls": str(i % len(colours))})
    return write_shard(root / "test" / "test-000000.tar", samples), colours


def tiny_llama(words: list[str], hidden_size: int = 32, layers: int = 2, heads: int = 4):
    """``(LlamaForCausalLM, tokenizer)``: a small random causal LM over a word-level vocabulary (``words[0]`` is the
    end-of-sequence token, ``words[1]`` the unknown one), for LiMBer tests that need an LM but not a real one."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[1]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token=words[0], unk_token=words[1])
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, eos_token_id=0, bos_token_id=0, pad_token_id=0))
    return lm, tokenizer


class FileServer:
    """Serves ``files`` (path -> bytes) on 127.0.0.1, HTTP range requests too (206, or 200 with the whole file where
    ``ranges`` is False); ``/cut/...`` promises the full length but sends half, as does the next request for a
    path while ``cuts[path]`` counts down; ``delay`` seconds pass before each answer; with ``token`` set, a request
    without ``Authorization: Bearer TOKEN`` gets 401 (a gated repo); ``redirects`` sends a path elsewhere (302, as
    the hub sends large files to its CDN). ``requested`` lists each request's (path, Range header or None),
    ``authorizations`` its Authorization header or None."""

    def __init__(self, files):
        files = dict(files)
        server = self
        self.cuts, self.ranges, self.requested, self.delay = Counter(), True, [], 0.0
        self.token, self.redirects, self.authorizations = None, {}, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                cut = self.path.startswith("/cut/")
                path = self.path.removeprefix("/cut") if cut else self.path
                server.authorizations.append(self.headers.get("Authorization"))
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    self.send_error(401)
                    return
                if path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[path])
                    self.end_headers()
                    return
                body = files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                asked = self.headers.get("Range")
                server.requested.append((path, asked))
                time.sleep(server.delay)
                if server.cuts[path] > 0:
                    server.cuts[path] -= 1
                    cut = True
                start = int(asked.removeprefix("bytes=").split("-")[0]) if asked and server.ranges else 0
                if start >= len(body) > 0:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                sent = body[start:]
                self.wfile.write(sent[: len(sent) // 2] if cut else sent)
                self.wfile.flush()
                if cut:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def hub_server(monkeypatch, cache: Path, repo: str, files: dict) -> FileServer:
    """A stand-in for the Hugging Face Hub serving ``files`` (name -> bytes) as ``repo`` (OWNER/NAME), with
    clipforge's cache at ``cache`` and downloads allowed; close it when done."""
    srv = FileServer({f"/{repo}/resolve/main/{name}": data for name, data in files.items()})
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("CLIPFORGE_CACHE", str(cache))
    for name in ("CLIPFORGE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return srv
