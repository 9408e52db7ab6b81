"""LiMBer captioning: only the linear map trains, it carries image information into a frozen LM, runs resume exactly."""
import inspect
import io
import json
import random
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import clipforge
from clipforge.captioning import cli as limber_cli, limber
from clipforge.checkpoint import CheckpointError, save_pretrained
from clipforge.evaluate.features import embed_images
from clipforge.cli import main

from conftest import write_shard

COLOURS = {"red": (220, 40, 40), "blue": (50, 80, 220), "green": (40, 170, 60), "yellow": (235, 210, 40)}


def colour_images(n: int, seed: int):
    """Solid-colour images with pixel noise, and their caption lists ("a red shape", ...)."""
    rng = random.Random(seed)
    names = [list(COLOURS)[i % 4] for i in range(n)]
    images = [Image.new("RGB", (64, 64), tuple(min(255, max(0, v + rng.randint(-30, 30))) for v in COLOURS[c]))
              for c in names]
    return images, [[f"a {c} shape"] for c in names]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A small Llama trained (briefly, here) as a language model that copies a colour word seen before the caption:
    like a real LM, it already 'reads' its input space; LiMBer must learn to write the image's colour into it."""
    pytest.importorskip("transformers", reason="LiMBer loads language models with transformers")
    from conftest import tiny_llama

    lm, tokenizer = tiny_llama(["</s>", "<unk>", "a", "shape", *COLOURS])
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    rng = random.Random(0)
    for _ in range(100):
        ids = torch.tensor([tokenizer(f"{c} {c} a {c} shape").input_ids + [0]
                            for c in (rng.choice(list(COLOURS)) for _ in range(16))])
        loss = lm(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("tiny-lm")
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(clipforge.create_model("ViT-Tiny-64"), tmp_path_factory.mktemp("clip"),
                           clipforge.get_model_config("ViT-Tiny-64"))


def test_linear_map_carries_the_image_into_a_frozen_lm(tiny_lm, tiny_clip):
    lm, tokenizer = limber.load_language_model(str(tiny_lm))
    model, preprocess, _ = clipforge.load(str(tiny_clip))
    lm_before = [p.clone() for p in lm.parameters()]
    clip_before = [p.clone() for p in model.parameters()]
    images, captions = colour_images(64, seed=0)
    features = embed_images(model, images, preprocess)
    mapping = limber.ImageToPrefix(limber.MappingConfig(features.shape[1], lm.config.hidden_size, prefix_tokens=2))
    mapping.fit_scale(features)
    mapping.start_from(lm)
    assert len(set(map(str, mapping(features[:8]).tolist()))) == 1  # the same neutral prompt for every image
    losses, _ = limber.train_mapping(mapping, lm, tokenizer, features, captions, steps=150, lr=1e-2, progress=False)
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]
    test_images, test_captions = colour_images(32, seed=1)  # unseen images
    generated = limber.generate(mapping, lm, tokenizer, embed_images(model, test_images, preprocess), 5)
    accuracy = sum(g == c[0] for g, c in zip(generated, test_captions)) / len(generated)
    assert accuracy >= 0.9, generated[:8]
    blind = limber.ImageToPrefix(mapping.config)
    torch.nn.init.zeros_(blind.proj.weight), torch.nn.init.zeros_(blind.proj.bias)
    without_image = limber.generate(blind, lm, tokenizer, embed_images(model, test_images, preprocess), 5)
    assert len(set(without_image)) == 1  # the frozen LM alone cannot tell the images apart
    test_features = embed_images(model, test_images, preprocess)
    candidates = [f"a {c} shape" for c in COLOURS]
    ranked = limber.rank_captions(mapping, lm, tokenizer, test_features, candidates, batch_size=20)
    assert ranked.shape == (32, 4)
    assert sum(candidates[i] == c[0] for i, c in zip(ranked.argmax(1).tolist(), test_captions)) >= 0.9 * 32
    assert len(set(limber.rank_captions(blind, lm, tokenizer, test_features, candidates).argmax(1).tolist())) == 1
    assert all(torch.equal(a, b) for a, b in zip(lm_before, lm.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(clip_before, model.parameters()))
    assert [name for name, p in mapping.named_parameters()] == ["proj.weight", "proj.bias"]


def _lm_with_head(head: str):
    """A tiny random LM whose logits are a plain projection of its last hidden states, or are not (a head with a
    bias; Gemma 2's soft-capped logits)."""
    from conftest import tiny_llama

    words = ["</s>", "<unk>", "a", "shape", *COLOURS]
    lm, tokenizer = tiny_llama(words)
    if head == "biased":
        lm.lm_head = torch.nn.Linear(lm.config.hidden_size, len(words), bias=True)
    elif head == "soft-capped":
        import transformers

        lm = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5, eos_token_id=0, bos_token_id=0,
            pad_token_id=0))
    return lm.eval().requires_grad_(False), tokenizer


@pytest.mark.parametrize("head", ["plain", "biased", "soft-capped"])
def test_caption_loss_is_the_language_models_own_loss_whatever_its_head(head):
    """Where the LM's logits are a plain projection (checked per model), only the scored positions' states are
    projected, chunk by chunk, and the LM's head module never runs; otherwise the LM's own logits are taken. Either
    way: the loss and the map's gradient of the LM's own ``labels=`` loss, and its per-caption sums."""
    lm, tokenizer = _lm_with_head(head)
    torch.manual_seed(1)
    mapping = limber.ImageToPrefix(limber.MappingConfig(8, lm.config.hidden_size, prefix_tokens=2, prompt="a"))
    torch.nn.init.normal_(mapping.proj.weight, std=0.5)
    features, captions = torch.randn(3, 8), ["a red shape", "red", "a blue blue shape"]
    assert (limber._plain_output_projection(lm) is not None) == (head == "plain")
    head_calls = []
    hook = lm.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    try:
        loss = limber.caption_loss(mapping, lm, tokenizer, features, captions)
        loss.backward()
    finally:
        hook.remove()
    assert len(head_calls) == (0 if head == "plain" else 1)
    ours = mapping.proj.weight.grad.clone()
    mapping.zero_grad()
    embeds, attention, labels = limber._prefixed_captions(mapping, lm, tokenizer, features, captions)
    output = lm(inputs_embeds=embeds, attention_mask=attention, labels=labels)
    output.loss.backward()
    torch.testing.assert_close(loss, output.loss)
    torch.testing.assert_close(ours, mapping.proj.weight.grad)
    token_nll = torch.nn.functional.cross_entropy(output.logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                  reduction="none")
    nll, scored = limber._caption_nll(mapping, lm, tokenizer, features, captions)
    torch.testing.assert_close(nll, token_nll.sum(dim=1).detach())
    assert scored.tolist() == [len(c.split()) + 1 for c in captions]


def test_grad_checkpointing_recomputes_the_lm_layers_for_the_same_gradients_without_dropout(tiny_lm):
    lm, tokenizer = limber.load_language_model(str(tiny_lm))
    torch.manual_seed(0)
    mapping = limber.ImageToPrefix(limber.MappingConfig(8, lm.config.hidden_size, prefix_tokens=2))
    torch.nn.init.normal_(mapping.proj.weight, std=0.5)
    features, captions = torch.randn(4, 8), ["a red shape", "red", "a blue blue shape", "a shape"]

    def loss_grad_and_layer_calls():
        calls = []
        # (on the layers' attention: transformers recomputes a layer's forward, outside the layer's own hooks)
        hooks = [layer.self_attn.register_forward_hook(lambda *_: calls.append(1)) for layer in lm.model.layers]
        mapping.zero_grad()
        try:
            loss = limber.caption_loss(mapping, lm, tokenizer, features, captions)
            loss.backward()
        finally:
            for hook in hooks:
                hook.remove()
        return loss.detach(), mapping.proj.weight.grad.clone(), len(calls)

    assert limber._plain_output_projection(lm) is not None  # (checked once, by running the LM: before counting)
    loss, grad, calls = loss_grad_and_layer_calls()
    assert calls == len(lm.model.layers)
    limber.recompute_activations(lm)
    checkpointed_loss, checkpointed_grad, calls = loss_grad_and_layer_calls()
    assert calls == 2 * len(lm.model.layers)  # each layer again in the backward pass
    torch.testing.assert_close(checkpointed_loss, loss)
    torch.testing.assert_close(checkpointed_grad, grad)
    assert not any(m.training for m in lm.modules() if m not in set(lm.model.layers))  # dropout stays off


def test_caption_log_likelihood_matches_the_training_loss(tiny_lm):
    """Summed log-probabilities per caption, over the same scored tokens as ``caption_loss``'s mean."""
    lm, tokenizer = limber.load_language_model(str(tiny_lm))
    torch.manual_seed(0)
    mapping = limber.ImageToPrefix(limber.MappingConfig(8, lm.config.hidden_size, prefix_tokens=2))
    features, captions = torch.randn(3, 8), ["a red shape", "red", "a blue blue shape"]
    logp = limber.caption_log_likelihood(mapping, lm, tokenizer, features, captions)
    scored_tokens = torch.tensor([len(c.split()) + 1 for c in captions])  # words and EOS
    with torch.no_grad():
        mean_loss = limber.caption_loss(mapping, lm, tokenizer, features, captions)
    torch.testing.assert_close(-logp.sum() / scored_tokens.sum(), mean_loss)
    for batch_size in (1, 32):  # the development loss is the training loss, over any batching
        torch.testing.assert_close(torch.tensor(limber.held_out_loss(mapping, lm, tokenizer, features,
                                                                     [[c] for c in captions], batch_size)),
                                   mean_loss, atol=1e-5, rtol=1e-5)
    for row in range(3):  # padding of the other rows changes nothing
        torch.testing.assert_close(logp[row], limber.caption_log_likelihood(
            mapping, lm, tokenizer, features[row:row + 1], captions[row:row + 1])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one candidate"):
        limber.rank_captions(mapping, lm, tokenizer, features, [])


@pytest.mark.parametrize("prompt", ["", "a"])
def test_rank_captions_reads_the_shared_prefix_once_with_the_same_scores(tiny_lm, prompt):
    """Scores after the cached shared prefix equal each (image, caption) pair scored whole, in float64 to 1e-9:
    shared words then different lengths, nothing shared, identical candidates, one candidate, and more candidates
    than one call holds (the prefix read again per chunk)."""
    lm, tokenizer = limber.load_language_model(str(tiny_lm))
    lm = lm.double()
    torch.manual_seed(0)
    mapping = limber.ImageToPrefix(limber.MappingConfig(8, lm.config.hidden_size, prefix_tokens=2,
                                                        prompt=prompt)).double()
    torch.nn.init.normal_(mapping.proj.weight, std=0.5)
    features = torch.randn(5, 8, dtype=torch.float64)
    candidate_sets = [["a red shape", "a red", "a blue blue shape", "a green shape shape shape"],
                      ["red", "blue shape", "a yellow"], ["a red shape", "a red shape"], ["a blue shape"],
                      [f"a {c} shape" for c in COLOURS] + ["a shape"]]
    for candidates in candidate_sets:
        pairs = [(i, c) for i in range(len(features)) for c in candidates]
        whole = limber.caption_log_likelihood(mapping, lm, tokenizer, features[[i for i, _ in pairs]],
                                              [c for _, c in pairs]).view(len(features), len(candidates))
        for batch_size in (64, 3, 1):
            ranked = limber.rank_captions(mapping, lm, tokenizer, features, candidates, batch_size=batch_size)
            torch.testing.assert_close(ranked, whole, atol=1e-9, rtol=0, msg=f"{candidates}, batch {batch_size}")


def test_caption_prior_is_the_likelihood_without_the_image_or_over_reference_images(tiny_lm):
    lm, tokenizer = limber.load_language_model(str(tiny_lm))
    torch.manual_seed(0)
    mapping = limber.ImageToPrefix(limber.MappingConfig(8, lm.config.hidden_size, prefix_tokens=2))
    torch.nn.init.normal_(mapping.proj.weight, std=0.5)
    weights = mapping.proj.weight.clone()
    features, references = torch.randn(4, 8), torch.randn(6, 8)
    classes, templates = list(COLOURS), ["a {} shape", "{}"]
    blind = limber.ImageToPrefix(mapping.config)
    blind.load_state_dict(mapping.state_dict())
    torch.nn.init.zeros_(blind.proj.weight)
    without_image = limber.caption_prior(mapping, lm, tokenizer, classes, templates)
    assert without_image.shape == (4,)
    for row in limber.zero_shot_logits(blind, lm, tokenizer, features, classes, templates):  # any image alike
        torch.testing.assert_close(without_image, row)
    over_references = limber.caption_prior(mapping, lm, tokenizer, classes, templates, references)
    torch.testing.assert_close(over_references, limber.zero_shot_logits(mapping, lm, tokenizer, references, classes,
                                                                         templates).mean(0))
    assert not torch.allclose(over_references, without_image)
    torch.testing.assert_close(limber.zero_shot_logits(mapping, lm, tokenizer, features, classes, templates,
                                                       prior=over_references),
                               limber.zero_shot_logits(mapping, lm, tokenizer, features, classes, templates)
                               - over_references)
    assert torch.equal(mapping.proj.weight, weights)  # the blind copy left the map itself alone


def test_mapping_optimizer_gives_the_shared_prompt_a_faster_rate():
    mapping = limber.ImageToPrefix(limber.MappingConfig(8, 6, 3))
    groups = limber.mapping_optimizer(mapping, 1e-3).param_groups
    assert [(g["params"][0] is mapping.proj.weight, g["lr"]) for g in groups] == [(True, 1e-3), (False, 1e-2)]


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that records the norm of the gradient it is given at each step."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen = []

    def step(self, closure=None):
        self.seen.append(float(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]).norm()))
        return super().step(closure)


def test_training_clips_the_maps_gradient_and_reports_its_norm_before_clipping(tiny_lm):
    """A spike in the frozen LM's gradient reaches the optimiser no larger than ``max_grad_norm``; ``on_step`` gets
    the norm as computed, so the log shows where the spikes were."""
    lm, tokenizer = limber.load_language_model(str(tiny_lm))
    features, captions = torch.randn(8, 8) * 50, [["a red shape"], ["a blue shape"]] * 4  # large inputs, large grads
    reported = {}
    for bound in (None, 0.01):
        torch.manual_seed(0)
        mapping = limber.ImageToPrefix(limber.MappingConfig(8, lm.config.hidden_size, prefix_tokens=2))
        optimizer = RecordingSGD(mapping.parameters())
        norms = []
        limber.train_mapping(mapping, lm, tokenizer, features, captions, steps=3, batch_size=4, optimizer=optimizer,
                             on_step=lambda step, loss, norm: norms.append(norm), progress=False, max_grad_norm=bound)
        reported[bound] = norms
        if bound is None:
            assert optimizer.seen == pytest.approx(norms, rel=1e-5) and min(norms) > 0.01
        else:
            assert max(optimizer.seen) == pytest.approx(0.01, rel=1e-4)
    assert reported[None] == pytest.approx(reported[0.01], rel=1e-5)  # lr 0: same batches, same unclipped norms


def test_mapping_round_trips_and_rejects_bad_input(tmp_path):
    mapping = limber.ImageToPrefix(limber.MappingConfig(8, 6, 3, clip="somewhere", lm="smollm2"))
    mapping.fit_scale(torch.randn(10, 8))
    mapping.save(tmp_path / "map")
    loaded = limber.ImageToPrefix.load(tmp_path / "map")
    features = torch.randn(4, 8)
    assert torch.equal(loaded(features), mapping(features)) and loaded(features).shape == (4, 3, 6)
    assert loaded.config == mapping.config
    with pytest.raises(ValueError, match=r"expected image features \[N, 8\]"):
        mapping(torch.randn(4, 7))
    with pytest.raises(CheckpointError, match="not a LiMBer mapping"):
        limber.ImageToPrefix.load(tmp_path)
    with pytest.raises(ValueError, match="one caption list per image"):
        limber.train_mapping(mapping, None, None, features, [["a"]], steps=1, progress=False)
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        limber.train_mapping(mapping, None, None, features, [["a"]] * 4, steps=1, progress=False, max_grad_norm=-1.0)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_ctrl_c_stops_caption_train_with_a_checkpoint_and_resume_ends_on_the_straight_run(tiny_lm, tiny_clip,
                                                                                          tmp_path, monkeypatch, capsys):
    """A first SIGINT mid-run: the step finishes, the map and optimizer state are saved although no checkpoint is
    due, the command exits 130 saying how to go on; --resume then ends on the uninterrupted run's weights."""
    import os
    import signal

    images, captions = colour_images(12, seed=0)
    samples = [{"__key__": f"{i:04d}", "png": _png(img), "txt": "\n".join(c)}
               for i, (img, c) in enumerate(zip(images, captions))]
    shard = write_shard(tmp_path / "data" / "train-000000.tar", samples)
    common = ["caption", "train", "--clip", str(tiny_clip), "--lm", str(tiny_lm), "--data", str(shard),
              "--batch-size", "4", "--save-every", "100", "--steps", "6", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "straight")]) == 0
    calls, real_loss = [], limber.caption_loss

    def interrupted_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(limber, "caption_loss", interrupted_in_step_3)
    handler = signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "stopped")]) == 128 + signal.SIGINT
    assert "stopped by SIGINT at step 3 of 6" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is handler
    assert json.loads((tmp_path / "stopped" / "log.jsonl").read_text().splitlines()[-1])["step"] == 3
    monkeypatch.setattr(limber, "caption_loss", real_loss)
    assert main([*common, "--output", str(tmp_path / "stopped"), "--resume"]) == 0
    assert "resuming at step 3" in capsys.readouterr().out
    straight = limber.ImageToPrefix.load(tmp_path / "straight").state_dict()
    resumed = limber.ImageToPrefix.load(tmp_path / "stopped").state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_cli_train_resumes_exactly_then_captions_files(tiny_lm, tiny_clip, tmp_path, capsys, monkeypatch):
    images, captions = colour_images(24, seed=0)
    samples = [{"__key__": f"{i:04d}", "png": _png(img), "txt": "\n".join(c + ["one " + c[0]])}
               for i, (img, c) in enumerate(zip(images, captions))]
    samples.append({"__key__": "bad", "png": b"not a png", "txt": "a red shape"})  # skipped and counted
    shard = write_shard(tmp_path / "data" / "train-000000.tar", samples)
    common = ["caption", "train", "--clip", str(tiny_clip), "--lm", str(tiny_lm), "--data", str(shard),
              "--batch-size", "4", "--save-every", "2", "--no-progress"]
    # the straight run also scores development data: that must not change what it trains
    assert main([*common, "--steps", "4", "--output", str(tmp_path / "straight"), "--val-data", str(shard)]) == 0
    assert "skipped: {'corrupt_image': 1}" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert all(entry["grad_norm"] > 0 for entry in log)
    assert [entry["step"] for entry in log if "val_loss" in entry] == [2, 4] and log[3]["val_loss"] > 0
    train_args = json.loads((tmp_path / "straight" / "train_args.json").read_text())
    assert train_args["steps"] == 4 and train_args["environment"]["torch"] == torch.__version__
    assert main([*common, "--steps", "4", "--max-grad-norm", "-1", "--output", str(tmp_path / "bad")]) == 2
    assert "--max-grad-norm must be >= 0" in capsys.readouterr().err
    assert main([*common, "--steps", "2", "--output", str(tmp_path / "resumed")]) == 0
    # the second half recomputes the LM's activations in backward: the same steps
    assert main([*common, "--steps", "4", "--output", str(tmp_path / "resumed"), "--resume",
                 "--grad-checkpointing"]) == 0
    straight = limber.ImageToPrefix.load(tmp_path / "straight").state_dict()
    resumed = limber.ImageToPrefix.load(tmp_path / "resumed").state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    # a new map into a map's folder wrote over it and appended to its log: refused without --overwrite
    capsys.readouterr()
    assert main([*common, "--steps", "2", "--output", str(tmp_path / "resumed")]) == 2
    assert "holds a trained map already (mapping.safetensors, train_state.pt): --resume continues it, --overwrite" \
        in capsys.readouterr().err
    assert limber.ImageToPrefix.load(tmp_path / "resumed").state_dict().keys() == resumed.keys()
    assert main([*common, "--steps", "2", "--output", str(tmp_path / "resumed"), "--overwrite"]) == 0
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]  # the new map's log alone

    files = []
    for i, image in enumerate(colour_images(2, seed=5)[0]):
        files.append(tmp_path / f"img{i}.png")
        image.save(files[-1])
    capsys.readouterr()
    assert main(["caption", "generate", "--mapping", str(tmp_path / "straight"), "--json", "--max-new-tokens", "4",
                 *map(str, files)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["image"] for row in rows] == list(map(str, files))
    # the captions the map gives those images, generated here directly from the same three parts
    mapping = limber.ImageToPrefix.load(tmp_path / "straight").eval()
    clip_model, preprocess, _ = clipforge.load(str(tiny_clip))
    lm, tokenizer = limber.load_language_model(str(tiny_lm))
    features = embed_images(clip_model, [Image.open(f).convert("RGB") for f in files], preprocess)
    with torch.no_grad():
        assert [row["caption"] for row in rows] == limber.generate(mapping, lm, tokenizer, features, 4)
    # beam search and a repetition penalty reach transformers' generate; what they give is generate's
    decodings = []
    real_generate = limber.generate

    def recording_generate(*args, **kwargs):
        call = inspect.signature(real_generate).bind(*args, **kwargs).arguments
        decodings.append((call.get("num_beams"), call.get("repetition_penalty")))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(limber, "generate", recording_generate)
    assert main(["caption", "generate", "--mapping", str(tmp_path / "straight"), "--json", "--max-new-tokens", "4",
                 "--beams", "3", "--repetition-penalty", "1.3", *map(str, files)]) == 0
    assert decodings == [(3, 1.3)]
    with torch.no_grad():
        assert [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()] == real_generate(
            mapping, lm, tokenizer, features, 4, num_beams=3, repetition_penalty=1.3)
    assert main(["caption", "generate", "--mapping", str(tmp_path / "straight"), "--beams", "2", "--question", "what",
                 str(files[0])]) == 2
    assert "--question's answers are greedy" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        real_generate(mapping, lm, tokenizer, features, 4, num_beams=0)
    assert main(["caption", "generate", "--mapping", str(tmp_path / "straight"), "--json", "--question", "which colour",
                 *map(str, files)]) == 0  # a question about each image instead: the captioner's own answers
    answers = [json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]
    from clipforge.captioning.captioner import Captioner
    captioner = Captioner.load(tmp_path / "straight")
    assert answers == captioner.answer([Image.open(f) for f in files], ["which colour"] * 2, 5)
    assert main(["caption", "generate", "--mapping", str(tmp_path / "straight"), "--question", " ", str(files[0])]) == 2
    assert "ask something" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"garbage")
    assert main(["caption", "generate", "--mapping", str(tmp_path / "straight"), str(tmp_path / "broken.png")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["caption", "generate", "--mapping", str(tmp_path / "straight"), str(tmp_path / "absent.png")]) == 2
    assert "no such image file" in capsys.readouterr().err

    report = tmp_path / "eval.json"
    assert main(["caption", "eval", "--mapping", str(tmp_path / "straight"), "--data", str(shard), "--max-images", "8",
                 "--max-new-tokens", "4", "--json", str(report), "--no-progress"]) == 0
    result = json.loads(report.read_text())
    assert result["scores"]["images"] == 8 and len(result["captions"]) == 8
    assert result["decoding"] == {"num_beams": limber_cli.LIMBER_BEAMS, "repetition_penalty": 1.0}
    expected = {"clip_score", "ref_clip_score", "bleu_4", "cider", "human_clip_score", "human_cider"}
    assert expected <= result["scores"].keys()
    assert result["captions"][0]["references"] == ["a red shape", "one a red shape"]
    assert result["scores"]["clip_score"] == pytest.approx(
        sum(c["clip_score"] for c in result["captions"]) / 8, abs=1e-6)
    assert "noun_recall" in result["scores"] and "people" in result["nouns_by_category"]

    # --judge: another CLIP model grades the same captions; its scores are what it says of them, computed directly
    torch.manual_seed(5)
    judge_path = save_pretrained(clipforge.create_model("ViT-Tiny-64"), tmp_path / "judge",
                                 clipforge.get_model_config("ViT-Tiny-64"))
    judged = tmp_path / "judged.json"
    assert main(["caption", "eval", "--mapping", str(tmp_path / "straight"), "--data", str(shard), "--max-images", "8",
                 "--max-new-tokens", "4", "--json", str(judged), "--judge", str(judge_path), "--no-progress",
                 "--no-word-similarity"]) == 0
    by_judge = json.loads(judged.read_text())
    assert [c["caption"] for c in by_judge["captions"]] == [c["caption"] for c in result["captions"]]
    judge, judge_preprocess, judge_tokenizer = clipforge.load(str(judge_path))
    images = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in samples[:8]]
    from clipforge.captioning.metrics import clip_scores

    direct = clip_scores(judge, judge_tokenizer, embed_images(judge, images, judge_preprocess),
                         [c["caption"] for c in by_judge["captions"]])["clip_score"]
    assert [c["clip_score"] for c in by_judge["captions"]] == pytest.approx(direct.tolist(), abs=1e-5)
    assert by_judge["scores"]["clip_score"] != pytest.approx(result["scores"]["clip_score"], abs=1e-6)

    # labelled data (image + .cls, classnames.txt): also whether each caption names its image's class
    (tmp_path / "colours").mkdir()
    (tmp_path / "colours" / "classnames.txt").write_text("\n".join(COLOURS) + "\n")
    labelled = write_shard(tmp_path / "colours" / "test" / "test-000000.tar",
                           [{"__key__": f"{i:04d}", "png": _png(img), "cls": str(list(COLOURS).index(c[0].split()[1]))}
                            for i, (img, c) in enumerate(zip(*colour_images(8, seed=7)))])
    assert main(["caption", "eval", "--mapping", str(tmp_path / "straight"), "--data", str(labelled), "--label-captions",
                 "--max-new-tokens", "4", "--json", str(report), "--no-progress"]) == 0
    result = json.loads(report.read_text())
    named = [c["caption"].split() for c in result["captions"]]
    truth = [list(COLOURS)[i % 4] for i in range(8)]
    assert result["scores"]["names_the_class"] == pytest.approx(
        sum({w for w in words if w in COLOURS} == {colour} for words, colour in zip(named, truth)) / 8)

    # caption classify: zero-shot through the LM, the class caption it finds likeliest after each labelled image
    scores = tmp_path / "classify.json"
    assert main(["caption", "classify", "--mapping", str(tmp_path / "straight"), "--dataset-root",
                 str(tmp_path / "colours"), "--templates", "a {} shape", "--json", str(scores), "--no-progress",
                 "--prior", "none"]) == 0
    classified = json.loads(scores.read_text())
    labelled_images = colour_images(8, seed=7)[0]  # what the labelled shard holds, as lossless PNG
    labels = torch.tensor([list(COLOURS).index(c) for c in truth])
    with torch.no_grad():
        logits = limber.zero_shot_logits(mapping, lm, tokenizer, embed_images(clip_model, labelled_images, preprocess),
                                         list(COLOURS), ["a {} shape"])
        two = limber.zero_shot_logits(mapping, lm, tokenizer, features, list(COLOURS), ["a {} shape", "{}"])
        torch.testing.assert_close(two, (limber.rank_captions(mapping, lm, tokenizer, features,
                                                              [f"a {c} shape" for c in COLOURS]) +
                                         limber.rank_captions(mapping, lm, tokenizer, features, list(COLOURS))) / 2)
    predicted = logits.argmax(1)
    assert classified["images"] == 8 and classified["templates"] == ["a {} shape"]
    assert classified["metrics"]["acc1"] == pytest.approx((predicted == labels).float().mean().item())
    assert classified["confusion_matrix"] == [[int(((labels == t) & (predicted == q)).sum()) for q in range(4)]
                                              for t in range(4)]
    assert main(["caption", "classify", "--mapping", str(tmp_path / "straight"), "--dataset-root",
                 str(tmp_path / "colours"), "--templates", "a {} shape", "--json", str(scores), "--no-progress",
                 "--without-image", "--prior", "none"]) == 0
    blind = json.loads(scores.read_text())  # the shared prompt alone: one guess for every image
    assert blind["without_image"] and max(map(sum, zip(*blind["confusion_matrix"]))) == 8
    prior = limber.caption_prior(mapping, lm, tokenizer, list(COLOURS), ["a {} shape"])  # --prior blind
    assert main(["caption", "classify", "--mapping", str(tmp_path / "straight"), "--dataset-root",
                 str(tmp_path / "colours"), "--templates", "a {} shape", "--json", str(scores), "--no-progress"]) == 0
    assert json.loads(scores.read_text())["prior"] == "blind"  # the default without --prior-data
    predicted = (logits - prior).argmax(1)
    assert json.loads(scores.read_text())["confusion_matrix"] == [
        [int(((labels == t) & (predicted == q)).sum()) for q in range(4)] for t in range(4)]
    assert main(["caption", "classify", "--mapping", str(tmp_path / "straight"), "--dataset-root",
                 str(tmp_path / "colours"), "--json", str(scores), "--no-progress", "--prior", "images",
                 "--prior-data", str(shard)]) == 0
    assert json.loads(scores.read_text())["prior_data"] == str(shard)
    assert main(["caption", "classify", "--mapping", str(tmp_path / "straight"), "--dataset-root",
                 str(tmp_path / "colours"), "--prior", "images"]) == 2
    assert "--prior images needs --prior-data" in capsys.readouterr().err
    assert main(["caption", "classify", "--mapping", str(tmp_path / "straight"), "--dataset-root",
                 str(tmp_path / "absent")]) == 2


def test_a_randomly_initialised_tower_is_saved_with_the_map_and_reloads(tiny_lm, tmp_path, capsys):
    """The paper's "random init" rows: a zoo name without weights is initialised from --seed and saved beside the
    map (under a name relative to it), so generation later sees the very same features."""
    images, captions = colour_images(8, seed=0)
    shard = write_shard(tmp_path / "data" / "train-000000.tar", [{"__key__": f"{i:04d}", "png": _png(img), "txt": c[0]}
                                                                 for i, (img, c) in enumerate(zip(images, captions))])
    args = ["caption", "train", "--clip", "ViT-Tiny-64", "--lm", str(tiny_lm), "--data", str(shard), "--steps", "2",
            "--batch-size", "4", "--no-progress", "--seed", "3"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert main([*args, "--output", str(tmp_path / "b")]) == 0
    a = load_file(tmp_path / "a" / "tower" / "model.safetensors")
    b = load_file(tmp_path / "b" / "tower" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed, the same random tower
    assert json.loads((tmp_path / "a" / "limber.json").read_text())["clip"] == "tower"
    moved = tmp_path / "moved"
    (tmp_path / "a").rename(moved)  # the map's folder can move: the tower is found beside it
    image_file = tmp_path / "x.png"
    images[1].save(image_file)
    capsys.readouterr()
    assert main(["caption", "generate", "--mapping", str(moved), "--max-new-tokens", "3", str(image_file)]) == 0
    assert main(["caption", "train", "--clip", "NoSuchNet", "--data", str(shard), "--output", str(tmp_path / "c")]) == 2
    assert "not a checkpoint, a Hugging Face vision folder or a zoo name" in capsys.readouterr().err


def test_a_map_names_its_tower_and_lm_relative_to_itself_so_a_project_can_move(tiny_lm, tiny_clip, tmp_path,
                                                                              monkeypatch, capsys):
    project = tmp_path / "project"
    shutil.copytree(tiny_clip, project / "towers" / "clip")
    shutil.copytree(tiny_lm, project / "lm")
    images, captions = colour_images(8, seed=0)
    shard = write_shard(tmp_path / "data" / "train-000000.tar", [{"__key__": f"{i:04d}", "png": _png(img), "txt": c[0]}
                                                                 for i, (img, c) in enumerate(zip(images, captions))])
    image_file = tmp_path / "x.png"
    images[2].save(image_file)
    monkeypatch.chdir(project)  # paths as users type them: relative to where they stand
    assert main(["caption", "train", "--clip", "towers/clip", "--lm", "lm", "--data", str(shard), "--steps", "2",
                 "--batch-size", "4", "--no-progress", "--output", "runs/map"]) == 0
    config = json.loads((project / "runs" / "map" / "limber.json").read_text())
    assert (config["clip"], config["lm"]) == ("../../towers/clip", "../../lm")
    generate = ["caption", "generate", "--max-new-tokens", "3", "--json", str(image_file), "--mapping"]
    capsys.readouterr()
    assert main([*generate, "runs/map"]) == 0
    before = capsys.readouterr().out
    moved = tmp_path / "elsewhere"
    project.rename(moved)  # the whole project moves, and is used from another directory
    monkeypatch.chdir(tmp_path)
    assert main([*generate, str(moved / "runs" / "map")]) == 0
    assert capsys.readouterr().out == before  # the same tower and LM found, the same caption
    shutil.rmtree(moved / "towers")
    assert main([*generate, str(moved / "runs" / "map")]) == 2
    assert "its image encoder '../../towers/clip' is not there" in capsys.readouterr().err


def test_smollm2_from_pypi_takes_a_prefix_and_only_the_map_gets_gradients(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="loading the GGUF language model needs the gguf package")
    try:
        limber.smollm2_folder()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path))
    from_gguf, gguf_tokenizer = limber.load_language_model("smollm2")
    cached = list((tmp_path / "language-models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()  # converted once, kept
    lm, tokenizer = limber.load_language_model("smollm2")  # now from the cache: the same model and tokenizer
    text = "A picture of two dogs 🙂 Q: what colour? A:"
    ids = torch.tensor([tokenizer(text).input_ids])
    assert ids[0].tolist() == gguf_tokenizer(text).input_ids and tokenizer.eos_token_id == gguf_tokenizer.eos_token_id
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, from_gguf(ids).logits)
    del from_gguf
    assert lm.config.hidden_size == 576 and not any(p.requires_grad for p in lm.parameters())
    mapping = limber.ImageToPrefix(limber.MappingConfig(16, lm.config.hidden_size, 2))
    captions = ["a dog on a sofa", "two red apples"]
    loss = limber.caption_loss(mapping, lm, tokenizer, torch.randn(2, 16), captions)
    loss.backward()
    with torch.no_grad():  # the LM reads the prefix: other image features, another loss
        assert limber.caption_loss(mapping, lm, tokenizer, torch.randn(2, 16), captions).item() != loss.item()
    assert mapping.proj.weight.grad is not None and mapping.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.parameters())
    features = torch.randn(2, 16)
    captions = limber.generate(mapping, lm, tokenizer, features, max_new_tokens=4, prompt="A picture of")
    # greedy: each caption starts with the LM's most likely token after [image prefix, prompt]
    with torch.no_grad():
        prompt = tokenizer("A picture of", add_special_tokens=False, return_tensors="pt").input_ids
        inputs = torch.cat([mapping(features), lm.get_input_embeddings()(prompt).expand(2, -1, -1)], dim=1)
        first = lm(inputs_embeds=inputs).logits[:, -1].argmax(dim=-1)
    assert len(captions) == 2
    for caption, token in zip(captions, first.tolist()):
        assert caption.startswith(tokenizer.decode([token]).strip()), (caption, tokenizer.decode([token]))


def test_streamed_embedding_equals_embedding_all_at_once(tiny_clip, tmp_path):
    """caption train decodes and embeds in chunks (a large collection never sits in memory as images)."""
    from clipforge.captioning.cli import collect_captioned_images, embed_captioned

    images, captions = colour_images(7, seed=2)
    shard = write_shard(tmp_path / "d" / "s-000000.tar", [{"__key__": f"{i}", "png": _png(im), "txt": c[0]}
                                                          for i, (im, c) in enumerate(zip(images, captions))])
    model, preprocess, _ = clipforge.load(str(tiny_clip))
    featurize = lambda batch: embed_images(model, batch, preprocess)  # noqa: E731
    streamed, streamed_captions, _, _ = embed_captioned(featurize, str(shard), chunk=3, progress=False)
    all_images, all_captions, _ = collect_captioned_images(str(shard))
    torch.testing.assert_close(streamed, embed_images(model, all_images, preprocess))
    assert streamed_captions == all_captions == captions
    limited, _, _, _ = embed_captioned(featurize, str(shard), max_images=4, chunk=3, progress=False)
    assert len(limited) == 4


def test_coco_caption_scores_reward_matching_captions():
    pytest.importorskip("pycocoevalcap", reason="BLEU/CIDEr need pycocoevalcap (in the test extras)")
    from clipforge.captioning.metrics import coco_caption_scores

    references = [["A man rides a brown horse on the beach.", "a person riding a horse by the sea"],
                  ["Two dogs play with a red ball in the grass.", "dogs playing with a ball outside"],
                  ["A plate of pasta with tomato sauce.", "spaghetti with red sauce on a white plate"]]
    exact = coco_caption_scores([refs[0] for refs in references], references)
    assert exact["bleu_4"] == pytest.approx(1.0, abs=1e-6)  # punctuation and case do not count
    swapped = coco_caption_scores([references[1][0], references[2][0], references[0][0]], references)
    assert swapped["bleu_4"] < 0.1 and swapped["cider"] < exact["cider"] / 5
    with pytest.raises(ValueError, match="reference"):
        coco_caption_scores(["a caption"], [[]])


def test_class_naming_counts_words_not_substrings():
    from clipforge.captioning.metrics import classes_named, names_the_class

    names = ["cat", "dog", "pickup truck", "box"]
    assert classes_named("Two dogs and a Cat.", names) == {0, 1}
    assert classes_named("a red pickup truck by the boxes", names) == {2, 3}
    assert classes_named("a catalog of dogma", names) == set()
    assert names_the_class(["a cat", "a cat and a dog", "a truck"], [0, 0, 2], names) == 1 / 3


def test_clip_scores_follow_hessel_et_al(tiny_clip):
    from clipforge.captioning.metrics import clip_scores

    model, preprocess, tokenizer = clipforge.load(str(tiny_clip))
    images, _ = colour_images(3, seed=1)
    features = embed_images(model, images, preprocess)
    captions = ["a red shape", "a blue shape", "something else entirely"]
    references = [["a red shape", "red"], ["blue"], ["green", "yellow shape"]]
    scores = clip_scores(model, tokenizer, features, captions, references)
    with torch.no_grad():
        unit = lambda t: torch.nn.functional.normalize(model.encode_text(tokenizer([t])), dim=-1)[0]  # noqa: E731
        for i, (caption, refs) in enumerate(zip(captions, references)):
            image = torch.nn.functional.normalize(features[i], dim=-1)
            clip = 2.5 * max(float(image @ unit(caption)), 0.0)
            best = max(max(float(unit(caption) @ unit(r)) for r in refs), 0.0)
            assert float(scores["clip_score"][i]) == pytest.approx(clip, abs=1e-5)
            assert float(scores["ref_clip_score"][i]) == pytest.approx(2 * clip * best / (clip + best), abs=1e-5)
    assert float(scores["ref_clip_score"][0]) == pytest.approx(2 * float(scores["clip_score"][0]) / (
        float(scores["clip_score"][0]) + 1), abs=1e-5)  # the caption is one of its references: best cosine 1


def test_concept_nouns_precision_recall_and_missed_word_similarity():
    from clipforge.captioning import concepts

    assert concepts.lemma("dogs") == "dog" and concepts.lemma("children") == "child" and concepts.lemma("puppies") == "puppy"
    assert concepts.lemma("running") is None
    assert concepts.concept_nouns("Two men ride bikes past the beach .") == {"man", "bike", "beach"}
    generated = ["a dog runs on the beach", "a man rides a horse"]
    references = [["a black dog runs through the water", "a dog on a beach"], ["a woman on a horse in a field"]]
    scores = concepts.noun_scores(generated, references)
    # image 1: said {dog, beach}, referenced {dog, water, beach}; image 2: said {man, horse}, referenced {woman, horse, field}
    assert scores["animals"]["recall"] == 1.0 and scores["animals"]["precision"] == 1.0
    assert scores["people"]["precision"] == 0.0 and scores["people"]["recall"] == 0.0
    assert scores["places"]["recall"] == pytest.approx(1 / 3) and scores["places"]["precision"] == 1.0
    assert scores["all"]["matched"] == 3 and scores["all"]["generated"] == 4 and scores["all"]["referenced"] == 6
    unit = {"woman": torch.tensor([1.0, 0.0]), "man": torch.tensor([0.8, 0.6]), "horse": torch.tensor([0.0, 1.0]),
            "water": torch.tensor([0.6, 0.8]), "field": torch.tensor([-1.0, 0.0]), "dog": torch.tensor([0.0, -1.0]),
            "beach": torch.tensor([1.0, 0.0])}
    similarity = concepts.missed_noun_similarity(generated, references, lambda words: unit)
    # missed: water (best of dog 0 / beach 0.6 -> 0.6), woman (man 0.8, horse 0 -> 0.8), field (man -0.8, horse 0 -> 0)
    assert similarity["places"] == pytest.approx((0.6 + 0.0) / 2) and similarity["people"] == pytest.approx(0.8)
    assert similarity["all"] == pytest.approx((0.6 + 0.8 + 0.0) / 3)


def test_vqa_prompts_interleave_solved_examples_and_the_cli_scores_them(tiny_lm, tiny_clip, tmp_path, capsys,
                                                                          monkeypatch):
    from clipforge.captioning import vqa

    lm, tokenizer = limber.load_language_model(str(tiny_lm))
    mapping = limber.ImageToPrefix(limber.MappingConfig(8, lm.config.hidden_size, prefix_tokens=2))
    seen = []
    original = lm.generate

    def recording_generate(inputs_embeds, **kwargs):
        seen.append(inputs_embeds.shape[1])
        return original(inputs_embeds=inputs_embeds, **kwargs)

    lm.generate = recording_generate
    length = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    vqa.answer(mapping, lm, tokenizer, torch.randn(8), "what colour", [])
    vqa.answer(mapping, lm, tokenizer, torch.randn(8), "what colour", [(torch.randn(8), "which shape", "red")])
    assert seen[0] == 2 + length(" Q: what colour A:")  # the image prompt, then the question
    assert seen[1] == seen[0] + 2 + length(" Q: which shape A: red\n")  # one solved example before it
    # prompts of different lengths answered in one left-padded batch get the answers they get alone
    prompts = [(torch.randn(8), "what colour", []), (torch.randn(8), "how many shapes are there", []),
               (torch.randn(8), "which", [(torch.randn(8), "which shape", "red"), (torch.randn(8), "how", "two")])]
    mapping.proj.weight.data.normal_()
    alone = [vqa.answer(mapping, lm, tokenizer, *p, max_new_tokens=4) for p in prompts]
    assert vqa.answer_batch(mapping, lm, tokenizer, prompts, max_new_tokens=4) == alone
    assert seen[-1] == max(seen[2:-1])  # one call, as long as the longest prompt

    images, captions = colour_images(16, seed=0)
    shard = write_shard(tmp_path / "d" / "train-000000.tar", [{"__key__": f"{i:04d}", "png": _png(im), "txt": c[0]}
                                                              for i, (im, c) in enumerate(zip(images, captions))])
    assert main(["caption", "train", "--clip", str(tiny_clip), "--lm", str(tiny_lm), "--data", str(shard), "--steps",
                 "2", "--batch-size", "4", "--output", str(tmp_path / "map"), "--no-progress"]) == 0
    assert main(["caption", "vqa", "--make-shapes", str(tmp_path / "vqa"), "--shapes-images", "4"]) == 0
    report = tmp_path / "vqa.json"
    assert main(["caption", "vqa", "--mapping", str(tmp_path / "map"), "--questions", str(tmp_path / "vqa" /
                 "questions.json"), "--annotations", str(tmp_path / "vqa" / "annotations.json"), "--images",
                 str(tmp_path / "vqa" / "images"), "--shots", "0", "1", "--json", str(report), "--no-progress"]) == 0
    result = json.loads(report.read_text())
    assert set(result["accuracy"]) == {"0", "1"} and all(0 <= a <= 1 for a in result["accuracy"].values())
    rows = result["answers"]["0"]
    assert len(rows) == 4 + 3 + 3 + 4  # 1, 2, 3, 1 shapes: "where" is asked of single shapes only
    assert result["accuracy"]["0"] == pytest.approx(sum(r["accuracy"] for r in rows) / len(rows))
    assert result["min_new_tokens"] == 0
    answer_batch, asked_for = vqa.answer_batch, []  # --min-new-tokens reaches the LM's generate
    monkeypatch.setattr(vqa, "answer_batch", lambda *a, **kw: asked_for.append(a[5:] + tuple(kw.values())) or
                        answer_batch(*a, **kw))
    assert main(["caption", "vqa", "--mapping", str(tmp_path / "map"), "--questions", str(tmp_path / "vqa" /
                 "questions.json"), "--annotations", str(tmp_path / "vqa" / "annotations.json"), "--images",
                 str(tmp_path / "vqa" / "images"), "--max-questions", "2", "--min-new-tokens", "1", "--json",
                 str(report), "--no-progress"]) == 0
    assert asked_for == [(1,)] and json.loads(report.read_text())["min_new_tokens"] == 1
    capsys.readouterr()
    assert main(["caption", "vqa", "--mapping", str(tmp_path / "map")]) == 2
    assert "--questions" in capsys.readouterr().err


def test_a_training_prompt_sits_between_image_and_caption_and_is_not_scored(tiny_lm):
    lm, tokenizer = limber.load_language_model(str(tiny_lm))
    plain = limber.ImageToPrefix(limber.MappingConfig(8, lm.config.hidden_size, 2))
    prompted = limber.ImageToPrefix(limber.MappingConfig(8, lm.config.hidden_size, 2, prompt="a shape"))
    prompted.load_state_dict(plain.state_dict())
    features, captions = torch.randn(2, 8), ["a red shape", "a blue shape"]
    embeds, _, labels = limber._prefixed_captions(plain, lm, tokenizer, features, captions)
    p_embeds, _, p_labels = limber._prefixed_captions(prompted, lm, tokenizer, features, captions)
    prompt_length = len(tokenizer("a shape", add_special_tokens=False).input_ids)
    assert p_embeds.shape[1] == embeds.shape[1] + prompt_length
    assert (p_labels[:, : 2 + prompt_length] == -100).all()  # image prompt and text prompt: not scored
    assert torch.equal(p_labels[:, 2 + prompt_length:], labels[:, 2:])  # the same caption tokens scored
    torch.testing.assert_close(p_embeds[:, 2:2 + prompt_length],
                               lm.get_input_embeddings()(tokenizer("a shape", add_special_tokens=False,
                                                                   return_tensors="pt").input_ids).expand(2, -1, -1))


def test_a_map_copied_elsewhere_names_its_tower_and_lm_from_its_new_folder(tmp_path, monkeypatch):
    from clipforge.captioning.captioner import rebase_references
    from clipforge.captioning.limber import MappingConfig

    for folder in ("towers/clip", "lm", "runs/map", "copies/deeper/blind"):
        (tmp_path / folder).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config = MappingConfig(8, 16, clip="../../towers/clip", lm="../../lm")
    rebase_references(config, "runs/map", "copies/deeper/blind")
    assert (config.clip, config.lm) == ("../../../towers/clip", "../../../lm")
    zoo = MappingConfig(8, 16, clip="ViT-Tiny-64@seed", lm="smollm2")  # names, not paths: as they are
    rebase_references(zoo, "runs/map", "copies/deeper/blind")
    assert (zoo.clip, zoo.lm) == ("ViT-Tiny-64@seed", "smollm2")
