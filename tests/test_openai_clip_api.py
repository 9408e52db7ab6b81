"""OpenAI's ``clip`` package API (``import clipforge.openai_clip as clip``) beside OpenAI's own code (PyPI's
``openai-clip``, github.com/openai/CLIP packaged): the same logits, features, preprocessing and tokens."""
import importlib
import sys
import types

import pytest
import torch
from PIL import Image

import clipforge.openai_clip as ours


@pytest.fixture(scope="module")
def openai_clip():
    """OpenAI's package; it imports ``packaging`` through setuptools' ``pkg_resources``, which new venvs lack."""
    pytest.importorskip("torchvision", reason="OpenAI's clip package needs torchvision (in the test environment)")
    import packaging.version

    with pytest.MonkeyPatch.context() as patch:  # the stand-in goes when these tests end
        try:
            importlib.import_module("pkg_resources").packaging  # what OpenAI's code imports
        except (ImportError, AttributeError):
            patch.setitem(sys.modules, "pkg_resources", types.SimpleNamespace(packaging=packaging))
        yield pytest.importorskip("clip", reason="OpenAI's clip package is PyPI's openai-clip (in the test extra)")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """``archive(name)``: the path of ``_openai_archive``'s file for ``name``, made once for this module's tests."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = _openai_archive(tmp_path_factory.mktemp("openai") / "model.pt", name)
        return made[name]

    return get


def _openai_archive(path, name):
    """A random model of ``name``'s shapes as OpenAI ships its weights: a TorchScript archive of fp16 values (read
    back as fp32 on CPU by both), in OpenAI's layout (open_clip's). OpenAI's loader cannot read a plain state-dict
    file under current torch (its TorchScript attempt consumes the file it then unpickles)."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    root = torch.nn.Module()
    for key, value in open_clip.create_model(name, pretrained=None).state_dict().items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, value.half().float() if value.is_floating_point() else value)
    torch.jit.save(torch.jit.script(root), str(path))
    return str(path)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # OpenAI's files are TorchScript archives
@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_load_forward_and_preprocess_are_openais(openai_clip, name, archive):
    weights = archive(name)
    theirs, their_preprocess = openai_clip.load(weights, device="cpu")
    model, preprocess = ours.load(weights, device="cpu")
    image = Image.radial_gradient("L").convert("RGB").resize((300, 200))
    assert (preprocess(image) - their_preprocess(image)).abs().max() <= 1e-6
    images = torch.randn(2, 3, 224, 224)
    text = ours.tokenize(["a diagram", "a dog", "a cat"])
    assert torch.equal(text, openai_clip.tokenize(["a diagram", "a dog", "a cat"]))
    with torch.no_grad():
        for a, b in zip(model(images, text), theirs(images, text)):  # logits per image, per text
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-4
        assert (model.encode_image(images) - theirs.encode_image(images)).abs().max() <= 1e-4
    assert not model.training and model.dtype == theirs.dtype == torch.float32
    assert model.visual.input_resolution == theirs.visual.input_resolution == 224
    assert model.vocab_size == theirs.vocab_size and model.context_length == theirs.context_length
    assert set(model.state_dict()) == set(clipforge_state(name))  # still clipforge's model, weights not copied


def clipforge_state(name):
    import clipforge

    with torch.device("meta"):
        return clipforge.create_model(name).state_dict()


def test_names_tokens_and_refusals_are_openais(openai_clip):
    assert ours.available_models() == openai_clip.available_models()
    long = "a photo of " + "a very " * 60 + "big dog"
    with pytest.raises(RuntimeError, match="too long for context length 77"):
        ours.tokenize(long)
    with pytest.raises(RuntimeError, match="too long for context length 77"):
        openai_clip.tokenize(long)
    assert torch.equal(ours.tokenize([long, "a dog"], truncate=True), openai_clip.tokenize([long, "a dog"],
                                                                                           truncate=True))
    assert ours.tokenize("a dog", context_length=16).shape == (1, 16)
    with pytest.raises(RuntimeError, match="Model ViT-Q/1 not found; available models"):
        ours.load("ViT-Q/1", device="cpu")
    with pytest.raises(ValueError, match="jit=True"):
        ours.load("ViT-B/32", device="cpu", jit=True)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_fp16_as_on_a_gpu_is_as_close_to_fp32_as_openais_fp16_model(openai_clip, name, archive):
    """``load`` casts the model to fp16 off the CPU, as OpenAI's does; OpenAI's keeps LayerNorm (and embeddings, batch
    norm) in fp32 there. Both run here on CPU in fp16: ours is as far from fp32 as theirs, and as close to theirs."""
    from clip.model import build_model  # what OpenAI's load builds on a GPU: fp16 weights, fp32 LayerNorm

    weights = archive(name)
    state = torch.jit.load(weights, map_location="cpu").state_dict()
    theirs = build_model(dict(state)).eval()
    reference = build_model(dict(state)).float().eval()
    model, _ = ours.load(weights, device="cpu")
    model.half()  # what load does on a GPU
    assert model.dtype == theirs.dtype == torch.float16
    images = torch.randn(1, 3, 224, 224)
    text = ours.tokenize(["a diagram", "a dog"])
    normalize = torch.nn.functional.normalize
    features = {}
    with torch.no_grad():
        for encode, inputs in (("encode_image", images), ("encode_text", text)):
            fp32 = normalize(getattr(reference, encode)(inputs), dim=-1)
            their16 = getattr(theirs, encode)(inputs.half() if inputs.is_floating_point() else inputs)
            our16 = getattr(model, encode)(inputs)  # fp32 images in, as OpenAI's examples pass them
            assert our16.dtype == their16.dtype == torch.float16
            their_error = (normalize(their16.float(), dim=-1) - fp32).abs().max()
            our_error = (normalize(our16.float(), dim=-1) - fp32).abs().max()
            assert our_error <= 2 * their_error + 1e-3, (encode, our_error, their_error)
            assert (normalize(our16.float(), dim=-1) - normalize(their16.float(), dim=-1)).abs().max() <= 5e-3
            features[encode] = their16 / their16.norm(dim=1, keepdim=True)  # as OpenAI's forward normalises
        logits = model(images, text)[0]
    their_logits = theirs.logit_scale.exp() * features["encode_image"] @ features["encode_text"].t()  # its forward
    assert logits.dtype == their_logits.dtype == torch.float16
    assert (logits.float() - their_logits.float()).abs().max() <= 0.05
