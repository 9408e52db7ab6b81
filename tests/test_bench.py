"""clipforge bench compares like with like: peers built from the same config carry the same weights, timings
interleave, and the ratios come from the timings."""
import statistics

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge import cli
from clipforge.bench import corpora, peers, tasks, timing, worker

from conftest import shared_data


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("impl", ["open_clip", "transformers"])
def test_peers_have_our_weights_and_outputs(impl):
    ours = peers.build("ViT-Tiny-64").eval()
    peer = peers.peer(impl, ours)
    if peer is None:
        pytest.skip(f"{impl} not installed")
    peer.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs = peer.get_image_features(pixel_values=images) if impl == "transformers" else peer.encode_image(images)
        theirs = getattr(theirs, "pooler_output", theirs)
        torch.testing.assert_close(theirs, ours.encode_image(images), atol=1e-5, rtol=1e-4)
    assert peers.peer("transformers", peers.build("RN-Tiny-64")) is None  # no ResNet CLIP in transformers
    layer_scaled = peers.build("ViT-Tiny-64")
    layer_scaled.config["vision_cfg"]["ls_init_value"] = 1e-4
    assert peers.peer("transformers", layer_scaled) is None  # nor LayerScale blocks
    with pytest.raises(ValueError, match="no-such-peer"):
        peers.peer("no-such-peer", ours)


def test_loss_memory_table_shows_dense_quadratic_chunked_linear():
    table = tasks.loss_memory((512, 1024))
    assert table[1024]["dense"] / table[512]["dense"] > 3.5
    assert table[1024]["chunked"] / table[512]["chunked"] < 2.5


def test_real_captions_are_coco_minis_human_captions_then_label_captions():
    import tarfile

    with tarfile.open(shared_data("coco-mini", "test", "test-000000.tar")) as tar:  # every line of every .txt
        expected = sorted(line.strip() for m in tar if m.name.endswith(".txt")
                          for line in tar.extractfile(m).read().decode().splitlines() if line.strip())
    human = corpora.coco_captions(shared_data())
    assert len(human) >= 79 * 5 and sorted(human) == expected
    captions = corpora.real_captions(shared_data(), 500)
    assert captions[:len(human)] == human and len(captions) == 500
    assert all(any(name in c for name in corpora.CIFAR10_NAMES) for c in captions[len(human):])


def test_without_data_the_captions_are_label_captions(tmp_path):
    for data in (None, tmp_path):  # no folder, or one without coco-mini
        captions = corpora.real_captions(data, 50)
        assert len(captions) == 50 and all(any(name in c for name in corpora.CIFAR10_NAMES) for c in captions)


def test_summary_rates_and_adjacent_run_ratios():
    times = {"clipforge": [1.0, 2.0, 4.0], "peer": [2.0, 2.0, 2.0]}
    out = timing.summary(times, 10, "items_per_s")
    assert out["clipforge"] == {"items_per_s": 5.0, "min": 2.5, "max": 10.0}
    assert out["peer"]["items_per_s"] == 5.0 and out["peer"]["clipforge_ratio"] == 1.0  # median of 2, 1, 0.5


def test_interleaving_rotates_the_order():
    calls = []
    times = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"] and len(times["a"]) == 3


def _recording_interleaved(monkeypatch):
    recorded = {}

    def record(runs, repeats):
        recorded.update(timing.interleaved(runs, repeats))
        return recorded

    monkeypatch.setattr(tasks, "interleaved", record)
    return recorded


def test_train_speed_is_interleaved_from_the_same_loss(monkeypatch):
    pytest.importorskip("open_clip")
    pytest.importorskip("transformers")
    times = _recording_interleaved(monkeypatch)
    result = worker.run_task({"kind": "train_speed", "impls": ["clipforge", "open_clip", "transformers"],
                              "model": "ViT-Tiny-64", "batch": 8, "steps": 3, "threads": 1})
    ours = result["clipforge"]
    for peer in ("open_clip", "transformers"):
        theirs = result[peer]
        assert ours["first_loss"] == pytest.approx(theirs["first_loss"], abs=1e-5), peer  # same weights and batch
        assert len(times["clipforge"]) == len(times[peer]) == 3
        assert theirs["clipforge_ratio"] == pytest.approx(
            statistics.median(p / c for c, p in zip(times["clipforge"], times[peer])))
    assert ours["samples_per_s"] == pytest.approx(8 / statistics.median(times["clipforge"]))
    assert ours["achieved_gflops"] == pytest.approx(ours["flops_per_step"] / statistics.median(times["clipforge"]) / 1e9)


def test_training_peak_memory_holds_at_least_the_optimiser_state():
    pytest.importorskip("open_clip")
    # a fresh process, as the bench runs it: in this one earlier tests have already raised the peak
    memory = worker.run_in_subprocess({"kind": "train_memory", "impls": ["clipforge"], "model": "ViT-Tiny-64",
                                       "batch": 8, "steps": 2, "threads": 1})
    # AdamW's two moments are allocated during the steps, after the baseline: at least twice the weights
    assert memory["clipforge"]["peak_rss_growth_mb"] * 2**20 >= 2 * _param_bytes(peers.build("ViT-Tiny-64")), memory
    # a peer without the architecture is reported as skipped, not as a failed measurement
    assert worker.run_in_subprocess({"kind": "train_memory", "impls": ["transformers"], "model": "RN-Tiny-64", "batch": 2,
                            "steps": 1, "threads": 1}) == \
        {"transformers": {"skipped": "transformers is not installed or has no such architecture"}}


def test_training_memory_is_the_median_of_three_processes_per_implementation_taken_in_turns(monkeypatch):
    """A resident-set peak moves between processes: on CPU each implementation's is the median of three runs, the
    runs rotating through the implementations; a peer without the architecture is reported as the worker says."""
    import argparse

    from clipforge.bench import cli as bench_cli

    readings = {"clipforge": iter([700.0, 600.0, 650.0]), "open_clip": iter([900.0, 1100.0, 1000.0])}
    calls = []

    def fake_subprocess(task):
        if task["kind"] == "train_speed":
            return {"clipforge": {"samples_per_s": 2.0, "first_loss": 1.0},
                    "open_clip": {"samples_per_s": 1.0, "first_loss": 1.0, "clipforge_ratio": 2.0}}
        impl, = task["impls"]
        calls.append(impl)
        if impl not in readings:
            return {impl: {"skipped": f"{impl} is not installed or has no such architecture"}}
        return {impl: {"peak_rss_growth_mb": next(readings[impl])}}

    monkeypatch.setattr(bench_cli, "run_in_subprocess", fake_subprocess)
    args = argparse.Namespace(train_model=None, train_batch=None, quick=True, data=None, train_compile=False)
    ratios = {}
    train, key = bench_cli.bench_training(args, "cpu", ratios)
    assert key == "peak_rss_growth_mb" and calls == ["clipforge", "open_clip", "transformers"] * 3
    assert train["clipforge"][key] == 650.0 and train["clipforge"][f"{key}_runs"] == [700.0, 600.0, 650.0]
    assert ratios["train_memory_vs_open_clip"] == pytest.approx(650 / 1000) and ratios["train_vs_open_clip"] == 2.0
    assert train["transformers"] == {"skipped": "transformers is not installed or has no such architecture"}


@pytest.mark.parametrize("what", ["image", "text"])
def test_embedding_rates_and_ratios_come_from_the_interleaved_times(monkeypatch, what):
    pytest.importorskip("open_clip")
    times = _recording_interleaved(monkeypatch)
    result = worker.run_task({"kind": "embed", "what": what, "impls": ["clipforge", "open_clip"],
                              "model": "ViT-Tiny-64", "n": 8, "batch": 4, "repeats": 3, "threads": 1})
    unit = f"{what}s_per_s"
    assert result["clipforge"][unit] == pytest.approx(8 / statistics.median(times["clipforge"]))
    assert result["open_clip"]["clipforge_ratio"] == pytest.approx(
        statistics.median(p / c for c, p in zip(times["clipforge"], times["open_clip"])))


def test_onnx_backends_are_timed_against_open_clip(monkeypatch):
    pytest.importorskip("open_clip")
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extras")
    pytest.importorskip("onnxscript", reason="onnxscript is in the test extras")
    times = _recording_interleaved(monkeypatch)
    result = worker.run_task({"kind": "embed", "what": "image", "impls": ["clipforge", "open_clip", "onnx-int8"],
                              "model": "ViT-Tiny-64", "n": 8, "batch": 4, "repeats": 3, "threads": 1})
    assert result["onnx-int8"]["open_clip_ratio"] == pytest.approx(
        statistics.median(o / n for n, o in zip(times["onnx-int8"], times["open_clip"])))
    assert "open_clip_ratio" not in result["open_clip"]


def test_bf16_weights_are_timed_against_open_clip_and_embed_close_to_fp32(monkeypatch):
    pytest.importorskip("open_clip")
    times = _recording_interleaved(monkeypatch)
    result = worker.run_task({"kind": "embed", "what": "image", "impls": ["clipforge", "open_clip", "bf16"],
                              "model": "ViT-Tiny-64", "n": 8, "batch": 4, "repeats": 3, "threads": 1})
    assert result["bf16"]["open_clip_ratio"] == pytest.approx(
        statistics.median(o / b for b, o in zip(times["bf16"], times["open_clip"])))
    ours = peers.build("ViT-Tiny-64").eval()
    cast = peers.peer("bf16", ours)
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ours.parameters()} == {torch.float32}  # a copy: the fp32 model is untouched
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert F.cosine_similarity(cast.encode_image(images).float(), ours.encode_image(images)).min() > 0.99


def test_tokenizer_speed_is_cold_with_a_fresh_tokenizer_per_repeat():
    built = []

    class Fake:
        def __init__(self):
            built.append(self)

        def __call__(self, texts):
            return texts

    cold = tasks.tokenizer_speed({"clipforge": Fake, "peer": Fake}, ["a", "b"], repeats=3)
    assert len(built) == 6 and set(cold) == {"clipforge", "peer"} and "clipforge_ratio" in cold["peer"]
    built.clear()
    tasks.tokenizer_speed({"clipforge": Fake}, ["a"], repeats=3, warm=True)
    assert len(built) == 1


def test_distinct_captions_never_repeat(tmp_path):
    captions = corpora.distinct_captions(tmp_path, 1000)
    assert len(set(captions)) == 1000


def test_bench_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "--quick" in capsys.readouterr().out


def test_bench_parts_measure_only_what_is_asked(tmp_path):
    import json

    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--parts", "loss", "--device", "cpu", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["loss_memory_mb"]) == {"512", "1024"}
    assert "train" not in results and "embed" not in results and "tokenizer" not in results


def test_open_clip_peer_caches_its_locked_text_towers_features_without_dropout():
    """The Flickr8k peer runs open_clip's model with the recipe's text-feature cache: features of the frozen
    Hugging Face transformer, computed once and dropout-free, give the same outputs as open_clip in eval mode."""
    pytest.importorskip("open_clip", reason="open_clip is in the test extras")
    torch.manual_seed(0)
    try:
        ours = peers.build("ViT-Tiny-64-MiniLM")
    except Exception as error:  # the MiniLM package is in the test extras
        pytest.skip(f"MiniLM text tower unavailable: {error}")
    model = peers.OpenClipForTraining(ours)
    with pytest.raises(ValueError, match="locked"):
        model.text.cache_features()
    model.lock_text_tower()
    tokenizer = clipforge.get_tokenizer("ViT-Tiny-64-MiniLM")
    tokens = tokenizer(["a dog runs through water", "a child on a swing", "two people"])
    model.text.cache_features().fill(tokens)
    assert len(model.text_features) == 3
    model.train()
    assert model.inner.visual.training and not model.inner.text.transformer.training  # dropout stays off
    images = torch.randn(3, 3, 64, 64)
    cached = model(images, tokens)
    assert cached.text_features.requires_grad  # the projection above the cache still trains
    model.eval()
    model.text_features = None
    with torch.no_grad():
        plain = model(images, tokens)
    torch.testing.assert_close(cached.text_features.detach(), plain.text_features, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached.image_features.detach(), plain.image_features, atol=1e-5, rtol=1e-4)
