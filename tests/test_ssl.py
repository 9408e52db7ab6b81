"""The self-supervised objective: two augmented views, no language; its tower is a LiMBer encoder like any other."""
import json

import pytest
import torch
from PIL import Image

import clipforge
from clipforge import ssl
from clipforge.checkpoint import CheckpointError
from clipforge.train import TrainConfig, train

from conftest import shapes_shard


def test_views_differ_and_training_lowers_the_loss(tmp_path):
    shard = shapes_shard(tmp_path / "s-000000.tar", 64)
    cfg = TrainConfig(model="ViT-Tiny-64", model_cfg={"vision_cfg": {"layers": 2}}, objective="self-supervised",
                      train_data=str(shard), batch_size=16, steps=40, lr=2e-3, warmup=4, workers=0, save_every=0,
                      log_every=5, crop_scale=(0.3, 1.0), output=str(tmp_path / "run"), progress=False)
    summary = train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.2, losses  # the views find their partners better than at the start
    model, preprocess = ssl.load(summary["checkpoint"])
    images = torch.stack([preprocess(Image.new("RGB", (64, 64), c)) for c in ("red", "blue")])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), summary["model"].eval().encode_image(images))
    with pytest.raises(CheckpointError, match="load_image_tower"):
        clipforge.load(summary["checkpoint"])

    from clipforge.captioning.encoders import open_encoder

    features = open_encoder(summary["checkpoint"]).features([Image.new("RGB", (64, 64), "red")])
    assert features.shape == (1, 128)


def test_two_views_of_one_image_are_different_crops_of_it(tmp_path):
    from clipforge.data import ContrastiveStream, open_source
    from clipforge.preprocess import TrainTransform

    shard = shapes_shard(tmp_path / "s-000000.tar", 8)
    stream = ContrastiveStream(open_source(str(shard)), TrainTransform(64, scale=(0.3, 1.0)), None, 8, targets="views")
    batch = next(iter(stream))
    assert batch["images"].shape == batch["tokens"].shape == (8, 3, 64, 64)
    assert not torch.equal(batch["images"], batch["tokens"])
    again = next(iter(stream))  # tied to the sample's position: the same views on every pass
    assert torch.equal(again["images"], batch["images"]) and torch.equal(again["tokens"], batch["tokens"])
