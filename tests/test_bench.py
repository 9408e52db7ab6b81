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


def test_train_speed_is_interleaved_from_the_same_loss(tmp_path):
    pytest.importorskip("open_clip")
    result = bench._worker({"kind": "train_speed", "impls": ["clipforge", "open_clip"], "model": "ViT-Tiny-64",
                            "batch": 8, "steps": 2, "data": str(tmp_path), "threads": 1})
    ours, theirs = result["clipforge"], result["open_clip"]
    assert ours["samples_per_s"] > 0 and theirs["samples_per_s"] > 0 and theirs["clipforge_ratio"] > 0
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], abs=1e-5)  # same weights, same batch
    assert ours["achieved_gflops"] > 0


def test_train_memory_and_embed_workers(tmp_path):
    pytest.importorskip("open_clip")
    # a fresh process, as the bench runs it: in this one earlier tests have already raised the peak
    memory = bench._subprocess({"kind": "train_memory", "impls": ["clipforge"], "model": "ViT-Tiny-64", "batch": 8,
                                "steps": 2, "data": str(tmp_path), "threads": 1})
    assert memory["clipforge"]["peak_rss_growth_mb"] > 0, memory  # the optimiser state alone is ~60 MB
    embed = bench._worker({"kind": "embed", "impls": ["clipforge"], "model": "ViT-Tiny-64",
                           "n": 4, "batch": 2, "repeats": 2, "threads": 1})
    assert embed["clipforge"]["images_per_s"] > 0
    texts = bench._worker({"kind": "embed", "what": "text", "impls": ["clipforge", "open_clip"], "model": "ViT-Tiny-64",
                           "n": 8, "batch": 4, "repeats": 2, "threads": 1, "data": str(tmp_path)})
    assert texts["clipforge"]["texts_per_s"] > 0 and texts["open_clip"]["clipforge_ratio"] > 0
    resnet = bench._worker({"kind": "embed", "impls": ["clipforge", "transformers"], "model": "RN-Tiny-64",
                            "n": 2, "batch": 2, "repeats": 1, "threads": 1})
    assert "skipped" in resnet["transformers"]  # no ResNet CLIP in transformers: skipped with a note
    with pytest.raises(ValueError, match="no-such-peer"):
        bench._peer("no-such-peer", bench._build("ViT-Tiny-64"))


def test_interleaving_rotates_the_order():
    calls = []
    times = bench._interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"] and len(times["a"]) == 3


def test_tokenizer_speed_is_cold_with_a_fresh_tokenizer_per_repeat():
    built = []

    class Fake:
        def __init__(self):
            built.append(self)

        def __call__(self, texts):
            return texts

    cold = bench.tokenizer_speed({"clipforge": Fake, "peer": Fake}, ["a", "b"], repeats=3)
    assert len(built) == 6 and cold["peer"]["clipforge_ratio"] > 0
    built.clear()
    bench.tokenizer_speed({"clipforge": Fake}, ["a"], repeats=3, warm=True)
    assert len(built) == 1


def test_distinct_captions_never_repeat(tmp_path):
    captions = bench.distinct_captions(tmp_path, 1000)
    assert len(set(captions)) == 1000


def test_bench_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "--quick" in capsys.readouterr().out
