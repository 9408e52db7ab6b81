"""Locking a tower but its last groups or layers (open_clip's --lock-image-unlocked-groups, --lock-text-unlocked-layers,
--lock-text-freeze-layer-norm): the same parameters train as under open_clip."""
import pytest
import torch

import clipforge
from clipforge.checkpoint import openai
from clipforge.train import TrainConfig, train

from conftest import shapes_shard
from test_train import _minilm_or_skip

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16}
TEXT = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 3}


def _trainable(model, rename=lambda names: names) -> set[str]:
    return set(rename({name: None for name, p in model.named_parameters() if p.requires_grad}))


def test_unlocked_groups_and_layers_are_open_clips():
    open_clip = pytest.importorskip("open_clip")
    for count in (1, 2, 4, 5):
        ours = clipforge.create_model({"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT})
        theirs = open_clip.CLIP(16, VISION, TEXT)
        ours.lock_image_tower(unlocked_groups=count)
        theirs.lock_image_tower(unlocked_groups=count)
        ours.lock_text_tower(unlocked_layers=count)
        theirs.lock_text_tower(unlocked_layers=count)
        mine = _trainable(ours, openai.from_clipforge)
        assert mine == _trainable(theirs), count
        assert ("visual.proj" in mine) and ("visual.conv1.weight" in mine) == (count == 5)
        assert ours.training and ours.visual.training  # the unlocked part trains in training mode
    with pytest.raises(ValueError, match="6 unlocked groups; this tower has 5"):
        ours.lock_image_tower(unlocked_groups=6)
    ours.lock_image_tower()  # locked whole (kept in eval mode), then partly: its unlocked part trains in training mode
    ours.lock_image_tower(unlocked_groups=1)
    assert ours.train().visual.training
    with pytest.raises(ValueError, match="a ResNet is locked whole"):
        clipforge.create_model("RN50").lock_image_tower(unlocked_groups=1)
    with pytest.raises(ValueError, match="Hugging Face text towers"):
        ours.lock_text_tower(freeze_layer_norm=False)


def _visual_trainable_as_open_clip_names(model) -> set[str]:
    """The image tower's trainable parameters under open_clip's names (a flag per tensor, through the converters)."""
    from clipforge.checkpoint import timm_siglip

    flags = {name: torch.tensor(float(p.requires_grad)).expand(p.shape) for name, p in model.named_parameters()}
    flags = timm_siglip.from_clipforge(flags) if "visual.head.probe" in flags else openai.from_clipforge(flags)
    return {name for name, flag in flags.items() if name.startswith("visual.") and flag.flatten()[0] == 1}


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP2", "PE-Core-B-16", "ViTamin-S", "convnext_base_w", "MobileCLIP-S1",
                                  "coca_ViT-B-32"])
def test_timm_named_image_towers_unlock_the_groups_timm_gives_open_clip(name):
    """SigLIP's, EVA/PE's, ViTamin's, ConvNeXt's and FastViT's towers: the parameters open_clip's ``TimmModel.lock``
    leaves trainable (timm's ``group_matcher`` groups; open_clip's projection head never frozen), built on the meta
    device; and a CoCa's ViT, whose attention pooler open_clip's ``lock`` leaves frozen (in no group). (By hand, all 112
    such zoo architectures agree at 1, 3 and all groups.)"""
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    import logging

    logging.disable(logging.WARNING)  # open_clip's "no pretrained weights loaded"
    try:
        with torch.device("meta"):
            ours = clipforge.create_model(name)
            theirs = open_clip.create_model(name, device="meta")
    finally:
        logging.disable(logging.NOTSET)
    count = len(ours.visual.lock_groups())
    for unlocked in (0, 1, 3, count):  # 0: locked whole (a head outside the trunk still trains)
        theirs.requires_grad_(True)
        ours.lock_image_tower(unlocked_groups=unlocked)
        theirs.visual.lock(unlocked_groups=unlocked, freeze_bn_stats=False)
        mine = _visual_trainable_as_open_clip_names(ours)
        assert mine == {n for n, p in theirs.named_parameters() if n.startswith("visual.") and p.requires_grad}, unlocked
    everything = {n for n, _ in theirs.named_parameters() if n.startswith("visual.")}
    assert mine == everything or name.startswith("coca") and mine < everything  # all groups: all (CoCa: its pooler)
    with pytest.raises(ValueError, match=f"{count + 1} unlocked groups; this tower has {count}"):
        ours.lock_image_tower(unlocked_groups=count + 1)
    ours.lock_image_tower(lock_head=True)  # LiT's whole tower: nothing of it trains, its head included
    assert not any(p.requires_grad for p in ours.visual.parameters()) and not ours.visual.training
    with pytest.raises(ValueError, match="the head is in the last group"):
        ours.lock_image_tower(unlocked_groups=1, lock_head=True)


def test_freeze_bn_stats_keeps_the_locked_groups_batch_norm_statistics_as_open_clip():
    """FastViT (MobileCLIP-S1), 20 of 42 groups unlocked: with ``freeze_bn_stats`` the batch norms open_clip turns into
    ``FrozenBatchNorm2d`` keep their statistics through a training-mode forward while the unlocked ones move; without
    it the locked ones move too (open_clip's default for a partly locked tower)."""
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    from torchvision.ops.misc import FrozenBatchNorm2d

    ours, theirs = clipforge.create_model("MobileCLIP-S1"), open_clip.create_model("MobileCLIP-S1")
    ours.lock_image_tower(unlocked_groups=20, freeze_bn_stats=True)
    theirs.visual.lock(unlocked_groups=20, freeze_bn_stats=True)
    norms = {name: m for name, m in ours.visual.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    frozen = {name for name, m in norms.items() if m in ours._frozen_norms}
    assert frozen == {n for n, m in theirs.visual.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert 0 < len(frozen) < len(norms)

    def moved_after_a_training_step() -> set[str]:
        before = {name: m.running_mean.clone() for name, m in norms.items()}
        ours.train()
        ours.encode_image(torch.randn(2, 3, 256, 256))
        return {name for name, m in norms.items() if not torch.equal(m.running_mean, before[name])}

    assert ours.visual.training and not (moved := moved_after_a_training_step()) & frozen and moved
    ours.lock_image_tower(unlocked_groups=20)
    assert moved_after_a_training_step() & frozen


def test_a_hugging_face_text_tower_unlocks_its_last_layers_and_layer_norms_as_open_clip(monkeypatch):
    """open_clip's partial unlocking fails on BERT towers (MiniLM: its table names no layer attribute for "bert", a
    KeyError); given RoBERTa's names, which BERT shares, it is the reference."""
    _minilm_or_skip()
    open_clip_hf = pytest.importorskip("open_clip.hf_model")
    from clipforge.models.hf_text import resolve_hf_model

    names = open_clip_hf.arch_dict["bert"]["config_names"]
    monkeypatch.setitem(open_clip_hf.arch_dict["bert"], "config_names",
                        {**names, "layer_attr": "layer", "token_embeddings_attr": "embeddings"})

    folder = resolve_hf_model("all-minilm-l6-v2")
    for unlocked, freeze_layer_norm in ((0, False), (2, True), (3, False), (7, True)):
        ours = clipforge.create_model("ViT-Tiny-64", text_cfg={"hf_model_name": "all-minilm-l6-v2", "pooling": "mean"})
        ours.lock_text_tower(unlocked, freeze_layer_norm)
        theirs = open_clip_hf.HFTextEncoder(folder, output_dim=128, pooler_type="mean_pooler", proj_type="linear")
        theirs.lock(unlocked, freeze_layer_norm)
        mine = {name.removeprefix("text.") for name in _trainable(ours) if name.startswith("text.transformer.")}
        assert mine == {name for name in _trainable(theirs) if name.startswith("transformer.")}, unlocked
        assert bool(mine) and not ours.text.locked  # a partly trainable tower is not cached nor kept in eval
    assert "transformer.embeddings.word_embeddings.weight" in mine  # 7: the embeddings and all six layers
    with pytest.raises(ValueError, match="8 unlocked layers; this tower has 7"):
        ours.lock_text_tower(8)


def test_training_moves_only_the_unlocked_part(tmp_path):
    shard = shapes_shard(tmp_path / "s-000000.tar", 16)
    cfg = dict(model="ViT-Tiny-64", model_cfg={"vision_cfg": {"layers": 2}, "text_cfg": {"layers": 2}},
               train_data=str(shard), batch_size=8, steps=2, workers=0, progress=False, lr=1e-2,
               lock_image=True, lock_image_unlocked_groups=2, lock_text=True, lock_text_unlocked_layers=1)
    torch.manual_seed(0)
    start = clipforge.create_model(TrainConfig(**cfg).model, vision_cfg={"layers": 2}, text_cfg={"layers": 2})
    summary = train(TrainConfig(**cfg, seed=0, output=str(tmp_path / "run")))
    after = summary["model"].state_dict()
    moved = {name for name, value in start.state_dict().items() if not torch.equal(value, after[name])}
    assert {"visual.proj", "visual.ln_post.weight", "text.text_projection", "logit_scale"} <= moved
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in moved
    assert not any(n.startswith(("visual.conv1", "visual.transformer.resblocks.0.", "text.transformer.",
                                 "text.token_embedding", "text.ln_final")) for n in moved)
    with pytest.raises(ValueError, match="give --lock-image too"):
        train(TrainConfig(**{**cfg, "lock_image": False}, output=str(tmp_path / "bad")))
    with pytest.raises(ValueError, match="--lock-image-head .* not --lock-image-unlocked-groups"):
        train(TrainConfig(**cfg, lock_image_head=True, output=str(tmp_path / "bad")))
    with pytest.raises(ValueError, match="--lock-image-head .* give --lock-image too"):
        train(TrainConfig(**{**cfg, "lock_image": False, "lock_image_unlocked_groups": 0}, lock_image_head=True,
                          output=str(tmp_path / "bad")))
    with pytest.raises(ValueError, match="leave --text-cache out"):
        train(TrainConfig(**cfg, text_cache=True, output=str(tmp_path / "bad")))


def test_lock_image_trains_a_timm_named_towers_head_as_open_clip_and_lock_image_head_freezes_it(tmp_path):
    """ConvNeXt locked whole: its trunk stays as it was and open_clip's projection head outside it trains (as open_clip's
    ``--lock-image``); with ``--lock-image-head`` nothing of the image tower moves."""
    shard = shapes_shard(tmp_path / "s-000000.tar", 16)
    cfg = dict(model="convnext_tiny", model_cfg={"vision_cfg": {"image_size": 64, "depths": [1, 1, 1, 1]},
                                                 "text_cfg": {"layers": 1, "width": 64, "heads": 4}},
               train_data=str(shard), batch_size=8, steps=2, workers=0, progress=False, lr=1e-2, lock_image=True)
    for lock_head in (False, True):
        torch.manual_seed(0)
        start = clipforge.create_model("convnext_tiny", **cfg["model_cfg"])
        summary = train(TrainConfig(**cfg, lock_image_head=lock_head, seed=0, output=str(tmp_path / f"run{lock_head}")))
        after = summary["model"].state_dict()
        moved = {name for name, value in start.state_dict().items() if not torch.equal(value, after[name])}
        assert "text.text_projection" in moved and not any(n.startswith("visual.trunk.") for n in moved)
        assert ("visual.head.proj.weight" in moved) is not lock_head, lock_head
    # a run locked with its head resumed without: another set of trained tensors, named as the cause
    with pytest.raises(ValueError, match="holds 18 trained parameter tensors, this run trains 19.*--lock-image-head"):
        train(TrainConfig(**{**cfg, "steps": 4}, resume="latest", seed=0, output=str(tmp_path / "runTrue")))
    from clipforge.cli import build_parser
    from clipforge.train.cli import config_from_args

    parsed = config_from_args(build_parser("train").parse_args(["train", "--train-data", "x", "--lock-image",
                                                                "--lock-image-head"]))
    assert parsed.lock_image and parsed.lock_image_head
