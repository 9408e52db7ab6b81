"""Data sources and the batching pipeline: formats, caption choice, label captions, splitting, resumability."""
import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipforge
import clipforge.train
from clipforge import cli
from clipforge.data import ContrastiveStream, CsvSource, FolderSource, ShapesSource, open_source
from clipforge.prompts import load_templates
from clipforge.preprocess import TrainTransform

from conftest import shapes_shard, write_shard


def _png(colour="red"):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_multi_line_captions_are_drawn_at_random_per_use(tmp_path):
    samples = [{"__key__": f"k{i}", "png": _png(), "txt": "one\ntwo\nthree"} for i in range(4)]
    source = open_source(str(write_shard(tmp_path / "multi-000000.tar", samples)))
    stream = ContrastiveStream(source, TrainTransform(32), clipforge.get_tokenizer(), batch_size=4, seed=0)
    tokens = torch.cat([b["tokens"] for b in _take(stream, 6)])
    decoded = {clipforge.get_tokenizer().decode(t[1:t.argmax()]).strip() for t in tokens}
    assert decoded == {"one", "two", "three"}


def test_label_captions_and_excluded_classes(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "classnames.txt").write_text("zebra\nkettle\n")
    samples = [{"__key__": f"k{i}", "png": _png(), "cls": str(i % 2)} for i in range(20)]
    shard = write_shard(tmp_path / "ds" / "train" / "train-000000.tar", samples)
    cfg = clipforge.train.TrainConfig(train_data=str(shard), label_captions="default", exclude_classes=["kettle"])
    labels = clipforge.train.loop._Labels(cfg, open_source(str(shard)))
    stream = ContrastiveStream(open_source(str(shard)), TrainTransform(32), clipforge.get_tokenizer(), 5,
                               classnames=labels.classnames, label_captions=True, exclude_labels=labels.exclude)
    batches = _take(stream, 4)
    texts = [clipforge.get_tokenizer().decode(t[1:t.argmax()]) for b in batches for t in b["tokens"]]
    assert all("zebra" in t and "kettle" not in t for t in texts) and len(set(texts)) > 3
    assert batches[-1]["state"]["skipped"]["excluded_class"] >= 10
    with pytest.raises(ValueError, match="not among the class names"):
        clipforge.train.loop._Labels(clipforge.train.TrainConfig(label_captions="default", exclude_classes=["cat"]),
                                     open_source(str(shard)))


def test_caption_templates_file_needs_placeholders(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("# comment\na snapshot of {}\n\n{} up close\n")
    bad.write_text("a photo of something\n")
    assert load_templates(good) == ["a snapshot of {}", "{} up close"]
    with pytest.raises(ValueError, match="placeholder"):
        load_templates(bad)


def test_csv_and_folder_sources(tmp_path):
    for i, colour in enumerate(["red", "blue", "green"]):
        (tmp_path / f"img{i}.png").write_bytes(_png(colour))
        (tmp_path / f"img{i}.txt").write_text(f"a {colour} thing")
    (tmp_path / "pairs.csv").write_text("filepath,title\nimg0.png,first\nimg1.png,second\nmissing.png,gone\n")
    csv_source = CsvSource(tmp_path / "pairs.csv")
    skipped = Counter()
    keys = [s["txt"] for s in csv_source.samples(0, 1, 0, 0, skipped)]
    assert sorted(keys) == [b"first", b"second"] and skipped["missing_file"] == 1
    folder = FolderSource(tmp_path)
    assert len(folder) == 3
    with pytest.raises(ValueError, match="caption column"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        CsvSource(tmp_path / "bad.csv")



def test_files_people_write_are_read_as_utf8_without_the_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" and Windows editors put a byte-order mark first: it became part of the first column's name
    ("no image path column"), of the first class name (classify printed "\ufeffa dog"), of the first template, and a
    JSON --config with one did not parse. Another encoding is named, whatever the locale."""
    from clipforge.data.sources import read_classnames
    from clipforge.train.cli import read_config

    bom = "\ufeff"
    (tmp_path / "img0.png").write_bytes(_png("red"))
    (tmp_path / "excel.csv").write_text(bom + "filepath,title\r\nimg0.png,un caf\u00e9 rouge\r\n", encoding="utf-8")
    skipped = Counter()
    samples = list(CsvSource(tmp_path / "excel.csv").samples(0, 1, 0, 0, skipped))
    assert [s["txt"].decode() for s in samples] == ["un caf\u00e9 rouge"] and not skipped
    (tmp_path / "labels.txt").write_text(bom + "a dog\r\n\r\na caf\u00e9\r\n", encoding="utf-8")
    assert read_classnames(tmp_path / "labels.txt") == ["a dog", "a caf\u00e9"]
    (tmp_path / "templates.txt").write_text(bom + "a photo of {}\n", encoding="utf-8")
    assert load_templates(tmp_path / "templates.txt") == ["a photo of {}"]
    (tmp_path / "config.json").write_text(bom + '{"steps": 7}', encoding="utf-8")
    assert read_config(tmp_path / "config.json")["steps"] == 7
    (tmp_path / "latin1.csv").write_bytes("filepath,title\nimg0.png,un caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"CSV .*latin1.csv: not UTF-8 text .* save it as UTF-8"):
        CsvSource(tmp_path / "latin1.csv")
    (tmp_path / "latin1.txt").write_bytes("un caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"class names .*latin1.txt: not UTF-8 text"):
        read_classnames(tmp_path / "latin1.txt")


def test_a_folder_reads_gif_and_tiff_photos_and_names_the_files_it_passes_over(tmp_path, capsys):
    """Photos come as .tif and .gif too (clip-retrieval reads neither); files that are not images by their name are
    counted on stderr by kind (a folder of Photoshop files or videos was otherwise just found smaller without a word),
    while captions, metadata and hidden files are not."""
    from clipforge.retrieval.collection import load_item

    colours = {"a.png": "red", "b.gif": "blue", "c.TIF": "green", "sub/d.tiff": "yellow", "e.jfif": "white"}
    (tmp_path / "sub").mkdir()
    for name, colour in colours.items():
        Image.new("RGB", (40, 30), colour).save(tmp_path / name, format="JPEG" if name.endswith("jfif") else None)
    (tmp_path / "a.txt").write_text("a red thing")
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main")
    for name in ("f.psd", "sub/g.PSD", "h.mov", "README"):
        (tmp_path / name).write_bytes(b"x")
    items = FolderSource(tmp_path, shuffle=False).catalogue()
    assert [item["path"] for item in items] == sorted(str(tmp_path / name) for name in colours)
    for item in items:
        name = str(Path(item["path"]).relative_to(tmp_path))
        pixel = Image.new("RGB", (1, 1), colours[name]).getpixel((0, 0))
        got = load_item(item)[0].convert("RGB").getpixel((5, 5))
        assert max(abs(a - b) for a, b in zip(got, pixel)) <= (3 if name.endswith("jfif") else 0), name
    assert load_item(items[0])[1] == "a red thing"
    err = capsys.readouterr().err
    assert f"warning: {tmp_path}: 4 files passed over as not images by their name (2 .psd, 1 .mov, 1 without a " \
           "suffix); images are read from .jpg, .jpeg, .png, .webp, .bmp, .gif, .tif, .tiff" in err

    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.psd").write_bytes(b"x")
    with pytest.raises(ValueError, match="no images found"):
        FolderSource(tmp_path / "only")
    assert "1 file passed over as not images by their name (1 .psd)" in capsys.readouterr().err


def test_heic_photos_are_read_with_pillow_heif_and_named_with_how_to_read_them_without(tmp_path):
    """An iPhone's photos are HEIC: read from folders and as single files where pillow-heif is installed (the test
    extras install it), and without it passed over, or refused as a file, with the command that reads them."""
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif is in the test extras (clipforge[heif])")
    from clipforge.preprocess import BadImageError, open_image

    pillow_heif.register_heif_opener()  # to write one; clipforge registers it itself on reading
    Image.new("RGB", (48, 32), (200, 30, 40)).save(tmp_path / "IMG_0001.HEIC")
    Image.new("RGB", (48, 32), (20, 30, 200)).save(tmp_path / "IMG_0002.png")
    heic = (tmp_path / "IMG_0001.HEIC").read_bytes()
    assert heic[4:12] == b"ftypheic"
    items = FolderSource(tmp_path, shuffle=False).catalogue()
    assert [Path(item["path"]).name for item in items] == ["IMG_0001.HEIC", "IMG_0002.png"]
    for source in (heic, tmp_path / "IMG_0001.HEIC"):
        image = open_image(source)
        assert image.size == (48, 32) and max(abs(a - b) for a, b in zip(image.getpixel((9, 9)), (200, 30, 40))) < 6

    script = f"""
import sys
sys.modules["pillow_heif"] = None  # as where it is not installed
from pathlib import Path
from clipforge.data import FolderSource
from clipforge.preprocess import BadImageError, open_image
print([Path(item["path"]).name for item in FolderSource({str(tmp_path)!r}).catalogue()])
try:
    open_image({str(tmp_path / "IMG_0001.HEIC")!r})
except BadImageError as error:
    print(error)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    listed, refused = run.stdout.splitlines()
    assert listed == "['IMG_0002.png']"
    hint = "pip install 'clipforge[heif]' (pillow-heif) to read HEIC/HEIF photos"
    assert refused == f"{tmp_path / 'IMG_0001.HEIC'}: a HEIF image (HEIC): {hint}, an iPhone's own format"
    assert "1 file passed over as not images by their name (1 .heic); images are read from" in run.stderr
    assert hint in run.stderr
    with pytest.raises(BadImageError, match="no image format recognised"):  # not every ftyp-less file is HEIF
        open_image(b"\0" * 64)

def test_csv_columns_and_separator_as_open_clip_names_them(tmp_path):
    """open_clip's --csv-img-key / --csv-caption-key / --csv-separator: named columns and separator; a tab-separated
    file named .csv (open_clip's default separator) is read without one; a named column that is absent is an error
    naming it and the columns found."""
    for i, colour in enumerate(["red", "blue"]):
        (tmp_path / f"img{i}.png").write_bytes(_png(colour))
    (tmp_path / "custom.csv").write_text("img;desc;title\nimg0.png;a red thing;x\nimg1.png;a blue thing;y\n")
    custom = open_source(str(tmp_path / "custom.csv"), csv_keys={"image_key": "img", "caption_key": "desc",
                                                                 "separator": ";"})
    assert sorted(s["txt"] for s in custom.samples(0, 1, 0, 0, Counter())) == [b"a blue thing", b"a red thing"]
    (tmp_path / "tabbed.csv").write_text("filepath\ttitle\nimg0.png\tred, in a field\nimg1.png\tblue\n")
    assert sorted(s["txt"] for s in open_source(str(tmp_path / "tabbed.csv")).samples(0, 1, 0, 0, Counter())) == \
        [b"blue", b"red, in a field"]
    with pytest.raises(ValueError, match=r"no caption column 'caption'; its columns \(separated by ';'\): \['img'"):
        CsvSource(tmp_path / "custom.csv", caption_key="caption", separator=";")


def test_parts_split_the_data_without_overlap():
    source = ShapesSource(50)
    seen = [s["__key__"] for part in range(3) for s in source.samples(part, 3, 0, 0, Counter())]
    assert len(seen) == 50 and len(set(seen)) == 50


def test_shards_split_across_parts_and_epochs_reshuffle(tmp_path):
    for i in range(4):
        shapes_shard(tmp_path / f"s-{i:06d}.tar", 10, seed=i)
    source = open_source(str(tmp_path / "s-{000000..000003}.tar"))
    assert len(source.urls) == 4 and len(source) == 40
    for epoch in (0, 1):  # every epoch: the parts are disjoint halves that together cover every sample once
        parts = [[(s["__url__"], s["__key__"]) for s in source.samples(p, 2, epoch, 0, Counter())] for p in range(2)]
        assert len(parts[0]) == len(parts[1]) == 20 and len(set(parts[0] + parts[1])) == 40
        if epoch == 0:
            epoch0 = parts
    assert parts != epoch0  # a new epoch, a new order
    again = [[(s["__url__"], s["__key__"]) for s in source.samples(p, 2, 0, 0, Counter())] for p in range(2)]
    assert again == epoch0  # the order is a function of (seed, epoch)


def test_upsampling_factors_weigh_each_shard_list_per_epoch_as_open_clips(tmp_path):
    """``--train-data-upsampling-factors 1::2.5`` (open_clip's): each epoch reads the first list's shards once and
    the second's twice, plus a third time with probability 0.5 per shard and epoch; parts still split each epoch's
    reads without overlap; the text cache sees every shard once; a CSV or a miscounted list is refused."""
    for i in range(4):
        shapes_shard(tmp_path / f"s-{i:06d}.tar", 10, seed=i)
    spec = f"{tmp_path}/s-{{000000..000001}}.tar::{tmp_path}/s-{{000002..000003}}.tar"
    source = open_source(spec, upsampling="1::2.5")
    assert source.weights == [1, 1, 2.5, 2.5] and len(source) == 20 + 50
    thirds = []
    for epoch in range(40):
        urls = Counter(source.epoch_urls(epoch, seed=0))
        assert urls[source.urls[0]] == urls[source.urls[1]] == 1 and {urls[u] for u in source.urls[2:]} <= {2, 3}
        thirds += [urls[u] == 3 for u in source.urls[2:]]
        if epoch < 2:  # what the parts read is that list, split between them
            reads = [[s["__url__"] for s in source.samples(p, 2, epoch, 0, Counter())] for p in range(2)]
            assert Counter(reads[0] + reads[1]) == Counter({u: 10 * n for u, n in urls.items()})
    assert 25 <= sum(thirds) <= 55  # of 80 draws at 0.5
    assert source.epoch_urls(3, seed=0) == source.epoch_urls(3, seed=0) != source.epoch_urls(3, seed=1)
    from clipforge.data.pipeline import caption_texts

    assert len(caption_texts(source)) == len(caption_texts(open_source(spec)))  # every caption, once
    zero = open_source(spec, upsampling=[0, 1])
    assert set(zero.epoch_urls(0, 0)) == set(zero.urls[2:]) and len(zero) == 20
    for spec_, factors, named in ((spec, "1::2::3", "3 upsampling factors for 2"), (spec, "1::-1", "each 0 or more"),
                                  (spec, "a::b", "expected numbers"), (str(tmp_path / "x.csv"), "1", "is a CSV")):
        with pytest.raises(ValueError, match=named):
            open_source(spec_, upsampling=factors)
    # through training: the flag reaches the source (an epoch of 70 samples: 9 steps of 8)
    run = tmp_path / "run"
    assert cli.main(["train", "--model", "ViT-Tiny-64", "--train-data", spec, "--train-data-upsampling-factors",
                     "1::2.5", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--save-every", "0",
                     "--no-progress", "--output", str(run)]) == 0
    assert '"step": 9' in (run / "metrics.jsonl").read_text()


def test_resume_state_skips_exactly_the_consumed_samples(tmp_path):
    shard = shapes_shard(tmp_path / "s-000000.tar", 30)
    make = lambda resume=None: ContrastiveStream(open_source(str(shard)), TrainTransform(32),
                                                 clipforge.get_tokenizer(), 4, seed=5, resume=resume)
    straight = _take(make(), 12)  # crosses an epoch boundary
    resumed = _take(make({0: straight[4]["state"]}), 7)
    for a, b in zip(straight[5:], resumed):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])


def test_missing_shard_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="shard not found"):
        open_source(str(tmp_path / "nothing-{000000..000002}.tar"))


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "4", "--batch-size", "16", "--workers", "0", "--no-progress",
                     "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "zero-shot" in out and "report:" in out
    page = (tmp_path / "demo" / "report.html").read_text()
    assert page.count("<img") >= 48 and "Text→image retrieval" in page
    model, _, _ = clipforge.load(str(tmp_path / "demo" / "checkpoints" / "step-00000004"))
    assert model.image_size == 64
    # run again into its own folder: an earlier demo's run is started over (another run's folder is refused)
    assert cli.main(["demo", "--steps", "2", "--batch-size", "16", "--workers", "0", "--no-progress",
                     "--output", str(tmp_path / "demo")]) == 0
    assert sorted(p.name for p in (tmp_path / "demo" / "checkpoints").iterdir()) == ["step-00000002"]


def test_left_and_right_swap_as_whole_words_with_their_case():
    from clipforge.data.captions import swap_left_right

    assert swap_left_right("A dog on the left, a cat to the Right.") == "A dog on the right, a cat to the Left."
    assert swap_left_right("LEFT turn; leftover brightness") == "RIGHT turn; leftover brightness"


def test_mirrored_samples_come_with_mirrored_captions(tmp_path):
    """--hflip: whenever the image is flipped, left and right trade places in its caption, so the caption stays true."""
    image = Image.new("RGB", (32, 32), "blue")
    image.paste((255, 0, 0), (0, 0, 16, 32))  # red left half
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    shard = write_shard(tmp_path / "s-000000.tar", [{"__key__": f"{i:03d}", "png": buffer.getvalue(),
                                                      "txt": "red on the left"} for i in range(40)])
    tokenizer = clipforge.get_tokenizer()
    stream = ContrastiveStream(open_source(str(shard)), TrainTransform(32, scale=(1.0, 1.0)), tokenizer, 40,
                               hflip=True)
    batch = next(iter(stream))
    red_side = ["left" if img[0, :, :16].mean() > img[0, :, 16:].mean() else "right" for img in batch["images"]]
    said = ["left" if row.tolist() == tokenizer("red on the left")[0].tolist() else "right" for row in batch["tokens"]]
    assert said == red_side and 5 < red_side.count("right") < 35


def test_evaluation_sets_keep_every_caption_of_every_image(tmp_path):
    from clipforge.data import evaluation_set

    shard = write_shard(tmp_path / "s-000000.tar", [{"__key__": f"{i:03d}", "png": _png("red"),
                                                      "txt": "\n".join(f"caption {i}.{j}" for j in range(i % 3 + 1))}
                                                     for i in range(6)])
    pairs = evaluation_set(open_source(str(shard), shuffle_buffer=0), TrainTransform(32, scale=(1.0, 1.0)))
    assert len(pairs.images) == 6 and len(pairs.captions) == 1 + 2 + 3 + 1 + 2 + 3
    assert all(c.startswith(f"caption {i}.") for c, i in zip(pairs.captions, pairs.caption_images.tolist()))


def test_a_compact_evaluation_set_holds_uint8_pixels_and_reads_as_the_held_tensors(tmp_path):
    from clipforge.data import evaluation_set
    from clipforge.preprocess import HeldPixels, Preprocess

    shard = write_shard(tmp_path / "s-000000.tar", [{"__key__": f"{i:03d}", "png": _png(colour), "txt": colour}
                                                     for i, colour in enumerate(["red", "green", "blue", "white"])])
    source = open_source(str(shard), shuffle_buffer=0)
    tensors = evaluation_set(source, Preprocess(24))
    compact = evaluation_set(source, Preprocess(24), compact=True)
    assert isinstance(tensors.images, list) and isinstance(compact.images, HeldPixels)
    assert all(torch.equal(a, b) for a, b in zip(tensors.images, compact.images[:])) and len(compact.images) == 4
    assert compact.captions == tensors.captions
    assert compact.images.nbytes * 4 == sum(t.nbytes for t in tensors.images)
    with pytest.raises(TypeError, match="Preprocess"):
        evaluation_set(source, TrainTransform(24), compact=True)
