"""clipforge bench compares like with like: peers built from the same config carry the same weights."""
import pytest
import torch

from clipforge import bench
from clipforge import cli


@pytest.mark.parametrize("impl", ["open_clip", "transformers"])
def test_peers_have_our_weights_and_outputs(impl):
    ours = bench._build("ViT-Tiny-64").eval()
    peer = bench._peer(impl, ours)
    if peer is None:
        pytest.skip(f"{impl} not installed")
    peer.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs = peer.get_image_features(pixel_values=images) if impl == "transformers" else peer.encode_image(images)
        theirs = getattr(theirs, "pooler_output", theirs)
        torch.testing.assert_close(theirs, ours.encode_image(images), atol=1e-5, rtol=1e-4)


def test_loss_memory_table_shows_dense_quadratic_chunked_linear():
    table = bench.loss_memory((512, 1024))
    assert table[1024]["dense"] / table[512]["dense"] > 3.5
    assert table[1024]["chunked"] / table[512]["chunked"] < 2.5


def test_real_captions_mix_coco_and_label_captions(tmp_path):
    captions = bench.real_captions(tmp_path, 50)  # no coco-mini here: label captions only
    assert len(captions) == 50 and all(isinstance(c, str) and c for c in captions)


def test_train_worker_measures_both_implementations(tmp_path):
    for impl in ("clipforge", "open_clip"):
        result = bench._worker({"kind": "train", "impl": impl, "model": "ViT-Tiny-64", "batch": 8, "steps": 2,
                                "data": str(tmp_path), "threads": 1})
        if "skipped" in result:
            pytest.skip(result["skipped"])
        assert result["samples_per_s"] > 0
    assert "achieved_gflops" in bench._worker({"kind": "train", "impl": "clipforge", "model": "ViT-Tiny-64",
                                                "batch": 8, "steps": 1, "data": str(tmp_path), "threads": 1})


def test_bench_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "--quick" in capsys.readouterr().out
