import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.models import UnknownModelError, get_model_config

from conftest import random_tokens

ZOO = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336",
       "ViT-B-32-256", "ViT-B-16-plus-240", "ViT-H-14", "ViT-g-14", "ViT-bigG-14"]


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_parameter_counts_equal_open_clip(name):
    open_clip = pytest.importorskip("open_clip")
    with torch.device("meta"):
        ours = clipforge.create_model(name)
        theirs = open_clip.create_model(name, pretrained=None, device="meta")
    assert count(ours) == count(theirs)


def test_list_models_has_the_zoo():
    models = clipforge.list_models()
    for name in ZOO + ["ViT-Tiny-64"]:
        assert name in models


def _transformer_params(width: int, layers: int, hidden: int) -> int:
    """Residual blocks as CLIP builds them: two LayerNorms, fused QKV + output projection, a two-layer MLP."""
    per_block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) \
        + (width * hidden + hidden) + (hidden * width + width)
    return layers * per_block


def test_tiny_model_has_the_parameters_its_config_implies_and_runs():
    config = get_model_config("ViT-Tiny-64")
    vision, text, embed = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    width, grid = vision["width"], vision["image_size"] // vision["patch_size"]
    image_tower = (3 * vision["patch_size"] ** 2 * width + width + (grid * grid + 1) * width + 2 * width
                   + _transformer_params(width, vision["layers"], 4 * width) + 2 * width + width * embed)
    text_tower = (text["vocab_size"] * text["width"] + text["context_length"] * text["width"]
                  + _transformer_params(text["width"], text["layers"], 4 * text["width"]) + 2 * text["width"]
                  + text["width"] * embed)
    model = clipforge.create_model("ViT-Tiny-64").eval()
    assert count(model) == image_tower + text_tower + 1  # + the temperature
    tokenizer = clipforge.get_tokenizer("ViT-Tiny-64")
    out = model(torch.randn(2, 3, 64, 64), tokenizer(["a red square", "a blue circle"]))
    assert out.image_features.shape == (2, 128)
    assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert out.logits_per_image.shape == (2, 2)


def test_logit_scale_init_and_clamp():
    model = clipforge.create_model("ViT-Tiny-64")
    assert model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(torch.randn(1, 3, 64, 64), torch.tensor([[49406, 49407] + [0] * 30])).logit_scale.item() == 100.0


def test_overrides_merge_nested_config():
    model = clipforge.create_model("ViT-Tiny-64", quick_gelu=True, vision_cfg={"patch_dropout": 0.5})
    assert model.visual.patch_dropout == 0.5
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_text_padding_skip_does_not_change_features():
    """The CPU path drops padding columns after the last EOT; features must equal the full-length computation."""
    model = clipforge.create_model("ViT-Tiny-64").eval()
    tokens = clipforge.get_tokenizer("ViT-Tiny-64")(["a", "a much longer caption about a red square"])
    with torch.no_grad():
        short = model.encode_text(tokens)
        full = torch.cat([model.encode_text(tokens[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-4)


def test_unknown_model_lists_close_matches():
    with pytest.raises(UnknownModelError) as err:
        get_model_config("ViT-B-33")
    assert "ViT-B-32" in str(err.value)
    with pytest.raises(UnknownModelError):
        clipforge.create_model("resnet-ninety")


def test_openai_slash_names_are_accepted():
    assert get_model_config("ViT-B/32") == get_model_config("ViT-B-32")


@pytest.mark.parametrize("name", ["ViT-Tiny-64", "RN-Tiny-64"])
def test_wrong_image_or_token_shape_or_dtype_is_a_clear_error(name):
    model = clipforge.create_model(name)
    with pytest.raises(ValueError, match="64x64"):
        model.encode_image(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model.encode_image(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="expected float images .* got torch.uint8"):  # forgot the preprocess
        model.encode_image(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected integer token ids .* got torch.float32"):  # was "length 77 exceeds"
        model.encode_text(torch.zeros(1, 77))
    with pytest.raises(ValueError, match="length 40 exceed context_length 32"):
        model.encode_text(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[N, context_length\]"):
        model.encode_text(torch.zeros(32, dtype=torch.long))


def test_text_or_a_pil_image_where_a_batch_goes_is_a_type_error_that_shows_the_call():
    from PIL import Image

    model = clipforge.create_model("ViT-Tiny-64")
    with pytest.raises(TypeError, match=r"token ids .* not a str: model.encode_text\(tokenizer\(texts\)\)"):
        model.encode_text("a dog")  # was AttributeError: 'str' object has no attribute 'ndim'
    with pytest.raises(TypeError, match=r"not a list"):
        model.encode_text(["a dog", "a cat"])
    with pytest.raises(TypeError, match=r"preprocessed images .* not a Image: preprocess\(image\).unsqueeze\(0\)"):
        model.encode_image(Image.new("RGB", (64, 64)))


@pytest.mark.parametrize("name, overrides", [
    ("ViT-Tiny-64", {}), ("RN-Tiny-64", {}), ("ViT-Tiny-64-MiniLM", {}),
    ("EVA02-B-16", {"vision_cfg": {"layers": 1}, "text_cfg": {"layers": 1}}),
])
def test_an_empty_batch_gives_empty_features(name, overrides):
    """open_clip's text towers answer an empty batch with [0, D]; clipforge's stopped on max() of no lengths, and its
    attention reshapes (EVA, SigLIP, PE, MobileCLIP image towers) could not infer a size from zero elements."""
    model = clipforge.create_model(name, **overrides).eval()
    tokenizer = clipforge.get_tokenizer(name)
    size = model.image_size
    with torch.no_grad():
        images = model.encode_image(torch.randn(0, 3, size, size))
        texts = model.encode_text(tokenizer([]), normalize=True)
        out = model(torch.randn(0, 3, size, size), tokenizer([]))
    assert images.shape == texts.shape == out.image_features.shape == (0, model.embed_dim)
    assert images.dtype == texts.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):  # an empty batch is still checked
        model.encode_image(torch.randn(0, 1, size, size))


def test_length_grouped_text_encoding_matches_one_by_one():
    """On CPU a large batch is encoded in length groups, each cut at its longest EOT: same features, any order."""
    model = clipforge.create_model("ViT-Tiny-64").eval()
    g = torch.Generator().manual_seed(3)
    tokens = random_tokens(70, 32, generator=g)
    with torch.no_grad():
        grouped = model.encode_text(tokens)
        single = torch.cat([model.encode_text(tokens[i : i + 1]) for i in range(70)])
    torch.testing.assert_close(grouped, single, atol=1e-5, rtol=1e-4)


def test_by_length_runs_sorted_groups_each_as_wide_as_its_longest_row_and_restores_the_order():
    from clipforge.models.inputs import by_length

    calls = []

    def run(rows, width):  # each row's "features": its own length, and the width it was run at
        calls.append((None if rows is None else rows.tolist(), width))
        picked = torch.arange(len(lengths)) if rows is None else rows
        return torch.stack([torch.tensor(lengths)[picked], torch.full((len(picked),), width)], dim=1)

    lengths = [5, 30, 2, 7] * 16  # 64 rows: 4 groups of 16, each cut at its own longest
    out = by_length(lengths, run)
    assert out[:, 0].tolist() == lengths  # back in the batch's order
    assert [width for _, width in calls] == [2, 5, 7, 30] and all(out[:, 1] == out[:, 0])
    assert sorted(sum((rows for rows, _ in calls), [])) == list(range(64))
    calls.clear()
    lengths = [12, 13] * 32  # grouping would save under a tenth of the tokens: one run, as wide as the longest
    assert by_length(lengths, run)[:, 0].tolist() == lengths and calls == [(None, 13)]
    calls.clear()
    lengths = [3, 30] * 7  # under 16 rows: one run
    by_length(lengths, run)
    assert calls == [(None, 30)]


def test_hugging_face_text_tower_skips_padding_by_length_with_the_padded_features():
    """MiniLM (a masked, bidirectional encoder): a large batch of captions of many lengths, grouped by length on
    CPU, gives the features of the whole padded computation and of each caption alone."""
    pytest.importorskip("transformers")
    model = clipforge.create_model("ViT-Tiny-64-MiniLM").eval()
    words = "a dog runs across the green grass near two children playing with a red ball".split()
    texts = [" ".join(words[: 1 + i % len(words)]) for i in range(70)]
    tokens = clipforge.get_tokenizer("ViT-Tiny-64-MiniLM")(texts)
    with torch.no_grad():
        grouped = model.encode_text(tokens)
        padded = model.text.features_padded(tokens)
        alone = torch.cat([model.encode_text(tokens[i : i + 1]) for i in range(0, 70, 7)])
    torch.testing.assert_close(grouped, padded, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grouped[::7], alone, atol=1e-5, rtol=1e-4)


def test_patch_embedding_as_a_matrix_product_equals_the_convolution():
    """On GPU the ViT embeds patches with one GEMM over patchified images instead of its strided conv1."""
    from clipforge.models.vision_transformer import patchify

    model = clipforge.create_model("ViT-Tiny-64")
    conv1 = model.visual.conv1
    images = torch.randn(3, 3, 64, 64)
    as_matrix = patchify(images, conv1.kernel_size[0]) @ conv1.weight.reshape(conv1.out_channels, -1).T
    torch.testing.assert_close(as_matrix, conv1(images).flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GEMM patch embedding runs on CUDA only")
def test_cuda_vit_patch_embedding_equals_the_convolution():
    model = clipforge.create_model("ViT-Tiny-64").cuda()
    images = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        expected = model.visual.conv1(images).flatten(2).transpose(1, 2)
        torch.testing.assert_close(model.visual._embed_patches(images), expected, atol=1e-4, rtol=1e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            embedded = model.visual._embed_patches(images)
            expected = model.visual.conv1(images).flatten(2).transpose(1, 2)
        assert embedded.dtype == torch.bfloat16  # the image was cast before its patches were gathered
        torch.testing.assert_close(embedded.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="--precision auto is bf16 on CUDA only")
@pytest.mark.parametrize("name", ["ViT-Tiny-64", "RN-Tiny-64"])
def test_cuda_inference_loads_bf16_weights_by_default_and_embeds_like_fp32(name, tmp_path):
    from clipforge.inference import load_for_inference

    path = str(clipforge.save_pretrained(clipforge.create_model(name), tmp_path / "m"))
    fp32, _, tokenizer = load_for_inference(pretrained=path, device="cuda", precision="fp32")
    bf16, _, _ = load_for_inference(pretrained=path, device="cuda", precision="auto")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    images, tokens = torch.randn(4, 3, 64, 64, device="cuda"), tokenizer(["a red square", "two dogs"]).cuda()
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            inputs = images if encode == "encode_image" else tokens
            full, reduced = getattr(fp32, encode)(inputs), getattr(bf16, encode)(inputs).float()
            assert F.cosine_similarity(full, reduced).min() > 0.99, encode


def test_compiled_text_tower_traces_once_for_every_caption_length():
    """Under torch.compile the text tower runs padded: the CPU length grouping (a host sync on lengths) would break
    the graph and recompile for each new batch of lengths, which made `--torchcompile` on CPU slower than eager."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = clipforge.create_model("ViT-Tiny-64").eval()
    tokenizer = clipforge.get_tokenizer("ViT-Tiny-64")
    counter = CompileCounter()
    compiled = torch.compile(model.encode_text, backend=counter)
    for words in (3, 9, 20):  # 16 rows of mixed lengths, a longer longest row each time
        tokens = tokenizer([" ".join(["red"] * (1 + (i * words) // 16)) for i in range(16)])
        with torch.no_grad():
            torch.testing.assert_close(compiled(tokens), model.encode_text(tokens), atol=1e-5, rtol=1e-4)
    assert counter.frame_count == 1, f"traced {counter.frame_count} times"
    torch._dynamo.reset()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_pooled_last_block_equals_full_computation_and_gradients(causal, checkpointing):
    """The last block computes only the pooled row (class token / EOT); outputs and gradients must not change."""
    from clipforge.models.layers import Transformer

    torch.manual_seed(0)
    net = Transformer(width=64, layers=3, heads=4)
    net.init_parameters()
    net.grad_checkpointing = checkpointing
    x = torch.randn(5, 9, 64, requires_grad=True)
    index = torch.tensor([0, 8, 3, 5, 1]) if causal else torch.zeros(5, dtype=torch.long)
    full = net(x, causal=causal)[torch.arange(5), index]
    (grad_full,) = torch.autograd.grad(full.square().sum(), x)
    pooled = net(x, causal=causal, pool_index=index)
    (grad_pooled,) = torch.autograd.grad(pooled.square().sum(), x)
    torch.testing.assert_close(pooled, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_pooled, grad_full, atol=1e-5, rtol=1e-4)


def test_pooled_last_block_saves_the_last_blocks_per_token_work():
    """Why the image tower trains faster than open_clip's (docs/BENCHMARKS.md): pooling skips the last block's
    queries, output projection and MLP for all but one row, a known share of the forward + backward FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from clipforge.models.layers import Transformer

    width, layers, length, batch = 64, 3, 17, 4
    net = Transformer(width=width, layers=layers, heads=4)
    x = torch.randn(batch, length, width, requires_grad=True)
    index = torch.zeros(batch, dtype=torch.long)
    flops = {}
    for name, pool_index in (("full", None), ("pooled", index)):
        with FlopCounterMode(display=False) as counter:
            out = net(x, pool_index=pool_index)
            (out if pool_index is not None else out[:, 0]).square().sum().backward()
        flops[name] = counter.get_total_flops()
    # per token and block: QKV 3w^2, output projection w^2, MLP 8w^2 multiply-adds; the pooled block keeps K, V (2w^2)
    # for every token and the rest (10w^2) for one; attention itself is a few percent here, hence the tolerance
    saved_matmul_flops = 3 * 2 * batch * (length - 1) * 10 * width**2  # forward + backward = 3x, 2 FLOPs a mul-add
    assert flops["full"] - flops["pooled"] == pytest.approx(saved_matmul_flops, rel=0.1)


def test_cpu_training_uses_the_fused_adamw_kernel():
    from clipforge.train.optim import build_optimizer

    optimizer = build_optimizer(clipforge.create_model("ViT-Tiny-64"), 1e-3, 0.2)
    assert all(group["fused"] for group in optimizer.param_groups)


@pytest.mark.parametrize("quick_gelu", [False, True])
@pytest.mark.parametrize("pool", [False, True])
def test_lean_blocks_give_identical_gradients_and_drop_cheap_activations(quick_gelu, pool):
    """Lean training recomputes LayerNorm / GELU / head-merge outputs in backward: the gradients must be bit-for-bit
    those of the plain graph, and those outputs must really be released after the forward pass."""
    import gc
    import weakref

    from clipforge.models.layers import Transformer

    torch.manual_seed(0)
    net = Transformer(width=64, layers=2, heads=4, quick_gelu=quick_gelu)
    net.init_parameters()
    x = torch.randn(5, 9, 64, requires_grad=True)
    index = torch.tensor([8, 2, 3, 5, 1]) if pool else None
    block = net.resblocks[0]  # never pooled: its activations are the full [N, L, width] ones

    def run(lean: bool):
        net.lean = lean
        alive = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: alive.append(weakref.ref(out)))
                 for m in (block.ln_1, block.ln_2, block.mlp.gelu)]
        loss = net(x, causal=True, pool_index=index).square().sum()
        for h in hooks:
            h.remove()
        gc.collect()
        kept = sum(ref() is not None for ref in alive)
        grads = torch.autograd.grad(loss, [x, *net.parameters()])
        return kept, grads

    kept_plain, grads_plain = run(False)
    kept_lean, grads_lean = run(True)
    assert kept_plain == 3 and kept_lean == 0, (kept_plain, kept_lean)
    for plain, lean in zip(grads_plain, grads_lean):
        assert torch.equal(plain, lean)


def test_lean_blocks_under_bf16_autocast_give_identical_gradients():
    """Under autocast the lean path casts LayerNorm outputs itself (as the next linear layer would)."""
    from clipforge.models.layers import Transformer

    torch.manual_seed(0)
    net = Transformer(width=64, layers=2, heads=4)
    net.init_parameters()
    x = torch.randn(5, 9, 64, requires_grad=True)

    def grads(lean: bool):
        net.lean = lean
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(x, causal=True).float().square().sum()
        return torch.autograd.grad(loss, [x, *net.parameters()])

    for plain, lean in zip(grads(False), grads(True)):
        assert torch.equal(plain, lean)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_inference_path_gives_the_same_features_and_leaves_its_input_alone(quick_gelu, causal):
    """Without autograd a block activates in place and lets the GEMM accumulate bias and residual (addmm_): the
    same sums in another order, so equal to float rounding, and the caller's tensor must not be overwritten."""
    from clipforge.models.layers import ResidualAttentionBlock, _activate_in_place

    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 4, quick_gelu=quick_gelu)
    for p in block.parameters():  # non-zero biases, so that moving them into the GEMM is really exercised
        torch.nn.init.normal_(p, std=0.2)
    hidden = torch.randn(3, 7, 256)
    expected = block.mlp.gelu(hidden)
    assert torch.equal(_activate_in_place(block.mlp.gelu, hidden.clone()), expected)
    x = torch.randn(3, 7, 64)
    reference = block(x.clone().requires_grad_(), causal=causal).detach()  # the autograd path: plain ops
    before = x.clone()
    with torch.inference_mode():
        fast = block(x, causal=causal)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(x, before)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # casts: the plain path runs, no dtype clash
        assert block(x, causal=causal).shape == x.shape
        assert block(x.bfloat16(), causal=causal).dtype == torch.bfloat16  # bf16 input, fp32 weights (mid-tower)


def test_forward_output_unpacks_as_open_clip_and_compiles_without_a_graph_break():
    """CLIPOutput: three values to unpack (four with a logit bias), fields by name and by key, the namedtuple helpers
    over all four fields, and torch.compile(fullgraph=True) of the forward in one frame."""
    import copy
    import pickle

    from torch._dynamo.testing import CompileCounter

    images, tokens = torch.randn(2, 3, 64, 64), random_tokens(2, 32)
    for bias, size in ((None, 3), (-2.0, 4)):
        model = clipforge.create_model("ViT-Tiny-64", init_logit_bias=bias).eval()
        with torch.no_grad():
            out = model(images, tokens)
        assert len(out) == len(list(out)) == size and torch.equal(out["image_features"], out.image_features)
        assert (out.logit_bias is None) == (bias is None) and (out._asdict()["logit_bias"] is None) == (bias is None)
        again = pickle.loads(pickle.dumps(out))
        assert type(again) is type(out) and torch.equal(again.logits_per_image, out.logits_per_image)
        assert torch.equal(copy.deepcopy(out)._replace(logit_scale=out.logit_scale * 2).logit_scale,
                           2 * out.logit_scale)
    counter = CompileCounter()
    compiled = torch.compile(clipforge.create_model("ViT-Tiny-64").eval(), backend=counter, fullgraph=True)
    with torch.no_grad():
        image_features, text_features, scale = compiled(images, tokens)
    assert counter.frame_count == 1 and image_features.shape == (2, 128)


@pytest.mark.parametrize("name, overrides", [
    ("EVA02-B-16", {"vision_cfg": {"width": 64, "heads": 4, "layers": 2, "image_size": 32}}),
    ("ViTamin-S", {"vision_cfg": {"layers": 2, "image_size": 64}}),
    ("convnext_tiny", {"vision_cfg": {"image_size": 64, "depths": [1, 1, 1, 1]}}),
    ("ViT-Tiny-64-MiniLM", {}),
])
def test_grad_checkpointing_recomputes_every_tower_that_offers_it_with_the_same_gradients(name, overrides):
    """`set_grad_checkpointing` reaches the timm-named trunks (EVA, ViTamin, ConvNeXt stages) and a Hugging Face text
    tower as well as clipforge's own stacks: blocks run again in backward, and the gradients do not change."""
    if name.endswith("MiniLM"):
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    text = {} if name.endswith("MiniLM") else {"text_cfg": {"layers": 1, "width": 64, "heads": 4}}
    model = clipforge.create_model(name, **overrides, **text)
    size = model.image_size
    images, tokens = torch.randn(2, 3, size, size), clipforge.get_tokenizer(name)(["a dog", "a cat"])
    calls = []
    blocks = [m for m in model.modules() if type(m).__name__ in ("EvaBlock", "MbConvBlock", "ConvNeXtBlock",
                                                                  "BertLayer", "ResidualAttentionBlock")]
    assert blocks
    for block in blocks:  # counted inside forward: checkpoint's recomputation skips forward hooks
        def counted(*args, _forward=block.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)
        block.forward = counted

    def gradients():
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)  # the same dropout masks each time (the BERT tower's; recomputation replays them)
        out = model(images, tokens)
        (out.image_features @ out.text_features.T).sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = gradients()
    model.set_grad_checkpointing(True)
    recomputed, recomputed_calls = gradients()
    assert recomputed_calls > plain_calls  # blocks ran again in backward
    assert plain.keys() == recomputed.keys()
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], atol=1e-5, rtol=1e-4, msg=key)
    model.set_grad_checkpointing(False)
    assert gradients()[1] == plain_calls
