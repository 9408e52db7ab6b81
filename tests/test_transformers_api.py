"""clipforge.transformers_api against transformers' own classes on the same folders (random weights): CLIPModel,
CLIPProcessor and its tokenizer and image processors, the zero-shot pipeline, the single-tower models and SigLIP's; on
the folder `clipforge convert --to hf` writes (vocab.json + merges.txt, transformers 4's preprocessor_config.json),
the one transformers 5 writes from it (tokenizer.json, processor_config.json) and a hub repo."""
import io
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import clipforge
from clipforge import transformers_api

transformers = pytest.importorskip("transformers")

TOL = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from clipforge.convert import convert

    root = tmp_path_factory.mktemp("transformers_api")
    torch.manual_seed(0)
    clipforge.save_pretrained(clipforge.create_model("ViT-Tiny-64").eval(), root / "ours")
    convert(str(root / "ours"), str(root / "converted"), to="hf")
    transformers.CLIPProcessor.from_pretrained(root / "converted").save_pretrained(root / "saved")
    transformers.CLIPModel.from_pretrained(root / "converted").save_pretrained(root / "saved")
    assert (root / "saved" / "tokenizer.json").is_file() and (root / "saved" / "processor_config.json").is_file()
    return {"converted": root / "converted", "saved": root / "saved"}


def _photos(n: int = 12, seed: int = 0) -> list[Image.Image]:
    """Smooth random pictures of odd and even sizes, wide and tall: every crop offset rounding case."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        width, height = int(rng.randint(40, 300)), int(rng.randint(40, 300))
        noise = rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
        out.append(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(3)))
    return out


def _script(library, folder, texts, images):
    """What a transformers user writes, with only the import changed: 4.x's normalisation of get_*_features, 5.x's
    .pooler_output, the processor's batch moved with .to(), the model's logits and loss."""
    model = library.CLIPModel.from_pretrained(folder).eval()
    processor = library.CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=inputs["pixel_values"])
        text_features = model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
        outputs = model(**inputs, return_loss=True)
    if library is transformers_api:  # the tensor also answers .pooler_output, as transformers 5's output does
        assert torch.equal(image_features.pooler_output, image_features)
        image_features = image_features / image_features.norm(p=2, dim=-1, keepdim=True)
    else:
        image_features = torch.nn.functional.normalize(image_features.pooler_output, dim=-1)
    text_features = getattr(text_features, "pooler_output", text_features)
    return {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask, "image": image_features,
            "text": text_features, "probs": outputs.logits_per_image.softmax(dim=1), "loss": outputs.loss,
            "logits_per_text": outputs["logits_per_text"], "image_embeds": outputs[4]}  # loss first, as set


@pytest.mark.parametrize("kind", ["converted", "saved"])
def test_a_transformers_script_runs_with_clipforge_swapped_in(folders, kind):
    texts = ["a photo of a cat", "A Dog's   DINNER, café & crème brûlée!! 😀", "two  dogs\tplay?!"]
    theirs = _script(transformers, folders[kind], texts, _photos(3))
    ours = _script(transformers_api, folders[kind], texts, _photos(3))
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.equal(theirs["attention_mask"], ours["attention_mask"])
    assert theirs["input_ids"].shape[1] < 32  # padded to the longest text, shorter than the context
    for key in ("image", "text", "probs", "loss", "logits_per_text", "image_embeds"):
        assert (theirs[key] - ours[key]).abs().max().item() <= TOL, key


@pytest.mark.parametrize("kind", ["converted", "saved"])
def test_token_ids_and_decoding_are_transformers_on_natural_and_noisy_text(folders, kind):
    from clipforge.bench.corpora import distinct_captions, noisy_captions

    texts = distinct_captions(None, 150) + noisy_captions(None, 150) + ["", " ", "x " * 40, "<|endoftext|> hi"]
    theirs = transformers.CLIPTokenizer.from_pretrained(folders[kind])
    ours = transformers_api.CLIPTokenizer.from_pretrained(folders[kind])
    for settings in ({"padding": True, "truncation": True}, {"padding": "max_length", "truncation": True},
                     {"padding": "max_length", "truncation": True, "max_length": 12}):
        a, b = theirs(texts, return_tensors="pt", **settings), ours(texts, return_tensors="pt", **settings)
        assert torch.equal(a.input_ids, b.input_ids), settings
        assert torch.equal(a.attention_mask, b.attention_mask), settings
    a, b = theirs(texts[:20]), ours(texts[:20])  # lists, unpadded
    assert a["input_ids"] == b["input_ids"] and a["attention_mask"] == b["attention_mask"]
    assert theirs("one text")["input_ids"] == ours("one text")["input_ids"]
    assert (ours.pad_token_id, ours.eos_token_id, ours.model_max_length) == (49407, 49407, 32)
    for skip in (True, False):
        assert theirs.batch_decode(a["input_ids"], skip_special_tokens=skip) == \
            ours.batch_decode(b["input_ids"], skip_special_tokens=skip)
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "a longer text"], return_tensors="pt")
    with pytest.warns(UserWarning, match="truncation=True"):
        assert ours("x " * 40)["input_ids"][-1] == 49407


def assert_tokenizer_methods_match(theirs, ours, texts, unknown_as_text: bool = True):
    """encode, tokenize, the id/token conversions, the vocabulary and the special tokens of two tokenizers agree;
    without ``unknown_as_text``, ``tokenize``'s strings are compared through their ids (transformers' SentencePiece
    tokenizer shows a character the vocabulary lacks as its text, clipforge's as the unknown token)."""
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == theirs.encode(text, add_special_tokens=special)
            assert ours(text, add_special_tokens=special)["input_ids"] == \
                theirs(text, add_special_tokens=special)["input_ids"]
        tokens = theirs.tokenize(text)
        if unknown_as_text:
            assert ours.tokenize(text) == tokens, text
        assert ours.convert_tokens_to_ids(ours.tokenize(text)) == theirs.convert_tokens_to_ids(tokens), text
        ids = theirs.encode(text)
        for skip in (False, True):
            assert ours.convert_ids_to_tokens(ids, skip_special_tokens=skip) == \
                theirs.convert_ids_to_tokens(ids, skip_special_tokens=skip), text
    assert ours.get_vocab() == theirs.get_vocab()
    assert (ours.all_special_tokens, ours.all_special_ids) == (theirs.all_special_tokens, theirs.all_special_ids)
    assert ours.convert_ids_to_tokens(5) == theirs.convert_ids_to_tokens(5) == \
        ours.convert_ids_to_tokens(torch.tensor(5)) == ours.convert_ids_to_tokens(np.int64(5))
    assert ours.convert_tokens_to_ids("qqqzzzq") == theirs.convert_tokens_to_ids("qqqzzzq")
    assert torch.equal(ours.encode("a dog", return_tensors="pt"), theirs.encode("a dog", return_tensors="pt"))


@pytest.mark.parametrize("kind", ["converted", "saved", "gemma"])
def test_the_tokenizers_other_methods_answer_as_transformers(folders, kind, tmp_path):
    """encode, tokenize, convert_ids_to_tokens / convert_tokens_to_ids, get_vocab, all_special_tokens and
    add_special_tokens=False, on CLIP's files of both versions and on SigLIP 2's Gemma tokenizer."""
    from clipforge.bench.corpora import noisy_captions

    if kind == "gemma":
        from test_siglip import make_gemma_tokenizer_folder

        make_gemma_tokenizer_folder(tmp_path)
    folder = tmp_path if kind == "gemma" else folders[kind]
    texts = ["a photo of a dog", "A Dog's DINNER, café & crème!! 😀", "", "x " * 40] + noisy_captions(None, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long text's warning, from both
        assert_tokenizer_methods_match(transformers.AutoTokenizer.from_pretrained(folder),
                                       transformers_api.AutoTokenizer.from_pretrained(folder), texts)


@pytest.mark.parametrize("squash", [False, True])
@pytest.mark.parametrize("resample", [3, 2])
def test_pixels_are_transformers_5s_and_with_pillow_transformers_4s_exactly(squash, resample, tmp_path):
    settings = {"size": {"height": 64, "width": 64}, "do_center_crop": False} if squash else \
        {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}
    settings.update(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25], resample=resample)
    transformers.CLIPImageProcessor(**settings).save_pretrained(tmp_path)
    photos = _photos(16, seed=1) + [Image.new("RGBA", (90, 70), (200, 10, 10, 100)), Image.new("L", (64, 64), 90)]
    std = torch.tensor(settings["image_std"]).view(1, 3, 1, 1)
    for ours, theirs in ((transformers_api.CLIPImageProcessor, transformers.CLIPImageProcessor),
                         (transformers_api.CLIPImageProcessorPil, transformers.CLIPImageProcessorPil)):
        pixels = ours.from_pretrained(tmp_path)(photos, return_tensors="pt").pixel_values
        assert pixels.shape == (18, 3, 64, 64)
        expected = theirs(**settings)(images=photos, return_tensors="pt").pixel_values
        assert ((expected - pixels).abs() * std * 255).max().item() < 1e-3, ours  # the same 8-bit levels
    # arrays and tensors of the same picture give its pixels
    processor = transformers_api.CLIPImageProcessor.from_pretrained(tmp_path)
    array = np.array(photos[0])
    assert torch.equal(processor(array).pixel_values, processor(photos[0]).pixel_values)
    assert torch.equal(processor(torch.from_numpy(array).permute(2, 0, 1)).pixel_values, processor(array).pixel_values)
    with pytest.raises(ValueError, match="uint8"):
        processor(np.zeros((8, 8, 3), dtype=np.float32))


def test_crop_margins_are_split_as_transformers_splits_them_not_as_open_clip():
    """transformers halves a crop's margin rounding down; torchvision (open_clip, clipforge.load's preprocess) rounds
    half to even: a margin of 3, 7, 11 ... pixels puts the two crops a pixel apart."""
    from clipforge.preprocess import center_crop

    image = Image.fromarray(np.arange(7 * 4, dtype=np.uint8).reshape(7, 4))  # height 7, width 4: margin 3
    assert np.asarray(center_crop(image, 4, floor=True))[0, 0] == 4  # from row 1
    assert np.asarray(center_crop(image, 4))[0, 0] == 8  # from row 2


def test_features_are_a_tensor_that_saves_plainly_and_keeps_its_gradient(folders):
    model = transformers_api.CLIPModel.from_pretrained(folders["saved"]).train()
    features = model.get_image_features(torch.randn(2, 3, 64, 64))
    assert type(features / 2) is torch.Tensor and type(features.pooler_output) is torch.Tensor
    features.pooler_output.sum().backward()
    assert model.clip.visual.conv1.weight.grad is not None
    buffer = io.BytesIO()
    torch.save(features.detach(), buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=True)) is torch.Tensor
    buffer = io.BytesIO()
    torch.save(features, buffer)  # the subclass itself: stored as a plain tensor
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=True), features.detach())


def test_save_pretrained_writes_a_folder_transformers_loads_and_clipforge_reads_transformers_5_processor(folders,
                                                                                                         tmp_path):
    ours = transformers_api.CLIPModel.from_pretrained(folders["converted"], dtype="float32", device_map="cpu",
                                                      attn_implementation="sdpa")
    assert (ours.config.projection_dim, ours.config.vision_config.image_size, ours.dtype) == (128, 64, torch.float32)
    ours.save_pretrained(tmp_path / "again")
    theirs = transformers.CLIPModel.from_pretrained(tmp_path / "again").eval()
    images, tokens = torch.randn(2, 3, 64, 64), transformers_api.CLIPTokenizer.from_pretrained(folders["saved"])(
        ["a cat", "a dog on a mat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = theirs(pixel_values=images, **tokens), ours(pixel_values=images, **tokens)
        assert (theirs.get_image_features(images).pooler_output - ours.get_image_features(images)).abs().max() <= TOL
        assert (theirs.get_text_features(**tokens).pooler_output - ours.get_text_features(**tokens)).abs().max() <= TOL
    for key in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert (a[key] - b[key]).abs().max().item() <= TOL, key
    # a folder transformers 5 saved keeps its image settings in processor_config.json: clipforge.load reads them
    processor = transformers.CLIPProcessor.from_pretrained(folders["converted"])
    processor.image_processor.image_mean, processor.image_processor.image_std = [0.5] * 3, [0.5] * 3
    theirs.save_pretrained(tmp_path / "transformers-5")
    processor.save_pretrained(tmp_path / "transformers-5")
    assert not (tmp_path / "transformers-5" / "preprocessor_config.json").exists()
    _, preprocess, _ = clipforge.load(str(tmp_path / "transformers-5"))
    assert preprocess.mean == preprocess.std == (0.5, 0.5, 0.5)


def test_what_is_not_built_is_refused_by_name(folders, tmp_path):
    model = transformers_api.CLIPModel.from_pretrained(folders["saved"])
    images = torch.randn(1, 3, 64, 64)
    ids = torch.tensor([[49406, 320, 49407, 49407]])
    with pytest.raises(ValueError, match="model.vision_model"):
        model.get_image_features(images, output_hidden_states=True)
    with pytest.raises(AttributeError, match="output_hidden_states=True"):  # not computed unless asked for
        model(input_ids=ids, pixel_values=images).vision_model_output.last_hidden_state
    resnet = transformers_api.CLIPModel(clipforge.create_model(
        "RN50", vision_cfg={"layers": [1, 1, 1, 1], "width": 8, "image_size": 64}, text_cfg={"layers": 1}).eval())
    with pytest.raises(ValueError, match="no position grid"):
        resnet.get_image_features(images, interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="ModifiedResNet"):
        resnet(input_ids=ids, pixel_values=images, output_attentions=True)
    assert resnet(input_ids=ids, pixel_values=images).vision_model_output.pooler_output.shape == (1, 1024)
    with pytest.raises(ValueError, match="left padding"):
        model.get_text_features(ids, attention_mask=torch.tensor([[0, 1, 1, 1]]))
    mask = torch.tensor([[1, 1, 1, 0]])  # right padding after the end token changes nothing
    assert torch.equal(model.get_text_features(ids, attention_mask=mask), model.get_text_features(ids))
    with pytest.raises(TypeError, match="load_in_8bit"):
        transformers_api.CLIPModel.from_pretrained(folders["saved"], load_in_8bit=True)
    with pytest.raises(ValueError, match="zoo names"):
        transformers_api.CLIPModel.from_pretrained("ViT-B-32")
    with pytest.raises(ValueError, match="both input_ids and pixel_values"):
        model(pixel_values=images)
    with pytest.raises(FileNotFoundError, match="image processor"):
        transformers_api.CLIPImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        transformers_api.CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'pt' and 'np'"):
        transformers_api.CLIPTokenizer.from_pretrained(folders["saved"])("a", return_tensors="tf")
    siglip = clipforge.create_model("ViT-B-16-SigLIP", vision_cfg={"layers": 1}, text_cfg={"layers": 1})
    clipforge.save_pretrained(siglip, tmp_path / "siglip")
    with pytest.raises(ValueError, match="SiglipModel"):
        transformers_api.CLIPModel.from_pretrained(tmp_path / "siglip")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    transformers.Siglip2Model(transformers.Siglip2Config(
        text_config=dict(tower, vocab_size=100, max_position_embeddings=16),
        vision_config=dict(tower, patch_size=8, num_patches=16))).save_pretrained(tmp_path / "naflex")
    assert type(transformers_api.AutoModel.from_pretrained(tmp_path / "naflex")).__name__ == "Siglip2Model"
    with pytest.raises(ValueError, match="Siglip2Model.from_pretrained"):
        transformers_api.SiglipModel.from_pretrained(tmp_path / "naflex")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**tower)).save_pretrained(tmp_path / "text-encoder")
    with pytest.raises(ValueError, match="clip_text_model folder"):  # one tower: its own class reads it
        transformers_api.CLIPModel.from_pretrained(tmp_path / "text-encoder")
    assert transformers_api.CLIPTextModel.from_pretrained(tmp_path / "text-encoder").config.hidden_size == 32


def test_the_processor_takes_text_and_images_by_position_in_either_order(folders):
    processor = transformers_api.CLIPProcessor.from_pretrained(folders["saved"])
    photo = _photos(1)[0]
    a = processor(["a cat"], [photo], return_tensors="pt")  # transformers 4's order
    b = processor([photo], ["a cat"], return_tensors="pt")  # transformers 5's
    assert a.keys() == b.keys() == {"input_ids", "attention_mask", "pixel_values"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a.to(torch.float64).pixel_values.dtype == torch.float64 and a.to(torch.float64).input_ids.dtype == torch.long


def test_a_hub_repo_transformers_5_saved_loads_by_name_with_its_processor(folders, tmp_path, monkeypatch):
    """OWNER/NAME fetched from the hub (a local stand-in) into the cache: the model, its tokenizer.json and
    transformers 5's processor_config.json (its mean and std read by clipforge.load("hf-hub:...") too)."""
    from conftest import hub_server

    processor = transformers.CLIPProcessor.from_pretrained(folders["saved"])
    processor.image_processor.image_mean, processor.image_processor.image_std = [0.5] * 3, [0.5] * 3
    processor.save_pretrained(tmp_path / "repo")
    transformers.CLIPModel.from_pretrained(folders["saved"]).save_pretrained(tmp_path / "repo")
    files = {p.name: p.read_bytes() for p in (tmp_path / "repo").iterdir()}
    server = hub_server(monkeypatch, tmp_path / "cache", "someone/tiny-clip", files)
    try:
        from clipforge.pretrained import DownloadError

        with pytest.raises(DownloadError, match="offline"):  # nothing fetched: not cached yet
            transformers_api.CLIPModel.from_pretrained("someone/tiny-clip", local_files_only=True)
        assert "CLIPFORGE_OFFLINE" not in os.environ
        transformers_api.CLIPProcessor.from_pretrained("someone/tiny-clip", cache_dir=tmp_path / "elsewhere")
        assert (tmp_path / "elsewhere" / "transformers-api" / "someone--tiny-clip" / "tokenizer.json").is_file()
        texts, photos = ["a cat", "two dogs on a mat"], _photos(2)
        expected = _script(transformers, tmp_path / "repo", texts, photos)
        fetched = _script(transformers_api, "someone/tiny-clip", texts, photos)
        _, preprocess, _ = clipforge.load("hf-hub:someone/tiny-clip")
    finally:
        server.close()
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")  # fetched once: no hub needed again
    assert torch.equal(_script(transformers_api, "someone/tiny-clip", texts, photos)["probs"], fetched["probs"])
    assert torch.equal(expected["input_ids"], fetched["input_ids"])
    assert (expected["probs"] - fetched["probs"]).abs().max().item() <= TOL
    assert preprocess.mean == preprocess.std == (0.5, 0.5, 0.5)
    assert (tmp_path / "cache" / "transformers-api" / "someone--tiny-clip" / "tokenizer.json").is_file()
    from clipforge.cache_cli import entries

    assert [p.name for p in entries(tmp_path / "cache", "transformers-api")] == ["someone--tiny-clip"]


def test_the_zero_shot_pipeline_ranks_labels_as_transformers_pipeline_does(folders, tmp_path):
    """pipeline("zero-shot-image-classification") on a PIL image, a path, a JPEG stored sideways with its EXIF
    orientation, an http URL, and a list of them: the same labels in the same order with the same scores."""
    from conftest import FileServer

    photos = _photos(3, seed=2)
    photos[1].save(tmp_path / "photo.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter: shown upright by both
    photos[2].save(tmp_path / "sideways.jpg", exif=exif)
    server = FileServer({"/photo.png": (tmp_path / "photo.png").read_bytes()})
    labels = ["cat", "dog", "a red car", "two birds"]
    inputs = [photos[0], str(tmp_path / "photo.png"), str(tmp_path / "sideways.jpg"), f"{server.url}/photo.png"]
    try:
        theirs = transformers.pipeline("zero-shot-image-classification", model=str(folders["saved"]), device="cpu")
        ours = transformers_api.pipeline("zero-shot-image-classification", model=folders["saved"], device=-1)
        expected = [theirs(image, candidate_labels=labels, hypothesis_template="a photo of {}") for image in inputs]
        got = ours(inputs, candidate_labels=labels, hypothesis_template="a photo of {}")
        single = ours(inputs[0], candidate_labels=labels, hypothesis_template="a photo of {}")
    finally:
        server.close()
    for a, b in zip([*expected, single], [*got, got[0]]):
        assert [r["label"] for r in a] == [r["label"] for r in b]
        assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=TOL)
    assert [r["score"] for r in got[1]] == pytest.approx([r["score"] for r in got[3]], abs=TOL)  # the same photo
    assert [r["score"] for r in got[1]] != pytest.approx([r["score"] for r in got[2]], abs=TOL)  # another one
    with pytest.raises(ValueError, match="candidate_labels"):
        ours(inputs[0], candidate_labels=[])
    with pytest.raises(ValueError, match="only 'zero-shot-image-classification'"):
        transformers_api.pipeline("image-to-text", model=folders["saved"])


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    """test_siglip's SiglipModel folder: a SentencePiece-style tokenizer.json that gives an attention_mask (SigLIP 2's
    Gemma tokenizer does) and SiglipImageProcessor files."""
    from test_siglip import make_hf_siglip

    return make_hf_siglip(tmp_path_factory.mktemp("siglip") / "hf")[0]


def test_a_siglip_script_runs_with_clipforge_swapped_in_padding_masked_or_seen(siglip_folder, tmp_path):
    """AutoModel / AutoProcessor on a SiglipModel folder: the same ids, pixels, logits (with the bias) and sigmoid
    loss; with an attention_mask the padding is hidden as transformers hides it, without one (Google's SigLIP
    tokenizers give none) it is seen, as SigLIP was trained."""
    import shutil

    texts = ["A photo of a dog.", "a cat on a mat", "two dogs play in the park today"]
    photos = _photos(3)
    unmasked = tmp_path / "unmasked"
    shutil.copytree(siglip_folder, unmasked)
    settings = json.loads((unmasked / "tokenizer_config.json").read_text())
    (unmasked / "tokenizer_config.json").write_text(json.dumps({**settings, "model_input_names": ["input_ids"]}))
    for folder, masked in ((siglip_folder, True), (unmasked, False)):
        results = []
        for library in (transformers, transformers_api):
            model = library.AutoModel.from_pretrained(folder).eval()
            processor = library.AutoProcessor.from_pretrained(folder)
            inputs = processor(text=texts, images=photos, padding="max_length", max_length=64, return_tensors="pt")
            with torch.no_grad():
                results.append((type(model).__name__, inputs, model(**inputs, return_loss=True)))
        (theirs_name, theirs_inputs, theirs), (ours_name, ours_inputs, ours) = results
        assert theirs_name == ours_name == "SiglipModel"
        assert ("attention_mask" in ours_inputs) is masked and theirs_inputs.keys() == ours_inputs.keys()
        assert torch.equal(theirs_inputs["input_ids"], ours_inputs["input_ids"])
        assert (theirs_inputs["pixel_values"] - ours_inputs["pixel_values"]).abs().max().item() < 1e-6
        for key in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "loss"):
            assert torch.allclose(theirs[key], ours[key], rtol=2e-5, atol=2e-5), (key, masked)
    with pytest.raises(ValueError, match="SiglipModel.from_pretrained"):
        transformers_api.CLIPModel.from_pretrained(siglip_folder)


def test_the_zero_shot_pipeline_gives_siglips_sigmoids_as_transformers_does(siglip_folder):
    labels = ["a dog", "a cat on a mat", "a red car"]
    photos = _photos(2, seed=3)
    theirs = transformers.pipeline("zero-shot-image-classification", model=str(siglip_folder), device="cpu")
    ours = transformers_api.pipeline("zero-shot-image-classification", model=siglip_folder)
    for image, got in zip(photos, ours(photos, candidate_labels=labels)):
        expected = theirs(image, candidate_labels=labels)
        assert [r["label"] for r in expected] == [r["label"] for r in got]
        assert [r["score"] for r in expected] == pytest.approx([r["score"] for r in got], abs=TOL)
        assert abs(sum(r["score"] for r in got) - 1) > 0.01  # sigmoids, not a softmax


def test_a_gemma_tokenizer_pads_on_the_left_as_its_class_does(tmp_path):
    """SigLIP 2's GemmaTokenizer: BOS and EOS added, padding on the left where the folder names no side."""
    from test_siglip import TEXTS, make_gemma_tokenizer_folder

    make_gemma_tokenizer_folder(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = transformers_api.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.padding_side == "left"
    for settings in ({"padding": "max_length", "max_length": 64, "truncation": True}, {"padding": True}):
        a, b = theirs(TEXTS, return_tensors="pt", **settings), ours(TEXTS, return_tensors="pt", **settings)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)


def test_the_vision_models_give_transformers_hidden_states_and_embeddings(folders):
    """CLIPVisionModel / CLIPVisionModelWithProjection, as vision-language models load them (LLaVA reads
    hidden_states[-2]'s patch tokens): every hidden state, the last, the pooled class token and the projection equal
    transformers' within 1e-5."""
    images = torch.randn(2, 3, 64, 64)
    ours = transformers_api.CLIPVisionModel.from_pretrained(folders["saved"])
    theirs = transformers.CLIPVisionModel.from_pretrained(folders["saved"]).eval()
    assert (ours.config.hidden_size, ours.config.image_size, ours.config.patch_size) == \
        (theirs.config.hidden_size, theirs.config.image_size, theirs.config.patch_size)
    assert not hasattr(ours, "clip")  # the text tower is not kept
    with torch.no_grad():
        a, b = theirs(pixel_values=images, output_hidden_states=True), ours(images, output_hidden_states=True)
        assert len(a.hidden_states) == len(b.hidden_states) == theirs.config.num_hidden_layers + 1
        for x, y in zip(a.hidden_states, b.hidden_states):
            assert (x - y).abs().max().item() <= TOL
        for key in ("last_hidden_state", "pooler_output"):
            assert (a[key] - b[key]).abs().max().item() <= TOL, key
        assert ours(images).hidden_states is None and ours(images)[0].shape == a.last_hidden_state.shape == (2, 65, 128)
        projected = transformers_api.CLIPVisionModelWithProjection.from_pretrained(folders["saved"])(images)
        expected = transformers.CLIPVisionModelWithProjection.from_pretrained(folders["saved"]).eval()(images)
        assert (projected.image_embeds - expected.image_embeds).abs().max().item() <= TOL
        assert (projected.image_embeds - transformers_api.CLIPModel.from_pretrained(folders["saved"])
                .get_image_features(images)).abs().max().item() <= TOL


def test_a_legacy_feature_extractor_config_reads_as_transformers_reads_it(tmp_path):
    """openai/clip-vit-base-patch32's preprocessor_config.json predates image processors: sizes as plain numbers,
    "feature_extractor_type": "CLIPFeatureExtractor". Both read it as a short-side resize and a centre crop."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 48, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 48}))
    photos = _photos(6, seed=4)
    theirs = transformers.CLIPImageProcessor.from_pretrained(tmp_path)(images=photos, return_tensors="pt")
    ours = transformers_api.CLIPImageProcessor.from_pretrained(tmp_path)(photos)
    assert ours.pixel_values.shape == (6, 3, 48, 48)
    assert (theirs.pixel_values - ours.pixel_values).abs().max().item() < 1e-5


def test_the_text_models_give_transformers_hidden_states_and_embeddings(folders):
    """CLIPTextModel / CLIPTextModelWithProjection on right-padded captions, with and without the attention mask:
    every hidden state (padding positions included), the normed last one, the pooled end token and the projection
    equal transformers' within 1e-5."""
    tokens = transformers_api.CLIPTokenizer.from_pretrained(folders["saved"])(
        ["a photo of a cat", "two dogs play on the grass in the park", "x"], padding=True, return_tensors="pt")
    ours = transformers_api.CLIPTextModel.from_pretrained(folders["saved"])
    theirs = transformers.CLIPTextModel.from_pretrained(folders["saved"]).eval()
    assert ours.config.hidden_size == theirs.config.hidden_size and not hasattr(ours, "clip")
    with torch.no_grad():
        for inputs in (dict(tokens), {"input_ids": tokens["input_ids"]}):
            a, b = theirs(**inputs, output_hidden_states=True), ours(**inputs, output_hidden_states=True)
            assert len(a.hidden_states) == len(b.hidden_states) == theirs.config.num_hidden_layers + 1
            for x, y in zip([*a.hidden_states, a.last_hidden_state, a.pooler_output],
                            [*b.hidden_states, b.last_hidden_state, b.pooler_output]):
                assert (x - y).abs().max().item() <= TOL, len(inputs)
        projected = transformers_api.CLIPTextModelWithProjection.from_pretrained(folders["saved"])(**tokens)
        expected = transformers.CLIPTextModelWithProjection.from_pretrained(folders["saved"]).eval()(**tokens)
        assert (projected.text_embeds - expected.text_embeds).abs().max().item() <= TOL
        assert projected.hidden_states is None


def test_a_clip_models_tower_modules_and_projections_answer_as_transformers(folders, siglip_folder):
    """model.vision_model / model.text_model (their states) and model.visual_projection / model.text_projection
    (a Linear's call and weight), over the model's own weights: what scripts written against transformers' CLIPModel
    reach into; SigLIP's towers too."""
    images, texts = torch.randn(2, 3, 64, 64), ["a photo of a cat", "two dogs"]
    ours = transformers_api.CLIPModel.from_pretrained(folders["saved"])
    theirs = transformers.CLIPModel.from_pretrained(folders["saved"]).eval()
    inputs = transformers.CLIPTokenizer.from_pretrained(folders["saved"])(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = theirs.vision_model(pixel_values=images, output_hidden_states=True), \
            ours.vision_model(pixel_values=images, output_hidden_states=True)
        assert max((x - y).abs().max().item() for x, y in zip(a.hidden_states, b.hidden_states)) <= TOL
        assert (a.pooler_output - b.pooler_output).abs().max().item() <= TOL
        assert (theirs.visual_projection(a.pooler_output) - ours.visual_projection(b.pooler_output)).abs().max() <= TOL
        a, b = theirs.text_model(**inputs), ours.text_model(**inputs)
        assert (a.last_hidden_state - b.last_hidden_state).abs().max().item() <= TOL
        assert (theirs.text_projection(a.pooler_output) - ours.text_projection(b.pooler_output)).abs().max() <= TOL
    assert torch.equal(ours.visual_projection.weight, theirs.visual_projection.weight)
    assert ours.visual_projection.weight.data_ptr() == ours.clip.visual.proj.data_ptr()  # the same tensor
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ours.clip.parameters())
    siglip = transformers_api.SiglipModel.from_pretrained(siglip_folder)
    theirs = transformers.SiglipModel.from_pretrained(siglip_folder).eval()
    size = siglip.clip.visual.image_size
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        inputs = transformers_api.AutoTokenizer.from_pretrained(siglip_folder)(texts, padding=True, return_tensors="pt")
        for a, b in ((theirs.vision_model(pixel_values=images), siglip.vision_model(images)),
                     (theirs.text_model(**inputs), siglip.text_model(**inputs))):
            assert type(b).__name__ == "BaseModelOutputWithPooling"
            for key in ("last_hidden_state", "pooler_output"):
                assert (a[key] - b[key]).abs().max().item() <= TOL, key
    assert not hasattr(siglip, "visual_projection")  # transformers' SiglipModel has none either
    assert not hasattr(transformers.SiglipModel.from_pretrained(siglip_folder), "visual_projection")


def test_autoconfig_gives_transformers_values_for_full_sparse_and_other_format_folders(folders, siglip_folder,
                                                                                        tmp_path):
    """AutoConfig / CLIPConfig / SiglipConfig.from_pretrained: the keys a script reads equal transformers' for a CLIP
    folder, a SigLIP folder and a SigLIP config as sparse as Google's (transformers' defaults filled in); a clipforge
    checkpoint folder's config is its CLIPModel's."""
    sparse = tmp_path / "sparse"
    shutil.copytree(siglip_folder, sparse)
    config = json.loads((sparse / "config.json").read_text())
    for tower, kept in (("text_config", ("model_type", "vocab_size", "hidden_size", "num_attention_heads",
                                         "intermediate_size", "num_hidden_layers")),
                        ("vision_config", ("model_type", "patch_size", "image_size", "hidden_size",
                                           "num_attention_heads", "intermediate_size", "num_hidden_layers"))):
        config[tower] = {k: v for k, v in config[tower].items() if k in kept}
    (sparse / "config.json").write_text(json.dumps(config))
    keys = {None: ("model_type", "projection_dim", "logit_scale_init_value"),
            "text_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "max_position_embeddings", "vocab_size", "hidden_act", "layer_norm_eps"),
            "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "image_size", "patch_size", "num_channels", "hidden_act", "layer_norm_eps")}
    for folder, ours_class in ((folders["saved"], transformers_api.CLIPConfig), (siglip_folder,
                               transformers_api.AutoConfig), (sparse, transformers_api.SiglipConfig)):
        theirs, ours = transformers.AutoConfig.from_pretrained(folder), ours_class.from_pretrained(folder)
        for tower, names in keys.items():
            for name in names:
                expected = getattr(theirs if tower is None else getattr(theirs, tower), name, None)
                got = getattr(ours if tower is None else getattr(ours, tower), name, None)
                assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected, \
                    (folder.name, tower, name, got, expected)
    model = clipforge.create_model("ViT-Tiny-64")
    clipforge.save_pretrained(model, tmp_path / "clipforge-format")
    ours = transformers_api.AutoConfig.from_pretrained(tmp_path / "clipforge-format")
    assert (ours.projection_dim, ours.vision_config.image_size) == (model.embed_dim, 64)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_attention_maps_hidden_states_and_other_image_sizes_are_transformers_eager_ones(folders, siglip_folder, kind):
    """output_attentions / output_hidden_states through the model's forward (vision_model_output, text_model_output)
    and the tower classes, with padding masked or not, and interpolate_pos_encoding for larger, smaller and
    non-square images: every map, state and logit equals transformers' with eager attention (the only kind that
    gives maps) within 1e-5. Without the flags the towers' outputs hold transformers 5's pooler_output."""
    folder = folders["saved"] if kind == "clip" else siglip_folder
    theirs = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    ours = transformers_api.AutoModelForZeroShotImageClassification.from_pretrained(folder)
    assert type(ours).__name__ == type(theirs).__name__ == ("CLIPModel" if kind == "clip" else "SiglipModel")
    texts = ["a photo of a cat", "two dogs play on the grass in the park"]
    padding = {"padding": True} if kind == "clip" else {"padding": "max_length", "max_length": 64}
    tokens = dict(transformers_api.AutoTokenizer.from_pretrained(folder)(texts, return_tensors="pt", **padding))
    assert not bool(tokens["attention_mask"].all())  # the shorter caption's padding is masked
    size = ours.clip.visual.image_size
    maps = 0
    with torch.no_grad():
        for inputs in (tokens, {"input_ids": tokens["input_ids"]}):
            images = torch.randn(2, 3, size, size)
            asked = {"output_attentions": True, "output_hidden_states": True}
            a, b = theirs(**inputs, pixel_values=images, **asked), ours(**inputs, pixel_values=images, **asked)
            for tower in ("vision_model_output", "text_model_output"):
                assert len(a[tower].attentions) == len(b[tower].attentions) == len(b[tower].hidden_states) - 1 > 0
                for x, y in zip([*a[tower].attentions, *a[tower].hidden_states],
                                [*b[tower].attentions, *b[tower].hidden_states]):
                    assert x.shape == y.shape and (x - y).abs().max().item() <= TOL, tower
                    maps += 1
                for key in ("last_hidden_state", "pooler_output"):
                    assert (a[tower][key] - b[tower][key]).abs().max().item() <= TOL, (tower, key)
            assert (a.logits_per_image - b.logits_per_image).abs().max().item() <= 1e-4
            assert torch.allclose(b.vision_model_output.attentions[0].sum(-1), torch.ones(()))  # each row sums to 1
            plain = ours(**inputs, pixel_values=images)
            assert (plain.logits_per_image - b.logits_per_image).abs().max().item() <= 1e-4  # fused vs explicit
            assert (plain.vision_model_output.pooler_output - a.vision_model_output.pooler_output).abs().max() <= TOL
        tower_class = "CLIPVisionModel" if kind == "clip" else "SiglipVisionModel"
        theirs_tower = getattr(transformers, tower_class).from_pretrained(folder, attn_implementation="eager").eval()
        ours_tower = getattr(transformers_api, tower_class).from_pretrained(folder)
        for shape in ((size + 32, size + 32), (size - 16, size + 16), (size + 5, size)):
            images = torch.randn(2, 3, *shape)
            x = theirs.get_image_features(pixel_values=images, interpolate_pos_encoding=True)
            y = ours.get_image_features(images, interpolate_pos_encoding=True)
            assert (x.pooler_output - y).abs().max().item() <= TOL, shape
            a = theirs_tower(pixel_values=images, interpolate_pos_encoding=True, output_attentions=True)
            b = ours_tower(images, interpolate_pos_encoding=True, output_attentions=True)
            assert a.attentions[-1].shape == b.attentions[-1].shape
            for key in ("last_hidden_state", "pooler_output"):
                assert (a[key] - b[key]).abs().max().item() <= TOL, (shape, key)
            with pytest.raises(ValueError, match=f"expected {size}x{size}"):
                ours.get_image_features(images)
    assert maps > 10


def _one_tower_folders(folders, siglip_folder, root):
    """A diffusers-style model folder (text_encoder/ as transformers 5 saves a CLIPTextModel, text_encoder_2/ a
    CLIPTextModelWithProjection in fp16 as the "fp16" variant, image_encoder/ a CLIPVisionModelWithProjection,
    tokenizer/), the text encoder again with its keys in the other layout (under text_model., as transformers 4
    and Stable Diffusion's files have them, or bare, as transformers 5 saves a fresh tower), and a SigLIP image
    tower saved alone."""
    from safetensors.torch import load_file, save_file

    saved = folders["saved"]
    transformers.CLIPTextModel.from_pretrained(saved).save_pretrained(root / "sd" / "text_encoder")
    transformers.CLIPTextModelWithProjection.from_pretrained(saved).to(torch.float16).save_pretrained(
        root / "sd" / "text_encoder_2", variant="fp16")
    transformers.CLIPVisionModelWithProjection.from_pretrained(saved).save_pretrained(root / "sd" / "image_encoder")
    transformers.CLIPTokenizer.from_pretrained(saved).save_pretrained(root / "sd" / "tokenizer")
    shutil.copytree(root / "sd" / "text_encoder", root / "other-layout")
    state = load_file(root / "other-layout" / "model.safetensors")
    prefixed = all(k.startswith("text_model.") for k in state)
    assert prefixed or not any(k.startswith("text_model.") for k in state)
    save_file({k.removeprefix("text_model.") if prefixed else f"text_model.{k}": v for k, v in state.items()},
              root / "other-layout" / "model.safetensors")
    transformers.SiglipVisionModel.from_pretrained(siglip_folder).save_pretrained(root / "siglip_vision")
    return root / "sd"


def test_one_tower_folders_load_as_transformers_reads_them(folders, siglip_folder, tmp_path, monkeypatch):
    """CLIPTextModel.from_pretrained(repo, subfolder="text_encoder") as diffusers loads Stable Diffusion's text
    encoders (clip skip's hidden_states[-2], SDXL's projected second encoder in its fp16 variant), IP-Adapter's
    CLIPVisionModelWithProjection image encoder and a vision-language model's SiglipVisionModel: from folders that
    hold one tower, local (both key layouts) and from a hub repo's subfolders; states and embeddings equal
    transformers' within 1e-5. What does not fit is named."""
    from conftest import hub_server

    sd = _one_tower_folders(folders, siglip_folder, tmp_path)
    texts = ["a photo of an astronaut riding a horse", "a cat"]
    tokens = transformers_api.CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")(
        texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    expected_tokens = transformers.CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")(
        texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    assert torch.equal(tokens.input_ids, expected_tokens.input_ids)
    images = torch.randn(2, 3, 64, 64)
    cases = [("CLIPTextModel", sd, {"subfolder": "text_encoder"}, {"input_ids": tokens.input_ids}),
             ("CLIPTextModel", tmp_path / "other-layout", {}, {"input_ids": tokens.input_ids}),
             ("CLIPTextModelWithProjection", sd, {"subfolder": "text_encoder_2", "variant": "fp16"}, dict(tokens)),
             ("CLIPVisionModelWithProjection", sd, {"subfolder": "image_encoder"}, {"pixel_values": images}),
             ("SiglipVisionModel", tmp_path / "siglip_vision", {}, {"pixel_values": torch.randn(2, 3, 32, 32)})]
    with torch.no_grad():
        for class_name, folder, options, inputs in cases:
            theirs = getattr(transformers, class_name).from_pretrained(folder, dtype=torch.float32, **options).eval()
            ours = getattr(transformers_api, class_name).from_pretrained(folder, **options)
            assert not hasattr(ours, "clip") and ours.config.hidden_size == theirs.config.hidden_size
            a, b = theirs(**inputs, output_hidden_states=True), ours(**inputs, output_hidden_states=True)
            assert len(a.hidden_states) == len(b.hidden_states)
            keys = [k for k in ("last_hidden_state", "pooler_output", "text_embeds", "image_embeds") if k in a]
            for x, y in zip([*a.hidden_states, *(a[k] for k in keys)], [*b.hidden_states, *(b[k] for k in keys)]):
                assert x.shape == y.shape and (x - y).abs().max().item() <= TOL, (class_name, options)
    for class_name, folder, options in (("AutoConfig", sd, {"subfolder": "text_encoder_2"}),
                                        ("CLIPTextConfig", sd, {"subfolder": "text_encoder"}),
                                        ("CLIPTextConfig", folders["saved"], {}),
                                        ("CLIPVisionConfig", folders["saved"], {}),
                                        ("SiglipVisionConfig", tmp_path / "siglip_vision", {})):
        theirs = getattr(transformers, class_name).from_pretrained(folder, **options)
        ours = getattr(transformers_api, class_name).from_pretrained(folder, **options)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                    "layer_norm_eps", "projection_dim", "max_position_embeddings", "image_size", "patch_size"):
            assert getattr(ours, key, None) == getattr(theirs, key, None), (class_name, key)
    headless = transformers.SiglipVisionConfig.from_pretrained(tmp_path / "siglip_vision")
    headless.vision_use_head = False  # a vision-language model's tower: the patch states, no pooling head
    transformers.SiglipVisionModel(headless).save_pretrained(tmp_path / "headless")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = transformers.SiglipVisionModel.from_pretrained(tmp_path / "headless").eval()(pixel_values=pixels)
        b = transformers_api.SiglipVisionModel.from_pretrained(tmp_path / "headless")(pixels)
    assert a.pooler_output is None and b.pooler_output is None
    assert (a.last_hidden_state - b.last_hidden_state).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="holds no projection"):
        transformers_api.CLIPTextModelWithProjection.from_pretrained(sd, subfolder="text_encoder")
    with pytest.raises(ValueError, match="load it with CLIPTextModel"):
        transformers_api.CLIPModel.from_pretrained(sd, subfolder="text_encoder")
    with pytest.raises(ValueError, match="vision tower"):
        transformers_api.CLIPVisionModel.from_pretrained(sd, subfolder="text_encoder")
    with pytest.raises(ValueError, match="not outside it"):
        transformers_api.CLIPTextModel.from_pretrained(sd, subfolder="../sd")
    with pytest.raises(FileNotFoundError, match="model.fp16.safetensors"):
        transformers_api.CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", variant="fp16")
    files = {str(p.relative_to(sd)): p.read_bytes() for p in sd.rglob("*") if p.is_file()}
    server = hub_server(monkeypatch, tmp_path / "cache", "someone/tiny-sd", files)
    try:
        ours = transformers_api.CLIPTextModel.from_pretrained("someone/tiny-sd", subfolder="text_encoder")
        tokenizer = transformers_api.CLIPTokenizer.from_pretrained("someone/tiny-sd", subfolder="tokenizer")
    finally:
        server.close()
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")  # fetched once: no hub needed again
    again = transformers_api.CLIPTextModel.from_pretrained("someone/tiny-sd", subfolder="text_encoder")
    local = transformers_api.CLIPTextModel.from_pretrained(sd, subfolder="text_encoder")
    ids = tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt").input_ids
    assert torch.equal(ids, tokens.input_ids)
    with torch.no_grad():
        assert torch.equal(ours(ids).last_hidden_state, local(ids).last_hidden_state)
        assert torch.equal(again(ids).pooler_output, local(ids).pooler_output)


def test_a_private_hub_repo_loads_with_transformers_token_keyword(folders, tmp_path, monkeypatch):
    """from_pretrained(..., token=...) sends that token to the hub for the model, its tokenizer and processor (a
    private or gated repo); without one the refusal says what to do."""
    from conftest import hub_server

    from clipforge.pretrained import DownloadError

    files = {p.name: p.read_bytes() for p in folders["saved"].iterdir() if p.is_file()}
    server = hub_server(monkeypatch, tmp_path / "cache", "someone/private-clip", files)
    server.token = "secret"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no saved token
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    images = torch.randn(2, 3, 64, 64)
    try:
        with pytest.raises(DownloadError, match="set HF_TOKEN"):
            transformers_api.CLIPModel.from_pretrained("someone/private-clip")
        model = transformers_api.CLIPModel.from_pretrained("someone/private-clip", token="secret")
        processor = transformers_api.CLIPProcessor.from_pretrained("someone/private-clip", use_auth_token="secret")
    finally:
        server.close()
    with torch.no_grad():
        expected = transformers_api.CLIPModel.from_pretrained(folders["saved"]).get_image_features(images)
        assert torch.equal(model.get_image_features(images), expected)
    assert processor(text=["a cat"], return_tensors="pt")["input_ids"].shape[0] == 1
    assert server.authorizations[0] is None and set(server.authorizations[1:]) == {"Bearer secret"}

def test_a_sharded_transformers_folder_loads_whole(folders, tmp_path, monkeypatch):
    """A large model's folder, as transformers shards it (model.safetensors.index.json beside its shards): read by
    clipforge.load and CLIPModel.from_pretrained, every shard, from a folder and from a hub repo (fetched once); the
    same features as the one-file folder. A missing shard is named."""
    from conftest import hub_server

    transformers.CLIPModel.from_pretrained(folders["saved"]).save_pretrained(tmp_path / "sharded",
                                                                            max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(folders["saved"] / name, tmp_path / "sharded" / name)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = transformers_api.CLIPModel.from_pretrained(folders["saved"]).get_image_features(images)
        assert torch.equal(transformers_api.CLIPModel.from_pretrained(tmp_path / "sharded").get_image_features(images),
                           expected)
        assert torch.equal(clipforge.load(str(tmp_path / "sharded"))[0].encode_image(images), expected)
    files = {p.name: p.read_bytes() for p in (tmp_path / "sharded").iterdir()}
    server = hub_server(monkeypatch, tmp_path / "cache", "someone/big-clip", files)
    try:
        fetched = clipforge.load("hf-hub:someone/big-clip")[0]
    finally:
        server.close()
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")  # every shard cached: nothing fetched again
    with torch.no_grad():
        assert torch.equal(fetched.encode_image(images), expected)
        assert torch.equal(transformers_api.CLIPModel.from_pretrained("someone/big-clip").get_image_features(images),
                           expected)
    shards[1].unlink()
    with pytest.raises(clipforge.checkpoint.CheckpointError, match=f"shard {shards[1].name} is missing"):
        clipforge.load(str(tmp_path / "sharded"))


def test_a_hub_repo_of_pickled_shards_loads_as_transformers_reads_it(folders, tmp_path, monkeypatch):
    """transformers' older sharded layout (pytorch_model-*.bin and their index), read with weights_only: the features
    transformers gives on the same folder, fetched once from a hub repo (each name asked for in transformers' order)
    and then offline. A repo with no weights names every file looked for."""
    from conftest import hub_server
    from safetensors.torch import load_file

    state = load_file(folders["saved"] / "model.safetensors")
    keys, files, weight_map = sorted(state), {}, {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        buffer = io.BytesIO()
        torch.save({key: state[key] for key in part}, buffer)
        files[name] = buffer.getvalue()
        weight_map.update(dict.fromkeys(part, name))
    files["pytorch_model.bin.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["config.json"] = (folders["saved"] / "config.json").read_bytes()
    (tmp_path / "local").mkdir()
    for name, data in files.items():
        (tmp_path / "local" / name).write_bytes(data)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = transformers.CLIPModel.from_pretrained(tmp_path / "local").get_image_features(images)
        expected = getattr(expected, "pooler_output", expected)
        server = hub_server(monkeypatch, tmp_path / "cache", "someone/old-clip", files)
        try:
            fetched = transformers_api.CLIPModel.from_pretrained("someone/old-clip")
        finally:
            server.close()
        monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
        assert torch.allclose(fetched.get_image_features(images), expected, atol=1e-5)
        again = transformers_api.CLIPModel.from_pretrained("someone/old-clip")  # every shard cached
        assert torch.equal(again.get_image_features(images), fetched.get_image_features(images))
    server = hub_server(monkeypatch, tmp_path / "cache", "someone/no-weights", {"config.json": files["config.json"]})
    try:  # a repo without weights: every name transformers would take is named
        with pytest.raises(clipforge.pretrained.DownloadError, match="nor model.safetensors.index.json, pytorch"):
            transformers_api.CLIPModel.from_pretrained("someone/no-weights")
    finally:
        server.close()


def _diffusers_prompt_embeds(library, sd, prompt, clip_skip):
    """What diffusers' Stable Diffusion pipelines do with their text encoders, the import changed: SD's
    encode_prompt (the last state, or with clip skip an earlier block's through text_model.final_layer_norm) and
    SDXL's (the second encoder's projected text_embeds as output[0], hidden_states[-(clip_skip + 2)])."""
    tokenizer = library.CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    encoder = library.CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", dtype=torch.float32)
    encoder_2 = library.CLIPTextModelWithProjection.from_pretrained(sd, subfolder="text_encoder_2", variant="fp16",
                                                                    dtype=torch.float32)
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    assert not getattr(encoder.config, "use_attention_mask", False)
    with torch.no_grad():
        if clip_skip is None:
            sd_embeds = encoder(ids, attention_mask=None)[0]
        else:
            sd_embeds = encoder(ids, attention_mask=None, output_hidden_states=True)[-1][-(clip_skip + 1)]
            # transformers 4's layout, as diffusers reaches into it; 5's is flat (clipforge answers both)
            layers = encoder.text_model if library is transformers_api or hasattr(encoder, "text_model") else encoder
            sd_embeds = layers.final_layer_norm(sd_embeds)
            assert library is transformers or encoder.final_layer_norm is layers.final_layer_norm
        output = encoder_2(ids, output_hidden_states=True)
        pooled = output[0]
        xl_embeds = output.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)]
    return sd_embeds.to(encoder.dtype), pooled, xl_embeds, encoder.get_input_embeddings().weight


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_diffusers_prompt_encoding_runs_with_clipforge_swapped_in(folders, siglip_folder, tmp_path, clip_skip):
    sd = _one_tower_folders(folders, siglip_folder, tmp_path)
    prompt = ["a photograph of an astronaut riding a horse", "a cat"]
    expected = _diffusers_prompt_embeds(transformers, sd, prompt, clip_skip)
    got = _diffusers_prompt_embeds(transformers_api, sd, prompt, clip_skip)
    for name, a, b in zip(("sd", "pooled", "xl", "input embeddings"), expected, got):
        assert a.shape == b.shape and (a - b).abs().max().item() <= TOL, name


def _textual_inversion(library, sd, learned, mean_resizing=True):
    """What diffusers' textual inversion does with a text encoder and its tokenizer, the import changed: training
    (placeholders added, the embedding resized to the tokenizer as a seeded run draws it, the placeholders started
    from an initializer word) and loading (``load_textual_inversion``: a multi-vector embedding's tokens added after
    a resize, the prompt spelled out with them from ``added_tokens_encoder``), then a prompt encoded both ways."""
    tokenizer = library.CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    encoder = library.CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", dtype=torch.float32)
    vocabulary = len(tokenizer)
    added = tokenizer.add_tokens(["<shiny-toy>", "<toy-style>"])
    torch.manual_seed(1)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=mean_resizing)
    drawn = encoder.get_input_embeddings().weight[vocabulary:].detach().clone()
    initializer = tokenizer.encode("toy", add_special_tokens=False)[0]
    weights = encoder.get_input_embeddings().weight.data
    for token in ("<shiny-toy>", "<toy-style>"):
        weights[tokenizer.convert_tokens_to_ids(token)] = weights[initializer]
    assert "<cat-toy>" not in tokenizer.get_vocab()
    names = ["<cat-toy>", "<cat-toy>_1"]
    encoder.resize_token_embeddings(len(tokenizer) + len(names))
    for name, vector in zip(names, learned):
        tokenizer.add_tokens(name)
        encoder.get_input_embeddings().weight.data[tokenizer.convert_tokens_to_ids(name)] = vector
    prompt = "A <cat-toy> backpack, <Shiny-Toy> on a table in <toy-style>"  # matched lower-cased, as the text
    for token in set(tokenizer.tokenize(prompt)):  # diffusers' maybe_convert_prompt
        if token in tokenizer.added_tokens_encoder and f"{token}_1" in tokenizer.added_tokens_encoder:
            prompt = prompt.replace(token, f"{token} {token}_1")
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids)
    return {"added": added, "length": len(tokenizer), "vocab_size": encoder.config.vocab_size, "drawn": drawn,
            "encoder": {k: v for k, v in tokenizer.added_tokens_encoder.items()}, "prompt": prompt, "ids": ids,
            "tokens": tokenizer.tokenize(prompt), "decoded": tokenizer.decode(ids[0], skip_special_tokens=True),
            "last": out.last_hidden_state, "pooled": out.pooler_output}


def _bpe_files(tokenizer_json: Path, folder: Path) -> None:
    """``vocab.json`` and ``merges.txt`` (Stable Diffusion's tokenizer files) of a CLIP ``tokenizer.json``'s BPE."""
    bpe = json.loads(tokenizer_json.read_text())["model"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def test_a_tokenizer_transformers_4_saved_with_added_tokens_keeps_them(folders, tmp_path, monkeypatch):
    """A textual inversion saved as a full pipeline under transformers 4: its CLIPTokenizer (the slow one, which
    diffusers loads) writes vocab.json and merges.txt, and the placeholders to added_tokens.json and
    tokenizer_config.json, without a tokenizer.json. clipforge reads them at their ids, as transformers 5 and
    transformers 4's fast tokenizer do (the BPE split them into pieces before); ids out of order are refused."""
    import subprocess
    import sys

    from conftest import transformers4_peer

    peer = transformers4_peer()
    _bpe_files(folders["saved"] / "tokenizer.json", tmp_path / "bpe")
    (tmp_path / "bpe" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    texts = ["a <cat-toy> <cat-toy>_1 backpack", "A <CAT-TOY>!! on a <cat-toy>_1", "no placeholder"]
    script = ("import json, sys, transformers\n"
              "slow = transformers.CLIPTokenizer.from_pretrained(sys.argv[1])\n"
              "assert slow.add_tokens(['<cat-toy>', '<cat-toy>_1']) == 2\n"
              "slow.save_pretrained(sys.argv[2])\n"
              "fast = transformers.CLIPTokenizerFast.from_pretrained(sys.argv[2])\n"
              "print(json.dumps([transformers.__version__, fast(json.loads(sys.argv[3])).input_ids]))\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "bpe"), str(tmp_path / "saved4"),
                          json.dumps(texts)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(peer)})
    version, fast4 = json.loads(out.stdout.strip().splitlines()[-1])
    saved = tmp_path / "saved4"
    assert version.startswith("4.") and (saved / "added_tokens.json").is_file()
    assert not (saved / "tokenizer.json").exists()
    ours = transformers_api.CLIPTokenizer.from_pretrained(saved)
    assert ours(texts).input_ids == transformers.CLIPTokenizer.from_pretrained(saved)(texts).input_ids == fast4
    assert len(ours) == 49410 and ours.convert_tokens_to_ids("<cat-toy>_1") == 49409
    # from a hub repo, added_tokens.json alone (as transformers before 4.34 saved them) is fetched and read too
    from conftest import hub_server

    files = {p.name: p.read_bytes() for p in saved.iterdir() if p.name != "tokenizer_config.json"}
    files["tokenizer_config.json"] = json.dumps({"model_max_length": 77}).encode()
    server = hub_server(monkeypatch, tmp_path / "cache", "someone/inversion", files)
    try:
        fetched = transformers_api.CLIPTokenizer.from_pretrained("someone/inversion")
        assert fetched(texts).input_ids == fast4
    finally:
        server.close()
    # a cache an earlier clipforge filled (without that round) still reads with the hub gone, and says so
    root = tmp_path / "cache" / "transformers-api" / "someone--inversion"
    for leftover in [root / "added_tokens.json", *root.glob(".complete-added_tokens.json")]:
        leftover.unlink()
    with pytest.warns(UserWarning, match="could not ask for added_tokens.json"):
        assert len(transformers_api.CLIPTokenizer.from_pretrained("someone/inversion")) == 49408
    config = json.loads((saved / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["49500"] = {"content": "<far>", "special": False}
    (saved / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'<far>' is saved as id 49500, where the next id .* is 49410"):
        transformers_api.CLIPTokenizer.from_pretrained(saved)


@pytest.mark.parametrize("layout", ["vocab.json + merges.txt", "with added_tokens_decoder", "tokenizer.json"])
def test_sdxl_second_tokenizer_pads_with_a_special_exclamation_mark_as_transformers(folders, tmp_path, layout):
    """SDXL's tokenizer_2 pads with "!" (id 0): transformers registers every special token its config names, so each
    "!" of a prompt is matched whole ("wow!!" ends in two 0s, where the BPE alone makes one "!!" piece), in each
    layout its files come in; clipforge gives the same ids (it gave the BPE's pieces before)."""
    folder = tmp_path / "tokenizer_2"
    _bpe_files(folders["saved"] / "tokenizer.json", folder)
    config = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": "!", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    if layout != "vocab.json + merges.txt":
        config["added_tokens_decoder"] = {str(i): {"content": c, "lstrip": False, "normalized": True, "rstrip": False,
                                                   "single_word": False, "special": True}
                                          for i, c in ((0, "!"), (49406, "<|startoftext|>"), (49407, "<|endoftext|>"))}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({k: config[k] for k in ("bos_token", "eos_token",
                                                                                        "unk_token", "pad_token")}))
    if layout == "tokenizer.json":  # the BPE's own file, which knows nothing of "!" being special
        shutil.copy(folders["saved"] / "tokenizer.json", folder / "tokenizer.json")
    texts = ["wow!! a cat!", "hi ! there!!!", "no marks at all", "Hello, world?!"]
    expected = transformers.CLIPTokenizer.from_pretrained(folder)(texts, padding="max_length", max_length=16)
    ours = transformers_api.CLIPTokenizer.from_pretrained(folder)
    got = ours(texts, padding="max_length", max_length=16)
    assert got.input_ids == expected.input_ids and got.attention_mask == expected.attention_mask
    assert got.input_ids[0][:7] == [49406, 2781, 0, 0, 320, 2368, 0] and ours.pad_token_id == 0


@pytest.mark.parametrize("variant", ["tokenizer.json", "vocab.json + merges.txt, eos_token_id 2", "mean 0 rows"])
def test_textual_inversion_runs_with_clipforge_swapped_in(folders, siglip_folder, tmp_path, variant):
    """Added tokens and a resized text embedding as transformers gives them: the same ids, tokens and added-token
    tables, the same drawn rows for a seeded resize, and the same states; pooled where transformers pools (at the
    first end-of-text token, or for a config from before that, eos_token_id 2, at the largest id: then at an added
    token, as transformers does)."""
    sd = _one_tower_folders(folders, siglip_folder, tmp_path)
    if variant.startswith("vocab.json"):  # Stable Diffusion's own files: no tokenizer.json, an older config
        _bpe_files(sd / "tokenizer" / "tokenizer.json", sd / "tokenizer")
        (sd / "tokenizer" / "tokenizer.json").unlink()
        config = json.loads((sd / "text_encoder" / "config.json").read_text())
        (sd / "text_encoder" / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))
    width = transformers.CLIPTextConfig.from_pretrained(sd / "text_encoder").hidden_size
    learned = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    expected = _textual_inversion(transformers, sd, learned, mean_resizing=variant != "mean 0 rows")
    got = _textual_inversion(transformers_api, sd, learned, mean_resizing=variant != "mean 0 rows")
    assert expected["added"] == got["added"] == 2 and expected["length"] == got["length"] == got["vocab_size"]
    assert got["vocab_size"] == expected["vocab_size"]
    assert got["prompt"] == expected["prompt"] and "<cat-toy> <cat-toy>_1" in got["prompt"]
    assert got["tokens"] == expected["tokens"] and got["encoder"] == expected["encoder"]
    assert torch.equal(got["ids"], expected["ids"]) and int(got["ids"].max()) == got["length"] - 1
    assert got["decoded"] == expected["decoded"]
    assert torch.allclose(got["drawn"], expected["drawn"], atol=1e-7, rtol=0)
    for key in ("last", "pooled"):
        assert (got[key] - expected[key]).abs().max().item() <= TOL, key


def test_towers_tokenizer_and_processor_save_what_transformers_reads_back(folders, siglip_folder, tmp_path):
    """A textual inversion saved as a full pipeline (diffusers' --save_as_full_pipeline: the tokenizer with its added
    tokens, the resized text encoder), an image encoder, and a processor: transformers reads each back to the same
    ids, pixels and states as the clipforge objects that wrote them, and so does clipforge."""
    sd = _one_tower_folders(folders, siglip_folder, tmp_path)
    tokenizer = transformers_api.CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    texts = ["a <cat-toy> backpack", "A <Cat-Toy>!! and a dog", "plain words only"]
    for name, cls in (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")):
        encoder = getattr(transformers_api, cls).from_pretrained(sd, subfolder=name, variant=None if name ==
                                                                 "text_encoder" else "fp16", dtype=torch.float32)
        if name == "text_encoder":
            tokenizer.add_tokens("<cat-toy>")
        encoder.resize_token_embeddings(len(tokenizer))
        encoder.get_input_embeddings().weight.data[-1] = torch.randn(encoder.config.hidden_size)
        encoder.save_pretrained(tmp_path / "out" / name)
        ids = tokenizer(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            ours = encoder(ids)
            for library in (transformers, transformers_api):
                again = getattr(library, cls).from_pretrained(tmp_path / "out" / name)(ids)
                assert again.last_hidden_state.shape == ours.last_hidden_state.shape
                assert (again.last_hidden_state - ours.last_hidden_state).abs().max().item() <= TOL, (name, library)
                pooled = "pooler_output" if cls == "CLIPTextModel" else "text_embeds"
                assert (again[pooled] - ours[pooled]).abs().max().item() <= TOL, (name, library)
    written = tokenizer.save_pretrained(tmp_path / "out" / "tokenizer")
    assert sorted(Path(f).name for f in written) == ["special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    for library in (transformers, transformers_api):
        again = library.CLIPTokenizer.from_pretrained(tmp_path / "out", subfolder="tokenizer")
        assert len(again) == len(tokenizer) and again.convert_tokens_to_ids("<cat-toy>") == len(tokenizer) - 1
        assert again(texts).input_ids == tokenizer(texts).input_ids, library
        assert again.model_max_length == tokenizer.model_max_length

    # and the other way: transformers' own textual inversion, saved, read by clipforge
    theirs_tokenizer = transformers.CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    theirs_encoder = transformers.CLIPTextModel.from_pretrained(sd, subfolder="text_encoder")
    theirs_tokenizer.add_tokens("<cat-toy>")
    theirs_encoder.resize_token_embeddings(len(theirs_tokenizer))
    theirs_tokenizer.save_pretrained(tmp_path / "theirs" / "tokenizer")
    theirs_encoder.save_pretrained(tmp_path / "theirs" / "text_encoder")
    ours_tokenizer = transformers_api.CLIPTokenizer.from_pretrained(tmp_path / "theirs", subfolder="tokenizer")
    ids = ours_tokenizer(texts, padding=True, return_tensors="pt").input_ids
    assert torch.equal(ids, theirs_tokenizer(texts, padding=True, return_tensors="pt").input_ids)
    with torch.no_grad():
        expected = theirs_encoder(ids)
        got = transformers_api.CLIPTextModel.from_pretrained(tmp_path / "theirs", subfolder="text_encoder")(ids)
    for key in ("last_hidden_state", "pooler_output"):
        assert (got[key] - expected[key]).abs().max().item() <= TOL, key

    image_encoder = transformers_api.CLIPVisionModelWithProjection.from_pretrained(sd, subfolder="image_encoder")
    image_encoder.save_pretrained(tmp_path / "out" / "image_encoder")
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = image_encoder(pixels).image_embeds
        got = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "out" / "image_encoder")(pixels)
    assert (got.image_embeds - expected).abs().max().item() <= TOL
    siglip_tower = transformers_api.SiglipVisionModel.from_pretrained(siglip_folder)
    siglip_tower.save_pretrained(tmp_path / "out" / "siglip_vision")
    size = siglip_tower.config.image_size
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = siglip_tower(pixels).pooler_output
        got = transformers.SiglipVisionModel.from_pretrained(tmp_path / "out" / "siglip_vision")(pixels).pooler_output
    assert (got - expected).abs().max().item() <= TOL

    processor = transformers_api.CLIPProcessor.from_pretrained(folders["converted"])
    processor.save_pretrained(tmp_path / "processor")
    photos = _photos(4)
    # a folder of processor files alone names its class (AutoProcessor gave the tokenizer alone before)
    assert type(transformers.AutoProcessor.from_pretrained(tmp_path / "processor")) is transformers.CLIPProcessor
    for library in (transformers, transformers_api):
        again = library.CLIPProcessor.from_pretrained(tmp_path / "processor")
        a = again(text=texts, images=photos, return_tensors="pt", padding=True)
        b = processor(text=texts, images=photos, return_tensors="pt", padding=True)
        assert torch.equal(a.input_ids, b.input_ids) and (a.pixel_values - b.pixel_values).abs().max() <= 1e-5
    with pytest.raises(TypeError, match="not built here"):
        processor.save_pretrained(tmp_path / "processor", push_to_hub=True)


def test_resize_token_embeddings_rounds_up_shrinks_and_keeps_its_parameter(folders):
    encoder = transformers_api.CLIPTextModel.from_pretrained(folders["saved"])
    parameter, known = encoder.get_input_embeddings().weight, encoder.config.vocab_size
    before = parameter.detach().clone()
    resized = encoder.resize_token_embeddings(known + 3, pad_to_multiple_of=64)
    assert resized is encoder.get_input_embeddings() and resized.weight is parameter  # optimizers keep it
    assert resized.num_embeddings == -(-(known + 3) // 64) * 64 == encoder.config.vocab_size
    assert torch.equal(resized.weight[:known], before)
    assert encoder.resize_token_embeddings() is resized
    assert encoder.resize_token_embeddings(known).num_embeddings == known  # shrunk back
    assert torch.equal(encoder.get_input_embeddings().weight, before) and encoder.config.vocab_size == known
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        encoder.resize_token_embeddings(known, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="width"):
        encoder.set_input_embeddings(torch.nn.Embedding(10, 3))


@pytest.fixture(scope="module")
def siglip2_folder(tmp_path_factory):
    """A SigLIP 2 NaFlex repo as google/siglip2-*-naflex holds it: Siglip2Model, a Gemma tokenizer and
    Siglip2Processor's files."""
    from test_siglip import make_gemma_tokenizer_folder

    if not hasattr(transformers, "Siglip2Model"):
        pytest.skip("this transformers has no Siglip2Model (4.49 and later have)")
    folder = tmp_path_factory.mktemp("siglip2")
    make_gemma_tokenizer_folder(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    transformers.Siglip2Model(transformers.Siglip2Config(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=64),
        vision_config=dict(tower, patch_size=16, num_patches=256))).save_pretrained(folder)
    # Google's settings: transformers' Siglip2Processor passes 16-pixel patches and 256 of them whatever its image
    # processor was saved with (its images_kwargs defaults)
    transformers.Siglip2Processor(image_processor=transformers.Siglip2ImageProcessor(), tokenizer=tokenizer
                                  ).save_pretrained(folder)
    return folder


def test_a_siglip2_naflex_script_runs_with_clipforge_swapped_in(siglip2_folder, siglip_folder):
    """AutoModel / AutoProcessor on a Siglip2Model repo: the processor's patches, masks and grid shapes (each photo
    at its own aspect ratio; max_num_patches per call too) and its text defaults (padded to 64, lower-cased as
    transformers 5's Siglip2Tokenizer reads the repo's Gemma tokenizer), then the model's features, logits and
    sigmoid loss, as transformers gives them; the towers' states and attention maps; the zero-shot pipeline's
    scores."""
    texts, photos = ["A photo of a Dog.", "a cat on a mat", "TWO dogs play"], _photos(3, seed=5)  # lower-cased
    results = {}
    for library in (transformers, transformers_api):
        model = library.AutoModel.from_pretrained(siglip2_folder).eval()
        processor = library.AutoProcessor.from_pretrained(siglip2_folder)
        inputs = processor(text=texts, images=photos, return_tensors="pt")
        fewer = processor(images=photos, max_num_patches=32, return_tensors="pt")
        with torch.no_grad():
            output = model(**inputs, return_loss=True)
            features = model.get_image_features(**fewer)
            features = getattr(features, "pooler_output", features)  # transformers 5's output, or the tensor
        results[library.__name__] = type(model).__name__, inputs, fewer, output, features
    (theirs_name, theirs_inputs, theirs_fewer, theirs, theirs_features), (ours_name, ours_inputs, ours_fewer, ours,
                                                                          ours_features) = results.values()
    assert theirs_name == ours_name == "Siglip2Model"
    assert theirs_inputs.keys() == ours_inputs.keys() >= {"input_ids", "pixel_values", "spatial_shapes"}
    for key in theirs_inputs:
        assert theirs_inputs[key].shape == ours_inputs[key].shape, key
        assert (theirs_inputs[key].double() - ours_inputs[key].double()).abs().max().item() < 1e-6, key
    assert ours_inputs["input_ids"].shape[1] == 64 and ours_fewer["pixel_values"].shape[1] == 32
    assert torch.equal(theirs_fewer["spatial_shapes"], ours_fewer["spatial_shapes"])
    assert torch.allclose(theirs_features, ours_features, rtol=2e-5, atol=2e-5)  # positions resized per image
    for key in ("logits_per_image", "text_embeds", "image_embeds", "loss"):
        assert torch.allclose(theirs[key], ours[key], rtol=2e-5, atol=2e-5), key
    pipe = transformers_api.pipeline("zero-shot-image-classification", model=siglip2_folder)
    expected = transformers.pipeline("zero-shot-image-classification", model=str(siglip2_folder), device="cpu")
    labels = ["a dog", "a cat", "a car"]
    for image, got in zip(photos, pipe(photos, candidate_labels=labels)):
        want = expected(image, candidate_labels=labels)
        assert [r["label"] for r in want] == [r["label"] for r in got]
        assert [r["score"] for r in want] == pytest.approx([r["score"] for r in got], abs=TOL)
    model = transformers_api.Siglip2Model.from_pretrained(siglip2_folder)
    eager = transformers.Siglip2Model.from_pretrained(siglip2_folder, attn_implementation="eager").eval()
    asked = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():  # the towers' states and maps over padded NaFlex batches, padding positions included
        a, b = eager(**theirs_inputs, **asked), model(**ours_inputs, **asked)
        for tower in ("vision_model_output", "text_model_output"):
            assert len(a[tower].hidden_states) == len(b[tower].hidden_states) == 3
            for x, y in zip([*a[tower].hidden_states, *a[tower].attentions, a[tower].last_hidden_state],
                            [*b[tower].hidden_states, *b[tower].attentions, b[tower].last_hidden_state]):
                assert x.shape == y.shape and (x - y).abs().max().item() <= 5e-5, tower
        assert torch.allclose(a.logits_per_image, b.logits_per_image, rtol=2e-5, atol=2e-5)
        tower = transformers_api.Siglip2VisionModel.from_pretrained(siglip2_folder)(**{
            k: ours_fewer[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")})
        assert torch.allclose(tower.pooler_output, ours_features, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="spatial_shapes"):
        model.get_image_features(ours_inputs["pixel_values"])
    with pytest.raises(ValueError, match="a Siglip2 model; SiglipVisionModel reads a Siglip model's towers"):
        transformers_api.SiglipVisionModel.from_pretrained(siglip2_folder)
    with pytest.raises(ValueError, match="Siglip2VisionModel is SigLIP 2's NaFlex image tower"):
        transformers_api.Siglip2VisionModel(transformers_api.SiglipModel.from_pretrained(siglip_folder).clip)


def test_siglip2_towers_saved_alone_load_and_save_as_transformers(siglip2_folder, tmp_path):
    """A vision-language model's SigLIP 2 image tower (and the text tower) as transformers saves one alone
    (``Siglip2VisionModel.save_pretrained``: ``siglip2_vision_model``, the linear patch embedding): read to
    transformers' states, and written, from such a folder or a whole model's, to folders transformers reads back to
    the same outputs."""
    processor = transformers.Siglip2Processor.from_pretrained(siglip2_folder)
    pixels = processor(images=_photos(2, seed=3), max_num_patches=64, return_tensors="pt")
    image_inputs = {k: pixels[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
    text_inputs = {"input_ids": processor(text=["a dog", "two cats"], return_tensors="pt").input_ids}
    with torch.no_grad():
        for name, inputs in (("Siglip2VisionModel", image_inputs), ("Siglip2TextModel", text_inputs)):
            getattr(transformers, name).from_pretrained(siglip2_folder).save_pretrained(tmp_path / name)
            theirs = getattr(transformers, name).from_pretrained(tmp_path / name).eval()
            ours = getattr(transformers_api, name).from_pretrained(tmp_path / name)
            assert not hasattr(ours, "clip")
            a, b = theirs(**inputs, output_hidden_states=True), ours(**inputs, output_hidden_states=True)
            for x, y in zip([*a.hidden_states, a.last_hidden_state, a.pooler_output],
                            [*b.hidden_states, b.last_hidden_state, b.pooler_output]):
                assert x.shape == y.shape and (x - y).abs().max().item() <= TOL, name
            assert transformers_api.AutoConfig.from_pretrained(tmp_path / name).model_type == theirs.config.model_type
            for source in (tmp_path / name, siglip2_folder):  # a tower saved alone, a whole model's tower
                getattr(transformers_api, name).from_pretrained(source).save_pretrained(tmp_path / "out" / name)
                again = getattr(transformers, name).from_pretrained(tmp_path / "out" / name).eval()(**inputs)
                assert (again.pooler_output - a.pooler_output).abs().max().item() <= TOL, (name, source)
    with pytest.raises(ValueError, match="Siglip2TextModel / Siglip2VisionModel.from_pretrained"):
        transformers_api.Siglip2Model.from_pretrained(tmp_path / "Siglip2VisionModel")

    # an image tower saved without its pooling head (vision_use_head: false) is written back without one (before,
    # its config said it had one, and transformers drew a random head)
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=16,
                 vision_use_head=False)
    for name, size in (("SiglipVisionModel", {"image_size": 32}), ("Siglip2VisionModel", {"num_patches": 256})):
        torch.manual_seed(0)
        theirs = getattr(transformers, name)(getattr(transformers, name[:-5] + "Config")(**tower, **size)).eval()
        theirs.save_pretrained(tmp_path / "headless" / name)
        ours = getattr(transformers_api, name).from_pretrained(tmp_path / "headless" / name)
        assert ours.config.vision_use_head is False
        ours.save_pretrained(tmp_path / "headless-again" / name)
        again = getattr(transformers, name).from_pretrained(tmp_path / "headless-again" / name).eval()
        assert again.config.vision_use_head is False
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32)} if name == "SiglipVisionModel" else image_inputs
        with torch.no_grad():
            assert (again(**inputs).last_hidden_state - theirs(**inputs).last_hidden_state).abs().max() <= TOL


def test_a_siglip2_tokenizer_saves_as_the_class_that_lower_cases(siglip2_folder, tmp_path):
    """A SigLIP 2 repo's Gemma tokenizer, which transformers 5 reads as its lower-casing Siglip2Tokenizer, saved
    alone: under that class, as transformers saves it (the folder's "GemmaTokenizer" read back by transformers did not
    lower-case), and read back by clipforge to the same ids."""
    texts = ["A photo of a Dog.", "TWO cats"]
    expected = transformers.AutoTokenizer.from_pretrained(siglip2_folder)(texts).input_ids
    transformers_api.CLIPTokenizer.from_pretrained(siglip2_folder).save_pretrained(tmp_path / "tokenizer")
    assert json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "Siglip2Tokenizer"
    for library in (transformers.AutoTokenizer, transformers_api.CLIPTokenizer):
        assert library.from_pretrained(tmp_path / "tokenizer")(texts).input_ids == expected, library


def test_a_siglip_processor_saves_as_siglips_classes(siglip_folder, tmp_path):
    """A SigLIP folder's processor saved by clipforge: its image processor as SigLIP's own class (it squashes) and the
    processor class named, so transformers' AutoProcessor builds a SiglipProcessor (it built a CLIPProcessor) giving
    the original's ids and pixels; clipforge reads it back to the same."""
    texts, photos = ["A photo of a Dog.", "two cats"], _photos(3, seed=7)
    expected = transformers.AutoProcessor.from_pretrained(siglip_folder)(text=texts, images=photos,
                                                                          return_tensors="pt", padding=True)
    transformers_api.AutoProcessor.from_pretrained(siglip_folder).save_pretrained(tmp_path / "processor")
    assert json.loads((tmp_path / "processor" / "preprocessor_config.json").read_text())["image_processor_type"] == \
        "SiglipImageProcessor"
    for library in (transformers, transformers_api):
        processor = library.AutoProcessor.from_pretrained(tmp_path / "processor")
        assert library is transformers_api or type(processor) is transformers.SiglipProcessor
        got = processor(text=texts, images=photos, return_tensors="pt", padding=True)
        assert torch.equal(got["input_ids"], expected["input_ids"]), library
        assert (got["pixel_values"] - expected["pixel_values"]).abs().max().item() <= 1e-5, library


def test_a_transformers_script_runs_on_a_checkpoint_of_another_format(folders, tmp_path):
    """CLIPModel and CLIPProcessor.from_pretrained on a clipforge folder, an open_clip folder or an OpenAI file (a
    model trained here, as it is saved): the processor convert --to hf would write (before: "no image processor"),
    so the script gives what transformers gives on the converted folder."""
    from clipforge.convert import convert

    ours = folders["converted"].parent / "ours"
    convert(str(ours), str(tmp_path / "open_clip"), to="open_clip")
    convert(str(ours), str(tmp_path / "openai.pt"), to="openai")
    texts, photos = ["a photo of a cat", "two  dogs\tplay?!"], _photos(2, seed=9)
    expected = _script(transformers, folders["converted"], texts, photos)
    for source in (ours, tmp_path / "open_clip", tmp_path / "openai.pt"):
        got = _script(transformers_api, source, texts, photos)
        assert torch.equal(got["input_ids"], expected["input_ids"]), source
        for key in ("image", "text", "probs", "loss"):
            assert (got[key] - expected[key]).abs().max().item() <= TOL, (source, key)
    assert type(transformers_api.AutoProcessor.from_pretrained(ours)) is transformers_api.CLIPProcessor
    with pytest.raises(FileNotFoundError, match="no image processor"):  # a transformers folder without one, as there
        transformers_api.CLIPImageProcessor.from_pretrained(_without(folders["converted"], tmp_path / "bare",
                                                                     "preprocessor_config.json"))


def _without(folder: Path, copy: Path, name: str) -> Path:
    shutil.copytree(folder, copy)
    (copy / name).unlink()
    return copy
