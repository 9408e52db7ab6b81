"""Embed, index, search; the HTTP API (bad input, fuzzing); the web page in headless Chromium."""
import contextlib
import io
import json
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge import cli
from clipforge.data import ShapesSource
from clipforge.zeroshot import class_probabilities, zero_shot_classifier

from conftest import free_port, write_shard

pytest.importorskip("faiss", reason="faiss-cpu is in the test extras")
pytest.importorskip("pyarrow", reason="pyarrow is in the test extras")


def _shape_images(images: Path, count: int, seed: int, stem: str = "shape{:03d}", article: str = "a",
                  size: int | None = None) -> None:
    """``count`` generated images in ``images``, each with a caption file ("a red circle")."""
    images.mkdir()
    source = ShapesSource(count, seed=seed)
    for i in range(count):
        image, attrs = source.item(i)
        (image.resize((size, size)) if size else image).save(images / f"{stem.format(i)}.png")
        (images / f"{stem.format(i)}.txt").write_text(f"{article} {attrs['colour']} {attrs['shape']}")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """40 generated images with captions, embedded by a (random) ViT-Tiny-64 and indexed."""
    root = tmp_path_factory.mktemp("collection")
    images = root / "images"
    _shape_images(images, 40, seed=3)
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    torch.manual_seed(0)  # the same tower every run: the captions made from its features are then the same too
    ckpt = str(clipforge.save_pretrained(clipforge.create_model("ViT-Tiny-64"), root / "model"))
    out = root / "emb"
    assert cli.main(["embed", str(images), str(out), "--pretrained", ckpt, "--shard-size", "16",
                     "--no-progress"]) == 0
    assert cli.main(["index", "build", str(out)]) == 0
    return {"root": root, "images": images, "emb": out, "ckpt": ckpt}


def test_index_takes_its_folder_with_or_without_the_word_build(collection, tmp_path, capsys):
    """`clipforge index FOLDER` was "argument action: invalid choice" (build being its only action)."""
    out = tmp_path / "emb"
    shutil.copytree(collection["emb"], out)
    shutil.rmtree(out / "index", ignore_errors=True)
    for path in out.glob("*.index*"):
        path.unlink()
    assert cli.main(["index", str(out), "--rebuild", "--quiet"]) == 0
    assert "built flat index" in capsys.readouterr().out
    assert cli.main(["index", "build", str(out), "--quiet"]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert cli.main(["index", "build", str(out), "more"]) == 2
    assert "index takes one folder (clipforge index build FOLDER)" in capsys.readouterr().err


def test_embeddings_are_sharded_float16_with_metadata(collection):
    from clipforge.retrieval import load_embeddings

    emb = collection["emb"]
    assert sorted(p.name for p in (emb / "img_emb").iterdir()) == [f"img_emb_0000{i}.npy" for i in range(3)]
    assert np.load(emb / "img_emb" / "img_emb_00000.npy").dtype == np.float16
    vectors, rows = load_embeddings(emb)
    assert vectors.shape == (40, 128) and len(rows) == 40  # the broken file is skipped, not fatal
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-2)
    assert rows[0]["caption"].startswith("a ") and rows[0]["width"] == 64
    info = json.loads((emb / "embed_info.json").read_text())
    assert info["skipped"] == 1 and info["model_spec"]["pretrained"] == collection["ckpt"]
    assert info["weights_dtype"] == "float32"  # --precision auto on CPU
    # named with why, as the run printed it (up to 10; the rest counted)
    assert info["unreadable_examples"] == [f"{collection['images'] / 'broken.png'}: not a readable image (no image "
                                           "format recognised)"]



def test_embed_names_the_first_ten_unreadable_images_with_why(collection, tmp_path, capsys):
    """A long embedding run says which images it could not read and why (it gave only a count), the first ten."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(collection["images"] / "shape000.png", images)
    for i in range(12):
        (images / f"bad{i:02d}.jpg").write_bytes(b"\xff\xd8\xff" if i == 0 else b"nothing")  # a JPEG cut short first
    assert cli.main(["embed", str(images), str(tmp_path / "emb"), "--pretrained", collection["ckpt"],
                     "--no-progress", "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    named = [line for line in captured.err.splitlines() if line.startswith("warning: ") and "skipped" in line]
    assert len(named) == 10 and named[0].startswith(f"warning: {images / 'bad00.jpg'}: not a readable image (")
    assert named[1] == f"warning: {images / 'bad01.jpg'}: not a readable image (no image format recognised), skipped"
    assert "embedded 1 images" in captured.out and "(12 unreadable, skipped;" in captured.out


def test_a_second_run_into_a_folder_in_use_stops_naming_the_first_and_a_killed_one_holds_nothing(
        collection, tmp_path, capsys):
    """Two embed (or train, or caption train) runs given one folder wrote the same shards or checkpoints at once; the
    second now stops before any work, naming the first. A killed run's lock goes with its process: the next run goes ahead."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "emb"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from clipforge.files import run_lock
with run_lock({str(out)!r}, "embed"):
    print("held", flush=True)
    time.sleep(300)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        embed = ["embed", str(collection["images"]), str(out), "--pretrained", collection["ckpt"], "--no-progress"]
        assert cli.main(embed) == 2
        error = capsys.readouterr().err
        assert f"{out}: clipforge embed (process {holder.pid}, started " in error
        assert "is writing into this folder; wait for it to end, or give this run a folder of its own" in error
        assert not (out / "img_emb").exists()  # stopped before any work
        shards = tmp_path / "train-shard.tar"
        write_shard(shards, [{"__key__": f"k{i}", "png": (collection["images"] / f"shape{i:03d}.png").read_bytes(),
                              "txt": "a shape"} for i in range(4)])
        assert cli.main(["train", "--model", "ViT-Tiny-64", "--train-data", str(shards), "--steps", "1",
                         "--batch-size", "4", "--workers", "0", "--output", str(out), "--no-progress"]) == 2
        assert f"clipforge embed (process {holder.pid}, started " in capsys.readouterr().err
        assert cli.main(["caption", "train", "--clip", collection["ckpt"], "--data", str(shards), "--output",
                         str(out), "--no-progress"]) == 2  # LiMBer's map too
        assert f"clipforge embed (process {holder.pid}, started " in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert cli.main(embed) == 0  # killed: nothing held
    assert json.loads((out / "embed_info.json").read_text())["embedded"] == 40
    assert (out / ".clipforge-run.lock").read_text().startswith(f"clipforge embed (process {os.getpid()}, ")

def test_force_image_size_runs_a_model_at_another_size_and_the_collection_remembers_it(collection, tmp_path, capsys):
    """``clipforge.load(force_image_size=96)`` of a 64-pixel model: its position grid resized (``resize_positions``)
    and images preprocessed to 96; ``embed --force-image-size 96`` stores that model's features and records the size,
    which search and serve then load the model at; an ONNX export is made at the size and refuses another."""
    from clipforge.checkpoint.io import resize_positions
    from clipforge.inference import load_for_inference
    from clipforge.retrieval import load_embeddings

    ckpt = collection["ckpt"]
    model, preprocess, _ = clipforge.load(ckpt, force_image_size=96)
    assert model.image_size == preprocess.image_size == 96
    key = "visual.positional_embedding"
    assert torch.equal(model.state_dict()[key], resize_positions(clipforge.load(ckpt)[0].state_dict(), model)[key])
    for bad in (0, 9.5):
        with pytest.raises(ValueError, match="force_image_size"):
            clipforge.load(ckpt, force_image_size=bad)

    out = tmp_path / "emb96"
    assert cli.main(["embed", str(collection["images"]), str(out), "--pretrained", ckpt, "--force-image-size", "96",
                     "--no-progress"]) == 0
    assert json.loads((out / "embed_info.json").read_text())["force_image_size"] == 96
    vectors, rows = load_embeddings(out)
    assert rows[0]["path"].endswith("shape000.png")
    first = Image.open(collection["images"] / "shape000.png")
    with torch.no_grad():
        expected = model.encode_image(preprocess(first.convert("RGB"))[None], normalize=True)[0].numpy()
    assert np.abs(vectors[0] - expected).max() < 2e-3
    reloaded, queries, _ = load_for_inference(collection=out)
    assert reloaded.image_size == queries.image_size == 96
    # resuming at the model's own size would mix two kinds of vectors
    assert cli.main(["embed", str(collection["images"]), str(out), "--pretrained", ckpt, "--no-progress"]) == 2
    assert "other settings than this run's: the model's config; force_image_size 96 (now None)" in \
        capsys.readouterr().err
    load_for_inference(collection=out, force_image_size=80)
    assert "embedded with --force-image-size 96" in capsys.readouterr().err

    assert cli.main(["export", "onnx", ckpt, str(tmp_path / "onnx"), "--force-image-size", "96", "--no-check"]) == 0
    assert load_for_inference(str(tmp_path / "onnx"))[1].image_size == 96
    with pytest.raises(ValueError, match="runs at the image size it was exported at"):
        load_for_inference(str(tmp_path / "onnx"), force_image_size=96)


def test_embedding_resumes_at_the_first_missing_shard(collection, tmp_path, capsys):
    out = tmp_path / "emb"
    shutil.copytree(collection["emb"], out)
    (out / "img_emb" / "img_emb_00002.npy").unlink()
    assert cli.main(["index", "build", str(out), "--quiet"]) == 0  # part of a collection: indexed, with a warning
    captured = capsys.readouterr()
    assert "the embedding run has not finished (2 of 3 shards written)" in captured.err
    assert "(embedding unfinished)" in captured.out
    before = (out / "img_emb" / "img_emb_00000.npy").stat().st_mtime_ns
    assert cli.main(["embed", str(collection["images"]), str(out), "--pretrained", collection["ckpt"],
                     "--shard-size", "16", "--no-progress"]) == 0
    info = json.loads((out / "embed_info.json").read_text())
    assert info["reused_shards"] == 2 and (out / "img_emb" / "img_emb_00002.npy").exists()
    assert (out / "img_emb" / "img_emb_00000.npy").stat().st_mtime_ns == before
    capsys.readouterr()
    assert cli.main(["index", "build", str(out), "--quiet"]) == 0
    assert "not finished" not in capsys.readouterr().err
    info.pop("shards")  # what a run still going, or killed, leaves: the count is written last
    (out / "embed_info.json").write_text(json.dumps(info))
    assert cli.main(["index", "build", str(out), "--quiet"]) == 0
    assert "the embedding run has not finished (3 shards written)" in capsys.readouterr().err


def test_images_added_to_the_input_are_embedded_by_running_again_and_other_changes_refused(
        collection, tmp_path, capsys, monkeypatch):
    """Output shard i holds catalogue images from i * shard_size: new images are added after the embedded ones
    (the last shard redone where they join it, safely across a kill), those that sort among them too (their rows
    follow the catalogue the collection keeps); images removed, another shard size, or a collection from before
    inputs were recorded whose images changed are refused."""
    from clipforge.retrieval import embed as embed_module
    from clipforge.retrieval import load_embeddings

    images, out = tmp_path / "images", tmp_path / "emb"
    images.mkdir()

    def add(*numbers):
        for i in numbers:
            shutil.copy(collection["images"] / f"shape{i:03d}.png", images)

    def embed(*extra):
        return cli.main(["embed", str(images), str(out), "--pretrained", collection["ckpt"], "--shard-size", "3",
                         "--no-progress", *extra])

    def names(folder=out):
        return [Path(row["path"]).name for row in load_embeddings(folder)[1]]

    add(0, 1, 2, 3, 4)
    assert embed() == 0
    first_shard = (out / "img_emb" / "img_emb_00000.npy").stat().st_mtime_ns
    add(5, 6)
    capsys.readouterr()
    assert embed() == 0
    assert "note: 2 images added to the input since" in capsys.readouterr().err
    assert names() == [f"shape{i:03d}.png" for i in range(7)]  # in order, none twice
    assert json.loads((out / "embed_info.json").read_text())["reused_shards"] == 1  # shard 1 redone
    assert (out / "img_emb" / "img_emb_00000.npy").stat().st_mtime_ns == first_shard
    fresh = tmp_path / "fresh"
    assert cli.main(["embed", str(images), str(fresh), "--pretrained", collection["ckpt"], "--no-progress"]) == 0
    np.testing.assert_allclose(load_embeddings(out)[0], load_embeddings(fresh)[0], atol=2e-3)

    add(7)  # killed while redoing the last shard: the next run still redoes it
    original = embed_module.decoded_batches

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_module, "decoded_batches", interrupted)
    assert embed() == 130
    monkeypatch.setattr(embed_module, "decoded_batches", original)
    assert embed() == 0
    assert names() == [f"shape{i:03d}.png" for i in range(8)]

    written = {path: path.stat().st_mtime_ns for path in (out / "img_emb").iterdir()}
    capsys.readouterr()
    assert embed("--shard-size", "4") == 2  # (the last --shard-size wins)
    error = capsys.readouterr().err
    assert "--shard-size 4: the shards in" in error and "hold 3 images each; resume with --shard-size 3" in error
    assert {path: path.stat().st_mtime_ns for path in (out / "img_emb").iterdir()} == written  # nothing touched

    # images that sort among the embedded ones (it was refused: they would have moved the others between rows)
    (images / "aardvark.png").write_bytes((collection["images"] / "shape009.png").read_bytes())
    (images / "shape004b.png").write_bytes((collection["images"] / "shape010.png").read_bytes())
    vectors_before = load_embeddings(out)[0]
    original_write_info = embed_module.write_info

    def killed_before_the_record(*args, **kwargs):  # the list of the new order is written, its digest is not
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_module, "write_info", killed_before_the_record)
    assert embed() == 130
    monkeypatch.setattr(embed_module, "write_info", original_write_info)
    capsys.readouterr()
    assert embed() == 0
    error = capsys.readouterr().err
    assert "2 images added to the input since" in error
    assert "embedding them after the embedded ones, whose rows stay theirs" in error  # (shard 2 went with the kill)
    assert names() == [f"shape{i:03d}.png" for i in range(8)] + ["aardvark.png", "shape004b.png"]
    vectors = load_embeddings(out)[0]
    np.testing.assert_array_equal(vectors[:6], vectors_before[:6])  # shards 0 and 1 untouched
    assert {path: path.stat().st_mtime_ns for path in (out / "img_emb").iterdir() if path.name < "img_emb_00002"} \
        == {path: when for path, when in written.items() if path.name < "img_emb_00002"}
    whole, rows = load_embeddings(collection["emb"])  # the same images, embedded where they were first
    row_of = {Path(row["path"]).name: i for i, row in enumerate(rows)}
    np.testing.assert_allclose(vectors[8:], whole[[row_of["shape009.png"], row_of["shape010.png"]]], atol=2e-3)
    capsys.readouterr()
    assert embed() == 0 and "added" not in capsys.readouterr().err  # and as it is now, nothing to do
    assert json.loads((out / "embed_info.json").read_text())["reused_shards"] == 4

    (images / "shape003.png").rename(tmp_path / "shape003.png")  # removed: its row would still be found
    assert embed() == 2
    assert f"1 of the 10 images embedded into {out} are no longer in the input (such as " in \
        capsys.readouterr().err
    (tmp_path / "shape003.png").rename(images / "shape003.png")

    (out / "catalogue.parquet").unlink()  # a collection embedded before the list was kept: insertions refused
    (images / "aaa.png").write_bytes((collection["images"] / "shape011.png").read_bytes())
    assert embed() == 2
    assert "the input's first 10 images are no longer the ones embedded" in capsys.readouterr().err
    (images / "aaa.png").unlink()

    info = json.loads((out / "embed_info.json").read_text())  # a collection embedded before inputs were recorded
    info.pop("catalogue")
    (out / "embed_info.json").write_text(json.dumps(info))
    add(8)
    assert embed() == 2
    assert "was embedded from 10 images and the input now has 11" in capsys.readouterr().err


def test_resuming_or_querying_with_other_weights_of_the_same_architecture_is_caught(collection, tmp_path, capsys):
    """The collection stores its model's features of the probe images and texts (``retrieval.probe``): resuming with
    another checkpoint of the same architecture is refused, the same weights in bf16 resume, and search with other
    weights than the collection's warns (with its own, recorded or named, it does not)."""
    from clipforge.retrieval.probe import SAME_WEIGHTS, probe_features, read_probe

    ckpt = collection["ckpt"]
    stored = read_probe(collection["emb"])
    model, preprocess, tokenizer = clipforge.load(ckpt)
    assert set(stored) == {"image", "text"} and stored["image"].shape == (3, 128)
    for side, features in probe_features(model, preprocess, tokenizer).items():
        np.testing.assert_allclose(stored[side], features, atol=1e-6)
    torch.manual_seed(1)
    other = str(clipforge.save_pretrained(clipforge.create_model("ViT-Tiny-64"), tmp_path / "other"))

    out = tmp_path / "emb"
    shutil.copytree(collection["emb"], out)
    (out / "img_emb" / "img_emb_00002.npy").unlink()
    assert cli.main(["embed", str(collection["images"]), str(out), "--pretrained", other, "--shard-size", "16",
                     "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "other settings than this run's: other weights (probe images agree to cosine" in error
    cosine = float(error.split("agree to cosine ")[1].split()[0])
    assert cosine < SAME_WEIGHTS and not (out / "img_emb" / "img_emb_00002.npy").exists()
    assert cli.main(["embed", str(collection["images"]), str(out), "--pretrained", ckpt, "--shard-size", "16",
                     "--precision", "bf16", "--no-progress"]) == 0
    assert json.loads((out / "embed_info.json").read_text())["reused_shards"] == 2
    capsys.readouterr()

    for pretrained in ([], ["--pretrained", ckpt]):
        assert cli.main(["search", str(out), "a red circle", "-k", "1", *pretrained]) == 0
        assert "warning" not in capsys.readouterr().err
    assert cli.main(["search", str(out), "a red circle", "-k", "1", "--pretrained", other]) == 0
    assert "warning: this model is not the one that embedded" in capsys.readouterr().err


def test_caption_scores_filter_pairs_into_shards_that_train(collection, tmp_path, capsys):
    """``embed --captions`` stores each image's caption vector row for row (the model's normalised text features,
    float16); ``clipforge filter`` keeps the pairs whose cosine passes --min-score or is in the top --keep-fraction,
    as shards holding the image bytes, every caption line and the score, that training reads."""
    import pyarrow.parquet as pq

    from clipforge.data import open_source
    from clipforge.retrieval import load_embeddings

    out = tmp_path / "emb"
    assert cli.main(["embed", str(collection["images"]), str(out), "--pretrained", collection["ckpt"],
                     "--shard-size", "16", "--captions", "--no-progress"]) == 0
    vectors, rows = load_embeddings(out)
    captions = np.concatenate([np.load(out / "caption_emb" / f"caption_emb_0000{i}.npy") for i in range(3)])
    model, _, tokenizer = clipforge.load(collection["ckpt"])
    with torch.no_grad():
        expected = model.encode_text(tokenizer([r["caption"] for r in rows]), normalize=True).numpy()
    assert captions.shape == vectors.shape and np.abs(captions - expected).max() < 2e-3
    scores = (vectors * captions.astype(np.float32)).sum(1)

    assert cli.main(["filter", str(out), str(tmp_path / "half"), "--keep-fraction", "0.5", "--shard-size", "8",
                     "--no-progress"]) == 0
    assert "kept 20 of 40 pairs" in capsys.readouterr().out
    info = json.loads((tmp_path / "half" / "filter_info.json").read_text())
    table = pq.read_table(tmp_path / "half" / "scores.parquet").to_pylist()
    assert [r["path"] for r in table] == [r["path"] for r in rows] and info["shards"] == 3
    np.testing.assert_allclose([r["clip_score"] for r in table], scores, atol=1e-5)
    kept = [r for r in table if r["kept"]]
    assert len(kept) == 20 and min(r["clip_score"] for r in kept) >= max(r["clip_score"] for r in table
                                                                         if not r["kept"])
    samples = list(open_source(str(tmp_path / "half"), shuffle_buffer=0).samples(0, 1, 0, 0, Counter()))
    assert len(samples) == 20
    for sample in samples:
        record = json.loads(sample["json"])
        source = Path(record["source"])
        assert sample["png"] == source.read_bytes()
        assert sample["txt"].decode() == source.with_suffix(".txt").read_text()
        assert record["clip_score"] == pytest.approx(scores[[r["path"] for r in rows].index(str(source))], abs=1e-5)
    threshold = float(np.sort(scores)[-10])
    assert cli.main(["filter", str(out), str(tmp_path / "top"), "--min-score", str(threshold), "--no-progress"]) == 0
    assert json.loads((tmp_path / "top" / "filter_info.json").read_text())["kept"] == int((scores >= threshold).sum())
    # the kept pairs train as they are
    assert cli.main(["train", "--model", "ViT-Tiny-64", "--train-data", str(tmp_path / "half"), "--batch-size", "4",
                     "--steps", "1", "--workers", "0", "--no-progress", "--output", str(tmp_path / "run")]) == 0
    # what cannot work says what to do
    assert cli.main(["filter", str(out), str(tmp_path / "half"), "--keep-fraction", "0.5"]) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert cli.main(["filter", str(collection["emb"]), str(tmp_path / "none"), "--min-score", "0"]) == 2
    assert "embed it with --captions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["filter", str(out), str(tmp_path / "x"), "--min-score", "0", "--keep-fraction", "0.5"])
    assert "not allowed with argument" in capsys.readouterr().err
    shutil.copytree(collection["emb"], tmp_path / "plain")
    (tmp_path / "plain" / "img_emb" / "img_emb_00002.npy").unlink()
    assert cli.main(["embed", str(collection["images"]), str(tmp_path / "plain"), "--pretrained", collection["ckpt"],
                     "--shard-size", "16", "--captions", "--no-progress"]) == 2
    assert "other settings than this run's: captions False (now True)" in capsys.readouterr().err


def test_decoding_workers_change_nothing_but_speed(collection, tmp_path):
    from clipforge.retrieval import load_embeddings

    outputs = {}
    for workers in (0, 2):
        out = tmp_path / f"emb{workers}"
        assert cli.main(["embed", str(collection["images"]), str(out), "--pretrained", collection["ckpt"],
                         "--shard-size", "16", "--workers", str(workers), "--no-progress"]) == 0
        outputs[workers] = load_embeddings(out), json.loads((out / "embed_info.json").read_text())
    (vectors0, rows0), info0 = outputs[0]
    (vectors2, rows2), info2 = outputs[2]
    assert rows0 == rows2 and np.array_equal(vectors0, vectors2)
    assert info0["skipped"] == info2["skipped"] == 1 and info2["embedded"] == 40


def test_torchrun_splits_shards_by_rank_and_matches_one_process(collection, tmp_path):
    """Two processes under torchrun: each embeds its own output shards; together they equal the one-process run."""
    import subprocess
    import sys

    from clipforge.retrieval import load_embeddings

    port = free_port()
    out = tmp_path / "emb"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), "-m", "clipforge.cli", "embed", str(collection["images"]), str(out),
         "--pretrained", collection["ckpt"], "--shard-size", "16", "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    vectors, rows = load_embeddings(out)
    reference, reference_rows = load_embeddings(collection["emb"])
    assert [r["path"] for r in rows] == [r["path"] for r in reference_rows]
    np.testing.assert_allclose(vectors, reference, atol=2e-3)  # float16 storage
    info = json.loads((out / "embed_info.json").read_text())
    assert info["embedded"] == 40 and info["skipped"] == 1  # counts from both ranks


def test_embed_says_which_embedded_images_changed_since(collection, tmp_path, capsys):
    """A photo edited in place kept its old vector without a word (rows are kept by path, as clip-retrieval's are):
    each run now says how many embedded images changed, naming one, until they are embedded afresh; an image in a
    shard redone now (one the added images join) is embedded as it is and not said."""
    images, out = tmp_path / "images", tmp_path / "emb"
    images.mkdir()
    for i in range(5):
        shutil.copy(collection["images"] / f"shape{i:03d}.png", images)

    def embed() -> str:
        capsys.readouterr()
        assert cli.main(["embed", str(images), str(out), "--pretrained", collection["ckpt"], "--shard-size", "3",
                         "--no-progress"]) == 0
        return capsys.readouterr().err

    assert "changed since" not in embed()
    assert "changed since" not in embed()  # nothing touched
    shutil.copy(collection["images"] / "shape009.png", images / "shape001.png")  # edited in place (shard 0)
    err = embed()
    assert f"1 image embedded into {out} changed since, by file size or modification time (such as " in err
    assert "shape001.png" in err
    assert json.loads((out / "embed_info.json").read_text())["changed_since_embedded"] == 1
    assert "1 image embedded" in embed()  # said again: its vector is still the earlier picture's
    shutil.copy(collection["images"] / "shape008.png", images / "shape004.png")  # in shard 1, which shape005 joins
    shutil.copy(collection["images"] / "shape005.png", images)
    err = embed()
    assert "1 image embedded" in err and "shape001.png" in err and "shape004.png" not in err


def test_torchrun_embeds_images_added_since_with_the_last_shard_redone_by_its_rank(collection, tmp_path):
    """Images appended to the input, embedded again under torchrun: the shard they join is redone by the rank that
    owns it, whichever rank reads the input record first, and the rows come out as one process embeds them."""
    import subprocess
    import sys

    from clipforge.retrieval import load_embeddings

    images, out = tmp_path / "images", tmp_path / "emb"
    images.mkdir()

    def add(numbers):
        for i in numbers:
            shutil.copy(collection["images"] / f"shape{i:03d}.png", images)

    def embed():
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
             "--master-port", str(free_port()), "-m", "clipforge.cli", "embed", str(images), str(out),
             "--pretrained", collection["ckpt"], "--shard-size", "16", "--no-progress"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stderr

    add(range(30))
    embed()
    add(range(30, 40))
    assert "note: 10 images added to the input since" in embed()
    vectors, rows = load_embeddings(out)
    reference, reference_rows = load_embeddings(collection["emb"])
    assert [Path(r["path"]).name for r in rows] == [Path(r["path"]).name for r in reference_rows]
    np.testing.assert_allclose(vectors, reference, atol=2e-3)


def test_index_cli_tunes_on_a_query_file_and_rejects_a_bad_one(collection, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(collection["emb"], out)
    queries = np.random.default_rng(0).standard_normal((50, 128)).astype(np.float32)
    np.save(tmp_path / "queries.npy", queries)
    assert cli.main(["index", "build", str(out), "--kind", "ivfpq", "--tune-queries", str(tmp_path / "queries.npy")]) == 0
    assert json.loads((out / "index.json").read_text())["tuned_on"] == "50 given queries"
    with pytest.raises(SystemExit, match="tune-queries"):
        cli.main(["index", "build", str(out), "--tune-queries", str(tmp_path / "missing.npy")])


def test_search_cli_orders_by_score_and_finds_an_image_by_itself(collection, capsys):
    assert cli.main(["search", str(collection["emb"]), "a red circle", "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 5 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    query = collection["images"] / "shape007.png"
    assert cli.main(["search", str(collection["emb"]), "--image", str(query), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"].endswith("shape007.png")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_embedding_at_reduced_precision_gives_float_vectors_close_to_fp32s(collection, tmp_path, capsys, precision):
    """--precision casts the weights (the GPU default is bf16, as OpenAI's CLIP loads fp16 there): the collection
    stays float16 vectors, each within rounding of the fp32 one, and a query image finds itself."""
    from clipforge.retrieval import load_embeddings

    out = tmp_path / precision
    assert cli.main(["embed", str(collection["images"]), str(out), "--pretrained", collection["ckpt"],
                     "--shard-size", "16", "--precision", precision, "--no-progress"]) == 0
    assert json.loads((out / "embed_info.json").read_text())["weights_dtype"] == {"bf16": "bfloat16",
                                                                                  "fp16": "float16"}[precision]
    (reduced, rows), (full, full_rows) = load_embeddings(out), load_embeddings(collection["emb"])
    assert rows == full_rows and reduced.dtype == full.dtype
    cosine = (reduced.astype(np.float32) * full.astype(np.float32)).sum(axis=1)
    assert cosine.min() > 0.99 and not np.array_equal(reduced, full), cosine.min()  # rounded, not recomputed fp32
    query = collection["images"] / "shape007.png"
    assert cli.main(["index", "build", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["search", str(out), "--image", str(query), "-k", "5", "--json", "--precision", precision]) == 0
    # a random tower puts these shapes within 0.003 of each other: rounding may reorder the nearest few
    hits = json.loads(capsys.readouterr().out)
    assert any(h["path"].endswith("shape007.png") and h["score"] > 0.99 for h in hits), hits


def test_precision_auto_is_bf16_on_a_gpu_only_onnx_refuses_another_and_random_weights_warn(collection, capsys):
    from clipforge.inference import inference_dtype, load_for_inference

    assert inference_dtype("auto", "cuda:1") == torch.bfloat16 and inference_dtype("auto", "cpu") == torch.float32
    assert inference_dtype(None, "cpu") == torch.float32 and inference_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        inference_dtype("int4", "cpu")
    load_for_inference(collection["ckpt"], device="cpu")
    load_for_inference("ViT-Tiny-64", collection["ckpt"], device="cpu")
    assert "warning" not in capsys.readouterr().err
    model, _, _ = load_for_inference("ViT-Tiny-64", precision="bf16", device="cpu")
    assert "--model ViT-Tiny-64 without --pretrained has random weights" in capsys.readouterr().err  # a slip
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="unknown model 'ViT-Tiny-65'"):
        load_for_inference("ViT-Tiny-65", device="cpu")
    assert "warning" not in capsys.readouterr().err  # the unknown name is the message, not a random-weights warning
    images = torch.randn(2, 3, 64, 64)  # float32, as preprocessing gives them
    assert model.encode_image(images).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp32 graph; got --precision bf16"):
        load_for_inference("unused", backend="onnx", precision="bf16")


def _vector_collection(folder, vectors):
    """A collection folder as ``clipforge embed`` + ``index build`` leave it, from given unit vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.retrieval.index import build_index, save_index

    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for shard, start in enumerate(range(0, len(vectors), 16)):  # several shards: ids cross shard borders
        part = vectors[start:start + 16]
        np.save(folder / "img_emb" / f"img_emb_{shard:05d}.npy", part.astype(np.float16))
        pq.write_table(pa.table({"path": [f"v{start + i}.jpg" for i in range(len(part))], "caption": [""] * len(part),
                                 "width": [0] * len(part), "height": [0] * len(part)}),
                       folder / "metadata" / f"metadata_{shard:05d}.parquet")
    save_index(*build_index(vectors, kind="flat"), folder)
    return folder


def test_dedup_leaves_out_near_duplicates_and_still_fills_k(tmp_path, capsys):
    from clipforge.retrieval.search import Searcher

    rng = np.random.default_rng(0)
    originals = rng.standard_normal((30, 128)).astype(np.float32)
    copies = originals[:10] + 0.02 * rng.standard_normal((10, 128)).astype(np.float32)  # re-uploads, cosine > 0.99
    vectors = np.concatenate([originals, copies])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    folder = _vector_collection(tmp_path / "c", vectors)
    model = clipforge.create_model("ViT-Tiny-64")
    searcher = Searcher(folder, model, clipforge.Preprocess(64), clipforge.get_tokenizer())
    query = vectors[3:4]
    plain = searcher.search_vectors(query, k=5)[0]
    assert [h["id"] for h in plain[:2]] == [3, 33] or [h["id"] for h in plain[:2]] == [33, 3]
    deduped = searcher.search_vectors(query, k=5, dedup=0.95)[0]
    ids = [h["id"] for h in deduped]
    assert len(ids) == 5 and ids[0] in (3, 33) and not {3, 33} <= set(ids)
    kept = vectors[ids]
    assert (kept @ kept.T - np.eye(5)).max() < 0.95
    assert [h["score"] for h in deduped] == sorted((h["score"] for h in deduped), reverse=True)
    expected = []  # walk the full ranking: a result is left out exactly when it nearly copies a kept one
    for hit in searcher.search_vectors(query, k=40)[0]:
        if all(vectors[hit["id"]] @ vectors[i] < 0.95 for i in expected):
            expected.append(hit["id"])
    assert ids == expected[:5]
    assert cli.main(["search", str(folder), "x", "--dedup", "1.5", "--model", "ViT-Tiny-64"]) == 2
    assert "cosine similarity" in capsys.readouterr().err
    for command in (["search", str(tmp_path / "nowhere"), "x"], ["serve", str(tmp_path / "nowhere")]):
        assert cli.main(command) == 2
        assert "nowhere: no such folder" in capsys.readouterr().err
    assert cli.main(["search", str(tmp_path), "x"]) == 2  # a folder, but not an embedded collection
    assert "no img_emb/*.npy here" in capsys.readouterr().err
    assert cli.main(["embed", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--model", "ViT-Tiny-64"]) == 2
    assert "nowhere not found (expected an image folder" in capsys.readouterr().err


def test_approximate_index_reaches_target_recall():
    from clipforge.retrieval.index import build_index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20_000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for kind in ("ivfpq", "hnsw"):
        lines = []
        index, info = build_index(vectors, kind=kind, target_recall=0.9, log=lines.append)
        assert info["recall@10"] >= 0.9 and index.ntotal == 20_000, info
        # a line per stage, the last tuning line being the setting that was kept
        assert any("20,000" in line for line in lines) and f"recall@10 {info['recall@10']:.3f}" in lines[-1]
    _, info = build_index(vectors[:100])
    assert info["kind"] == "flat"


def test_index_tuned_on_given_queries_holds_its_recall_on_fresh_ones(tmp_path):
    """Random queries on random vectors are the hardest case: the builder escalates until the target is met, and
    the saved index reloads with the tuned knobs."""
    import faiss

    from clipforge.retrieval.index import build_index, load_index, recall_at_k, save_index

    rng = np.random.default_rng(1)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
    vectors, tune, fresh = (unit(rng.standard_normal((n, 32))) for n in (20_000, 300, 300))
    index, info = build_index(vectors, kind="ivfpq", target_recall=0.95, queries=tune)
    assert info["target_met"] and info["tuned_on"] == "300 given queries", info
    save_index(index, info, tmp_path)
    loaded, _ = load_index(tmp_path, vectors=vectors)  # the re-rank reads these (a folder's own img_emb by default)
    assert loaded.ivf.nprobe == info["nprobe"] and loaded.k_factor == info["k_factor"]
    exact = faiss.IndexFlatIP(32)
    exact.add(vectors)
    recall = recall_at_k(loaded.search(fresh, 10)[1], exact.search(fresh, 10)[1])
    assert recall >= 0.92, recall  # held-out queries: within sampling noise of the tuned 0.95
    with pytest.raises(ValueError, match="tuning queries"):
        build_index(vectors, kind="ivfpq", queries=np.zeros((3, 16), np.float32))


# ------------------------------------------------------------------------------------------------------- HTTP API

CAPTION_WORDS = ["</s>", "<unk>", "a", "red", "green", "blue", "yellow", "square", "circle", "triangle", "cross"]


def test_search_copy_to_writes_the_hits_images_and_captions_as_stored(collection, tmp_path, capsys):
    """clip-retrieval's filter: the results' image bytes (from files, and from tar shards), captions and a listing;
    --min-score keeps only the close ones; a file gone since embedding is skipped and counted."""
    assert cli.main(["search", str(collection["emb"]), "a red circle", "-k", "6", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    out = tmp_path / "subset"
    assert cli.main(["search", str(collection["emb"]), "a red circle", "-k", "6", "--copy-to", str(out)]) == 0
    listing = [json.loads(line) for line in (out / "hits.jsonl").read_text().splitlines()]
    assert [row["source"] for row in listing] == [h["path"] for h in ranked] and "copied 6 images" in \
        capsys.readouterr().err
    for row in listing:
        source = Path(row["source"])
        assert row["file"].startswith(f"{row['rank']:05d}-{source.stem}")
        assert (out / row["file"]).read_bytes() == source.read_bytes()
        assert (out / row["file"]).with_suffix(".txt").read_text() == source.with_suffix(".txt").read_text() + "\n"
    threshold = ranked[2]["score"]
    assert cli.main(["search", str(collection["emb"]), "a red circle", "-k", "6", "--min-score", str(threshold),
                     "--json"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)] == [h["id"] for h in ranked[:3]]

    # a shard collection; one image file of a folder collection deleted since
    shard = write_shard(tmp_path / "s-000000.tar", [{"__key__": f"k{i}", "png": _png(colour=c), "txt": f"a {c} one"}
                                                    for i, c in enumerate(("red", "blue", "green"))])
    assert cli.main(["embed", str(shard), str(tmp_path / "emb"), "--pretrained", collection["ckpt"],
                     "--no-progress"]) == 0
    assert cli.main(["index", "build", str(tmp_path / "emb"), "--quiet"]) == 0
    assert cli.main(["search", str(tmp_path / "emb"), "red", "-k", "3", "--copy-to", str(tmp_path / "fromshard")]) == 0
    copied = sorted((tmp_path / "fromshard").glob("*.png"))
    assert len(copied) == 3 and {Image.open(p).getpixel((0, 0)) for p in copied} == {(255, 0, 0), (0, 0, 255),
                                                                                     (0, 128, 0)}
    assert {p.with_suffix(".txt").read_text() for p in copied} == {"a red one\n", "a blue one\n", "a green one\n"}
    images = tmp_path / "images"
    shutil.copytree(collection["images"], images, ignore=shutil.ignore_patterns("broken.png"))
    assert cli.main(["embed", str(images), str(tmp_path / "emb2"), "--pretrained", collection["ckpt"],
                     "--no-progress"]) == 0
    assert cli.main(["index", "build", str(tmp_path / "emb2"), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["search", str(tmp_path / "emb2"), "a red circle", "-k", "2", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)[0]["path"]
    os.remove(first)
    assert cli.main(["search", str(tmp_path / "emb2"), "a red circle", "-k", "2", "--copy-to",
                     str(tmp_path / "partial")]) == 0
    err = capsys.readouterr().err
    assert f"skipped {first}" in err and "copied 1 images" in err and "(1 unreadable, skipped)" in err
    assert len((tmp_path / "partial" / "hits.jsonl").read_text().splitlines()) == 1
    (tmp_path / "a-file").write_text("")
    assert cli.main(["search", str(tmp_path / "emb2"), "red", "--copy-to", str(tmp_path / "a-file")]) == 2
    assert "a file, not a folder" in capsys.readouterr().err  # was a FileExistsError traceback
    assert cli.main(["search", str(tmp_path / "emb2"), "red", "--min-score", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [] and "no result scores --min-score 2.0 or more (the best: " in captured.err


@pytest.fixture(scope="module")
def mapping_folder(collection, tmp_path_factory):
    """A LiMBer map (random, scaled up so that captions depend on the image) from the collection's tower into a tiny
    random Llama: what ``serve --mapping`` loads."""
    pytest.importorskip("transformers", reason="LiMBer loads language models with transformers")
    from clipforge.captioning.encoders import open_encoder
    from clipforge.captioning.limber import ImageToPrefix, MappingConfig
    from conftest import tiny_llama

    root = tmp_path_factory.mktemp("limber")
    lm, tokenizer = tiny_llama(CAPTION_WORDS)
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    images = [Image.open(collection["images"] / f"shape{i:03d}.png") for i in range(40)]
    features = open_encoder(collection["ckpt"]).features(images)
    torch.manual_seed(0)
    mapping = ImageToPrefix(MappingConfig(features.shape[1], lm.config.hidden_size, 2, collection["ckpt"],
                                          str(root / "lm"), prompt="a"))
    mapping.fit_scale(features)
    with torch.no_grad():
        mapping.proj.weight.mul_(30)
    return mapping.save(root / "map")


@pytest.fixture(scope="module")
def app(collection, mapping_folder):
    pytest.importorskip("fastapi", reason="fastapi is in the test extras")
    from clipforge.captioning.captioner import Captioner
    from clipforge.serve.app import create_app

    model, preprocess, tokenizer = clipforge.load(collection["ckpt"])
    return create_app(collection["emb"], model, preprocess, tokenizer, max_upload_bytes=2_000_000,
                      captioner=Captioner.load(mapping_folder))


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    return TestClient(app)


def _png(size=(32, 32), colour="red"):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_search_classify_embed_and_thumbnails(client, collection):
    assert client.get("/health").json()["images"] == 40
    results = client.get("/search", params={"q": "a blue square", "k": 7}).json()["results"]
    assert len(results) == 7 and results[0]["score"] >= results[-1]["score"]
    thumb = client.get(results[0]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    probs = client.post("/classify", files={"file": ("x.png", _png())}, data={"labels": "cat, dog,car",
                                                                            "templates": "a {}\na photo of a {c}"}).json()
    model, preprocess, tokenizer = clipforge.load(collection["ckpt"])  # the same zero-shot, computed directly
    with torch.no_grad():
        image = model.encode_image(preprocess(Image.open(io.BytesIO(_png())))[None], normalize=True)
        weights = zero_shot_classifier(model, tokenizer, ["cat", "dog", "car"], ["a {}", "a photo of a {}"])
    expected = dict(zip(["cat", "dog", "car"], class_probabilities(model, image, weights)[0].tolist()))
    assert [p["label"] for p in probs["labels"]] == sorted(expected, key=lambda name: -expected[name])
    for row in probs["labels"]:
        assert row["probability"] == pytest.approx(expected[row["label"]], abs=1e-5)
    assert len(client.post("/embed", json={"texts": ["a", "b"]}).json()["embeddings"]) == 2
    assert len(client.post("/search/image", files={"file": ("x.png", _png())}, data={"k": "3"}).json()["results"]) == 3
    assert "<input id=\"query\"" in client.get("/").text
    # pages of one ranking: offset 5, k 7 are places 6-12 of the full list
    full = [h["id"] for h in client.get("/search", params={"q": "a blue square", "k": 12}).json()["results"]]
    paged = [h["id"] for h in client.get("/search", params={"q": "a blue square", "k": 7, "offset": 5}).json()["results"]]
    assert paged == full[5:12]
    like = client.get("/search/similar", params={"id": full[3], "k": 5}).json()["results"]
    assert like[0]["id"] == full[3] and like[0]["score"] > 0.99  # more like this: the image itself comes first
    item = client.get(f"/item/{full[3]}").json()
    name = item["name"].rsplit(".", 1)[0]
    assert item["captions"] == [(collection["images"] / f"{name}.txt").read_text()]  # its sidecar caption
    big = client.get(f"/thumb/{full[3]}", params={"size": 512})
    assert big.status_code == 200 and Image.open(io.BytesIO(big.content)).size == (64, 64)  # never upscaled
    # de-duplicated: an order-preserving selection from the plain ranking, with no two results closer than asked
    deep = [h["id"] for h in client.get("/search", params={"q": "a blue square", "k": 40}).json()["results"]]
    params = {"q": "a blue square", "k": 5, "dedup": 0.999}
    found = [h["id"] for h in client.get("/search", params=params).json()["results"]]
    assert 1 <= len(found) <= 5 and found == [i for i in deep if i in found]
    images = client.post("/search/image", files={"file": ("x.png", _png())}, data={"k": "3", "dedup": "0.999"})
    assert images.status_code == 200 and 1 <= len(images.json()["results"]) <= 3


@pytest.mark.parametrize("request_kwargs, status, message", [
    (dict(method="POST", url="/classify", files={"file": ("x.png", b"garbage")}, data={"labels": "a"}), 400,
     "not a readable image"),
    (dict(method="POST", url="/classify", files={"file": ("x.png", _png())}, data={"labels": " , ,"}), 400,
     "at least one class name"),
    (dict(method="POST", url="/classify", files={"file": ("x.png", _png())}, data={"labels": "a",
                                                                                 "templates": "no placeholder"}), 400,
     "templates"),
    (dict(method="POST", url="/search/image", files={"file": ("big.bin", b"\0" * 2_100_000)}), 413, "limit"),
    (dict(method="POST", url="/search/image", files={"file": ("x.png", b"")}), 400, "empty"),
    (dict(method="GET", url="/thumb/40"), 404, "no image with id 40"),
    (dict(method="GET", url="/thumb/-1"), 404, "no image"),
    (dict(method="GET", url="/thumb/..%2F..%2Fetc%2Fpasswd"), 404, "Not Found"),
    (dict(method="GET", url="/thumb/abc"), 422, "valid integer"),
    (dict(method="GET", url="/../../etc/passwd"), 404, "Not Found"),
    (dict(method="GET", url="/search", params={"q": "x" * 1001}), 422, "at most 1000 characters"),
    (dict(method="GET", url="/search", params={"q": "cat", "k": 1000}), 422, "less than or equal to 100"),
    (dict(method="GET", url="/search", params={"q": "cat", "dedup": 1.5}), 422, "dedup"),
    (dict(method="GET", url="/search", params={"q": "cat", "dedup": 0}), 422, "dedup"),
    (dict(method="POST", url="/embed", json={"texts": []}), 422, "at least 1 item"),
    (dict(method="GET", url="/search", params={"q": "cat", "k": 100, "offset": 950}), 422, "at most 1000 results deep"),
    (dict(method="GET", url="/search/similar", params={"id": 40}), 404, "no image with id 40"),
    (dict(method="GET", url="/search/similar", params={"id": -3}), 404, "no image with id -3"),
    (dict(method="GET", url="/item/40"), 404, "no image with id 40"),
    (dict(method="GET", url="/thumb/0", params={"size": 300}), 422, "size: one of 256, 512"),
    # clip-retrieval's API
    (dict(method="POST", url="/knn-service", json={"text": "cat", "indice_name": "laion5B"}), 400,
     "this server holds 'emb'"),
    (dict(method="POST", url="/knn-service", json={"text": "cat", "modality": "text"}), 400,
     "no caption index (embed it with --captions"),
    (dict(method="POST", url="/knn-service", json={"image_url": "http://127.0.0.1:22/x.jpg"}), 400,
     "makes no outbound requests"),
    (dict(method="POST", url="/knn-service", json={"num_images": 5}), 400, "exactly one of text, image"),
    (dict(method="POST", url="/knn-service", json={"text": "cat", "embedding_input": [0.1] * 32}), 400,
     "exactly one"),
    (dict(method="POST", url="/knn-service", json={"image": "not base64!"}), 400, "not valid base64"),
    (dict(method="POST", url="/knn-service", json={"image": "Z2FyYmFnZQ=="}), 400, "not a readable image"),
    (dict(method="POST", url="/knn-service", json={"image": "A" * 2_800_100}), 413, "limit"),
    (dict(method="POST", url="/knn-service", json={"embedding_input": [0.1] * 3}), 400, "finite numbers expected"),
    (dict(method="POST", url="/knn-service", json={"embedding_input": [0.0] * 128}), 400, "zero vector"),
    (dict(method="POST", url="/knn-service", json={"text": "cat", "num_images": 101}), 422, "less than or equal"),
    (dict(method="POST", url="/knn-service", json={"text": "cat", "use_mclip": True}), 400, "multilingual"),
    (dict(method="POST", url="/metadata", json={"ids": [0, 40]}), 404, "no image with id 40"),
    (dict(method="POST", url="/metadata", json={"ids": list(range(1001))}), 422, "at most 1000"),
])
def test_bad_requests_get_clear_4xx_errors(client, request_kwargs, status, message):
    response = client.request(**request_kwargs)
    assert response.status_code == status, response.text
    assert message in json.dumps(response.json())
    assert client.get("/health").status_code == 200  # still serving


def test_captions_and_answers_are_the_maps_own(client, collection, mapping_folder, monkeypatch):
    from clipforge.captioning.captioner import Captioner

    captioner = Captioner.load(mapping_folder)  # the same map, loaded apart from the server: what it should say
    assert client.get("/health").json()["captioning"] is True
    upload = Image.open(collection["images"] / "shape005.png").convert("RGB")
    png = (collection["images"] / "shape005.png").read_bytes()
    response = client.post("/caption", files={"file": ("x.png", png)})
    assert response.status_code == 200 and response.json()["caption"] == captioner.caption([upload])[0]
    short = client.post("/caption", files={"file": ("x.png", png)}, data={"prompt": "a red", "max_new_tokens": "3"})
    assert short.json()["caption"] == captioner.caption([upload], "a red", 3)[0]
    assert len(short.json()["caption"].split()) <= 3 + 2  # the prompt's two words and three new ones at most

    batcher = client.app.state.batchers["caption"]
    seen = {}
    for index in range(6):
        text = client.get(f"/item/{index}/caption").json()["caption"]
        image = Image.open(collection["images"] / client.get(f"/item/{index}").json()["name"]).convert("RGB")
        assert text == captioner.caption([image])[0]
        seen[index] = text
    assert len(set(seen.values())) > 1  # the captions follow the images
    calls = len(batcher.batch_sizes)
    assert client.get("/item/3/caption").json()["caption"] == seen[3] and len(batcher.batch_sizes) == calls  # kept

    answer = client.post("/ask", files={"file": ("x.png", png)}, data={"question": " what colour is it? "})
    assert answer.status_code == 200  # asked with the spaces around it trimmed
    assert answer.json()["answer"] == captioner.answer([upload], ["what colour is it?"])[0]
    longer = client.post("/ask", files={"file": ("x.png", png)}, data={"question": "a b", "max_new_tokens": "12"})
    assert longer.json()["answer"] == captioner.answer([upload], ["a b"], 12)[0]
    generate, asked_for = captioner.lm.generate, []  # an answer is never the end of text at once
    monkeypatch.setattr(captioner.lm, "generate", lambda **kw: asked_for.append(kw) or generate(**kw))
    captioner.answer([upload], ["a b"])
    assert asked_for[0]["min_new_tokens"] == 1


@pytest.mark.parametrize("request_kwargs, status, message", [
    (dict(method="POST", url="/caption", files={"file": ("x.png", b"garbage")}), 400, "not a readable image"),
    (dict(method="POST", url="/caption", files={"file": ("x.png", _png())}, data={"max_new_tokens": "0"}), 422,
     "greater than or equal to 1"),
    (dict(method="POST", url="/caption", files={"file": ("x.png", _png())}, data={"max_new_tokens": "65"}), 422,
     "less than or equal to 64"),
    (dict(method="POST", url="/caption", files={"file": ("x.png", _png())}, data={"prompt": "a" * 201}), 422,
     "at most 200 characters"),
    (dict(method="GET", url="/item/40/caption"), 404, "no image with id 40"),
    (dict(method="POST", url="/ask", files={"file": ("x.png", _png())}, data={"question": "  "}), 400,
     "ask something"),
    (dict(method="POST", url="/ask", files={"file": ("x.png", _png())}, data={"question": "q" * 301}), 422,
     "at most 300 characters"),
    (dict(method="POST", url="/ask", files={"file": ("x.png", _png())}), 422, "question"),
    (dict(method="POST", url="/ask", files={"file": ("x.png", _png())},
          data={"question": "why", "max_new_tokens": "33"}), 422, "less than or equal to 32"),
    (dict(method="POST", url="/ask", files={"file": ("x.png", b"garbage")}, data={"question": "why"}), 400,
     "not a readable image"),
])
def test_bad_caption_requests_get_clear_4xx_errors(client, request_kwargs, status, message):
    response = client.request(**request_kwargs)
    assert response.status_code == status, response.text
    assert message in json.dumps(response.json())
    assert client.get("/health").status_code == 200  # still serving


def test_without_a_map_captioning_is_off_and_says_how_to_turn_it_on(collection):
    from fastapi.testclient import TestClient
    from clipforge.serve.app import create_app

    client = TestClient(create_app(collection["emb"], *clipforge.load(collection["ckpt"])))
    assert client.get("/health").json()["captioning"] is False
    for response in (client.post("/caption", files={"file": ("x.png", _png())}), client.get("/item/0/caption"),
                     client.post("/ask", files={"file": ("x.png", _png())}, data={"question": "what is it?"})):
        assert response.status_code == 404 and "--mapping" in response.json()["detail"]


def test_serve_command_loads_the_map_and_refuses_a_folder_that_is_not_one(collection, mapping_folder, tmp_path,
                                                                         monkeypatch, capsys):
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi.testclient import TestClient

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kwargs: started.update(app=app, host=host))
    assert cli.main(["serve", str(collection["emb"]), "--mapping", str(mapping_folder)]) == 0
    assert started["host"] == "127.0.0.1"  # this machine only, unless asked
    assert TestClient(started["app"]).get("/health").json()["captioning"] is True
    assert cli.main(["serve", str(collection["emb"]), "--mapping", str(tmp_path)]) == 2
    assert "not a LiMBer mapping" in capsys.readouterr().err


def test_an_image_gone_since_embedding_is_a_clear_404(collection, mapping_folder, tmp_path):
    from fastapi.testclient import TestClient
    from clipforge.captioning.captioner import Captioner
    from clipforge.serve.app import create_app

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        shutil.copy(collection["images"] / f"shape{i:03d}.png", images)
    assert cli.main(["embed", str(images), str(tmp_path / "emb"), "--pretrained", collection["ckpt"],
                     "--no-progress"]) == 0
    assert cli.main(["index", "build", str(tmp_path / "emb")]) == 0
    client = TestClient(create_app(tmp_path / "emb", *clipforge.load(collection["ckpt"]),
                                   captioner=Captioner.load(mapping_folder)))
    for name in ("shape000.png", "shape001.png", "shape002.png"):
        (images / name).unlink()
    for path in ("/thumb/1", "/item/1/caption"):
        response = client.get(path)
        assert response.status_code == 404 and "image 1 is no longer readable" in response.json()["detail"], path


def test_path_references_keep_relative_and_inside_paths_relative_and_others_absolute(tmp_path, monkeypatch):
    from clipforge.files import PathReferences

    (tmp_path / "real" / "runs" / "c").mkdir(parents=True)
    (tmp_path / "real" / "images").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")  # the project reached through a link
    monkeypatch.chdir(tmp_path / "link")
    references = PathReferences("runs/c")
    outside = str(tmp_path / "elsewhere" / "x.jpg")
    recorded = {path: references.record(path) for path in
                ("images/a.jpg", str(tmp_path / "link" / "runs" / "c" / "tower"), outside)}
    assert list(recorded.values()) == ["../../images/a.jpg", "tower", outside]
    assert references.resolve("../../images/a.jpg") == str(tmp_path / "real" / "images" / "a.jpg")
    assert references.resolve(outside) == outside


def _served(folder):
    """A test client of ``clipforge serve FOLDER`` with the model the collection recorded."""
    from fastapi.testclient import TestClient
    from clipforge.inference import load_for_inference
    from clipforge.serve.app import create_app

    return TestClient(create_app(folder, *load_for_inference(collection=folder)))


def test_embed_decodes_photos_reduced_and_upright_unless_full_decode(collection, tmp_path, monkeypatch, capsys):
    """``embed`` decodes a JPEG over three times the model's input at a reduced scale by default, and turns a photo
    stored sideways (EXIF orientation 6, as phones store portrait shots) upright (recorded): rows keep the size each
    is shown at, vectors within JPEG noise of the full upright decode's. ``--full-decode`` gives open_clip's: every
    pixel, as stored. ``classify`` the same; the page's thumbnail comes from a reduced, upright decode too."""
    from clipforge.preprocess import Decoding, open_image
    from clipforge.retrieval import load_embeddings

    photos = tmp_path / "photos"
    photos.mkdir()
    source, rng = ShapesSource(6, seed=5), np.random.default_rng(0)
    for i in range(6):  # shapes at phone-photo scale with texture, as JPEGs; the last stored sideways
        shape = np.asarray(source.item(i)[0].convert("RGB").resize((1440, 1080), Image.BICUBIC), dtype=np.float32)
        texture = rng.normal(0, 12, (135, 180, 3)).repeat(8, 0).repeat(8, 1)
        photo = Image.fromarray(np.clip(shape + texture, 0, 255).astype(np.uint8))
        exif = Image.Exif()
        if i == 5:
            photo, exif[0x0112] = photo.transpose(Image.Transpose.ROTATE_90), 6
        photo.save(photos / f"p{i}.jpg", quality=90, exif=exif.tobytes())
    for way, extra in (("reduced", []), ("full", ["--full-decode"])):
        assert cli.main(["embed", str(photos), str(tmp_path / way), "--pretrained", collection["ckpt"],
                         "--no-progress", *extra]) == 0
    reduced, rows = load_embeddings(tmp_path / "reduced")
    full, full_rows = load_embeddings(tmp_path / "full")
    assert json.loads((tmp_path / "reduced" / "embed_info.json").read_text())["decoding"] == {"min_size": 192,
                                                                                             "upright": True}
    assert json.loads((tmp_path / "full" / "embed_info.json").read_text())["decoding"] is None
    capsys.readouterr()  # resuming with the other decoding would mix sideways and upright vectors: refused
    assert cli.main(["embed", str(photos), str(tmp_path / "reduced"), "--pretrained", collection["ckpt"],
                     "--no-progress", "--full-decode"]) == 2
    assert "decoding (--full-decode given now)" in capsys.readouterr().err
    info_path = tmp_path / "reduced" / "embed_info.json"
    info = json.loads(info_path.read_text())
    del info["decoding"]  # as a folder embedded before decoding was recorded: resumed as it is
    info_path.write_text(json.dumps(info))
    assert cli.main(["embed", str(photos), str(tmp_path / "reduced"), "--pretrained", collection["ckpt"],
                     "--no-progress"]) == 0
    assert [(r["width"], r["height"]) for r in rows] == [(1440, 1080)] * 6
    assert [(r["width"], r["height"]) for r in full_rows] == [(1440, 1080)] * 5 + [(1080, 1440)]  # as stored
    model, preprocess, _ = clipforge.load(collection["ckpt"])
    with torch.no_grad():
        def vectors(decoding):
            pixels = torch.stack([preprocess(open_image(photos / f"p{i}.jpg", decoding=decoding)) for i in range(6)])
            return model.encode_image(pixels, normalize=True).numpy()

        as_stored, upright = vectors(None), vectors(Decoding())
    assert np.allclose(full.astype(np.float32), as_stored, atol=2e-3)
    cosines = (reduced.astype(np.float32) * upright).sum(1)
    assert not np.array_equal(reduced, upright.astype(np.float16))  # reduced ...
    # ... and as near the full upright decode's as this random tower tells apart; the sideways photo is farther
    assert cosines.min() > 0.9999 > full[5].astype(np.float32) @ upright[5]
    chosen, _ = {}, capsys.readouterr()
    for way, extra in (("reduced", []), ("full", ["--full-decode"])):  # classify decodes as embed does
        assert cli.main(["classify", str(photos), "--labels", "red,green,blue", "--pretrained", collection["ckpt"],
                         "--json", "--no-progress", *extra]) == 0
        chosen[way] = [{c["label"]: c["probability"] for c in json.loads(line)["labels"]}
                       for line in capsys.readouterr().out.splitlines()]
    assert chosen["reduced"][:5] != chosen["full"][:5]
    assert all(abs(a[c] - b[c]) < 0.01 for a, b in zip(chosen["reduced"][:5], chosen["full"]) for c in a)

    from clipforge.serve import app as serve_app

    asked = []
    monkeypatch.setattr(serve_app, "load_item", lambda item, decoding=None: asked.append(decoding) or
                        (open_image(item["path"], decoding=decoding), ""))
    assert cli.main(["index", "build", str(tmp_path / "reduced"), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["search", str(tmp_path / "reduced"), "--image", str(photos / "p5.jpg"), "-k", "1", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)[0]  # the query decoded as embed decoded it: upright
    assert found["id"] == 5 and found["score"] > 0.9999
    served = _served(tmp_path / "reduced")
    thumb = Image.open(io.BytesIO(served.get("/thumb/0").content))
    assert asked == [Decoding(512, upright=True)]
    assert Image.open(io.BytesIO(served.get("/thumb/5").content)).size == (256, 192)  # upright
    whole, encoded = open_image(photos / "p0.jpg").convert("RGB"), io.BytesIO()
    whole.thumbnail((256, 256))
    whole.save(encoded, format="JPEG", quality=85)  # as the server encodes its thumbnails
    assert thumb.size == whole.size == (256, 192)
    # the full decode's thumbnail within a level or two (this texture of 8-pixel blocks is JPEG's own worst case)
    assert np.abs(np.asarray(thumb, np.float32) - np.asarray(Image.open(encoded), np.float32)).mean() < 2


def test_end2end_embeds_indexes_serves_and_takes_the_images_added_since(collection, tmp_path, monkeypatch, capsys):
    """``clipforge end2end IMAGES OUT``: embed, index build and serve in one command (clip-retrieval's end2end);
    run again with nothing new, nothing is embedded or built again (``index build`` says its index is up to date);
    after images were added, only those are embedded and added to the indexes. A bad --mapping fails first."""
    import uvicorn

    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()

    def add(first: int, last: int) -> None:
        for i in range(first, last):
            for suffix in (".png", ".txt"):
                shutil.copy(collection["images"] / f"shape{i:03d}{suffix}", photos)

    def end2end(*extra) -> str:
        capsys.readouterr()
        assert cli.main(["end2end", str(photos), str(out), "--pretrained", collection["ckpt"], "--captions",
                         "--no-progress", *extra]) == 0
        return capsys.readouterr().out

    add(0, 20)
    printed = end2end("--no-serve")
    assert "built flat index of 20 vectors" in printed and "built flat caption index of 20" in printed
    built = (out / "index.faiss").stat().st_mtime_ns
    printed = end2end("--no-serve")
    assert "embedded 0 images" in printed and printed.count("is up to date") == 2
    assert (out / "index.faiss").stat().st_mtime_ns == built
    add(20, 30)
    printed = end2end("--no-serve")
    assert "embedded 30 images" in printed and "added 10 vectors to the flat index of 20 (now 30" in printed

    served, loads = {}, []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **_: served.update(app=app, host=host, port=port))
    from clipforge import inference

    load = inference.load_for_inference
    monkeypatch.setattr(inference, "load_for_inference", lambda *a, **k: loads.append(a) or load(*a, **k))
    assert "is up to date" in end2end("--port", "8123")
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    assert len(loads) == 1  # one model for the embedding and the server
    from fastapi.testclient import TestClient

    client = TestClient(served["app"])
    assert client.get("/health").json()["images"] == 30
    assert len(client.get("/search", params={"q": "a red circle", "k": 5}).json()["results"]) == 5

    assert cli.main(["end2end", str(photos), str(tmp_path / "other"), "--pretrained", collection["ckpt"],
                     "--mapping", str(tmp_path / "no-map")]) == 2
    assert "--mapping" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert cli.main(["index", "build", str(out), "--rebuild"]) == 0 and "built flat index" in capsys.readouterr().out
    import socket

    with socket.socket() as holder:  # another server on the port: said before anything is embedded
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = str(holder.getsockname()[1])
        assert cli.main(["end2end", str(photos), str(tmp_path / "other"), "--pretrained", collection["ckpt"],
                         "--port", taken]) == 2
        assert f"--port {taken}: cannot listen there" in capsys.readouterr().err
        assert not (tmp_path / "other").exists()
        # serve too, before its model loads (uvicorn said so only after, exiting 3)
        assert cli.main(["serve", str(out), "--pretrained", str(tmp_path / "no-such-model"), "--port", taken]) == 2
        assert f"--port {taken}: cannot listen there" in capsys.readouterr().err


def test_a_collection_names_images_and_model_relative_to_itself_so_a_project_can_move(collection, tmp_path,
                                                                                      monkeypatch, capsys):
    """Embedded from inside a project with relative paths (an image folder, a tar shard, a checkpoint), the
    collection is searched and served from another directory after the whole project has moved."""
    import pyarrow.parquet as pq

    pytest.importorskip("fastapi", reason="fastapi is in the test extras")
    project = tmp_path / "project"
    (project / "images").mkdir(parents=True)
    for i in range(4):
        shutil.copy(collection["images"] / f"shape{i:03d}.png", project / "images")
        shutil.copy(collection["images"] / f"shape{i:03d}.txt", project / "images")
    shutil.copytree(collection["ckpt"], project / "model")
    write_shard(project / "shards" / "s-000000.tar", [{"__key__": f"k{i}", "png": _png(colour=c), "txt": f"a {c} one"}
                                                      for i, c in enumerate(("red", "blue"))])
    monkeypatch.chdir(project)  # paths as users type them
    for source, out in (("images", "runs/files"), ("shards/s-000000.tar", "runs/shards")):
        assert cli.main(["embed", source, out, "--pretrained", "model", "--no-progress"]) == 0
        assert cli.main(["index", "build", out, "--quiet"]) == 0
    stored = pq.read_table(project / "runs" / "files" / "metadata" / "metadata_00000.parquet").column("path")
    assert stored.to_pylist()[0] == "../../images/shape000.png"
    assert pq.read_table(project / "runs" / "shards" / "metadata" / "metadata_00000.parquet").column(
        "path").to_pylist()[0] == "../../shards/s-000000.tar:k0"
    info = json.loads((project / "runs" / "files" / "embed_info.json").read_text())
    assert info["model_spec"]["pretrained"] == "../../model" and info["input"] == "../../images"
    capsys.readouterr()
    assert cli.main(["search", "runs/files", "a red circle", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)

    moved = tmp_path / "elsewhere"
    project.rename(moved)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["search", str(moved / "runs" / "files"), "a red circle", "--json"]) == 0  # its model found
    after = json.loads(capsys.readouterr().out)
    assert [(h["id"], h["score"]) for h in after] == [(h["id"], h["score"]) for h in before]
    assert all(h["path"] == str(moved / "images" / os.path.basename(h["path"])) for h in after)
    for name in ("files", "shards"):  # images and their captions read through the stored paths
        client = _served(moved / "runs" / name)
        assert client.get("/thumb/1").status_code == 200, name
        expected = "a blue one" if name == "shards" else (moved / "images" / "shape001.txt").read_text()
        assert client.get("/item/1").json()["captions"] == [expected], name


def test_a_collection_embedded_before_relative_paths_reads_and_resumes_as_it_was(collection, tmp_path, monkeypatch):
    """Older collections stored paths as typed (from the working directory): read so, and a resumed run keeps
    writing them so, so that one collection never mixes the two."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.retrieval.collection import RELATIVE_PATHS, Metadata

    pytest.importorskip("fastapi", reason="fastapi is in the test extras")
    shutil.copytree(collection["images"], tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["embed", "images", "old", "--pretrained", collection["ckpt"], "--shard-size", "16",
                     "--no-progress"]) == 0
    info = json.loads(Path("old/embed_info.json").read_text())
    del info[RELATIVE_PATHS], info["catalogue"]  # as the earlier version wrote it, with the paths as typed
    Path("old/embed_info.json").write_text(json.dumps(info))
    for parquet in sorted(Path("old/metadata").glob("*.parquet")):
        table = pq.read_table(parquet)
        paths = [p.replace("../images/", "images/") for p in table.column("path").to_pylist()]
        pq.write_table(table.set_column(0, "path", pa.array(paths, pa.string())), parquet)
    assert cli.main(["index", "build", "old", "--quiet"]) == 0
    assert Metadata("old")[0]["path"] == "images/shape000.png"
    assert _served(Path("old")).get("/thumb/0").status_code == 200

    Path("old/img_emb/img_emb_00002.npy").unlink()  # cut short: the resumed run writes shard 2 again
    assert cli.main(["embed", "images", "old", "--pretrained", collection["ckpt"], "--shard-size", "16",
                     "--no-progress"]) == 0
    assert RELATIVE_PATHS not in json.loads(Path("old/embed_info.json").read_text())
    rewritten = pq.read_table("old/metadata/metadata_00002.parquet").column("path").to_pylist()
    assert rewritten[0].startswith("images/shape")


def test_blank_query_is_refused(client):
    response = client.get("/search", params={"q": "   "})
    assert response.status_code == 400 and "blank" in response.json()["detail"]


def test_uploads_are_decoded_off_the_event_loop_reduced_for_the_model(client, monkeypatch):
    """Every upload is decoded in a worker thread (a large photo on the event loop held up every other request: the
    p99 of text queries during uploads 436 -> 66 ms, docs/BENCHMARKS.md); for the collection's model at the size
    ``embed`` decodes for, for the captioner whole."""
    import asyncio
    import base64

    from clipforge.preprocess import Decoding, open_image
    from clipforge.serve import app as serve_app

    seen = []

    def recording(data, name=None, max_pixels=None, decoding=None):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((on_loop, decoding))
        return open_image(data, name=name, max_pixels=max_pixels, decoding=decoding)

    monkeypatch.setattr(serve_app, "open_image", recording)
    photo = io.BytesIO()
    Image.new("RGB", (640, 480), "blue").save(photo, format="JPEG")
    upload = {"file": ("photo.jpg", photo.getvalue())}
    assert client.post("/search/image", files=upload).status_code == 200
    assert client.post("/classify", files=upload, data={"labels": "red,blue"}).status_code == 200
    assert client.post("/embed/image", files=upload).status_code == 200
    assert client.post("/knn-service", json={"image": base64.b64encode(photo.getvalue()).decode()}).status_code == 200
    assert client.post("/caption", files=upload).status_code == 200
    assert seen == [(False, Decoding(192, upright=True))] * 4 + [(False, Decoding(None, upright=True))]


def test_decompression_bomb_is_refused(client):
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")  # tiny file, 64 Mpx decoded
    response = client.post("/classify", files={"file": ("bomb.png", bomb.getvalue())}, data={"labels": "a"})
    assert response.status_code == 400 and "exceeds the limit" in response.json()["detail"]


def batched_together(app, batcher: str, requests) -> list[int]:
    """Send ``requests`` (each a function of a client) from one thread each, all at once, through one event loop as
    under uvicorn, with a generous batching window so that they meet in it; the batch sizes ``batcher`` formed."""
    from fastapi.testclient import TestClient

    batcher = app.state.batchers[batcher]
    batcher.wait_s, start = 0.1, len(batcher.batch_sizes)
    try:
        with TestClient(app) as client:
            threads = [threading.Thread(target=request, args=(client,)) for request in requests]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        batcher.wait_s = 0.005
    return batcher.batch_sizes[start:]


def test_concurrent_requests_are_batched(app):
    results = []
    sizes = batched_together(app, "text", [lambda client, i=i: results.append(
        client.get("/search", params={"q": f"query {i}", "k": 3}).status_code) for i in range(16)])
    assert results == [200] * 16 and sum(sizes) == 16 and max(sizes) > 1, sizes


def test_concurrent_captions_are_batched_by_prompt(app, collection, mapping_folder):
    from clipforge.captioning.captioner import Captioner

    captioner = Captioner.load(mapping_folder)
    requests = [(i, "a red" if i % 2 else None) for i in range(10, 16)]
    answers = {}

    def ask(client, i, prompt):
        data = {"max_new_tokens": "4"} | ({"prompt": prompt} if prompt else {})
        png = (collection["images"] / f"shape{i:03d}.png").read_bytes()
        answers[i] = client.post("/caption", files={"file": ("x.png", png)}, data=data).json()["caption"]

    sizes = batched_together(app, "caption", [lambda client, r=r: ask(client, *r) for r in requests])
    assert sum(sizes) == 6 and max(sizes) > 1
    for i, prompt in requests:  # each got its own image's caption under its own prompt
        image = Image.open(collection["images"] / f"shape{i:03d}.png").convert("RGB")
        assert answers[i] == captioner.caption([image], prompt, 4)[0]


def test_concurrent_questions_of_different_lengths_are_answered_together_as_if_alone(app, collection,
                                                                                      mapping_folder):
    from clipforge.captioning.captioner import Captioner

    captioner = Captioner.load(mapping_folder)
    questions = {20: "what", 21: "what colour is the shape", 22: "is it red", 23: "where is the blue square now"}
    answers = {}

    def ask(client, i):
        png = (collection["images"] / f"shape{i:03d}.png").read_bytes()
        answers[i] = client.post("/ask", files={"file": ("x.png", png)}, data={"question": questions[i],
                                                                              "max_new_tokens": "4"}).json()["answer"]

    sizes = batched_together(app, "answer", [lambda client, i=i: ask(client, i) for i in questions])
    assert sum(sizes) == 4 and max(sizes) > 1
    for i, question in questions.items():
        image = Image.open(collection["images"] / f"shape{i:03d}.png").convert("RGB")
        assert answers[i] == captioner.answer([image], [question], 4)[0]


def test_openapi_fuzzing_finds_no_server_errors(app):
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extras")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def check(case):
            response = case.call()
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:200]))

        check()
    assert not failures, failures[:3]


def _clip_client_module():
    """clip-retrieval's ClipClient (README's test command installs clip-retrieval --no-deps): its module file alone,
    since the package's __init__ imports its whole back-end and that back-end's dependencies."""
    import importlib.util

    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None:
        pytest.skip("clip-retrieval is not installed (pip install --no-deps clip-retrieval==2.45.0)")
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_clip_retrieval_client_queries_the_server_unchanged(live_server, client, collection):
    """A script written for `clip-retrieval back`: ClipClient by text, image file and embedding; the answers are
    clipforge's own search results in clip-retrieval's shape, and each url serves the image."""
    import urllib.request

    clip_client = _clip_client_module()
    assert client_json(live_server, "/indices-list") == ["emb"]
    knn = clip_client.ClipClient(url=live_server + "/knn-service", indice_name="emb", num_images=6,
                                 deduplicate=False)  # its safety, violence and aesthetic defaults are accepted
    by_text = knn.query(text="a blue square")
    ours = client.get("/search", params={"q": "a blue square", "k": 6}).json()["results"]
    assert [r["id"] for r in by_text] == [h["id"] for h in ours]
    assert [r["caption"] for r in by_text] == [h["caption"] for h in ours]
    np.testing.assert_allclose([r["similarity"] for r in by_text], [h["score"] for h in ours], rtol=1e-6)
    with urllib.request.urlopen(by_text[0]["url"]) as response:
        assert response.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(response.read())).size == (64, 64)  # 64 px images (thumbnails never enlarge)
    by_image = knn.query(image=str(collection["images"] / "shape005.png"))
    assert by_image[0]["name"] == "shape005.png" and by_image[0]["similarity"] > 0.99  # finds itself
    vector = client.post("/embed", json={"texts": ["a blue square"]}).json()["embeddings"][0]
    assert [r["id"] for r in knn.query(embedding_input=vector)] == [r["id"] for r in by_text]
    request = urllib.request.Request(live_server + "/metadata", method="POST",
                                     data=json.dumps({"ids": [by_text[1]["id"]], "indice_name": "emb"}).encode())
    with urllib.request.urlopen(request) as response:
        (entry,) = json.loads(response.read())
    assert entry["id"] == by_text[1]["id"] and entry["metadata"]["caption"] == by_text[1]["caption"]
    ranked = client.post("/knn-service", json={"text": "a blue square", "num_images": 2, "num_result_ids": 9}).json()
    assert [r["id"] for r in ranked] == [h["id"] for h in client.get(
        "/search", params={"q": "a blue square", "k": 9}).json()["results"]]  # the ranking its page scrolls through
    assert [set(r) for r in ranked] == [set(by_text[0])] * 2 + [{"id", "similarity"}] * 7  # metadata: first 2

    from clipforge.retrieval import load_embeddings

    deduplicated = clip_client.ClipClient(url=live_server + "/knn-service", indice_name="emb", num_images=6)
    kept = [r["id"] for r in deduplicated.query(text="a blue square")]  # deduplicate: ClipClient's default
    ranking = [h["id"] for h in client.get("/search", params={"q": "a blue square", "k": 40}).json()["results"]]
    assert kept[0] == ranking[0] and kept == [i for i in ranking if i in kept]  # a subsequence of the ranking
    vectors = load_embeddings(collection["emb"])[0][kept].astype(np.float32)
    similarity = vectors @ vectors.T
    assert (similarity[np.triu_indices(len(kept), 1)] < 0.94 + 1e-3).all()  # no two kept are near-duplicates


def _clip_retrieval_folder(folder: Path, model, preprocess, tokenizer, items: list[tuple[str, str, Path]],
                           partition_rows: int, enable_metadata: bool = True) -> None:
    """An embeddings folder as `clip-retrieval inference` writes it, by its own writer: ``items`` are (image_path
    as it records it, caption, image file), embedded by ``model``, ``partition_rows`` to a partition."""
    import importlib.util

    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None:
        pytest.skip("clip-retrieval is not installed (pip install --no-deps clip-retrieval==2.45.0)")
    pytest.importorskip("pandas", reason="pandas is in the test extras (clip-retrieval's writer needs it)")
    path = Path(spec.submodule_search_locations[0]) / "clip_inference" / "writer.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_writer", path)
    writer = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(writer)
    partitions = (len(items) + partition_rows - 1) // partition_rows
    for partition in range(partitions):
        chunk = items[partition * partition_rows:(partition + 1) * partition_rows]
        images = [Image.open(file).convert("RGB") for _, _, file in chunk]
        with torch.no_grad():
            image_embs = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
            text_embs = model.encode_text(tokenizer([caption for _, caption, _ in chunk]), normalize=True)
        sink = writer.NumpyWriter(partition, str(folder), True, True, enable_metadata, partitions)
        sink({"image_embs": image_embs.numpy().astype(np.float16), "image_filename": [p for p, _, _ in chunk],
              "text": [caption for _, caption, _ in chunk], "text_embs": text_embs.numpy().astype(np.float16),
              "metadata": [json.dumps({"width": i.width, "height": i.height,
                                       "url": f"http://example.com/{Path(file).name}", "status": "success",
                                       "similarity": float("nan") if n == 2 else 0.25 + 0.001 * n,
                                       "exif": {"Make": "Shapes Inc."},
                                       "tags": ["shape", "toy"]})  # a list: no single value to keep
                           for n, ((_, _, file), i) in enumerate(zip(chunk, images))]})
        sink.flush()


def test_a_clip_retrieval_embeddings_folder_is_adopted_without_embedding_again(collection, tmp_path, capsys):
    """`clipforge import clip-retrieval`: the folder clip-retrieval's own writer makes (files by path; shard samples
    by key, found with --images) becomes a collection that searches as clipforge's own embedding of the same images,
    captions included; vectors of another model, another dimension, or a folder that is not new are refused; a run
    cut short resumes."""
    from clipforge.retrieval import load_embeddings
    from clipforge.retrieval.search import Searcher

    loaded = clipforge.load(collection["ckpt"])
    files = sorted(collection["images"].glob("shape0[0-2]*.png"))  # 30 images
    captions = [(file.with_suffix(".txt")).read_text().strip() for file in files]
    source = tmp_path / "clip-retrieval"
    _clip_retrieval_folder(source, *loaded, [(str(f), c, f) for f, c in zip(files, captions)], partition_rows=12)
    assert sorted(p.name for p in (source / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy",
                                                                         "img_emb_2.npy"]
    middle = source / "img_emb" / "img_emb_1.npy"  # float32, not unit length: copied as unit float16 all the same
    np.save(middle, np.load(middle).astype(np.float32) * 2.5)
    out = tmp_path / "adopted"
    assert cli.main(["import", "clip-retrieval", str(source), str(out), "--pretrained", collection["ckpt"],
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "adopted 30 images in 3 partitions" in printed and "with their caption vectors" in printed
    assert "median cosine 1.000" in printed or "median cosine 0.99" in printed
    vectors, rows = load_embeddings(out)
    assert [Path(r["path"]).name for r in rows] == [f.name for f in files]
    assert [r["caption"] for r in rows] == captions and rows[0]["width"] == 64
    # clip-retrieval's other metadata fields are kept (a nested one flattened as its writer does), lists are not
    assert rows[1]["status"] == "success" and rows[1]["similarity"] == pytest.approx(0.251)
    assert rows[1]["exif.Make"] == "Shapes Inc." and "tags" not in rows[1] and "image_path" not in rows[1]
    assert "kept its other metadata fields: status, similarity, exif.Make (not tags: list<element: string>, not a " \
           "string, number or boolean)" in printed
    ours = tmp_path / "ours"  # clipforge's own embedding of the same images, with their captions
    shutil.copytree(collection["images"], tmp_path / "images", ignore=lambda d, names: [
        n for n in names if not n.startswith(("shape00", "shape01", "shape02"))])
    assert cli.main(["embed", str(tmp_path / "images"), str(ours), "--pretrained", collection["ckpt"], "--captions",
                     "--no-progress"]) == 0
    np.testing.assert_allclose(vectors, load_embeddings(ours)[0], atol=2e-3)
    capsys.readouterr()  # embed cannot add to it: its rows follow clip-retrieval's partitions, not embed's order
    assert cli.main(["embed", str(tmp_path / "images"), str(out), "--pretrained", collection["ckpt"],
                     "--no-progress"]) == 2
    assert "was adopted from clip-retrieval's embeddings" in capsys.readouterr().err
    assert json.loads((out / "embed_info.json").read_text())["adopted_from"] == "clip-retrieval"  # untouched
    np.testing.assert_allclose(_caption_vectors(out)[0], _caption_vectors(ours)[0], atol=2e-3)
    for folder in (out, ours):
        assert cli.main(["index", "build", str(folder), "--quiet"]) == 0
    adopted, own = Searcher(out, *loaded), Searcher(ours, *loaded)
    for modality in ("image", "text"):
        assert [h["id"] for h in adopted.search_text("a red circle", k=8, modality=modality)] == \
            [h["id"] for h in own.search_text("a red circle", k=8, modality=modality)]
    capsys.readouterr()
    assert cli.main(["search", str(out), "a red circle", "-k", "1"]) == 0  # the recorded model embeds the query
    assert "shape0" in capsys.readouterr().out

    keyed = tmp_path / "keyed"  # from shards: clip-retrieval keeps the sample's key only
    shard = write_shard(tmp_path / "shards" / "000000.tar", [
        {"__key__": f.stem, "png": f.read_bytes(), "txt": c} for f, c in zip(files, captions)])
    _clip_retrieval_folder(keyed, *loaded, [(f.stem, c, f) for f, c in zip(files, captions)], partition_rows=30)
    capsys.readouterr()
    assert cli.main(["import", "clip-retrieval", str(keyed), str(tmp_path / "k1"), "--pretrained", collection["ckpt"],
                     "--no-progress"]) == 0  # the keys alone: not found, not checked; shown from their web address
    captured = capsys.readouterr()
    assert "none of the sampled images" in captured.err and "30 images not found from here" in captured.err
    assert cli.main(["index", "build", str(tmp_path / "k1"), "--quiet"]) == 0
    from fastapi.testclient import TestClient

    from clipforge.serve.app import create_app

    served = TestClient(create_app(tmp_path / "k1", *loaded))
    hit = served.get("/search", params={"q": "a red circle", "k": 1}).json()["results"][0]
    assert hit["thumbnail"] == f"http://example.com/{hit['name']}.png"  # the web address clip-retrieval kept
    item = served.get(f"/item/{hit['id']}").json()
    assert item["url"] == hit["thumbnail"] and item["metadata"]["status"] == "success"
    assert item["metadata"]["exif.Make"] == "Shapes Inc." and set(item["metadata"]) == {"status", "similarity",
                                                                                         "exif.Make"}
    knn = served.post("/knn-service", json={"text": "a red circle", "num_images": 1}).json()[0]
    assert knn["status"] == "success" and knn["exif.Make"] == "Shapes Inc."  # as clip-retrieval's back returns it
    assert served.post("/metadata", json={"ids": [hit["id"]]}).json()[0]["metadata"]["status"] == "success"
    assert served.get("/item/2").json()["metadata"]["similarity"] is None  # NaN has no JSON: null (pydantic's)
    capsys.readouterr()
    assert cli.main(["search", str(tmp_path / "k1"), "a red circle", "-k", "3", "--copy-to",
                     str(tmp_path / "picked")]) == 0  # nothing to copy: listed by their web addresses
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].split()[2] == hit["thumbnail"]
    assert "copied 0 images" in captured.err and "3 listed in hits.jsonl by their web address" in captured.err
    listed = [json.loads(line) for line in (tmp_path / "picked" / "hits.jsonl").read_text().splitlines()]
    assert [row["rank"] for row in listed] == [1, 2, 3] and listed[0]["url"] == hit["thumbnail"]
    assert all(row["file"] is None and row["url"].startswith("http://example.com/") for row in listed)
    assert cli.main(["filter", str(tmp_path / "k1"), str(tmp_path / "kept"), "--keep-fraction", "0.5",
                     "--no-progress"]) == 0  # kept pairs with no image here: listed for a downloader (img2dataset)
    assert "and 15 kept pairs known only by their web address" in capsys.readouterr().out
    import pyarrow.parquet as pq

    urls = pq.read_table(tmp_path / "kept" / "urls.parquet").to_pylist()
    scores = pq.read_table(tmp_path / "kept" / "scores.parquet").to_pylist()
    assert not list((tmp_path / "kept").glob("*.tar"))  # nothing to write into a shard
    assert sorted(u["url"] for u in urls) == sorted(r["url"] for r in scores if r["kept"]) and len(urls) == 15
    assert min(u["clip_score"] for u in urls) >= max(r["clip_score"] for r in scores if not r["kept"])
    assert served.post("/metadata", json={"ids": [2]}).json()[0]["metadata"]["similarity"] is None
    moved = served.get(f"/thumb/{hit['id']}", follow_redirects=False)  # as the page's "images like" banner asks
    assert moved.status_code == 307 and moved.headers["location"] == hit["thumbnail"]
    assert served.post("/knn-service", json={"text": "a red circle", "num_images": 1}).json()[0]["url"] == \
        hit["thumbnail"]
    assert cli.main(["import", "clip-retrieval", str(keyed), str(tmp_path / "k2"), "--pretrained", collection["ckpt"],
                     "--images", str(shard), "--no-progress"]) == 0
    rows = load_embeddings(tmp_path / "k2")[1]
    assert rows[3]["path"].endswith("000000.tar:" + files[3].stem) and rows[3]["width"] == 64
    assert "url" not in rows[3]  # found here: served from the shard, no web address kept
    from clipforge.retrieval.collection import item_from_path, load_item

    assert load_item(item_from_path(rows[3]["path"]))[0].size == (64, 64)  # the sample, read from its shard

    torch.manual_seed(5)  # vectors of another model: refused before anything is written
    other = clipforge.save_pretrained(clipforge.create_model("ViT-Tiny-64"), tmp_path / "other-model")
    capsys.readouterr()
    assert cli.main(["import", "clip-retrieval", str(source), str(tmp_path / "wrong"), "--pretrained", str(other),
                     "--no-progress"]) == 2
    assert "were not made by this model" in capsys.readouterr().err and not (tmp_path / "wrong").exists()
    assert cli.main(["import", "clip-retrieval", str(source), str(tmp_path / "wider"), "--model", "ViT-B-32",
                     "--no-progress"]) == 2
    assert "holds 128-dimensional vectors and this model makes 512" in capsys.readouterr().err
    assert cli.main(["import", "clip-retrieval", str(keyed), str(out), "--pretrained", collection["ckpt"],
                     "--no-progress"]) == 2
    assert f"{out} is not empty" in capsys.readouterr().err
    bad = tmp_path / "bad"  # not float vectors: refused by their header, before anything is read or written
    shutil.copytree(source, bad)
    np.save(bad / "img_emb" / "img_emb_1.npy", np.zeros((12, 128), np.int8))
    assert cli.main(["import", "clip-retrieval", str(bad), str(tmp_path / "b"), "--pretrained", collection["ckpt"],
                     "--no-progress"]) == 2
    assert "img_emb_1.npy: expected [n, d] float vectors, got [12, 128] int8" in capsys.readouterr().err

    (out / "img_emb" / "img_emb_00002.npy").unlink()  # cut short: the same command resumes
    assert cli.main(["import", "clip-retrieval", str(source), str(out), "--pretrained", collection["ckpt"],
                     "--no-progress"]) == 0
    np.testing.assert_array_equal(load_embeddings(out)[0], vectors)


def _clustered_unit_vectors(rng, n: int, dim: int, clusters: int = 40) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim))
    vectors = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def _autofaiss_index(path: Path, vectors: np.ndarray, factory: str, metric=None) -> None:
    """An index as `clip-retrieval index` leaves it: autofaiss's factory string over the vectors in row order."""
    import faiss

    index = faiss.index_factory(vectors.shape[1], factory,
                                faiss.METRIC_INNER_PRODUCT if metric is None else metric)
    if factory.startswith("OPQ"):  # fewer training iterations than FAISS's defaults (24 s down to 2.5 s here)
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        opq.niter = opq.niter_pq = 4
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.pq.cp.niter, ivf.do_polysemous_training = 5, False
    index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(path))


def test_clip_retrieval_indexes_are_adopted_with_the_embeddings(collection, tmp_path, capsys):
    """`import clip-retrieval --index`: autofaiss's indexes (IVF-PQ behind OPQ with an HNSW quantizer, its large-
    collection choice; HNSW; flat) become the collection's own, tuned and served as `index build` leaves them; an
    index of other vectors, of the rows in another order, by L2, or of a kind not adopted is refused."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.retrieval import load_embeddings
    from clipforge.retrieval.index import exact_top_k, recall_at_k
    from clipforge.retrieval.search import Searcher

    rng = np.random.default_rng(0)
    images, texts = _clustered_unit_vectors(rng, 6000, 128), _clustered_unit_vectors(rng, 6000, 128)
    source = tmp_path / "embeddings"
    for directory in ("img_emb", "text_emb", "metadata"):
        (source / directory).mkdir(parents=True)
    for part in range(3):  # clip-retrieval's layout: partitions of float16 vectors and their metadata
        rows = slice(2000 * part, 2000 * (part + 1))
        np.save(source / "img_emb" / f"img_emb_{part}.npy", images[rows].astype(np.float16))
        np.save(source / "text_emb" / f"text_emb_{part}.npy", texts[rows].astype(np.float16))
        pq.write_table(pa.table({"image_path": [f"gone/{i:05d}.jpg" for i in range(rows.start, rows.stop)],
                                 "caption": [f"caption {i}" for i in range(rows.start, rows.stop)]}),
                       source / "metadata" / f"metadata_{part}.parquet")
    index_folder = tmp_path / "index"
    index_folder.mkdir()
    _autofaiss_index(index_folder / "image.index", images, "OPQ16_64,IVF32_HNSW32,PQ16x8")
    _autofaiss_index(index_folder / "text.index", texts, "HNSW32")
    (index_folder / "image.json").write_text(json.dumps({"index_key": "OPQ16_64,IVF32_HNSW32,PQ16x8", "index_param":
                                                         "nprobe=16,efSearch=32,ht=2048", "nb vectors": 6000}))

    def adopt(out, indexes=index_folder):
        return cli.main(["import", "clip-retrieval", str(source), str(out), "--pretrained", collection["ckpt"],
                         "--no-check", "--no-progress", "--index", str(indexes)])

    capsys.readouterr()
    assert adopt(tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "adopted image.index as the ivfpq index: recall@10" in printed and "at nprobe" in printed
    assert "adopted text.index as the hnsw caption index: recall@10" in printed and "at efSearch" in printed
    out = tmp_path / "out"
    info = json.loads((out / "index.json").read_text())
    assert info["adopted"] == {"file": "image.index", "faiss_class": "IndexPreTransform", "index_key":
                               "OPQ16_64,IVF32_HNSW32,PQ16x8", "index_param": "nprobe=16,efSearch=32,ht=2048"}
    assert info["nlist"] == 32
    assert ("codes are coarse" in printed) == (info["k_factor"] > 16)  # a rebuild suggested where the re-rank deepened
    assert info["target_met"] and info["collection_rows"] == 6000 and info["rerank"] == "stored"
    (index_folder / "image.index").write_bytes(b"rewritten in place")  # as a second `clip-retrieval index` run
    searcher = Searcher(out, *clipforge.load(collection["ckpt"]))  # as serve loads it: codes memory-mapped
    assert searcher.info["nprobe"] == info["nprobe"] and searcher.captions_indexed == 6000
    stored = load_embeddings(out)[0].astype(np.float32)
    for modality, vectors in (("image", stored), ("text", _caption_vectors(out)[0].astype(np.float32))):
        queries = vectors[rng.choice(6000, 50)] + 0.1 * rng.standard_normal((50, 128)).astype(np.float32)
        truth = exact_top_k(vectors, queries, 10)[1]
        found = np.array([[h["id"] for h in hits] for hits in searcher.search_vectors(queries, 10, modality=modality)])
        assert recall_at_k(found, truth) >= 0.9, modality  # tuned to 0.95 on 500 queries; these are 50

    flat = tmp_path / "flat-index"  # a small collection's choice: exact, nothing to tune
    flat.mkdir()
    _autofaiss_index(flat / "image.index", images, "Flat")
    assert adopt(tmp_path / "out-flat", flat) == 0
    assert "adopted image.index as the flat index: recall@10 0.99" in capsys.readouterr().out  # float32 vs fp16
    assert not (tmp_path / "out-flat" / "caption_index.faiss").exists()  # no text.index given: none adopted

    refusals = {"shuffled": (np.concatenate([images[2000:4000], images[:2000], images[4000:]]), "IVF32,Flat", None,
                             "find themselves among their 10 nearest: its ids are not this collection's rows"),
                "fewer": (images[:5000], "IVF32,Flat", None, "indexes 5,000 vectors of dimension 128 and the "
                                                              "collection holds 6,000"),
                "l2": (images, "IVF32,Flat", faiss.METRIC_L2, "ranks by L2 distance"),
                "sq": (images, "SQ8", None, "FAISS's IndexScalarQuantizer, and clipforge adopts flat, HNSW and "
                                            "IVF indexes")}
    for name, (vectors, factory, metric, message) in refusals.items():
        (tmp_path / name).mkdir()
        _autofaiss_index(tmp_path / name / "image.index", vectors, factory, metric)
        assert adopt(tmp_path / f"out-{name}", tmp_path / name) == 2, name
        assert message in capsys.readouterr().err, name
        assert not (tmp_path / f"out-{name}" / "index.faiss").exists()
    assert adopt(tmp_path / "out-none", tmp_path / "flat-index-missing") == 2  # checked before anything is written
    assert "no image.index (expected the output folder of clip-retrieval index)" in capsys.readouterr().err
    assert not (tmp_path / "out-none").exists()


def test_browsers_may_call_the_api_only_from_allowed_origins(client, collection):
    """A clip-retrieval front page on another port posts JSON as text/plain (no preflight); its origin must be
    allowed for the browser to read the answer, and no other site's is, by default or otherwise."""
    from fastapi.testclient import TestClient

    from clipforge.serve.app import create_app

    front = "http://localhost:8080"
    body = json.dumps({"text": "a red circle", "num_images": 3, "indice_name": "emb"})
    assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": front}).headers
    allowing = TestClient(create_app(collection["emb"], *clipforge.load(collection["ckpt"]), allow_origins=[front]))
    answer = allowing.post("/knn-service", content=body, headers={"Origin": front, "Content-Type": "text/plain"})
    assert answer.status_code == 200 and len(answer.json()) == 3
    assert answer.headers["access-control-allow-origin"] == front
    other = allowing.post("/knn-service", content=body, headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = allowing.options("/search/image", headers={"Origin": front, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == front


# --------------------------------------------------------------------------------------------------- the browser

def _chromium_or_skip():
    """(playwright's sync API, the system Chromium's path), or the test skipped naming which is missing; called
    first, before a test's own setup."""
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras")
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return playwright_api, path
    pytest.skip("no system Chromium (Debian package `chromium`; .ci/run installs it)")


@contextlib.contextmanager
def _browser_page(chromium):
    """A page in a fresh headless Chromium (``chromium``: what ``_chromium_or_skip`` gave), closed on the way out."""
    playwright_api, path = chromium
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield browser.new_page()
        finally:
            browser.close()


@contextlib.contextmanager
def _serving(app):
    """``app`` under uvicorn on a free local port, in a thread; yields its base URL."""
    uvicorn = pytest.importorskip("uvicorn")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def live_server(app):
    with _serving(app) as url:
        yield url


def client_json(base: str, path: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(base + path) as response:
        return json.loads(response.read())


def requests_json(base: str, path: str) -> list:
    return client_json(base, path)["results"]


def test_the_page_shows_an_adopted_image_from_its_web_address_with_its_other_fields(collection, tmp_path):
    """An image adopted from clip-retrieval and not found here: its card, the larger view and the "images like"
    banner all load it from the web address clip-retrieval kept (here a second local server standing in for the
    web), and the larger view lists the metadata fields clip-retrieval kept."""
    chromium = _chromium_or_skip()
    from fastapi import FastAPI
    from fastapi.responses import Response

    from clipforge.serve.app import create_app

    loaded = clipforge.load(collection["ckpt"])
    files = sorted(collection["images"].glob("shape0[0-2]*.png"))
    source, adopted = tmp_path / "clip-retrieval", tmp_path / "adopted"
    _clip_retrieval_folder(source, *loaded, [(f.stem, f.with_suffix(".txt").read_text().strip(), f) for f in files],
                           partition_rows=30)  # keys only: none of the images is found from here
    web, fetched = FastAPI(), []  # "the web": serves each image under the name clip-retrieval's url gives it

    @web.get("/{name}")
    def image(name: str):
        fetched.append(name)
        return Response((collection["images"] / name).read_bytes(), media_type="image/png")

    with _serving(web) as web_url:
        for partition in (source / "metadata").glob("*.parquet"):  # the recorded addresses, pointed at it
            import pyarrow.parquet as pq

            table = pq.read_table(partition)
            urls = [u.replace("http://example.com", web_url) for u in table.column("url").to_pylist()]
            pq.write_table(table.set_column(table.schema.get_field_index("url"), "url", [urls]), partition)
        assert cli.main(["import", "clip-retrieval", str(source), str(adopted), "--pretrained", collection["ckpt"],
                         "--no-progress"]) == 0
        assert cli.main(["index", "build", str(adopted), "--quiet"]) == 0
        with _serving(create_app(adopted, *loaded)) as url, _browser_page(chromium) as page:
            page.goto(url + "/?q=a+red+circle")
            page.wait_for_function("(img => img && img.complete && img.naturalWidth > 0)"
                                   "(document.querySelector('#results .result img'))")
            card = page.locator("#results .result").first
            assert card.locator("img").get_attribute("src").startswith(web_url + "/shape0")
            card.locator(".view").click()
            page.wait_for_selector("#viewer:not([hidden]) #viewer-fields dt")
            fields = dict(zip(page.locator("#viewer-fields dt").all_inner_texts(),
                              page.locator("#viewer-fields dd").all_inner_texts()))
            assert fields["status"] == "success" and fields["exif.Make"] == "Shapes Inc."
            page.wait_for_function("document.querySelector('#viewer-image').naturalWidth > 0")
            assert page.locator("#viewer-image").get_attribute("src").startswith(web_url)
            page.click("#viewer-like")
            page.wait_for_function("(img => img && img.complete && img.naturalWidth > 0)"
                                   "(document.querySelector('#like-banner img'))")  # /thumb sent it to the web
    assert len(fetched) >= 3


def test_web_page_search_drop_classification_and_captions_in_chromium(live_server, collection):
    chromium = _chromium_or_skip()
    with _browser_page(chromium) as page:
        page.set_viewport_size({"width": 1100, "height": 700})
        page.goto(live_server + "/")
        page.fill("#query", "a green triangle")
        page.press("#query", "Enter")
        page.wait_for_selector("#results .result")
        assert page.url.endswith("/?q=a+green+triangle")  # the search lives in the URL: shareable
        scores = [float(s) for s in page.locator("#results .result .score").all_inner_texts()]
        assert len(scores) == 24 and scores == sorted(scores, reverse=True)
        # the thumbnail is made on the first request for it: wait for it to arrive (under load it may take a while)
        page.wait_for_function("(img => img.complete && img.naturalWidth > 0)"
                               "(document.querySelector('#results .result img'))")
        assert page.locator("#results .result img").first.evaluate("img => img.complete && img.naturalWidth") > 0
        page.mouse.wheel(0, 20_000)  # the next page loads as the end of the list comes into view
        page.wait_for_function("document.querySelectorAll('#results .result').length == 40")
        ranked = page.locator("#results .result").evaluate_all("cards => cards.map(c => c.dataset.id)")
        first_forty = [h["id"] for h in requests_json(live_server, "/search?q=a+green+triangle&k=40")]
        assert ranked == [str(i) for i in first_forty]  # the pages join into the one ranking, nothing repeated

        top = page.locator("#results .result").first  # "more like this": search by that image
        top_id = top.get_attribute("data-id")
        top.locator("img").click()
        page.wait_for_url(f"**/?like={top_id}")
        page.wait_for_function(f"document.querySelector('#results .result')?.dataset.id === '{top_id}'")
        assert float(page.locator("#results .result .score").first.inner_text()) > 0.99  # itself, first
        page.go_back()  # the back button returns to the text search
        page.wait_for_url("**/?q=a+green+triangle")
        page.wait_for_function("document.querySelector('#query').value === 'a green triangle'")

        page.locator("#results .result .view").first.click()  # the larger view, with the image's captions
        page.wait_for_selector("#viewer:not([hidden]) #viewer-captions li")
        captions = page.locator("#viewer-captions li").all_inner_texts()
        assert captions and all(c.startswith("a ") for c in captions)
        assert page.locator("#viewer-fields").is_hidden()  # clipforge's own collection: no other fields
        assert page.locator("#viewer-image").evaluate("img => img.src").endswith("size=512")
        viewed = page.locator("#results .result").first.get_attribute("data-id")  # served with a map: its caption
        page.wait_for_function("document.querySelector('#viewer-generated').textContent.startsWith('generated:')")
        generated = client_json(live_server, f"/item/{viewed}/caption")["caption"]
        assert page.locator("#viewer-generated").inner_text() == f"generated: “{generated}”"
        page.click("#viewer-close")
        assert page.locator("#viewer").is_hidden()

        page.check("#dedup")  # the same query, near-duplicates hidden: the request carries the threshold
        with page.expect_response(lambda r: "/search?" in r.url) as response:
            page.press("#query", "Enter")
        assert "dedup=0.95" in response.value.url and response.value.ok and page.url.endswith("&dedup=1")

        page.fill("#labels", "red square, blue circle, green cross")
        data = list((collection["images"] / "shape001.png").read_bytes())
        transfer = page.evaluate_handle("""bytes => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
            return dt; }""", data)
        with page.expect_response(lambda r: r.url.endswith("/caption")) as captioned:  # and captioned
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_selector("#predictions .prediction")
        labels = page.locator("#predictions .prediction .label").all_inner_texts()
        probabilities = [float(t.rstrip("%")) for t in page.locator("#predictions .probability").all_inner_texts()]
        assert sorted(labels) == ["blue circle", "green cross", "red square"]
        assert page.locator("#nearest-captions").is_hidden()  # no caption index here
        assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 100) < 0.5
        page.wait_for_function("document.querySelector('#dropped-caption').textContent.startsWith('generated:')")
        assert page.locator("#dropped-caption").inner_text() == f"generated: “{captioned.value.json()['caption']}”"
        page.fill("#question", "what colour is it")  # a question about the dropped image
        with page.expect_response(lambda r: r.url.endswith("/ask")) as asked:
            page.press("#question", "Enter")
        expected = asked.value.json()["answer"]
        page.wait_for_function("document.querySelector('#answer').textContent.startsWith('“')")
        assert page.locator("#answer").inner_text() == f"“{expected}”"


def test_web_page_asks_for_each_page_once_and_says_when_the_server_does_not_answer(live_server):
    """The list's end coming into view while a page's response is still being read must not fetch that page again
    (it was shown twice: seen once in CI, where the menu test found every card doubled); a search whose request
    fails says so instead of "searching…" for ever."""
    chromium = _chromium_or_skip()
    with _browser_page(chromium) as page:
        page.set_viewport_size({"width": 1100, "height": 700})
        complaints = []  # the browser's console: a failed request or a script error shows there
        page.on("console", lambda message: complaints.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: complaints.append(str(error)))
        page.goto(live_server + "/")
        # the race made certain: whenever a search response's body is read, the page is asked for more at once
        page.evaluate("""() => { const read = Response.prototype.json;
            Response.prototype.json = function () { if (this.url.includes("/search?")) loadMore();
                                                    return read.call(this); }; }""")
        page.fill("#query", "a red circle")
        page.press("#query", "Enter")
        page.wait_for_function("document.querySelector('#search-status').textContent.includes(' results for ')")
        page.wait_for_load_state("networkidle")
        shown = page.locator("#results .result").evaluate_all("cards => cards.map(c => c.dataset.id)")
        expected = requests_json(live_server, f"/search?q=a+red+circle&k={len(shown)}")
        assert len(shown) >= 24 and shown == [str(h["id"]) for h in expected]  # each page once, in rank order
        assert complaints == []  # (a page without an icon link asks for /favicon.ico, which is not found)

        page.route("**/search?*", lambda route: route.abort())  # the server stops answering
        page.fill("#query", "a blue square")
        page.press("#query", "Enter")
        page.wait_for_function("document.querySelector('#search-status').textContent.includes('did not answer')",
                               timeout=10_000)
        assert "error" in page.locator("#search-status").get_attribute("class")
        assert page.locator("#results .result").count() == 0
        page.unroute("**/search?*")  # and answers again: the next search runs
        page.press("#query", "Enter")
        page.wait_for_function("document.querySelector('#search-status').textContent.includes(' results for ')")
        assert page.locator("#results .result").first.get_attribute("data-id") == str(
            requests_json(live_server, "/search?q=a+blue+square&k=1")[0]["id"])


def test_web_page_shows_the_latest_view_and_drop_when_an_earlier_answer_arrives_late(live_server, collection):
    """Two clicks on "view" or two dropped images in quick succession: the first answer, held back until the second
    is on screen, must not replace it (it did: the larger view and the predictions showed the earlier image)."""
    chromium = _chromium_or_skip()
    held = []

    def hold_the_first(route):
        if held:
            route.continue_()
        else:
            held.append(route)

    with _browser_page(chromium) as page:
        page.goto(live_server + "/?q=a+red+circle")
        page.wait_for_selector("#results .result")
        first, second = (page.locator("#results .result").nth(i).get_attribute("data-id") for i in (0, 1))
        page.route("**/item/*", hold_the_first)
        page.locator("#results .result .view").nth(0).click()
        page.locator("#results .result .view").nth(1).click()
        page.wait_for_selector("#viewer:not([hidden])")
        name = client_json(live_server, f"/item/{second}")["name"]
        page.wait_for_function(f"document.querySelector('#viewer-name').textContent.startsWith({name!r})")
        with page.expect_response(f"**/item/{first}"):
            held.pop().continue_()
        page.wait_for_timeout(200)  # time for a late answer to be (wrongly) drawn
        assert page.locator("#viewer-name").inner_text().startswith(name + " (")
        page.click("#viewer-close")

        page.route("**/classify*", hold_the_first)
        page.fill("#labels", "red circle, green triangle, blue square")
        for name in ("shape001.png", "shape002.png"):
            data = list((collection["images"] / name).read_bytes())
            transfer = page.evaluate_handle("""bytes => { const dt = new DataTransfer();
                dt.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"})); return dt; }""",
                                            data)
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_selector("#predictions .prediction")
        shown = page.locator("#predictions .probability").all_inner_texts()
        with page.expect_response("**/classify*") as late:
            held.pop().continue_()
        earlier = [f"{100 * p['probability']:.1f}%" for p in late.value.json()["labels"]]
        page.wait_for_timeout(200)
        assert page.locator("#predictions .probability").all_inner_texts() == shown != earlier


def test_items_in_shards_are_read_by_offset_with_every_caption(tmp_path):
    from clipforge.data import open_source
    from clipforge.retrieval.collection import item_captions, item_from_path, item_path, load_item

    buffers = []
    for colour in ("red", "green", "blue"):
        buffer = io.BytesIO()
        Image.new("RGB", (20, 10), colour).save(buffer, format="PNG")
        buffers.append(buffer.getvalue())
    shard = write_shard(tmp_path / "s-000000.tar", [
        {"__key__": f"k{i}", "png": data, "txt": f"first {i}\n\nsecond {i}\n"} for i, data in enumerate(buffers)])
    items = open_source(str(shard), shuffle_buffer=0).catalogue()
    assert [item_from_path(item_path(item)) for item in items] == items  # the address round-trips
    image, caption = load_item(items[1])
    assert image.getpixel((0, 0)) == (0, 128, 0) and caption == "first 1"
    assert item_captions(items[2]) == ["first 2", "second 2"]


def test_a_corrupt_or_cut_short_shard_is_reported_and_the_rest_embedded(tmp_path, capsys):
    """One bad shard must not stop a long embedding run: a file that is not a tar is skipped, a shard cut short
    keeps the members it holds in full, and both are named on stderr and counted."""
    from conftest import shapes_shard

    from clipforge.data import open_source
    from clipforge.data.sources import shard_index

    shards = tmp_path / "shards"
    whole = shapes_shard(shards / "a-000000.tar", 12)
    data = whole.read_bytes()
    png_at = shard_index(str(whole)).members["shape-0000008"]["png"][0]
    (shards / "b-000001.tar").write_bytes(data[:png_at + 50])  # cut inside a member's data
    (shards / "c-000002.tar").write_bytes(b"not a tar file" * 10)
    for cut in (png_at - 512, png_at - 300):  # at a header, inside one: tarfile alone ends quietly at either
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        shard_index.cache_clear()
        assert "no end-of-archive block" in shard_index(str(tmp_path / "cut.tar")).problem
    assert shard_index(str(whole)).problem is None
    source = open_source(str(shards), shuffle_buffer=0)
    items = source.catalogue()
    from_cut = [item for item in items if item["shard"].endswith("b-000001.tar")]
    assert source.bad_shards == 2 and 0 < len(from_cut) < 12 and len(items) == 12 + len(from_cut)
    assert len(source) == 12 + len(from_cut)  # what --epochs counts
    err = capsys.readouterr().err
    assert "b-000001.tar: truncated inside shape-0000008.png" in err and "c-000002.tar: not a readable tar file" in err
    assert err.count("c-000002.tar") == 1  # named once, though the shards were read twice (listed, counted)

    ckpt = str(clipforge.save_pretrained(clipforge.create_model("ViT-Tiny-64"), tmp_path / "model"))
    assert cli.main(["embed", str(shards), str(tmp_path / "emb"), "--pretrained", ckpt, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"embedded {len(items)} images" in out and "2 input shards unreadable or cut short" in out
    assert json.loads((tmp_path / "emb" / "embed_info.json").read_text())["bad_input_shards"] == 2

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(shards / "c-000002.tar", only_bad / "c.tar")
    assert cli.main(["embed", str(only_bad), str(tmp_path / "emb2"), "--pretrained", ckpt, "--no-progress"]) == 2
    assert "no images in the shards (1 unreadable)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["search", "emb", "a dog", "-k", "0"], "argument -k: 0: expected a whole number of at least 1"),
    (["serve", "emb", "--port", "99999"], "argument --port: 99999: expected a TCP port"),  # was a traceback
    (["index", "build", "emb", "--target-recall", "2"], "argument --target-recall: 2"),  # was accepted
    (["embed", "in", "out", "--batch-size", "abc"], "argument --batch-size: 'abc' is not an integer"),
    (["eval", "zeroshot", "--max-images", "0"], "argument --max-images: 0"),
    (["caption", "train", "--save-every", "0"], "argument --save-every: 0"),  # was a ZeroDivisionError at step 1
])
def test_out_of_range_numbers_are_the_flags_own_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_clip_retrieval_web_front_searches_a_clipforge_server_in_chromium(collection):
    """clip-retrieval's own page (its `clip-retrieval front` build, from the wheel), on another port, pointed at
    `clipforge serve --allow-origin` that page: it lists the collection, searches it and shows its images."""
    import functools
    import http.server
    import importlib.util

    from clipforge.serve.app import create_app

    chromium = _chromium_or_skip()
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None:
        pytest.skip("clip-retrieval is not installed (pip install --no-deps clip-retrieval==2.45.0)")
    front = Path(collection["root"]) / "front"
    shutil.copytree(Path(spec.submodule_search_locations[0]).parent / "front" / "build", front, dirs_exist_ok=True)
    pages = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(front)))
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    front_url = f"http://127.0.0.1:{pages.server_address[1]}"
    app = create_app(collection["emb"], *clipforge.load(collection["ckpt"]), allow_origins=[front_url])
    try:
        with _serving(app) as backend, _browser_page(chromium) as page:
            (front / "config.json").write_text(json.dumps({"defaultBackend": backend, "defaultIndex": "emb"}))
            page.goto(f"{front_url}/?query=a+blue+square")
            page.wait_for_function("() => (document.querySelector('clip-front').images || []).length > 0",
                                   timeout=30_000)
            shown = page.evaluate("() => document.querySelector('clip-front').images.slice(0, 3)")
            assert shown[0]["url"].startswith(f"{backend}/thumb/") and shown[0]["caption"]
            page.wait_for_function(f"() => Array.from(document.querySelector('clip-front').shadowRoot"
                                   f".querySelectorAll('img')).some(i => i.src.startsWith('{backend}/thumb/') "
                                   f"&& i.naturalWidth > 0)", timeout=30_000)  # the collection's images load
    finally:
        pages.shutdown()


def test_embed_suggests_bf16_on_processors_that_multiply_it_natively(monkeypatch, capsys):
    """On such a CPU, an fp32 embedding of a ViT-B-32-sized tower at the default precision names --precision bf16;
    not on other CPUs, not for a tiny tower, not when fp32 was asked for."""
    from types import SimpleNamespace

    from clipforge import environment
    from clipforge.retrieval.cli import _suggest_bf16

    big, tiny = clipforge.create_model("ViT-B-32"), clipforge.create_model("ViT-Tiny-64")
    for has_bf16, model, precision, expected in ((True, big, "auto", True), (False, big, "auto", False),
                                                 (True, tiny, "auto", False), (True, big, "fp32", False)):
        monkeypatch.setattr(environment, "cpu_has_bf16", lambda: has_bf16)
        _suggest_bf16(SimpleNamespace(precision=precision), model, rank=0)
        assert ("--precision bf16" in capsys.readouterr().err) == expected, (has_bf16, precision)


def test_search_many_queries_from_a_file_equals_one_by_one(collection, tmp_path, capsys):
    """--queries: each line's results as the single-query search gives them (JSON lines with the query), a subfolder
    per query with --copy-to; an empty file or two kinds of query are refused before any model loads."""
    queries = ["a red circle", "a blue square", "a green triangle"]
    (tmp_path / "q.txt").write_text("\n".join([queries[0], "", *queries[1:]]) + "\n")
    single = []
    for query in queries:
        assert cli.main(["search", str(collection["emb"]), query, "-k", "4", "--json"]) == 0
        single.append(json.loads(capsys.readouterr().out))
    assert cli.main(["search", str(collection["emb"]), "--queries", str(tmp_path / "q.txt"), "-k", "4", "--json",
                     "--copy-to", str(tmp_path / "out")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == queries
    assert all([h["id"] for h in line["hits"]] == [h["id"] for h in hits] for line, hits in zip(lines, single))
    assert all(a["score"] == pytest.approx(b["score"], abs=1e-5) for line, hits in zip(lines, single)
               for a, b in zip(line["hits"], hits))
    folders = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert folders == ["00001-a-red-circle", "00002-a-blue-square", "00003-a-green-triangle"]
    assert len(list((tmp_path / "out" / folders[1]).glob("*.png"))) == 4
    (tmp_path / "empty.txt").write_text("\n \n")
    assert cli.main(["search", str(collection["emb"]), "--queries", str(tmp_path / "empty.txt")]) == 2
    assert "no queries (one per line)" in capsys.readouterr().err
    assert cli.main(["search", str(collection["emb"]), "red", "--queries", str(tmp_path / "q.txt")]) == 2
    assert "give only one of: a text query, --image PATH, --queries FILE" in capsys.readouterr().err
    assert cli.main(["search", str(collection["emb"]), "  "]) == 2
    assert "the text query is empty" in capsys.readouterr().err
    assert cli.main(["search", str(collection["emb"])]) == 2
    assert "give one of: a text query, --image PATH, --queries FILE" in capsys.readouterr().err


def test_near_duplicates_are_searchs_greedy_rule_across_blocks_and_chunks():
    """``near_duplicates`` drops exactly what ``drop_near_duplicates`` (search --dedup) drops, whatever the block and
    chunk sizes, and names for each dropped row its nearest kept row before it."""
    from clipforge.retrieval.filter import near_duplicates
    from clipforge.retrieval.search import drop_near_duplicates

    rng = np.random.default_rng(0)
    base = rng.standard_normal((60, 16))
    copies = base[rng.integers(0, 60, 40)] + 0.15 * rng.standard_normal((40, 16))  # near copies, some chains
    vectors = np.concatenate([base, copies])[rng.permutation(100)]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(100)
    for threshold in (0.9, 0.5):  # 0.5: rows with several kept rows above it, in and out of their block
        expected = set(order[drop_near_duplicates(vectors[order], threshold)].tolist())
        assert 30 <= len(expected) < 100
        for block, chunk in ((512, 65_536), (7, 65_536), (7, 5), (1, 3)):
            check_near_duplicates(vectors, threshold, order, block, chunk, expected)
    # c is within 0.7 of a (kept, an earlier block) and nearer still to b (kept, c's own block): c names b
    angles = np.radians([0, 180, 70, 40])  # a, a far one, b, c
    plane = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    assert near_duplicates(plane, 0.7, np.arange(4), block=2).tolist() == [-1, -1, -1, 2]
    with pytest.raises(ValueError, match="--dedup 1.5: a cosine similarity"):
        near_duplicates(vectors, 1.5, order)


def check_near_duplicates(vectors, threshold, order, block, chunk, expected):
    """The drops equal ``expected``; each dropped row names its nearest kept row before it, at the threshold or more."""
    from clipforge.retrieval.filter import near_duplicates

    found = near_duplicates(vectors, threshold, order, block=block, chunk=chunk)
    assert set(np.flatnonzero(found < 0).tolist()) == expected, (block, chunk)
    rank = np.argsort(order)
    for row in np.flatnonzero(found >= 0):
        twin = found[row]
        assert found[twin] < 0 and rank[twin] < rank[row] and vectors[row] @ vectors[twin] >= threshold
        before = [r for r in np.flatnonzero(found < 0) if rank[r] < rank[row]]
        assert vectors[row] @ vectors[twin] == pytest.approx(max(vectors[before] @ vectors[row]), abs=1e-6)


def test_filter_dedup_keeps_the_best_scored_of_each_near_duplicate_group(collection, tmp_path, capsys):
    """``filter --dedup``: exact copies of images (with other captions) go, the better-scored copy kept; alone it needs
    no captions and keeps the first copy; with --keep-fraction it dedups the pairs kept by score. (The random tower
    puts distinct shapes within 0.9996 of each other, copies at 1 +- 1e-4: hence 0.9999.)"""
    import pyarrow.parquet as pq

    images = tmp_path / "images"
    shutil.copytree(collection["images"], images)
    twins = {"shape001": "a photo", "shape005": "an object", "shape009": "a dog"}
    for name, caption in twins.items():
        shutil.copy(images / f"{name}.png", images / f"z{name}.png")
        (images / f"z{name}.txt").write_text(caption)
    out = tmp_path / "emb"
    assert cli.main(["embed", str(images), str(out), "--pretrained", collection["ckpt"], "--shard-size", "16",
                     "--captions", "--no-progress"]) == 0
    assert cli.main(["filter", str(out), str(tmp_path / "dedup"), "--dedup", "0.9999", "--no-progress"]) == 0
    assert "3 near-duplicates at cosine >= 0.9999 dropped" in capsys.readouterr().out
    table = {r["path"]: r for r in pq.read_table(tmp_path / "dedup" / "scores.parquet").to_pylist()}
    assert len(table) == 43 and sum(r["kept"] for r in table.values()) == 40
    for name in twins:
        pair = [table[str(images / f"{name}.png")], table[str(images / f"z{name}.png")]]
        better, worse = sorted(pair, key=lambda r: -r["clip_score"])
        assert better["kept"] and not worse["kept"] and worse["duplicate_of"] == better["path"]
        assert better["duplicate_of"] is None
    # without captions: the collection's order decides, the first copy stays
    plain = tmp_path / "plain"
    assert cli.main(["embed", str(images), str(plain), "--pretrained", collection["ckpt"], "--no-progress"]) == 0
    assert cli.main(["filter", str(plain), str(tmp_path / "first"), "--dedup", "0.9999", "--no-progress"]) == 0
    table = {r["path"]: r for r in pq.read_table(tmp_path / "first" / "scores.parquet").to_pylist()}
    assert {p for p, r in table.items() if not r["kept"]} == {str(images / f"z{name}.png") for name in twins}
    from clipforge.data import open_source

    first = next(iter(open_source(str(tmp_path / "first"), shuffle_buffer=0).samples(0, 1, 0, 0, Counter())))
    assert "clip_score" not in json.loads(first["json"])
    # by score first, then dedup among the kept
    assert cli.main(["filter", str(out), str(tmp_path / "both"), "--keep-fraction", "0.5", "--dedup", "0.9999",
                     "--no-progress"]) == 0
    info = json.loads((tmp_path / "both" / "filter_info.json").read_text())
    table = pq.read_table(tmp_path / "both" / "scores.parquet").to_pylist()
    by_score = [r for r in table if r["clip_score"] >= info["threshold"]]
    assert info["kept"] == len(by_score) - info["near_duplicates"] == sum(r["kept"] for r in table)
    assert cli.main(["filter", str(out), str(tmp_path / "none")]) == 2
    assert "--dedup COSINE" in capsys.readouterr().err
    assert cli.main(["filter", str(plain), str(tmp_path / "none"), "--min-score", "0"]) == 2
    assert "embed it with --captions" in capsys.readouterr().err
    # candidates from clusters: the same drops and twins here
    assert cli.main(["filter", str(out), str(tmp_path / "clustered"), "--dedup", "0.9999", "--dedup-clusters", "4",
                     "--no-progress"]) == 0
    assert "3 near-duplicates at cosine >= 0.9999 dropped (candidates from 4 clusters)" in capsys.readouterr().out
    assert json.loads((tmp_path / "clustered" / "filter_info.json").read_text())["dedup_clusters"] == 4
    assert pq.read_table(tmp_path / "clustered" / "scores.parquet").to_pylist() == \
        pq.read_table(tmp_path / "dedup" / "scores.parquet").to_pylist()
    assert cli.main(["filter", str(out), str(tmp_path / "none"), "--min-score", "0", "--dedup-clusters", "4"]) == 2
    assert "--dedup-clusters goes with --dedup COSINE" in capsys.readouterr().err


def test_clustered_near_duplicates_agree_with_the_exact_rule():
    """Candidates from k-means clusters (each row in its 3 nearest): the exact rule's drops and twins on clustered
    data with near copies, and one kept of a group of 150 copies, more than a row's candidate list holds (the last
    pass); rows outside the order are neither kept nor dropped."""
    from clipforge.retrieval.filter import clustered_near_duplicates, near_duplicates

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 24))
    base = centres[rng.integers(0, 40, 3000)] + 2.0 * rng.standard_normal((3000, 24))  # clusters that overlap
    copies = base[rng.integers(0, 3000, 600)] + 0.1 * rng.standard_normal((600, 24))
    group = base[:1] + 0.02 * rng.standard_normal((150, 24))
    vectors = np.concatenate([base, copies, group])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(vectors))[:-50]  # 50 rows left out
    exact = near_duplicates(vectors, 0.95, order)
    found = clustered_near_duplicates(vectors, 0.95, order, clusters=20)
    assert 700 < (exact >= 0).sum() and ((found >= 0) != (exact >= 0)).sum() <= 2
    one_probe = clustered_near_duplicates(vectors, 0.95, order, clusters=20, probes=1)  # SemDeDup's own way
    assert ((one_probe >= 0) != (exact >= 0)).sum() >= 5  # copies split across clusters: why each row is in 3
    assert np.mean(found[exact >= 0] == exact[exact >= 0]) > 0.995  # the same twin named
    in_group = np.isin(np.arange(len(vectors)), order) & (np.arange(len(vectors)) >= 3600)
    assert (found[in_group] < 0).sum() == 1 == (exact[in_group] < 0).sum()
    assert (found[np.setdiff1d(np.arange(len(vectors)), order)] == -1).all()
    rank = np.argsort(np.concatenate([order, np.setdiff1d(np.arange(len(vectors)), order)]))  # row -> its place
    for row in np.flatnonzero(found >= 0):
        twin = found[row]
        assert rank[twin] < rank[row] and vectors[row] @ vectors[twin] >= 0.95
    assert np.array_equal(clustered_near_duplicates(vectors, 0.95, order, clusters=1), exact)  # one cluster: exact
    with pytest.raises(ValueError, match="--dedup 1.5: a cosine similarity"):
        clustered_near_duplicates(vectors, 1.5, order, clusters=20)


@pytest.fixture(scope="module")
def captioned(collection, tmp_path_factory):
    """The collection's images embedded with --captions, three of them (in two shards) without a caption, indexed:
    an image index and a caption index."""
    root = tmp_path_factory.mktemp("captioned")
    images = root / "images"
    shutil.copytree(collection["images"], images)
    for i in (5, 17, 30):
        (images / f"shape{i:03d}.txt").unlink()
    out = root / "emb"
    assert cli.main(["embed", str(images), str(out), "--pretrained", collection["ckpt"], "--shard-size", "16",
                     "--captions", "--no-progress"]) == 0
    assert cli.main(["index", "build", str(out), "--quiet"]) == 0
    return {"images": images, "emb": out, "ckpt": collection["ckpt"]}


def test_captions_all_embeds_the_mean_of_every_caption_of_an_image(collection, tmp_path, capsys):
    """``embed --all-captions``: each image's caption vector is the renormalised mean of its captions' unit vectors
    (files with sidecars and samples in shards alike; one caption: its own; none: zeros); a folder embedded with the
    first captions is not resumed with all of them; the caption index is built and searched as ever."""
    from clipforge.retrieval.search import Searcher

    model, preprocess, tokenizer = clipforge.load(collection["ckpt"])
    captions = {0: ["a red circle", "a round red thing", "something red on grey"], 1: ["a blue square"], 2: [],
                3: ["a green cross", "two green bars crossing"]}
    images = tmp_path / "images"
    images.mkdir()
    samples = []
    for i, texts in captions.items():
        shutil.copy(collection["images"] / f"shape{i:03d}.png", images)
        if texts:
            (images / f"shape{i:03d}.txt").write_text("\n".join(texts) + "\n\n")
        samples.append({"__key__": f"s{i}", "png": (images / f"shape{i:03d}.png").read_bytes(),
                        **({"txt": "\n".join(texts)} if texts else {})})
    shard = write_shard(tmp_path / "shards" / "000000.tar", samples)
    with torch.no_grad():
        features = {text: model.encode_text(tokenizer([text]), normalize=True)[0].numpy()
                    for texts in captions.values() for text in texts}

    def expected(texts):
        if not texts:
            return np.zeros(model.embed_dim)
        mean = np.mean([features[t] for t in texts], axis=0)
        return mean / np.linalg.norm(mean)

    for source in (images, shard):
        out = tmp_path / f"emb-{Path(source).stem}"
        assert cli.main(["embed", str(source), str(out), "--pretrained", collection["ckpt"], "--all-captions",
                         "--no-progress"]) == 0
        stored, rows = _caption_vectors(out)
        assert len(rows) == 4 and json.loads((out / "embed_info.json").read_text())["captions"] == "all"
        for vector, row, texts in zip(stored, rows, captions.values()):
            assert row["caption"] == (texts[0] if texts else "")  # the metadata keeps the first caption
            np.testing.assert_allclose(vector, expected(texts), atol=2e-3)  # float16
        assert not np.allclose(stored[0], expected(captions[0][:1]), atol=2e-2)  # not the first caption alone
        assert cli.main(["index", "build", str(out), "--quiet"]) == 0
        found = Searcher(out, model, preprocess, tokenizer).search_text("a round red thing", k=3, modality="text")
        by_hand = np.argsort(-(stored @ features["a round red thing"]))[:3]
        assert [h["id"] for h in found] == by_hand.tolist()
        # each result shows its caption line nearest the query, not its first
        nearest = {i: max(texts, key=lambda t: float(features[t] @ features["a round red thing"]))
                   for i, texts in enumerate(captions.values()) if texts}
        assert [h["caption"] for h in found] == [nearest[i] for i in by_hand.tolist()]
        assert found[by_hand.tolist().index(0)]["caption"] == "a round red thing"
    from fastapi.testclient import TestClient

    from clipforge.serve.app import create_app

    served = TestClient(create_app(out, model, preprocess, tokenizer))  # the shard collection, served
    shown = served.get("/search", params={"q": "two green bars crossing", "k": 3, "modality": "text"}).json()
    assert shown["results"][0]["caption"] == "two green bars crossing"  # image 3's second line, not its first
    assert served.get("/search", params={"q": "two green bars crossing", "k": 3}).json()["results"][0]["caption"] \
        in ("", "a red circle", "a blue square", "a green cross")  # an image search: each image's first caption
    knn = served.post("/knn-service", json={"text": "two green bars crossing", "modality": "text", "num_images": 1,
                                            "num_result_ids": 3}).json()
    assert knn[0]["caption"] == "two green bars crossing" and "caption" not in knn[1]

    first = tmp_path / "first"
    assert cli.main(["embed", str(images), str(first), "--pretrained", collection["ckpt"], "--captions",
                     "--no-progress", "--shard-size", "2"]) == 0
    np.testing.assert_allclose(_caption_vectors(first)[0][0], features["a red circle"], atol=2e-3)
    (first / "img_emb" / "img_emb_00001.npy").unlink()  # cut short, then resumed with all the captions: refused
    capsys.readouterr()
    assert cli.main(["embed", str(images), str(first), "--pretrained", collection["ckpt"], "--all-captions",
                     "--no-progress", "--shard-size", "2"]) == 2
    assert "captions True (now 'all')" in capsys.readouterr().err


def _caption_vectors(folder):
    """Every row's caption vector as stored (float16, zeros without a caption), as float32, and the metadata."""
    from clipforge.retrieval import load_embeddings

    captions = np.concatenate([np.load(path) for path in sorted((folder / "caption_emb").glob("*.npy"))])
    return captions.astype(np.float32), load_embeddings(folder)[1]


def test_captions_get_an_index_of_their_own_searched_by_text_or_image(captioned, collection, capsys):
    """``index build`` on a collection embedded with --captions also indexes the captions, of the captioned images
    only; ``--modality text`` ranks the collection's rows by their caption's cosine to a text or an image (each
    result the image and the caption that matched), and de-duplicates on the captions."""
    from clipforge.retrieval.search import Searcher

    folder = captioned["emb"]
    captions, rows = _caption_vectors(folder)
    has_caption = np.flatnonzero(captions.any(axis=1))
    assert len(has_caption) == 37 and not {r["path"] for r in rows if not r["caption"]} - {
        str(captioned["images"] / f"shape{i:03d}.png") for i in (5, 17, 30)}
    assert np.load(folder / "caption_index.rows.npy").tolist() == has_caption.tolist()
    assert json.loads((folder / "caption_index.json").read_text())["count"] == 37
    assert json.loads((folder / "index.json").read_text())["count"] == 40
    stored = captions[has_caption]  # float16 unit vectors (an exact index scores them as stored)

    searcher = Searcher(folder, *clipforge.load(captioned["ckpt"]))
    assert searcher.captions_indexed == 37
    for query in (searcher.embed_texts(["a red circle"]), searcher.embed_images([Image.open(
            captioned["images"] / "shape003.png")])):
        hits = searcher.search_vectors(query, k=40, modality="text")[0]
        scores = stored @ query[0]
        assert len(hits) == 37  # every captioned row once; no caption-less one, whatever k
        np.testing.assert_allclose([h["score"] for h in hits], np.sort(scores)[::-1], atol=1e-5)
        assert all(abs(scores[has_caption.tolist().index(h["id"])] - h["score"]) < 1e-5 for h in hits)
        assert all(h["caption"] == rows[h["id"]]["caption"] and h["caption"] for h in hits)
    by_image = searcher.search_vectors(query, k=40)[0]
    assert [h["id"] for h in by_image] != [h["id"] for h in hits] and len(by_image) == 40  # the images' own ranking

    # de-duplication on the captions: the generated captions repeat ("a red circle" many times), so at 0.999 one
    # row per distinct caption is left, the best-ranked, in rank order
    ranking = searcher.search_text("a red circle", k=40, modality="text")
    distinct = list(dict.fromkeys(h["caption"] for h in ranking))
    assert 1 < len(distinct) < 37
    deduped = searcher.search_text("a red circle", k=40, dedup=0.999, modality="text")
    assert [h["caption"] for h in deduped] == distinct
    assert [h["id"] for h in deduped] == [next(h["id"] for h in ranking if h["caption"] == c) for c in distinct]

    # the CLI: the same ranking; refusals say what to do
    assert cli.main(["search", str(folder), "a red circle", "--modality", "text", "-k", "5", "--json"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)] == [h["id"] for h in ranking[:5]]
    plain = collection["emb"]  # embedded without --captions
    assert cli.main(["search", str(plain), "a red circle", "--modality", "text"]) == 2
    assert "has no caption index: embed the collection with --captions" in capsys.readouterr().err
    assert cli.main(["index", "build", str(plain), "--modality", "text"]) == 2
    assert "holds no caption embeddings; embed it with --captions" in capsys.readouterr().err


def test_serving_a_caption_index_over_http_and_clip_retrievals_api(captioned, client):
    """``modality=text`` on /search and /search/image, and clip-retrieval's ``modality: "text"``, search the
    caption index where there is one, with the Searcher's own ranking; a collection without one says how to build
    it; /health says how many captions are indexed."""
    from fastapi.testclient import TestClient

    from clipforge.retrieval.search import Searcher
    from clipforge.serve.app import create_app

    loaded = clipforge.load(captioned["ckpt"])
    served = TestClient(create_app(captioned["emb"], *loaded))
    searcher = Searcher(captioned["emb"], *loaded)
    assert served.get("/health").json()["captions_indexed"] == 37
    expected = searcher.search_text("a green cross", k=6, modality="text")
    found = served.get("/search", params={"q": "a green cross", "k": 6, "modality": "text"}).json()["results"]
    assert [h["id"] for h in found] == [h["id"] for h in expected]
    np.testing.assert_allclose([h["score"] for h in found], [h["score"] for h in expected], rtol=1e-6)
    paged = served.get("/search", params={"q": "a green cross", "k": 3, "offset": 3, "modality": "text"}).json()
    assert [h["id"] for h in paged["results"]] == [h["id"] for h in expected[3:6]]
    images = served.get("/search", params={"q": "a green cross", "k": 6}).json()["results"]
    assert [h["id"] for h in images] == [h["id"] for h in searcher.search_text("a green cross", k=6)]
    png = (captioned["images"] / "shape008.png").read_bytes()
    by_image = served.post("/search/image", files={"file": ("q.png", png)}, data={"k": 5, "modality": "text"}).json()
    assert [h["id"] for h in by_image["results"]] == [
        h["id"] for h in searcher.search_image(Image.open(io.BytesIO(png)), k=5, modality="text")]
    knn = served.post("/knn-service", json={"text": "a green cross", "modality": "text", "num_images": 6}).json()
    assert [r["id"] for r in knn] == [h["id"] for h in expected]
    assert [r["caption"] for r in knn] == [h["caption"] for h in expected]

    assert client.get("/health").json()["captions_indexed"] is None  # the collection embedded without --captions
    for response in (client.get("/search", params={"q": "a green cross", "modality": "text"}),
                     client.post("/search/image", files={"file": ("q.png", png)}, data={"modality": "text"}),
                     client.post("/knn-service", json={"text": "a green cross", "modality": "text"})):
        assert response.status_code == 400 and "no caption index (embed it with --captions" in \
            response.json()["detail"]
    assert served.get("/search", params={"q": "x", "modality": "captions"}).status_code == 422


def test_web_page_matches_captions_where_the_collection_has_a_caption_index(captioned, live_server):
    chromium = _chromium_or_skip()
    from clipforge.serve.app import create_app

    with _serving(create_app(captioned["emb"], *clipforge.load(captioned["ckpt"]))) as url, \
            _browser_page(chromium) as page:
        page.goto(live_server + "/")  # no caption index: no choice offered
        page.wait_for_function("document.querySelector('#captions-toggle').hidden === true")
        page.goto(url + "/")
        page.wait_for_selector("#captions-toggle:not([hidden])")
        page.check("#by-caption")
        page.fill("#query", "a red circle")
        with page.expect_response(lambda r: "/search?" in r.url) as response:
            page.press("#query", "Enter")
        assert "modality=text" in response.value.url and page.url.endswith("&modality=text")
        page.wait_for_selector("#results .result")
        page.wait_for_function("document.querySelector('#search-status').textContent.includes('results for')")
        shown = page.locator("#results .result").evaluate_all("cards => cards.map(c => c.dataset.id)")
        expected = requests_json(url, "/search?q=a+red+circle&k=40&modality=text")  # (a second page may load)
        assert len(shown) >= 24 and shown == [str(h["id"]) for h in expected][:len(shown)]
        assert page.locator("#search-status").inner_text().endswith("results for captions matching “a red circle”")
        page.reload()  # the choice lives in the URL
        page.wait_for_selector("#results .result")
        assert page.locator("#by-caption").is_checked()

        data = list((captioned["images"] / "shape012.png").read_bytes())  # a dropped image: its nearest captions
        transfer = page.evaluate_handle("""bytes => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
            return dt; }""", data)
        with page.expect_response(lambda r: r.url.endswith("/search/image")) as nearest:
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_selector("#nearest-captions:not([hidden]) li")
        expected = [hit["caption"] for hit in nearest.value.json()["results"]]
        assert len(expected) == 3 and page.locator("#nearest-captions li").all_inner_texts() == expected
        from clipforge.retrieval.search import Searcher  # the caption index's top 3 for that image

        searcher = Searcher(captioned["emb"], *clipforge.load(captioned["ckpt"]))
        assert expected == [hit["caption"] for hit in searcher.search_image(
            Image.open(captioned["images"] / "shape012.png"), k=3, modality="text")]


# ------------------------------------------------------------------------------------ several collections, one server

@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Six 40 px images embedded by another (random) ViT-Tiny-64: a collection in another embedding space."""
    root = tmp_path_factory.mktemp("other")
    images = root / "images"
    _shape_images(images, 6, seed=11, stem="other{}", article="another", size=40)
    torch.manual_seed(1)
    ckpt = str(clipforge.save_pretrained(clipforge.create_model("ViT-Tiny-64"), root / "model"))
    out = root / "other-emb"
    assert cli.main(["embed", str(images), str(out), "--pretrained", ckpt, "--no-progress"]) == 0
    assert cli.main(["index", "build", str(out), "--quiet"]) == 0
    return {"images": images, "emb": out, "ckpt": ckpt}


@pytest.fixture(scope="module")
def several(collection, captioned, other_model):
    """`clipforge serve` over three collections: two embedded by one model (both folders named "emb", so one is
    named on the command line), one by another."""
    uvicorn = pytest.importorskip("uvicorn")
    started = {}
    original = uvicorn.run
    uvicorn.run = lambda app, host, port, **kwargs: started.update(app=app)
    try:
        folders = [str(collection["emb"]), f"captioned={captioned['emb']}", str(other_model["emb"])]
        assert cli.main(["serve", *folders]) == 0
    finally:
        uvicorn.run = original
    return started["app"]


def test_serve_names_each_collection_and_loads_a_model_once_for_all_it_embedded(several, collection, captioned,
                                                                                 other_model, capsys, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    served = several.state.collections
    assert list(served) == ["emb", "captioned", "other-emb"]
    assert served["emb"].searcher.model is served["captioned"].searcher.model  # one model, loaded once
    assert served["other-emb"].searcher.model is not served["emb"].searcher.model
    assert served["emb"].embed_text == served["captioned"].embed_text  # and their queries batched together
    health = TestClient(several).get("/health").json()
    assert health["images"] == 40 and health["captions_indexed"] is None  # the first collection at the top
    assert [(c["name"], c["images"], c["captions_indexed"]) for c in health["collections"]] == [
        ("emb", 40, None), ("captioned", 40, 37), ("other-emb", 6, None)]

    assert cli.main(["serve", str(collection["emb"]), str(captioned["emb"])]) == 2  # two folders named emb
    assert "two collections named 'emb': name them, e.g. emb-2=" in capsys.readouterr().err
    assert cli.main(["serve", "my collection=" + str(captioned["emb"])]) == 2
    assert "collection name 'my collection': letters, digits" in capsys.readouterr().err
    assert cli.main(["serve", str(collection["emb"]), f"x={other_model['images']}"]) == 2  # checked before loading
    assert "other-emb" not in capsys.readouterr().err

    started = {}  # a model given on the command line serves every collection, with a warning where it did not embed
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kwargs: started.update(app=app))
    capsys.readouterr()
    assert cli.main(["serve", str(collection["emb"]), str(other_model["emb"]), "--pretrained", collection["ckpt"]]) == 0
    given = started["app"].state.collections
    assert given["emb"].searcher.model is given["other-emb"].searcher.model
    warnings = [line for line in capsys.readouterr().err.splitlines() if "is not the one that embedded" in line]
    assert len(warnings) == 1 and str(other_model["emb"]) in warnings[0]

    spaced = other_model["emb"].parent / "my photos (2024)"  # a folder's own name is made safe, not refused
    if not spaced.exists():
        shutil.copytree(other_model["emb"], spaced)
    assert cli.main(["serve", str(spaced)]) == 0
    assert TestClient(started["app"]).get("/indices-list").json() == ["my-photos-2024-"]


def test_each_request_searches_the_collection_it_names_with_that_collections_model(several, collection, captioned,
                                                                                    other_model):
    from fastapi.testclient import TestClient

    from clipforge.retrieval.search import Searcher

    client = TestClient(several)
    other = Searcher(other_model["emb"], *clipforge.load(other_model["ckpt"]))
    found = client.get("/search", params={"q": "a red circle", "k": 4, "collection": "other-emb"}).json()["results"]
    expected = other.search_text("a red circle", k=4)
    assert [h["id"] for h in found] == [h["id"] for h in expected]
    np.testing.assert_allclose([h["score"] for h in found], [h["score"] for h in expected], rtol=1e-5)
    assert all(h["name"].startswith("other") and h["caption"].startswith("another") for h in found)
    default = client.get("/search", params={"q": "a red circle", "k": 4}).json()["results"]
    first = Searcher(collection["emb"], *clipforge.load(collection["ckpt"])).search_text("a red circle", k=4)
    assert [h["id"] for h in default] == [h["id"] for h in first]

    vectors = [np.array(client.post("/embed", params=params, json={"texts": ["a red circle"]}).json()["embeddings"][0])
               for params in ({}, {"collection": "other-emb"})]
    np.testing.assert_allclose(vectors[1], other.embed_texts(["a red circle"])[0], atol=1e-5)
    assert float(vectors[0] @ vectors[1]) < 0.9  # two models, two embedding spaces

    hit = found[0]  # a result's thumbnail names its collection: the other collection's 40 px image
    assert hit["thumbnail"] == f"/thumb/{hit['id']}?collection=other-emb"
    thumb = client.get(hit["thumbnail"])
    assert Image.open(io.BytesIO(thumb.content)).size == (40, 40)
    assert Image.open(io.BytesIO(client.get(f"/thumb/{hit['id']}").content)).size == (64, 64)  # the first's
    assert client.get(f"/item/{hit['id']}", params={"collection": "other-emb"}).json()["name"] == hit["name"]
    assert client.get("/item/39", params={"collection": "other-emb"}).status_code == 404  # 6 images there
    png = (other_model["images"] / "other3.png").read_bytes()
    by_image = client.post("/search/image", params={"collection": "other-emb"}, files={"file": ("q.png", png)},
                           data={"k": 1}).json()["results"]
    assert by_image[0]["name"] == "other3.png" and by_image[0]["score"] > 0.99
    similar = client.get("/search/similar", params={"id": 3, "k": 2, "collection": "other-emb"}).json()["results"]
    assert similar[0]["id"] == 3 and similar[0]["name"] == "other3.png"
    classified = client.post("/classify", params={"collection": "other-emb"}, files={"file": ("q.png", png)},
                             data={"labels": "red, green"})
    assert classified.status_code == 200 and len(classified.json()["labels"]) == 2

    captions = client.get("/search", params={"q": "a green cross", "k": 3, "modality": "text",
                                             "collection": "captioned"}).json()["results"]
    assert [h["id"] for h in captions] == [h["id"] for h in Searcher(captioned["emb"], *clipforge.load(
        captioned["ckpt"])).search_text("a green cross", k=3, modality="text")]
    assert client.get("/search", params={"q": "x", "modality": "text", "collection": "emb"}).status_code == 400
    for response in (client.get("/search", params={"q": "x", "collection": "nowhere"}),
                     client.get("/thumb/0", params={"collection": "nowhere"})):
        assert response.status_code == 404
        assert response.json()["detail"] == "no collection named 'nowhere': this server holds emb, captioned, other-emb"


def test_clip_retrievals_indice_name_chooses_the_collection(several):
    from fastapi.testclient import TestClient

    client = TestClient(several)
    assert client.get("/indices-list").json() == ["emb", "captioned", "other-emb"]
    knn = client.post("/knn-service", json={"text": "a red circle", "num_images": 3, "indice_name": "other-emb"})
    ours = client.get("/search", params={"q": "a red circle", "k": 3, "collection": "other-emb"}).json()["results"]
    assert [r["id"] for r in knn.json()] == [h["id"] for h in ours]
    url = knn.json()[0]["url"]
    assert url.endswith(f"/thumb/{ours[0]['id']}?size=512&collection=other-emb")
    assert Image.open(io.BytesIO(client.get(url).content)).size == (40, 40)
    metadata = client.post("/metadata", json={"ids": [ours[1]["id"]], "indice_name": "other-emb"}).json()
    assert metadata[0]["metadata"]["name"] == ours[1]["name"]
    default = client.post("/knn-service", json={"text": "a red circle", "num_images": 3}).json()
    assert [r["id"] for r in default] == [h["id"] for h in client.get(
        "/search", params={"q": "a red circle", "k": 3}).json()["results"]]
    refused = client.post("/knn-service", json={"text": "x", "indice_name": "laion5B-L-14"})
    assert refused.status_code == 400 and "holds 'emb', 'captioned', 'other-emb'" in refused.json()["detail"]


def test_web_page_offers_a_menu_of_collections_where_there_are_several(several, live_server):
    chromium = _chromium_or_skip()
    with _serving(several) as url, _browser_page(chromium) as page:
        page.goto(live_server + "/?q=a+red+circle")  # one collection: no menu
        page.wait_for_selector("#results .result")
        assert page.locator("#collection").is_hidden()

        page.goto(url + "/?q=a+red+circle")
        page.wait_for_selector("#collection:not([hidden])")
        assert page.locator("#collection option").all_inner_texts() == ["emb", "captioned", "other-emb"]
        assert page.locator("#collection").input_value() == "emb" and page.locator("#captions-toggle").is_hidden()
        with page.expect_response(lambda r: "/search?" in r.url and "collection=other-emb" in r.url) as response:
            page.select_option("#collection", "other-emb")  # the same query in the other collection
        assert response.value.ok and "collection=other-emb" in page.url
        page.wait_for_function("document.querySelector('#search-status').textContent.endsWith('in other-emb')")
        shown = page.locator("#results .result").evaluate_all("cards => cards.map(c => c.dataset.id)")
        expected = requests_json(url, "/search?q=a+red+circle&k=24&collection=other-emb")
        assert shown == [str(h["id"]) for h in expected] and len(shown) == 6
        assert page.locator("#results .result img").first.evaluate("img => img.naturalWidth") == 40

        page.locator("#results .result .view").first.click()  # the larger view reads the chosen collection
        page.wait_for_selector("#viewer:not([hidden]) #viewer-captions li")
        assert page.locator("#viewer-captions li").first.inner_text().startswith("another ")
        assert page.locator("#viewer-image").evaluate("img => img.src").endswith("size=512&collection=other-emb")
        page.click("#viewer-close")

        page.select_option("#collection", "captioned")  # a collection with a caption index offers to match captions
        page.wait_for_selector("#captions-toggle:not([hidden])")
        page.reload()  # the choice lives in the URL
        page.wait_for_selector("#collection:not([hidden])")
        assert page.locator("#collection").input_value() == "captioned"
