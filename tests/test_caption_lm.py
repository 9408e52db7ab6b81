"""The word-by-word caption objective (the CLIP paper's transformer language-model baseline): vocabulary rows,
causal next-word prediction conditioned on the image, the loss, zero-shot from prompt likelihoods, training."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge import caption_lm
from clipforge.caption_lm import BOS, EOS, PAD, UNK, CaptionLMModel, CaptionLoss, CaptionVocabulary
from clipforge.checkpoint import CheckpointError
from clipforge.evaluate.metrics import topk_accuracy
from clipforge.train import TrainConfig, train
from clipforge.train.validation import validate_caption_lm

from conftest import colour_dataset, shapes_shard


def _model(vocabulary: CaptionVocabulary) -> CaptionLMModel:
    torch.manual_seed(0)
    config = {**clipforge.models.get_model_config("ViT-Tiny-64"), "objective": "caption",
              "vocabulary": vocabulary.words,
              "decoder": {"width": 32, "layers": 2, "heads": 4, "context_length": vocabulary.context_length}}
    config["vision_cfg"] = {**config["vision_cfg"], "layers": 1}
    return CaptionLMModel(config, vocabulary).eval()


def test_vocabulary_keeps_every_frequent_word_and_writes_bos_words_eos_rows():
    vocabulary = CaptionVocabulary.from_captions(["A dog runs", "a dog and a cat", "the cat"], 3, context_length=5)
    assert vocabulary.words == ["a", "cat", "dog"]  # stop words stay: a language model has to say them
    a, cat, dog = (vocabulary.index[w] for w in ("a", "cat", "dog"))
    rows = vocabulary(["A dog runs", "a cat a dog a cat", ""])
    assert rows.tolist() == [[BOS, a, dog, UNK, EOS], [BOS, a, cat, a, EOS], [BOS, EOS, PAD, PAD, PAD]]
    assert len(vocabulary) == 4 + 3
    with pytest.raises(ValueError, match="context_length"):
        CaptionVocabulary(["a"], context_length=2)


def _two_captions(captions: list[str]):
    """(vocabulary, model, caption rows, two image embeddings, next-word logits) over a four-word vocabulary."""
    vocabulary = CaptionVocabulary(["a", "red", "blue", "circle"], context_length=6)
    model = _model(vocabulary)
    tokens = vocabulary(captions)
    embeddings = torch.randn(2, model.embed_dim)
    with torch.no_grad():
        return vocabulary, model, tokens, embeddings, model.next_word_logits(embeddings, tokens)


def test_next_word_prediction_is_causal_and_reads_the_image():
    vocabulary, model, tokens, embeddings, logits = _two_captions(["a red circle", "a blue circle"])
    with torch.no_grad():
        assert logits.shape == (2, 5, len(vocabulary))
        changed = tokens.clone()
        changed[:, 2] = vocabulary.index["circle"]  # the word at position 2: predictions before it cannot change
        after = model.next_word_logits(embeddings, changed)
        torch.testing.assert_close(after[:, :2], logits[:, :2])
        assert not torch.allclose(after[:, 2:], logits[:, 2:])
        other_image = model.next_word_logits(torch.randn(2, model.embed_dim), tokens)
        assert not torch.allclose(other_image[:, 0], logits[:, 0])  # even the first word depends on the image


def test_loss_leaves_padding_out_and_likelihoods_sum_each_captions_words():
    vocabulary, model, tokens, embeddings, logits = _two_captions(["a red circle", "blue"])
    with torch.no_grad():
        targets = tokens[:, 1:]
        log_p = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        real = targets.ne(PAD)
        torch.testing.assert_close(CaptionLoss()(logits, targets), -(log_p * real).sum() / real.sum())
        likelihood = model.caption_log_likelihood(embeddings, tokens)  # [image, caption]
        torch.testing.assert_close(likelihood.diagonal(), (log_p * real).sum(1))
        wider = CaptionVocabulary(vocabulary.words, context_length=12)  # more padding changes nothing
        torch.testing.assert_close(model.caption_log_likelihood(embeddings, wider(["a red circle", "blue"])),
                                   likelihood, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_nodes", [256, 8, 1])
def test_caption_tree_scores_each_caption_as_the_causal_decoder_alone_does(monkeypatch, max_nodes):
    """Captions read as one tree per image (shared first words computed once) score what each caption scores run
    alone through the causal decoder, in float64 to 1e-9: shared words then different lengths, nothing shared, a
    duplicate, an empty caption, and trees split at ``MAX_NODES`` (8: several trees; 1: one caption per tree)."""
    monkeypatch.setattr(caption_lm.CaptionTree, "MAX_NODES", max_nodes)
    vocabulary = CaptionVocabulary(["a", "red", "blue", "circle", "photo", "of"], context_length=8)
    model = _model(vocabulary).double()
    embeddings = torch.randn(3, model.embed_dim, dtype=torch.float64)
    captions = ["a photo of a red circle", "a photo of a blue", "a photo of a red", "blue circle", "a red",
                "a photo of a red circle", "", "red"]
    tokens = vocabulary(captions)
    tree_scores = model.caption_log_likelihood(embeddings, tokens)
    assert tree_scores.shape == (3, len(captions))
    with torch.no_grad():
        for c, row in enumerate(tokens):
            one = row[: int(row.ne(PAD).sum())][None]
            log_p = torch.log_softmax(model.next_word_logits(embeddings, one.expand(3, -1)), -1)
            alone = log_p.gather(-1, one[:, 1:].expand(3, -1)[..., None]).sum(dim=(1, 2))
            torch.testing.assert_close(tree_scores[:, c], alone, atol=1e-9, rtol=0, msg=captions[c])
    trees = caption_lm.CaptionTree.split(tokens)
    assert all(len(tree.depth) <= max(max_nodes, 8) for tree in trees)  # 8: the longest caption's own tree
    if max_nodes == 1:
        assert len(trees) == len(captions)
    if max_nodes == 256:  # one tree: the image, <bos>, "a photo of a red circle", "blue" after it, "blue circle",
        assert len(trees) == 1 and len(trees[0].depth) == 1 + 1 + 6 + 1 + 2 + 1 + 1  # "red" after "a", "red"


def test_zero_shot_averages_templates_and_cannot_name_an_unknown_class():
    vocabulary = CaptionVocabulary(["a", "red", "blue", "circle", "photo", "of"], context_length=8)
    model = _model(vocabulary)
    embeddings = torch.randn(3, model.embed_dim)
    templates = ("a photo of a {}", "{}")
    scores = caption_lm.zero_shot_logits(model, embeddings, ["red circle", "blue", "green"], templates)
    assert scores.shape == (3, 3) and torch.isinf(scores[:, 2]).all()  # "green" would be <unk>
    single = [model.caption_log_likelihood(embeddings, vocabulary([t.format(c) for c in ("red circle", "blue")]))
              for t in templates]
    torch.testing.assert_close(scores[:, :2], (single[0] + single[1]) / 2)


def test_prompt_prior_is_the_mean_likelihood_over_references_and_leaves_unknown_classes_out():
    vocabulary = CaptionVocabulary(["a", "red", "blue", "circle", "photo", "of"], context_length=8)
    model = _model(vocabulary)
    references, embeddings = torch.randn(5, model.embed_dim), torch.randn(3, model.embed_dim)
    classes, templates = ["red circle", "blue", "green"], ("a photo of a {}", "{}")
    prior = caption_lm.prompt_log_prior(model, references, classes, templates, batch_size=2)
    assert prior.shape == (3,) and torch.isfinite(prior).all()  # "green" is <unk> but still has a likelihood
    plain = caption_lm.zero_shot_logits(model, embeddings, classes, templates)
    torch.testing.assert_close(prior[:2], caption_lm.zero_shot_logits(model, references, classes, templates)[:, :2]
                               .mean(0))
    scored = caption_lm.zero_shot_logits(model, embeddings, classes, templates, prior=prior)
    torch.testing.assert_close(scored[:, :2], plain[:, :2] - prior[:2])
    assert torch.isinf(scored[:, 2]).all() and (scored[:, 2] < 0).all()  # never nan, never chosen


def test_caption_training_lowers_its_loss_validates_and_saves_a_loadable_model(tmp_path):
    shard = shapes_shard(tmp_path / "s-000000.tar", 64)
    cfg = TrainConfig(model="ViT-Tiny-64", model_cfg={"vision_cfg": {"layers": 2}}, objective="caption",
                      bow_vocab=60, train_data=str(shard), val_data=str(shard), val_samples=32, batch_size=16,
                      steps=30, lr=2e-3, warmup=3, workers=0, save_every=0, log_every=5,
                      output=str(tmp_path / "run"), progress=False)
    summary = train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0] - 1.0, losses
    assert 0 < summary["val"]["caption_loss"] < losses[0]
    model, preprocess = caption_lm.load(summary["checkpoint"])
    assert model.config["decoder"]["width"] == clipforge.models.get_model_config("ViT-Tiny-64")["text_cfg"]["width"]
    images = torch.randn(2, 3, 64, 64)
    tokens = model.vocabulary(["a red circle", "a small blue square"])
    with torch.no_grad():
        torch.testing.assert_close(model(images, tokens).image_features,
                                   summary["model"].eval()(images, tokens).image_features)
    # validation's zero-shot is the prompt likelihoods' top-1
    val_set = SimpleNamespace(images=list(images), captions=["a red circle", "a blue square"],
                              caption_images=torch.tensor([0, 1]), labels=torch.tensor([0, 1]),
                              classnames=["red", "blue"])
    expected = caption_lm.zero_shot_logits(model, model.encode_image(images).detach(), ["red", "blue"])
    metrics = validate_caption_lm(model, val_set, "cpu")
    assert metrics["zeroshot_top1"] == topk_accuracy(expected, val_set.labels)[1]
    with torch.no_grad():
        logits = model.next_word_logits(model.encode_image(images), model.vocabulary(val_set.captions))
    manual = F.cross_entropy(logits.flatten(0, 1), model.vocabulary(val_set.captions)[:, 1:].flatten(),
                             ignore_index=PAD)
    assert metrics["caption_loss"] == pytest.approx(manual.item(), rel=1e-5)
    with pytest.raises(CheckpointError, match="objective"):
        clipforge.load(summary["checkpoint"])
    with pytest.raises(ValueError, match="from scratch on captioned data"):
        train(TrainConfig(objective="caption", text_model="all-minilm-l6-v2", train_data=str(shard),
                          output=str(tmp_path / "bad"), progress=False))


def test_labelled_validation_scores_zero_shot_less_the_prompt_prior_over_training_images(tmp_path):
    """With labelled validation data a caption run's zero-shot subtracts each prompt's mean likelihood over the first
    training images (the rule the objectives study chose on development data) and also reports the plain rule."""
    from clipforge.data import open_source
    from clipforge.train.validation import PRIOR_IMAGES, open_validation

    shard = shapes_shard(tmp_path / "s-000000.tar", 32)
    val_shard, colours = colour_dataset(tmp_path / "colours")
    cfg = TrainConfig(model="ViT-Tiny-64", model_cfg={"vision_cfg": {"layers": 1}}, objective="caption",
                      bow_vocab=60, train_data=str(shard), val_data=str(val_shard), batch_size=8, steps=3,
                      workers=0, save_every=0, output=str(tmp_path / "run"), progress=False)
    summary = train(cfg)
    assert {"zeroshot_top1", "zeroshot_plain_top1", "zeroshot_top5", "caption_loss"} <= summary["val"].keys()

    model = summary["model"].eval()
    train_source = open_source(str(shard), shuffle_buffer=cfg.shuffle_buffer)
    labels = SimpleNamespace(classnames=None, templates=None)
    val_set, templates = open_validation(cfg, None, model.image_size, None, train_source, labels)
    assert len(val_set.prior_images) == min(32, PRIOR_IMAGES) and len(val_set.images) == 24
    with torch.no_grad():
        embeddings = model.encode_image(torch.stack(val_set.images[:]))  # held as uint8 pixels: a slice reads them
        prior = caption_lm.prompt_log_prior(model, model.encode_image(torch.stack(val_set.prior_images[:])), colours,
                                            templates)
        expected = caption_lm.zero_shot_logits(model, embeddings, colours, templates, prior=prior)
        plain = caption_lm.zero_shot_logits(model, embeddings, colours, templates)
    metrics = validate_caption_lm(model, val_set, "cpu", templates=templates)
    # a --zeroshot-data set: the zero-shot figures alone, the same ones (the captions' loss is not computed)
    assert validate_caption_lm(model, val_set, "cpu", templates=templates, zero_shot_only=True) == \
        {k: v for k, v in metrics.items() if k.startswith("zeroshot_")}
    assert metrics["zeroshot_top1"] == topk_accuracy(expected, val_set.labels)[1] == summary["val"]["zeroshot_top1"]
    assert metrics["zeroshot_plain_top1"] == topk_accuracy(plain, val_set.labels)[1]
    assert not torch.equal(expected.argmax(1), plain.argmax(1))  # the prior changes what is predicted
    # the references are training images, not validation ones: a contrastive run carries none
    other, _ = open_validation(TrainConfig(**{**cfg.__dict__, "objective": "contrastive"}), None, 64, None,
                               train_source, labels)
    assert other.prior_images is None

