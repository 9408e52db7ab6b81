"""Checkpoint files: pretrained downloads (against a local HTTP server), conversions, and clear errors on bad input."""
import hashlib
import json
import re
import socket
import time

import pytest
import torch
from PIL import Image

import clipforge
from clipforge import cli
from clipforge.checkpoint import CheckpointError, read_checkpoint, save_safetensors
from clipforge.pretrained import DownloadError, cached_path, register_pretrained

from conftest import FileServer, random_tokens


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A ViT-Tiny-64 checkpoint in open_clip/OpenAI layout, as bytes, and the model it came from."""
    model = clipforge.create_model("ViT-Tiny-64").eval()
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_safetensors(clipforge.checkpoint.clipforge_to_openai(model.state_dict()), path)
    return path.read_bytes(), model


@pytest.fixture(autouse=True)
def _pretrained_registry_restored():
    """Tags a test registers (local servers, bad checksums) do not outlive it."""
    from clipforge import pretrained

    pretrained.list_pretrained()  # the built-in tags, loaded
    saved = dict(pretrained._REGISTRY)
    yield
    pretrained._REGISTRY.clear()
    pretrained._REGISTRY.update(saved)


@pytest.fixture
def server(tiny_weights):
    srv = FileServer({"/tiny.safetensors": tiny_weights[0]})
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLIPFORGE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache"


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _same_outputs(a, b):
    images, tokens = torch.randn(2, 3, 64, 64), random_tokens(2, 32)
    with torch.no_grad():
        return all(torch.equal(x, y) for x, y in zip(a(images, tokens)[:2], b(images, tokens)[:2]))


def test_download_verifies_and_caches_then_works_offline(server, cache, tiny_weights, monkeypatch):
    data, reference = tiny_weights
    url = f"{server.url}/tiny.safetensors"
    register_pretrained("ViT-Tiny-64", "local-test", url, sha256=hashlib.sha256(data).hexdigest())
    model, preprocess, tokenizer = clipforge.load("ViT-Tiny-64", pretrained="local-test")
    assert not model.training and _same_outputs(model, reference)
    assert cached_path(url).read_bytes() == data and len(_files(cache)) == 1  # no temp files left
    server.close()  # offline: the cached file is enough, nothing is fetched
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    again, _, _ = clipforge.load("ViT-Tiny-64", pretrained="local-test")
    assert _same_outputs(again, reference)


def test_repo_without_safetensors_falls_back_to_open_clips_bin(tiny_weights, cache, tmp_path, monkeypatch):
    """Older LAION repos hold only open_clip_pytorch_model.bin: fetched when the safetensors file is missing (404),
    read with weights_only=True, cached, and used offline afterwards."""
    _, reference = tiny_weights
    bin_path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clipforge.checkpoint.clipforge_to_openai(reference.state_dict()), bin_path)
    srv = FileServer({"/repo/open_clip_pytorch_model.bin": bin_path.read_bytes()})
    try:
        register_pretrained("ViT-Tiny-64", "bin-only", f"{srv.url}/repo/open_clip_model.safetensors",
                            fallback_url=f"{srv.url}/repo/open_clip_pytorch_model.bin")
        model, _, _ = clipforge.load("ViT-Tiny-64", pretrained="bin-only")
        fallback = cached_path(f"{srv.url}/repo/open_clip_pytorch_model.bin")
        assert _same_outputs(model, reference) and _files(cache) == [fallback.name]
        register_pretrained("ViT-Tiny-64", "missing", f"{srv.url}/repo/nothing.safetensors")
        with pytest.raises(DownloadError, match="HTTP 404"):
            clipforge.load("ViT-Tiny-64", pretrained="missing")
    finally:
        srv.close()
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    again, _, _ = clipforge.load("ViT-Tiny-64", pretrained="bin-only")
    assert _same_outputs(again, reference)
    laion = clipforge.pretrained.get_pretrained("ViT-H-14", "laion2b_s32b_b79k")
    assert laion.url.endswith("/open_clip_model.safetensors")
    assert laion.fallback_url.endswith("/open_clip_pytorch_model.bin")


_HUB_CONFIG = {"embed_dim": 48, "quick_gelu": True,
               "vision_cfg": {"image_size": 64, "layers": 2, "width": 160, "head_width": 40, "patch_size": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 2, "layers": 2}}


def _serve_repo(files: dict, monkeypatch) -> FileServer:
    """A stand-in for the Hugging Face Hub: ``files`` (name -> bytes) under /owner/repo/resolve/main/."""
    srv = FileServer({f"/owner/repo/resolve/main/{name}": data for name, data in files.items()})
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    return srv


def test_hf_hub_open_clip_repo_loads_with_identical_outputs_and_its_normalisation(cache, tmp_path, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "Test-Hub", _HUB_CONFIG)
    theirs = open_clip.create_model("Test-Hub", pretrained=None).eval()
    save_safetensors(theirs.state_dict(), tmp_path / "w.safetensors")
    meta = {"model_cfg": _HUB_CONFIG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    srv = _serve_repo({"open_clip_config.json": json.dumps(meta).encode(),
                       "open_clip_model.safetensors": (tmp_path / "w.safetensors").read_bytes()}, monkeypatch)
    try:
        ours, preprocess, tokenizer = clipforge.load("hf-hub:owner/repo")
    finally:
        srv.close()
    assert preprocess.mean == (0.5, 0.5, 0.5) and preprocess.std == (0.25, 0.25, 0.25)
    images, tokens = torch.randn(2, 3, 64, 64), tokenizer(["a diagram", "a photo of a dog"])
    with torch.no_grad():
        assert (theirs.encode_image(images) - ours.encode_image(images)).abs().max() <= 1e-5
        assert (theirs.encode_text(tokens) - ours.encode_text(tokens)).abs().max() <= 1e-5
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")  # cached: loads again with the server gone
    assert _same_outputs(clipforge.load("hf-hub:owner/repo")[0], ours)
    monkeypatch.setattr(clipforge.models, "_EXTRA_CONFIGS", {**clipforge.models._EXTRA_CONFIGS})  # undone after
    clipforge.models.register_model_config("Test-Hub", _HUB_CONFIG)  # or the repo's weights into a named architecture
    assert _same_outputs(clipforge.load("Test-Hub", pretrained="hf-hub:owner/repo")[0], ours)


def test_hf_hub_repo_preprocessing_is_the_repos_own_and_survives_a_save(cache, tmp_path, monkeypatch):
    """An open_clip repo whose images are squashed to a square (Apple's DFN) preprocesses so here too, and a
    clipforge save of it keeps that; one that asks for a resize clipforge does not build is refused by name."""
    model = clipforge.create_model(_HUB_CONFIG)
    save_safetensors(clipforge.checkpoint.clipforge_to_openai(model.state_dict()), tmp_path / "w.safetensors")
    meta = {"model_cfg": _HUB_CONFIG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                                         "resize_mode": "squash", "interpolation": "bilinear"}}
    longest = {**meta, "preprocess_cfg": {**meta["preprocess_cfg"], "resize_mode": "longest"}}
    srv = FileServer({"/owner/repo/resolve/main/open_clip_config.json": json.dumps(meta).encode(),
                   "/owner/repo/resolve/main/open_clip_model.safetensors": (tmp_path / "w.safetensors").read_bytes(),
                   "/owner/longest/resolve/main/open_clip_config.json": json.dumps(longest).encode()})
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    try:
        ours, preprocess, _ = clipforge.load("hf-hub:owner/repo")
        with pytest.raises(CheckpointError, match="resize_mode 'longest' is not built here"):
            clipforge.load("hf-hub:owner/longest")
    finally:
        srv.close()
    assert (preprocess.resize_mode, preprocess.interpolation, preprocess.std) == ("squash", "bilinear", (0.5,) * 3)
    wide = Image.new("RGB", (200, 100), "red")
    wide.paste(Image.new("RGB", (50, 100), "blue"))  # the left quarter: squashed, not cropped away
    assert preprocess(wide).shape == (3, 64, 64) and preprocess(wide)[2, 32, 4] > 0
    clipforge.save_pretrained(ours, tmp_path / "saved")
    _, again, _ = clipforge.load(str(tmp_path / "saved"))
    assert (again.resize_mode, again.interpolation, again.mean) == ("squash", "bilinear", (0.5,) * 3)


def test_hf_hub_transformers_repo_loads_with_identical_outputs(cache, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2),
        vision_config=dict(hidden_size=96, intermediate_size=384, num_attention_heads=3, num_hidden_layers=2,
                           image_size=64, patch_size=16), projection_dim=48)
    hf = transformers.CLIPModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    files = {name: (tmp_path / "hf" / name).read_bytes() for name in ("config.json", "model.safetensors")}
    files["preprocessor_config.json"] = json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}).encode()
    srv = _serve_repo(files, monkeypatch)
    try:
        ours, preprocess, tokenizer = clipforge.load("hf-hub:owner/repo")
    finally:
        srv.close()
    assert preprocess.mean == preprocess.std == (0.5, 0.5, 0.5)  # the repo's CLIPProcessor's, not OpenAI's
    images, tokens = torch.randn(2, 3, 64, 64), tokenizer(["a diagram", "a photo of a dog"])
    with torch.no_grad():
        out = hf(input_ids=tokens, pixel_values=images)
        assert (out.image_embeds - ours.encode_image(images, normalize=True)).abs().max() <= 1e-5
        assert (out.text_embeds - ours.encode_text(tokens, normalize=True)).abs().max() <= 1e-5
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")  # cached, with the server gone (no open_clip_config.json to cache)
    assert _same_outputs(clipforge.load("hf-hub:owner/repo")[0], ours)


def test_hf_hub_architectures_clipforge_does_not_build_are_refused_by_name(cache, monkeypatch):
    meta = {"model_cfg": {**_HUB_CONFIG, "vision_cfg": {**_HUB_CONFIG["vision_cfg"], "pos_embed_type": "sin_cos_2d"}}}
    srv = _serve_repo({"open_clip_config.json": json.dumps(meta).encode()}, monkeypatch)
    try:
        with pytest.raises(CheckpointError, match="vision_cfg.pos_embed_type"):
            clipforge.load("hf-hub:owner/repo")
        with pytest.raises(DownloadError, match="neither open_clip_config.json nor config.json"):
            clipforge.load("hf-hub:owner/missing")
        with pytest.raises(ValueError, match="OWNER/NAME"):
            clipforge.load("hf-hub:no-owner")
    finally:
        srv.close()
    # refused before any weights were fetched: only the small config file is in the cache
    assert _files(cache) == [cached_path(f"{srv.url}/owner/repo/resolve/main/open_clip_config.json").name]


def test_an_open_clip_folder_clipforge_does_not_build_is_refused_by_name(tmp_path, tiny_weights):
    """local-dir: folders are read as hub repos are: an architecture clipforge would build differently is named."""
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_model.safetensors").write_bytes(tiny_weights[0])
    for vision, message in (({"pos_embed_type": "sin_cos_2d"}, "vision_cfg.pos_embed_type"),
                            ({"timm_model_name": "swin_base_patch4_window7_224"}, "timm's 'swin_base_patch4_window7_224'")):
        meta = {"model_cfg": {**_HUB_CONFIG, "vision_cfg": {**_HUB_CONFIG["vision_cfg"], **vision}}}
        (folder / "open_clip_config.json").write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match=message):
            clipforge.load("local-dir:" + str(folder))


def test_checksum_mismatch_is_an_error_and_nothing_is_cached(server, cache):
    register_pretrained("ViT-Tiny-64", "bad-sum", f"{server.url}/tiny.safetensors", sha256="0" * 64)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        clipforge.load("ViT-Tiny-64", pretrained="bad-sum")
    assert _files(cache) == []


def test_an_interrupted_transfer_keeps_its_bytes_and_the_next_call_resumes_there(server, cache, tiny_weights,
                                                                                 monkeypatch):
    """A download cut short (a crash, Ctrl-C, a dropped connection past its retries) keeps what arrived beside the
    target, never as the cached file; the next call asks for the rest only (an HTTP range) and caches it whole and
    verified. Within one call a dropped transfer is retried from where it stopped."""
    monkeypatch.setattr(clipforge.pretrained, "_RETRY_WAITS", ())
    url = f"{server.url}/tiny.safetensors"
    register_pretrained("ViT-Tiny-64", "resumed", url, sha256=hashlib.sha256(tiny_weights[0]).hexdigest())
    server.cuts["/tiny.safetensors"] = 1
    with pytest.raises(DownloadError, match="bytes received are kept"):
        clipforge.load("ViT-Tiny-64", pretrained="resumed")
    part = cached_path(url).with_name(cached_path(url).name + ".part")
    assert part.read_bytes() == tiny_weights[0][: len(tiny_weights[0]) // 2] and not cached_path(url).exists()
    model, _, _ = clipforge.load("ViT-Tiny-64", pretrained="resumed")
    assert server.requested[-1] == ("/tiny.safetensors", f"bytes={len(tiny_weights[0]) // 2}-")
    assert _same_outputs(model, tiny_weights[1]) and _files(cache) == [cached_path(url).name]  # no .part, no lock
    monkeypatch.setattr(clipforge.pretrained, "_RETRY_WAITS", (0, 0, 0))
    server.cuts["/tiny.safetensors"], server.requested[:] = 2, []  # twice dropped, then whole: one call
    again = clipforge.pretrained.download(url, directory=cache / "again", progress=False)
    assert again.read_bytes() == tiny_weights[0] and [asked is None for _, asked in server.requested] == \
        [True, False, False]


def test_kept_bytes_that_do_not_verify_are_dropped_and_a_server_without_ranges_sends_all(server, cache, tiny_weights,
                                                                                         monkeypatch):
    url = f"{server.url}/tiny.safetensors"
    sha = hashlib.sha256(tiny_weights[0]).hexdigest()
    part = cached_path(url).with_name(cached_path(url).name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 100)  # another file's beginning, or a version of the file since replaced
    with pytest.raises(DownloadError, match="checksum mismatch"):
        clipforge.pretrained.download(url, sha, progress=False)
    assert not part.exists() and not cached_path(url).exists()
    assert clipforge.pretrained.download(url, sha, progress=False).read_bytes() == tiny_weights[0]
    cached_path(url).unlink()
    part.write_bytes(tiny_weights[0][:100])
    server.ranges = False  # answers a range request with the whole file (200): written afresh, not appended
    assert clipforge.pretrained.download(url, sha, progress=False).read_bytes() == tiny_weights[0]
    cached_path(url).unlink()
    part.write_bytes(tiny_weights[0] + b"more")  # longer than the file: the server refuses the range (416)
    server.ranges = True
    monkeypatch.setattr(clipforge.pretrained, "_RETRY_WAITS", (0,))
    assert clipforge.pretrained.download(url, sha, progress=False).read_bytes() == tiny_weights[0]
    assert server.requested[-2:] == [("/tiny.safetensors", f"bytes={len(tiny_weights[0]) + 4}-"),
                                     ("/tiny.safetensors", None)]  # then from the start


def test_processes_fetching_one_file_at_once_take_turns(server, cache, tiny_weights):
    """Two fetches of the same file at once (torchrun's ranks loading one model): the second waits on the first's
    lock and takes its file, one transfer in all and no bytes written twice."""
    from concurrent.futures import ThreadPoolExecutor

    url = f"{server.url}/tiny.safetensors"
    server.delay = 0.5  # long enough for both to have asked before either finishes
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: clipforge.pretrained.download(url, progress=False), range(2)))
    assert paths[0] == paths[1] and paths[0].read_bytes() == tiny_weights[0]
    assert len(server.requested) == 1 and _files(cache) == [paths[0].name]

def test_the_hub_token_goes_to_the_hub_only_and_a_gated_repo_without_one_says_so(server, cache, tiny_weights,
                                                                                  tmp_path, monkeypatch):
    """$HF_TOKEN, else the token `hf auth login` saved, is sent to the hub (HF_ENDPOINT) for a gated or private
    repo, and never to another host nor to where the hub redirects (its CDN); a 401 says what to do."""
    from clipforge.pretrained import download, token_at

    hub = FileServer({})
    hub.token = "secret"
    for name in ("w", "again"):
        hub.redirects[f"/owner/gated/resolve/main/{name}.safetensors"] = f"{server.url}/tiny.safetensors"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    url = f"{hub.url}/owner/gated/resolve/main/w.safetensors"
    try:
        with pytest.raises(DownloadError, match="HTTP 401.*set HF_TOKEN"):
            download(url, progress=False)
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "token").write_text("secret\n")  # where `hf auth login` keeps it
        assert download(url, progress=False).read_bytes() == tiny_weights[0]
        monkeypatch.setenv("HF_TOKEN", "wrong")  # the environment's comes before the saved one
        with pytest.raises(DownloadError, match="the token sent may not read it"):
            download(url.replace("/w.", "/again."), progress=False)
        with token_at("secret"):  # transformers' from_pretrained(token=...) comes first of all
            assert download(url.replace("/w.", "/again."), progress=False).read_bytes() == tiny_weights[0]
    finally:
        hub.close()
    assert hub.authorizations == [None, "Bearer secret", "Bearer wrong", "Bearer secret"]
    download(f"{server.url}/tiny.safetensors", progress=False)  # another host, HF_TOKEN set
    assert server.authorizations == [None, None, None]  # the CDN's two redirected fetches and that one

def test_no_connection_fails_at_once_without_retrying(cache, monkeypatch):
    """Offline or no such host: an error at once (retrying only delays it) and nothing left behind."""
    monkeypatch.setattr(clipforge.pretrained, "_RETRY_WAITS", (30.0,))
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(DownloadError, match="nothing was cached"):
        clipforge.pretrained.download(f"http://127.0.0.1:{port}/w.safetensors", progress=False)
    assert time.perf_counter() - start < 10 and _files(cache) == []


def test_offline_without_cache_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    with pytest.raises(DownloadError, match="offline"):
        clipforge.load("ViT-B-32", pretrained="openai")


def test_pretrained_tags_resolve_to_public_sources():
    tags = clipforge.list_pretrained("ViT-B-32")
    assert ("ViT-B-32", "openai") in tags and len(tags) >= 3
    source = clipforge.pretrained.get_pretrained("ViT-B-32", "openai")
    assert source.url.startswith("https://openaipublic") and len(source.sha256) == 64 and source.quick_gelu
    with pytest.raises(ValueError, match="known tags"):
        clipforge.pretrained.get_pretrained("ViT-B-32", "no-such-tag")


@pytest.mark.parametrize("width, hidden", [(448, 453), (64, 256), (1664, 8192), (1408, 6144)])
def test_inferred_architecture_fits_odd_mlp_widths(width, hidden):
    """hidden / width can come back a rounding error short of hidden through int(width * ratio)."""
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": width, "layers": 1,
                                              "head_width": width, "mlp_ratio": hidden / width + 1e-9},
              "text_cfg": {"context_length": 8, "vocab_size": 100, "width": width, "heads": 1, "layers": 1,
                           "mlp_ratio": hidden / width + 1e-9}}
    with torch.device("meta"):
        state = clipforge.create_model(config).state_dict()
        assert state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] == hidden
        rebuilt = clipforge.create_model(clipforge.infer_config(state)).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state.items()}


def test_bare_weights_that_fit_zoo_architectures_of_several_image_sizes_say_so_and_how_to_choose():
    """open_clip's convnext_base_w and convnext_base_w_320 (ViTamin-XL-256 and -336) have weights of the same names and
    shapes: a state dict alone is read as the first, with a warning naming the others; weights that fit one size
    are read without one."""
    import warnings

    for name, first, other in (("convnext_base_w_320", "convnext_base_w", "convnext_base_w_320 (320 px)"),
                               ("ViTamin-XL-336", "ViTamin-XL-256", "ViTamin-XL-336 (336 px)")):
        with torch.device("meta"):  # shapes only
            state = clipforge.create_model(name).state_dict()
        with pytest.warns(UserWarning, match="these weights fit") as caught:
            config = clipforge.infer_config(state)
        message = str(caught[0].message)
        assert f"{first} (256 px)" in message and other in message and f"read as {first}" in message
        assert "pretrained=PATH" in message and config["vision_cfg"]["image_size"] == 256
    for name, size in (("convnext_base", 224), ("EVA02-B-16", 224), ("MobileCLIP-S2", 256)):
        with torch.device("meta"):
            state = clipforge.create_model(name).state_dict()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert clipforge.infer_config(state)["vision_cfg"]["image_size"] == size


def test_every_zoo_architectures_bare_weights_are_read_as_that_architecture():
    """A state dict alone (names and shapes, on the meta device) of each zoo architecture with clipforge's own or
    timm's towers gives back every setting of its config (an MLP ratio as the width it builds); where the weights
    fit several image sizes (above; ViT-SO400M-14-SigLIP-378 and -384, whose 14-pixel patches cover 378 px of 384),
    a warning names the architecture."""
    import warnings

    from clipforge.models import get_model_config

    checked = []
    for name in clipforge.list_models():
        zoo = get_model_config(name)
        if "hf_model_name" in zoo["text_cfg"]:  # a Hugging Face text tower is read from its folder's config
            continue
        with torch.device("meta"):
            state = clipforge.create_model(name).state_dict()
        state = {k: torch.zeros(()) if v.dim() == 0 else v for k, v in state.items()}  # scalars are read as numbers
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inferred = clipforge.infer_config(state)
        for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
            for key, value in zoo.get(tower, {}).items():
                got = inferred[tower].get(key)
                if key == "mlp_ratio" and "width" in zoo[tower]:
                    assert int(zoo[tower]["width"] * value) == int(inferred[tower]["width"] * got), (name, tower)
                elif key == "image_size" and got != value:
                    assert any(f"{name} ({value} px)" in str(w.message) for w in caught), name
                else:
                    assert got == value, (name, tower, key, got, value)
        checked.append(name)
    assert len(checked) > 100 and {"ViT-M-16-alt", "coca_base", "ViT-SO400M-14-SigLIP-384", "EVA02-B-16"} <= \
        set(checked)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    small = clipforge.create_model("ViT-Tiny-64", embed_dim=64)
    clipforge.save_pretrained(small, tmp_path / "small", config=None)
    with pytest.raises(CheckpointError) as err:
        clipforge.load("ViT-Tiny-64", pretrained=str(tmp_path / "small"))
    message = str(err.value)
    assert "text.text_projection" in message or "visual.proj" in message
    assert "(128, 64)" in message and "(128, 128)" in message


def test_a_created_model_carries_its_config_into_what_it_is_saved_as(tmp_path):
    """``create_model``'s model knows its config: a setting the weights cannot show (QuickGELU) survives
    ``save_pretrained`` (it was read back off the weight shapes, as GELU, and the features changed), and the Hugging
    Face and open_clip writers take the model as it is (they raised AttributeError without a loaded model's config)."""
    from clipforge.checkpoint import hf, openai

    model = clipforge.create_model("ViT-Tiny-64", quick_gelu=True).eval()
    assert model.config == {**clipforge.get_model_config("ViT-Tiny-64"), "quick_gelu": True}
    clipforge.save_pretrained(model, tmp_path / "saved")
    back = clipforge.load(str(tmp_path / "saved"))[0]
    assert back.config["quick_gelu"] is True and _same_outputs(back, model)
    hf.save(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vision_config"]["hidden_act"] == "quick_gelu"
    openai.save_open_clip(model, tmp_path / "oc")
    assert _same_outputs(clipforge.load(str(tmp_path / "oc"))[0], model)


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "model.bin"])
def test_truncated_or_corrupt_files_name_the_file(tmp_path, name):
    model = clipforge.create_model("ViT-Tiny-64")
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_safetensors(model.state_dict(), path)
    else:
        torch.save(model.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=name) as err:
        clipforge.load(str(path))
    assert "truncated or corrupt" in str(err.value)
    garbage = tmp_path / f"garbage-{name}"
    garbage.write_bytes(b"\x00\x01 not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=f"garbage-{name}"):
        clipforge.load(str(garbage))


def test_pickled_objects_are_refused_unless_trusted(tmp_path):
    model = clipforge.create_model("ViT-Tiny-64")
    path = tmp_path / "train_state.pt"
    torch.save({"state_dict": model.state_dict(), "args": argparse_namespace()}, path)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        clipforge.load(str(path))
    # a bare state dict cannot tell ViT-Tiny-64's 32-wide heads from the default 64: name the architecture
    loaded, _, _ = clipforge.load("ViT-Tiny-64", pretrained=str(path), trust_pickle=True)
    assert _same_outputs(loaded, model.eval())


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=1e-3, model="ViT-Tiny-64")


def test_missing_file_and_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds none of"):
        read_checkpoint(tmp_path / "empty")


def test_a_folder_of_pickled_shards_loads_with_weights_only_and_safetensors_win(tmp_path):
    """transformers' older sharded layout (pytorch_model-0000N-of-0000M.bin beside pytorch_model.bin.index.json)
    loads with the one-file folder's outputs, each shard read with weights_only; where a folder holds both kinds the
    safetensors are read and the pickle never opened (transformers' order)."""
    from safetensors.torch import load_file, save_file

    model = clipforge.create_model("ViT-Tiny-64").eval()
    clipforge.save_pretrained(model, tmp_path / "ours")
    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    state = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    keys, weight_map = sorted(state), {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({key: state[key] for key in part}, tmp_path / "hf" / name)
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "hf" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert _same_outputs(clipforge.load(str(tmp_path / "hf"))[0], model)
    torch.save({"args": argparse_namespace()}, tmp_path / "hf" / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError, match="trust_pickle"):  # a shard holding objects: refused as one file is
        clipforge.load(str(tmp_path / "hf"))
    save_file(state, tmp_path / "hf" / "model.safetensors")  # safetensors first: the refused shard is not read
    assert _same_outputs(clipforge.load(str(tmp_path / "hf"))[0], model)


def test_cli_convert_round_trips_through_every_format(tmp_path, capsys):
    model = clipforge.create_model("ViT-Tiny-64").eval()
    clipforge.save_pretrained(model, tmp_path / "ours")
    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "openai.pt"), "--to", "openai"]) == 0
    state = torch.load(tmp_path / "openai.pt", weights_only=True)
    assert "visual.conv1.weight" in state and "token_embedding.weight" in state  # OpenAI's key layout
    # OpenAI's format stores no config; head width is not in the weights, so name the architecture
    assert cli.main(["convert", str(tmp_path / "openai.pt"), str(tmp_path / "hf"), "--to", "hf",
                     "--model", "ViT-Tiny-64"]) == 0
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "clipforge"]) == 0
    back, _, _ = clipforge.load(str(tmp_path / "back"))
    assert _same_outputs(back, model)
    assert "wrote" in capsys.readouterr().out


def test_convert_never_writes_over_its_source_nor_into_another_checkpoint_unasked(tmp_path, capsys):
    """`convert run/step-N run/step-N --to hf` replaced the clipforge config and weights with CLIPModel's beside the
    run's train_state.pt, and any folder holding a checkpoint took another format's files over or beside its own."""
    model = clipforge.create_model("ViT-Tiny-64")
    source = clipforge.save_pretrained(model, tmp_path / "ours")
    before = {p.name: p.read_bytes() for p in source.iterdir()}

    def refused(*argv) -> str:
        assert cli.main(["convert", *map(str, argv)]) == 2
        return capsys.readouterr().err

    for to in ("clipforge", "hf", "open_clip"):
        assert "is the checkpoint being converted" in refused(source, source, "--to", to, "--overwrite")
    assert "is the checkpoint being converted" in refused(source / "model.safetensors", source, "--to", "hf")
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert cli.main(["convert", str(source), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "holds a checkpoint already (config.json, model.safetensors)" in refused(
        source, tmp_path / "hf", "--to", "open_clip")
    assert cli.main(["convert", str(source), str(tmp_path / "hf"), "--to", "hf", "--overwrite"]) == 0
    assert cli.main(["convert", str(source), str(tmp_path / "w.pt"), "--to", "openai"]) == 0
    assert "exists; pass --overwrite" in refused(source, tmp_path / "w.pt", "--to", "openai")
    assert "is the checkpoint being converted" in refused(tmp_path / "w.pt", tmp_path / "w.pt", "--to", "openai",
                                                          "--overwrite")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("notes")  # other files are no checkpoint
    assert cli.main(["convert", str(source), str(tmp_path / "empty"), "--to", "open_clip"]) == 0


def test_a_hugging_face_text_tower_is_refused_by_the_openai_and_hf_layouts(tmp_path, capsys):
    """A model with a MiniLM text tower (the Flickr8k recipe's) has no place in OpenAI's or CLIPModel's layout: hf
    was a KeyError traceback and openai wrote a file nothing could load; both now refuse, writing nothing. An open_clip
    folder holds it, naming the hub repo the packaged MiniLM came from (what open_clip fetches), and reads back."""
    pytest.importorskip("transformers")
    model = clipforge.create_model("ViT-Tiny-64-MiniLM").eval()
    clipforge.save_pretrained(model, tmp_path / "ours", clipforge.get_model_config("ViT-Tiny-64-MiniLM"))
    for to, out in (("hf", tmp_path / "hf"), ("openai", tmp_path / "openai.pt")):
        assert cli.main(["convert", str(tmp_path / "ours"), str(out), "--to", to]) == 2
        assert f"its text tower is all-minilm-l6-v2, a Hugging Face encoder, which clipforge's {to} export cannot " \
            "hold" in capsys.readouterr().err
        assert not out.exists()
    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "oc"), "--to", "open_clip"]) == 0
    text_cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    back, _, tokenizer = clipforge.load("local-dir:" + str(tmp_path / "oc"))
    tokens, images = tokenizer(["a dog runs on the grass", "two people"]), torch.randn(2, 3, 64, 64)
    assert torch.equal(tokens, clipforge.get_tokenizer("ViT-Tiny-64-MiniLM")(["a dog runs on the grass", "two people"]))
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(back(images, tokens)[:2], model(images, tokens)[:2]))


def test_cli_asking_for_cuda_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the error path cannot be reached")
    for command in (["train", "--train-data", "x.tar", "--device", "cuda"], ["bench", "--quick", "--device", "cuda:1"]):
        assert cli.main(command) == 2
        assert "no CUDA device is available" in capsys.readouterr().err


def test_cli_names_a_device_it_cannot_use_before_loading_anything(capsys, tmp_path):
    """`--device gpu` was torch's RuntimeError traceback; a CUDA index past the machine's devices failed only when
    the first tensor moved there."""
    for device, message in (("gpu", "not a device name (cpu, cuda, cuda:1, mps ...)"),
                            ("cuda:99", "this machine has" if torch.cuda.is_available() else "no CUDA device")):
        assert cli.main(["classify", str(tmp_path / "x.png"), "--labels", "a,b", "--pretrained",
                         str(tmp_path / "no-such-model"), "--device", device]) == 2
        assert f"--device {device}: {message}" in capsys.readouterr().err  # and not the missing model's error
        with pytest.raises(ValueError, match=re.escape(f"device '{device}': {message}")):  # Python, before loading
            clipforge.load(str(tmp_path / "no-such-model"), device=device)


def test_cli_output_into_a_pipe_closed_early_is_not_an_error(capsys):
    """`clipforge models | head -1`: aligned rows, and no BrokenPipeError traceback when the reader has gone."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    assert cli.main(["models"]) == 0
    rows = capsys.readouterr().out.splitlines()
    kinds = {row.split()[1] for row in rows}
    assert len(rows) == len(clipforge.list_models())
    assert kinds == {"ViT", "ResNet", "SigLIP", "ConvNeXt", "EVA", "PE", "FastViT", "ViTamin", "CoCa"}
    assert len({row.index(row.split()[1], len(row.split()[0])) for row in rows}) == 1  # the kind column aligned
    assert len({row.index("px") for row in rows}) == 1
    proc = subprocess.Popen([sys.executable, "-m", "clipforge.cli", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    proc.stdout.close()  # the reader is gone before the command writes a byte (it is still importing)
    assert proc.wait(timeout=60) == 0 and proc.stderr.read() == b""


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "missing.pt" in err and "Traceback" not in err


def test_models_command_describes_one_architecture_and_its_tags(capsys, cache):
    """`clipforge models NAME`: the config, then per tag where it downloads from, its activation and its own image
    preprocessing (what a user needs to know before fetching gigabytes)."""
    assert cli.main(["models", "ViT-L-14"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[0].split(": ", 1)[1]) == clipforge.get_model_config("ViT-L-14")
    tags = {line.split(":")[0].strip(): line for line in out[1:]}
    assert set(tags) == {t for _, t in clipforge.list_pretrained("ViT-L-14")}
    assert "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K" in tags["laion2b_s32b_b82k"]
    assert "mean (0.5, 0.5, 0.5)" in tags["laion2b_s32b_b82k"] and "(QuickGELU)" in tags["metaclip_400m"]
    assert cli.main(["models", "ViT-H-14-378-quickgelu"]) == 0
    assert "resize_mode squash" in capsys.readouterr().out
    assert cli.main(["models", "ViT-Tiny-64"]) == 0
    assert "no pretrained tags" in capsys.readouterr().out


def test_hf_text_pooling_follows_eos_token_id_both_ways():
    """transformers pools a CLIP text at its first end-of-text token, at the largest id only for configs with the
    old eos_token_id 2: the two differ once tokens are added after it, so each reads as its own clipforge pool, and
    a clipforge model pooled at the largest id with such tokens writes eos_token_id 2."""
    from clipforge.checkpoint.hf import config_from_clipforge, config_to_clipforge
    from clipforge.models import get_model_config

    hf = config_from_clipforge(get_model_config("ViT-B-32"), 2.6592)
    assert hf["model_type"] == "clip" and hf["text_config"]["eos_token_id"] == 49407
    modern, legacy = config_to_clipforge(hf)["text_cfg"], config_to_clipforge(
        {**hf, "text_config": {**hf["text_config"], "eos_token_id": 2}})["text_cfg"]
    assert (modern["pool"], modern["eos_id"]) == ("eos", 49407) and "pool" not in legacy
    back = config_from_clipforge(config_to_clipforge(hf), 2.6592)
    assert back["model_type"] == "clip" and back["text_config"]["eos_token_id"] == 49407
    grown = get_model_config("ViT-B-32")
    grown["text_cfg"]["vocab_size"] = 49410
    assert config_from_clipforge(grown, 2.6592)["text_config"]["eos_token_id"] == 2
