"""Fine-tuning from the zero-shot head, and WiSE-FT between the endpoints."""
import io
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import clipforge
from clipforge.cli import main
from clipforge.finetune import CLIPClassifier, parse_alphas, wise_ft
from clipforge.zeroshot import temperature, zero_shot_classifier

from conftest import write_shard

COLOURS = ["red", "green", "blue", "yellow"]


def _labelled(root, n=32):
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(COLOURS) + "\n")
    for split, offset in (("train", 0), ("test", 100)):
        samples = []
        for i in range(n):
            colour = COLOURS[i % 4]
            image = Image.new("RGB", (40, 40), colour)
            image.putpixel(((i + offset) % 40, 3), (0, 0, 0))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            samples.append({"__key__": f"{i:04d}", "png": buffer.getvalue(), "cls": str(i % 4)})
        write_shard(root / split / f"{split}-000000.tar", samples)
    return root


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = clipforge.create_model("ViT-Tiny-64", vision_cfg={"layers": 2}, text_cfg={"layers": 2})
    return str(clipforge.save_pretrained(model, tmp_path_factory.mktemp("clip") / "model"))


def test_the_head_at_step_zero_is_the_zero_shot_classifier(clip_checkpoint):
    clip, preprocess, tokenizer = clipforge.load(clip_checkpoint)
    templates = ["a photo of a {}.", "a {} thing"]
    model = CLIPClassifier.from_zero_shot(clip, COLOURS, templates, tokenizer).eval()
    images = torch.stack([preprocess(Image.new("RGB", (50, 50), c)) for c in COLOURS + ["purple", "white"]])
    with torch.no_grad():
        zero_shot = temperature(clip) * clip.encode_image(images, normalize=True) @ zero_shot_classifier(
            clip, tokenizer, COLOURS, templates)
        torch.testing.assert_close(model.classify(images), zero_shot, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.classify(images).argmax(1), zero_shot.argmax(1))


def test_finetune_trains_resumes_exactly_and_wise_ft_reproduces_the_endpoints(clip_checkpoint, tmp_path, capsys):
    root = _labelled(tmp_path / "colours")
    common = ["finetune", "--pretrained", clip_checkpoint, "--dataset-root", str(root), "--val-split", "test",
              "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--save-every", "2", "--keep", "5",
              "--templates", "a {} square", "--no-progress"]
    assert main([*common, "--steps", "4", "--output", str(tmp_path / "straight")]) == 0
    out = capsys.readouterr().out
    assert "validation: top1" in out
    # killed after step 2, resumed: the same weights
    assert main([*common, "--steps", "4", "--output", str(tmp_path / "resumed")]) == 0
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000004")
    assert main([*common, "--steps", "4", "--output", str(tmp_path / "resumed"), "--resume", "latest"]) == 0
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    finetuned_path = tmp_path / "straight" / "checkpoints" / "step-00000004"
    finetuned, _, _ = clipforge.load(str(finetuned_path))
    assert isinstance(finetuned, CLIPClassifier) and finetuned.classnames == COLOURS
    clip, _, tokenizer = clipforge.load(clip_checkpoint)
    assert not torch.equal(finetuned.visual.proj, clip.visual.proj)  # the image tower was fine-tuned
    for name, value in clip.text.state_dict().items():  # the text tower, replaced by the head, was not
        assert torch.equal(value, finetuned.text.state_dict()[name]), name

    assert main(["wise-ft", "--zeroshot", clip_checkpoint, "--finetuned", str(finetuned_path), "--alphas", "0:1:0.5",
                 "--output", str(tmp_path / "wise")]) == 0
    zero_shot = CLIPClassifier.from_zero_shot(clip, COLOURS, ["a {} square"], tokenizer).state_dict()
    ends = {alpha: load_file(tmp_path / "wise" / f"alpha-{alpha}" / "model.safetensors") for alpha in ("0.00", "1.00")}
    assert all(torch.equal(ends["0.00"][k], zero_shot[k]) for k in zero_shot)  # alpha 0: the zero-shot model
    assert all(torch.equal(ends["1.00"][k], a[k]) for k in a)  # alpha 1: the fine-tuned model
    middle = load_file(tmp_path / "wise" / "alpha-0.50" / "model.safetensors")
    torch.testing.assert_close(middle["visual.proj"], (zero_shot["visual.proj"] + a["visual.proj"]) / 2)

    report = tmp_path / "rob.json"
    assert main(["eval", "robustness", "--pretrained", str(tmp_path / "wise" / "alpha-0.50"), "--dataset-root",
                 str(root), "--probe", "head", "--corruptions", "contrast", "--severities", "5", "--output",
                 str(report), "--quiet", "--no-cache"]) == 0
    assert set(json.loads(report.read_text())["corruptions"]) == {"contrast"}


def test_wise_ft_and_alpha_errors(clip_checkpoint):
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0] and parse_alphas("0.3") == [0.3]
    with pytest.raises(ValueError, match="between 0"):
        parse_alphas("1.5")
    for spec in ("2:1", "a", "0:1:x"):  # were a bare unpacking or float() error
        with pytest.raises(ValueError, match="expected numbers such as"):
            parse_alphas(spec)
    with pytest.raises(ValueError, match="goes up from start to stop"):
        parse_alphas("1:0:0.1")
    clip, _, tokenizer = clipforge.load(clip_checkpoint)
    a = CLIPClassifier.from_zero_shot(clip, COLOURS, ["a {}"], tokenizer)
    b = CLIPClassifier.from_zero_shot(clip, COLOURS[::-1], ["a {}"], tokenizer)
    with pytest.raises(ValueError, match="same classes"):
        wise_ft(a, b, 0.5)


def test_finetune_needs_labelled_data(clip_checkpoint, tmp_path, capsys):
    root = tmp_path / "unlabelled"
    _labelled(root)
    (root / "classnames.txt").unlink()
    assert main(["finetune", "--pretrained", clip_checkpoint, "--dataset-root", str(root), "--steps", "1",
                 "--output", str(tmp_path / "x")]) == 2
    assert "classnames" in capsys.readouterr().err


def test_finetune_reads_a_csv_split_and_a_plain_image_folder(clip_checkpoint, tmp_path, capsys):
    """A split given as <root>/train.csv was accepted by the layout check and then trained from <root>/train, which
    did not exist; a folder of class folders with no split in it is the training split (and refused as its own
    validation split)."""
    root = tmp_path / "csv"
    root.mkdir()
    (root / "classnames.txt").write_text("\n".join(COLOURS) + "\n")
    rows = ["filepath,label"]
    for i in range(8):
        Image.new("RGB", (40, 40), COLOURS[i % 4]).save(root / f"{i}.png")
        rows.append(f"{i}.png,{i % 4}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    common = ["--pretrained", clip_checkpoint, "--steps", "1", "--batch-size", "4", "--workers", "0",
              "--save-every", "0", "--templates", "a {} square", "--no-progress"]
    assert main(["finetune", "--dataset-root", str(root), "--output", str(tmp_path / "a"), *common]) == 0
    folder = tmp_path / "photos"
    for i in range(8):
        (folder / COLOURS[i % 4]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), COLOURS[i % 4]).save(folder / COLOURS[i % 4] / f"{i}.png")
    assert main(["finetune", "--dataset-root", str(folder), "--output", str(tmp_path / "b"), *common]) == 0
    capsys.readouterr()
    assert main(["finetune", "--dataset-root", str(folder), "--val-split", "test", "--output", str(tmp_path / "c"),
                 *common]) == 2
    assert "splits 'train' and 'test' both read" in capsys.readouterr().err
