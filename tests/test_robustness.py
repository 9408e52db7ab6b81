"""Distribution shift: corruptions are deterministic and grow with severity; eval robustness reports per corruption."""
import io
import json

import numpy as np
import pytest
from PIL import Image

import clipforge.evaluate.robustness as robustness
from clipforge.cli import main
from clipforge.evaluate.corruptions import CORRUPTIONS, UNAVAILABLE, corrupt, resolve

from conftest import shared_data, write_shard


def _photos(n: int = 12) -> list[Image.Image]:
    """Real photographs at CIFAR-10's resolution, the corruptions' native one (the first test images)."""
    import io
    import tarfile

    photos = []
    with tarfile.open(shared_data("cifar10", "test", "test-000000.tar")) as tar:
        for member in tar:
            if member.name.endswith(".jpg") and len(photos) < n:
                photos.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
    return photos


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_deterministic_and_moves_further_with_severity(name):
    photos = _photos()
    distance = []
    for severity in range(1, 6):
        shifted = [corrupt(p, name, severity, seed=3, index=i) for i, p in enumerate(photos)]
        again = corrupt(photos[0], name, severity, seed=3, index=0)
        assert np.array_equal(np.asarray(again), np.asarray(shifted[0]))  # same seed and index: same image
        assert all(s.size == p.size and s.mode == "RGB" for s, p in zip(shifted, photos))
        distance.append(np.mean([np.abs(np.asarray(s, np.float32) - np.asarray(p, np.float32)).mean()
                                 for s, p in zip(shifted, photos)]))
    assert distance[0] > 0 and all(a < b for a, b in zip(distance, distance[1:])), distance


def test_the_draws_depend_on_seed_and_index():
    photo = Image.new("RGB", (32, 32), "grey")
    a = np.asarray(corrupt(photo, "gaussian_noise", 3, seed=0, index=0))
    assert not np.array_equal(a, np.asarray(corrupt(photo, "gaussian_noise", 3, seed=1, index=0)))
    assert not np.array_equal(a, np.asarray(corrupt(photo, "gaussian_noise", 3, seed=0, index=1)))


def test_bad_corruption_names_and_severities_are_clear_errors():
    with pytest.raises(ValueError, match="unknown corruption 'fogg'"):
        resolve("fog,fogg")
    with pytest.raises(ValueError, match="not available here"):
        resolve(["frost"])
    assert "frost" in UNAVAILABLE and len(resolve("all")) == 14
    with pytest.raises(ValueError, match="severity 6 is outside 1..5"):
        corrupt(Image.new("RGB", (32, 32)), "fog", 6)


def test_eval_robustness_reports_every_corruption_and_severity(tmp_path, capsys):
    import clipforge

    root = tmp_path / "colours"
    root.mkdir()
    (root / "classnames.txt").write_text("red\ngreen\n")
    samples = []
    for i in range(8):
        colour = ("red", "green")[i % 2]
        image = Image.new("RGB", (32, 32), colour)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        samples.append({"__key__": f"{i:03d}", "png": buffer.getvalue(), "cls": str(i % 2)})
    write_shard(root / "test" / "test-000000.tar", samples)
    ckpt = str(clipforge.save_pretrained(clipforge.create_model("ViT-Tiny-64"), tmp_path / "model"))
    out = tmp_path / "r.json"
    assert main(["eval", "robustness", "--pretrained", ckpt, "--dataset-root", str(root), "--corruptions",
                 "contrast,pixelate", "--severities", "1,5", "--output", str(out), "--plot", str(tmp_path / "r.png"),
                 "--quiet", "--no-cache"]) == 0
    result = json.loads(out.read_text())
    assert set(result["corruptions"]) == {"contrast", "pixelate"}
    assert all(set(v) == {"1", "5"} for v in result["corruptions"].values())
    means = [sum(v.values()) / 2 for v in result["corruptions"].values()]
    assert result["metrics"]["mean_corrupted_acc1"] == pytest.approx(sum(means) / 2)
    assert result["metrics"]["images"] == 8 and (tmp_path / "r.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", "robustness", "--pretrained", ckpt, "--dataset-root", str(root), "--severities", "0..5"]) == 2
    assert "severity 0 is outside 1..5" in capsys.readouterr().err
    assert main(["eval", "robustness", "--pretrained", ckpt, "--dataset-root", str(root), "--corruptions", "x"]) == 2
    assert "unknown corruption 'x'" in capsys.readouterr().err
    (root / "classnames.txt").unlink()
    assert main(["eval", "robustness", "--pretrained", ckpt, "--dataset-root", str(root)]) == 2
    assert "missing classnames file" in capsys.readouterr().err


def test_shifted_sets_are_made_once_and_read_back_identically(tmp_path):
    from clipforge.evaluate.datasets import open_labelled
    from clipforge.evaluate.robustness import ShiftedSets

    root = tmp_path / "colours"
    (root).mkdir()
    (root / "classnames.txt").write_text("red\ngreen\n")
    samples = []
    for i in range(6):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16 + i), ("red", "green")[i % 2]).save(buffer, format="PNG")  # sizes differ
        samples.append({"__key__": f"{i:03d}", "png": buffer.getvalue(), "cls": str(i % 2)})
    write_shard(root / "test" / "test-000000.tar", samples)
    dataset = open_labelled(root, "test")
    first = ShiftedSets(dataset, max_images=5, seed=2, cache_dir=tmp_path / "cache", progress=False)
    made = first.shifted("shot_noise", 4)
    assert len(made) == 5 and first.labels.tolist() == [0, 1, 0, 1, 0]
    stored = list((tmp_path / "cache").rglob("shot_noise-4.npz"))
    assert len(stored) == 1
    again = ShiftedSets(dataset, max_images=5, seed=2, cache_dir=tmp_path / "cache", progress=False)
    original, robustness.corrupt = robustness.corrupt, None  # read back from disk: a recomputation would fail
    try:
        read = again.shifted("shot_noise", 4)
    finally:
        robustness.corrupt = original
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(made, read))
    assert [im.size for im in read] == [(16, 16 + i) for i in range(5)]
