"""Knowledge distillation from a frozen teacher CLIP (--distill-model / --distill-pretrained)."""
import json
import shutil
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import clipforge
from clipforge import cli
from clipforge.data import ContrastiveStream, open_source
from clipforge.loss import ClipLoss, DistillationLoss
from clipforge.models.feature_cache import FeatureCache
from clipforge.preprocess import TrainTransform
from clipforge.train import TrainConfig, train
from clipforge.train.distill import Teacher, TeacherInputs
from clipforge.train.step import train_step

from conftest import random_tokens, shapes_shard


def _features(n, width, seed):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, width, generator=g), dim=-1) for _ in range(2)]


def test_the_loss_is_open_clips_distill_clip_loss_dense_and_in_chunks():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    images, texts = _features(12, 16, 0)
    teacher_images, teacher_texts = _features(12, 24, 1)  # a wider teacher: only its similarities matter
    scale, teacher_scale = torch.tensor(14.0), torch.tensor(60.0)

    def value_and_grads(loss_fn, *extra):
        a, b, s = images.clone().requires_grad_(), texts.clone().requires_grad_(), scale.clone().requires_grad_()
        loss = loss_fn(a, b, s, *extra)
        loss = sum(loss) if isinstance(loss, tuple) else loss
        loss.backward()
        return loss.detach(), a.grad, b.grad, s.grad

    theirs = value_and_grads(open_clip_loss.DistillClipLoss(), teacher_images, teacher_texts, teacher_scale)
    for chunk in (None, 5):
        loss = DistillationLoss(ClipLoss(chunk_size=chunk), weight=1.0, chunk_size=chunk)
        ours = value_and_grads(lambda a, b, s: loss(a, b, s, None, teacher_images, teacher_texts, teacher_scale))
        for mine, reference in zip(ours, theirs):
            torch.testing.assert_close(mine, reference, atol=1e-6, rtol=1e-5)
    # the weight scales the distillation term alone, which the loss reports unweighted
    contrastive = ClipLoss()(images, texts, scale)
    loss = DistillationLoss(ClipLoss(), weight=0.25)
    total = loss(images, texts, scale, None, teacher_images, teacher_texts, teacher_scale)
    assert loss.last_distill_term > 0
    torch.testing.assert_close(total, contrastive + 0.25 * loss.last_distill_term)
    with pytest.raises(ValueError, match="teacher's image and text features"):
        loss(images, texts, scale)


def _tiny(**overrides):
    return clipforge.create_model("ViT-Tiny-64", vision_cfg={"layers": 1, **overrides.get("vision", {})},
                                  text_cfg={"layers": 1, **overrides.get("text", {})})


def test_a_step_with_a_teacher_is_exact_under_gradient_accumulation():
    student = _tiny()
    teacher_model = _tiny(vision={"image_size": 32}, text={"context_length": 16}).eval().requires_grad_(False)
    teacher = Teacher(teacher_model, TeacherInputs(None, None))
    images, tokens = torch.randn(12, 3, 64, 64), random_tokens(12, 32)
    teacher_images, teacher_tokens = torch.randn(12, 3, 32, 32), random_tokens(12, 16)

    def grads(parts):
        student.zero_grad(set_to_none=True)
        size = 12 // parts
        micro = [{"images": images[i:i + size], "tokens": tokens[i:i + size],
                  "teacher_images": teacher_images[i:i + size], "teacher_tokens": teacher_tokens[i:i + size]}
                 for i in range(0, 12, size)]
        loss_fn = DistillationLoss(ClipLoss(), weight=2.0)
        train_step(student, micro, loss_fn, torch.optim.SGD(student.parameters(), lr=0.0),
                   torch.amp.GradScaler("cpu", enabled=False), nullcontext(), torch.device("cpu"),
                   TrainConfig(accum_freq=parts), teacher)
        return loss_fn.last_distill_term, {k: p.grad.clone() for k, p in student.named_parameters()
                                           if p.grad is not None}

    (whole_term, whole), (split_term, split) = grads(1), grads(3)
    torch.testing.assert_close(split_term, whole_term)
    assert whole.keys() == split.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=2e-6, rtol=1e-4, msg=name)
    assert all(p.grad is None for p in teacher_model.parameters())


@pytest.mark.parametrize("colour", [{}, {"color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8,
                                              "gray_scale_prob": 0.3}])
def test_the_teacher_sees_the_students_crop_at_its_own_size_and_normalisation(tmp_path, colour):
    """... and with colour augmentation, the student's colour changes too (``TrainTransform.augmentation``)."""
    shard = shapes_shard(tmp_path / "s-000000.tar", 12)
    tokenizer = clipforge.get_tokenizer("ViT-Tiny-64")
    teacher_tokenizer = clipforge.get_tokenizer("ViT-Tiny-64", context_length=16)
    student = TrainTransform(48, scale=(0.3, 1.0), **colour)
    half = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def first_batch(teacher):
        stream = ContrastiveStream(open_source(str(shard)), student, tokenizer, 6, seed=2, hflip=True,
                                   teacher=teacher)
        return next(iter(stream))

    alone = first_batch(None)
    same_size = first_batch(TeacherInputs(TrainTransform(48, **student.augmentation(), **half), teacher_tokenizer))
    other_size = first_batch(TeacherInputs(TrainTransform(24, **student.augmentation(), **half), teacher_tokenizer))
    if colour:  # (the colour changes do change the student's images)
        plain = ContrastiveStream(open_source(str(shard)), TrainTransform(48, scale=(0.3, 1.0)), tokenizer, 6,
                                  seed=2, hflip=True)
        assert not torch.equal(next(iter(plain))["images"], alone["images"])
    for batch in (same_size, other_size):  # the student's batch is as without a teacher
        assert torch.equal(batch["images"], alone["images"]) and torch.equal(batch["tokens"], alone["tokens"])
        assert batch["teacher_tokens"].shape == (6, 16)
        assert torch.equal(batch["teacher_tokens"][:, :4], alone["tokens"][:, :4])  # same BPE, shorter context
    # the same pixels under the teacher's normalisation: the same crop of the same (flipped or not) image
    mean, std = torch.tensor(student.mean).view(3, 1, 1), torch.tensor(student.std).view(3, 1, 1)
    torch.testing.assert_close(same_size["teacher_images"] * 0.5 + 0.5, alone["images"] * std + mean,
                               atol=1e-5, rtol=0)
    assert other_size["teacher_images"].shape == (6, 3, 24, 24)
    smaller = F.interpolate(same_size["teacher_images"], size=24, mode="bilinear", antialias=True)
    assert (smaller - other_size["teacher_images"]).abs().mean() < 0.1  # the same crop, resized by Pillow
    no_teacher = first_batch(TeacherInputs(None, teacher_tokenizer))
    assert "teacher_images" not in no_teacher and torch.equal(no_teacher["teacher_tokens"], same_size["teacher_tokens"])
    with pytest.raises(ValueError, match="captioned batches"):
        ContrastiveStream(open_source(str(shard)), student, tokenizer, 6, targets="labels",
                          teacher=TeacherInputs(None, teacher_tokenizer))


def test_training_distils_from_a_saved_teacher_logs_the_term_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    teacher = _tiny(vision={"image_size": 32, "patch_size": 8}, text={"context_length": 16})
    teacher.normalisation = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    config = clipforge.get_model_config("ViT-Tiny-64")
    config["vision_cfg"].update(layers=1, image_size=32)
    config["text_cfg"].update(layers=1, context_length=16)
    clipforge.save_pretrained(teacher, tmp_path / "teacher", config)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    shard = shapes_shard(tmp_path / "s-000000.tar", 24)
    args = ["train", "--model", "ViT-Tiny-64", "--model-cfg", '{"vision_cfg": {"layers": 1}, "text_cfg": {"layers": 1}}',
            "--train-data", str(shard), "--batch-size", "8", "--steps", "4", "--save-every", "2", "--keep", "5",
            "--workers", "0", "--no-progress", "--hflip", "--distill-pretrained", str(tmp_path / "teacher"),
            "--distill-weight", "0.5", "--distill-text-cache"]
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    assert cli.main(args + ["--output", str(tmp_path / "straight")]) == 0
    assert "distilling from" in capsys.readouterr().err
    assert (tmp_path / "straight" / "teacher_text_features.safetensors").is_file()  # the teacher's table, kept
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4] and 0 < records[0]["distill_loss"] < 10
    run_config = json.loads((tmp_path / "straight" / "run_config.json").read_text())["train"]
    assert run_config["distill_pretrained"] == str(tmp_path / "teacher") and run_config["distill_weight"] == 0.5
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # cut back to the middle checkpoint and resumed: the weights of the straight run
    assert cli.main(args + ["--output", str(tmp_path / "resumed")]) == 0
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000004")
    fills = []
    monkeypatch.setattr(FeatureCache, "fill", lambda self, *a, **k: fills.append(1))
    assert cli.main(args + ["--output", str(tmp_path / "resumed"), "--resume", "latest"]) == 0
    assert not fills  # the teacher's text features read back from the run's folder
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("settings, message", [
    ({"distill_model": "ViT-Tiny-64"}, "random weights"),
    ({"distill_pretrained": "x", "objective": "bow"}, "CLIP student"),
    ({"distill_pretrained": "x", "distill_weight": 0.0}, "--distill-weight 0.0"),
    ({"distill_text_cache": True}, "give --distill-model"),
    ({"distill_pretrained": "x", "fsdp": True}, "--distill-"),
])
def test_distillation_settings_that_cannot_work_are_refused_by_name(tmp_path, settings, message):
    shard = shapes_shard(tmp_path / "s-000000.tar", 8)
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(model="ViT-Tiny-64", train_data=str(shard), batch_size=4, steps=1, workers=0,
                          progress=False, output=str(tmp_path / "run"), **settings))


def test_a_bf16_teacher_holds_half_the_bytes_and_gives_the_features_of_its_fp32_self(tmp_path, capsys):
    """``--distill-precision bf16``: the teacher's weights in bf16 (half the memory), its features of a batch within
    bf16 rounding of the fp32 teacher's, through the same ``Teacher.features`` a step calls; and a teacher of another
    size than the student draws its view as the student draws (``load_teacher`` passes the crop and colour settings)."""
    from contextlib import nullcontext

    from clipforge.train.distill import load_teacher

    folder = clipforge.save_pretrained(_tiny(vision={"image_size": 32, "patch_size": 8}), tmp_path / "teacher")
    student = TrainTransform(48, scale=(0.4, 1.0), color_jitter=(0.4, 0.4, 0.4), gray_scale_prob=0.3)
    teachers = {p: load_teacher(None, str(folder), torch.device("cpu"), student, precision=p) for p in ("fp32", "bf16")}
    view = teachers["fp32"].inputs.transform  # (32 px, the student's 48): its own view, drawn as the student's
    assert view.image_size == 32 and view.augmentation() == student.augmentation()
    assert "bfloat16 weights" in capsys.readouterr().err
    assert {p.dtype for p in teachers["bf16"].model.parameters()} == {torch.bfloat16}
    batch = {"images": torch.randn(4, 3, 48, 48), "teacher_images": torch.randn(4, 3, 32, 32),
             "teacher_tokens": teachers["fp32"].inputs.tokenizer(["a red square", "a blue circle", "two dogs",
                                                                  "a cat"])}
    exact, rounded = (teachers[p].features(batch, torch.device("cpu"), nullcontext()) for p in ("fp32", "bf16"))
    for a, b in zip(exact[:2], rounded[:2]):
        assert b.dtype == torch.bfloat16 and (a - b.float()).abs().max() < 0.05
        assert torch.nn.functional.cosine_similarity(a, b.float()).min() > 0.99


def test_a_teacher_that_is_not_a_clip_is_refused(tmp_path):
    shard = shapes_shard(tmp_path / "s-000000.tar", 16)
    bow = train(TrainConfig(model="ViT-Tiny-64", objective="bow", train_data=str(shard), batch_size=8, steps=1,
                            workers=0, progress=False, output=str(tmp_path / "bow")))
    with pytest.raises(ValueError, match="not a CLIP model"):
        train(TrainConfig(model="ViT-Tiny-64", train_data=str(shard), batch_size=8, steps=1, workers=0,
                          progress=False, output=str(tmp_path / "run"), distill_pretrained=bow["checkpoint"]))
