"""The bag-of-words objective (the CLIP paper's baseline): vocabulary, loss, training, zero-shot from class words."""
import io
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import clipforge
from clipforge import bow
from clipforge.captioning import concepts
from clipforge.checkpoint import CheckpointError
from clipforge.data import open_source
from clipforge.data.pipeline import caption_texts
from clipforge.evaluate.metrics import topk_accuracy
from clipforge.train import TrainConfig, train
from clipforge.train.validation import validate_bag_of_words

from conftest import shapes_shard, write_shard


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


def test_a_word_prior_turns_the_most_frequent_word_from_winner_into_baseline():
    vocabulary = bow.Vocabulary(["dog", "cat"])
    prior = bow.word_log_prior(vocabulary, ["a dog runs", "dogs play", "the dog and the dog", "a cat"])
    torch.testing.assert_close(prior.exp(), torch.tensor([5 / 7, 2 / 7]))  # counts 4 and 1, add-one smoothed
    log_probs = torch.log(torch.tensor([[0.7, 0.3], [0.9, 0.1]]))  # "dog" most likely for both images
    assert bow.zero_shot_logits(log_probs, vocabulary, ["dog", "cat"]).argmax(1).tolist() == [0, 0]
    # the first image makes "cat" likelier than the captions do (0.3 > 2/7), the second does not
    assert bow.zero_shot_logits(log_probs, vocabulary, ["dog", "cat"], prior=prior).argmax(1).tolist() == [1, 0]


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
    # the run keeps its captions' word counts, so zero-shot (and validation) can subtract their prior
    captions = caption_texts(open_source(str(shard)))
    torch.testing.assert_close(model.word_log_prior, bow.word_log_prior(model.vocabulary, captions))
    val_set = SimpleNamespace(images=list(images), captions=["a red shape", "a blue shape"], caption_images=
                              torch.tensor([0, 1]), labels=torch.tensor([0, 1]), classnames=["red", "blue"])
    expected = bow.zero_shot_logits(model.word_log_probs(images).detach(), model.vocabulary, ["red", "blue"],
                                    prior=model.word_log_prior)
    plain = bow.zero_shot_logits(model.word_log_probs(images).detach(), model.vocabulary, ["red", "blue"])
    assert not torch.equal(expected, plain)
    metrics = validate_bag_of_words(model, val_set, "cpu")
    assert metrics["zeroshot_top1"] == topk_accuracy(expected, val_set.labels)[1] and "bow_loss" in metrics
    only = validate_bag_of_words(model, val_set, "cpu", zero_shot_only=True)  # a --zeroshot-data set's figures
    assert only == {"zeroshot_top1": metrics["zeroshot_top1"]}  # (2 classes: no top-5; no loss over the captions)
    with pytest.raises(ValueError, match="from scratch: no --text-model"):
        train(TrainConfig(objective="bow", text_model="all-minilm-l6-v2", train_data=str(shard),
                          output=str(tmp_path / "bad"), progress=False))


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_labels_objective_predicts_caption_nouns_or_classes(tmp_path):
    scenes = [("red", "A dog runs on the beach ."), ("green", "Two men ride bikes in the park"),
              ("blue", "a girl with a ball near the water"), ("yellow", "The cat sleeps on a chair")]
    shard = write_shard(tmp_path / "s-000000.tar", [{"__key__": f"{i:03d}", "png": _png(scenes[i % 4][0]),
                                                     "txt": scenes[i % 4][1]} for i in range(32)])
    cfg = TrainConfig(model="ViT-Tiny-64", model_cfg={"vision_cfg": {"layers": 1}}, objective="labels", bow_vocab=20,
                      train_data=str(shard), val_data=str(shard), val_samples=16, batch_size=16, steps=4,
                      workers=0, save_every=0, output=str(tmp_path / "nouns"), progress=False)
    summary = train(cfg)
    model, _ = bow.load(summary["checkpoint"])
    # the vocabulary holds only lexicon nouns of the captions, each target present or absent
    assert model.vocabulary.kind == "nouns" and set(model.vocabulary.words) <= set(concepts.lexicon()[0])
    assert set(model.vocabulary.words) == {"dog", "beach", "man", "bike", "park", "girl", "ball", "water", "cat",
                                           "chair"}
    assert model.vocabulary(["dogs and a dog on beaches"]).sum() == 2 and "label_loss" in summary["val"]
    # labelled data: the classes are the vocabulary, cross-entropy on the labels; zero-shot is the head itself
    root = tmp_path / "colours"
    root.mkdir()
    (root / "classnames.txt").write_text("red\ngreen\n")
    samples = [{"__key__": f"{i:03d}", "png": _png(("red", "green")[i % 2]), "cls": str(i % 2)} for i in range(16)]
    write_shard(root / "train" / "train-000000.tar", samples)
    cfg = TrainConfig(model="ViT-Tiny-64", model_cfg={"vision_cfg": {"layers": 1}}, objective="labels",
                      train_data=str(root / "train"), val_data=str(root / "train"), batch_size=8, steps=20, lr=3e-3,
                      warmup=2, workers=0, save_every=0, output=str(tmp_path / "classes"), progress=False)
    summary = train(cfg)
    model, _ = bow.load(summary["checkpoint"])
    assert model.vocabulary.words == ["red", "green"] and summary["val"]["zeroshot_top1"] == 1.0
