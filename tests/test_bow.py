"""The bag-of-words objective (the CLIP paper's baseline): vocabulary, loss, training, zero-shot from class words."""
import json

import pytest
import torch
from PIL import Image

import clipforge
from clipforge import bow
from clipforge.checkpoint import CheckpointError
from clipforge.train import TrainConfig, train

from conftest import shapes_shard


def test_vocabulary_keeps_the_frequent_content_words_and_folds_plurals():
    texts = ["Two dogs run on the grass", "a dog in the grass", "A red car", "dogs and a car"]
    vocabulary = bow.Vocabulary.from_captions(texts, 3)
    assert vocabulary.words == ["dog", "car", "grass"]  # "dogs" counts as "dog"; stop words never enter
    counts = vocabulary(["The dogs chase a dog past a car", "nothing known here"])
    assert counts.tolist() == [[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert bow.class_word_indices(vocabulary, ["sports car", "cat", "dogs"]) == [[1], [], [0]]


def test_loss_is_cross_entropy_against_the_caption_word_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 2.0, 3.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # row 2: no word, no signal
    loss = bow.BagOfWordsLoss()(logits, targets)
    log_p = torch.log_softmax(logits.detach(), dim=-1)
    expected = (-(0.5 * log_p[0, 0] + 0.5 * log_p[0, 1]) - log_p[2, 2]) / 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[1].abs().sum() == 0


def test_zero_shot_scores_a_class_by_its_words_mean_log_probability():
    vocabulary = bow.Vocabulary(["red", "car", "dog"])
    log_probs = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]))
    logits = bow.zero_shot_logits(log_probs, vocabulary, ["red car", "dog", "airplane"])
    torch.testing.assert_close(logits[:, :2], torch.stack([(log_probs[:, 0] + log_probs[:, 1]) / 2, log_probs[:, 2]], 1))
    assert torch.isinf(logits[:, 2]).all()  # a class with no vocabulary word cannot be named
    assert logits.argmax(dim=1).tolist() == [0, 1]


def test_bow_training_lowers_its_loss_and_saves_a_loadable_image_tower(tmp_path):
    shard = shapes_shard(tmp_path / "s-000000.tar", 64)
    cfg = TrainConfig(model="ViT-Tiny-64", model_cfg={"vision_cfg": {"layers": 2}}, objective="bow", bow_vocab=50,
                      train_data=str(shard), val_data=str(shard), val_samples=32, batch_size=16, steps=30, lr=2e-3,
                      warmup=3, workers=0, save_every=0, log_every=5, output=str(tmp_path / "run"), progress=False)
    summary = train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0] - 0.3, losses
    assert "bow_loss" in summary["val"]
    model, preprocess = bow.load(summary["checkpoint"])
    assert "red" in model.vocabulary.words and model.head.out_features == len(model.vocabulary)
    images = torch.stack([preprocess(Image.new("RGB", (64, 64), colour)) for colour in ("red", "blue")])
    with torch.no_grad():
        torch.testing.assert_close(model.word_log_probs(images), summary["model"].eval().word_log_probs(images))
    with pytest.raises(CheckpointError, match="objective bow"):
        clipforge.load(summary["checkpoint"])
    with pytest.raises(ValueError, match="no --label-captions, --text-model"):
        train(TrainConfig(objective="bow", text_model="all-minilm-l6-v2", train_data=str(shard),
                          output=str(tmp_path / "bad"), progress=False))
