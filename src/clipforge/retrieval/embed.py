"""Embed image collections (folder, CSV, WebDataset shards) and texts into sharded float16 ``.npy`` + parquet, in
the layout ``retrieval.collection`` describes.

Each output shard is written atomically once its images are embedded, so a killed run continues at the first
missing shard. Under ``torchrun`` output shard ``i`` belongs to rank ``i % world_size``. Output shard ``i`` holds
images ``i * shard_size`` onwards of the catalogue (the input's images in order), so ``embed_info.json`` records
which images those were (a digest of their paths in order) and ``catalogue.parquet`` the paths themselves: images
added to the input are embedded by running again, after the embedded ones whatever their names (the last shard redone
where they join it), while images removed or renamed, or another ``--shard-size``, are refused instead of filing
images under other rows.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.sources import open_source
from ..files import atomic_path, run_lock
from ..inference import weights_dtype
from ..preprocess import BadImageError, full_size, image_batch
from .collection import (TEXT_EMBEDDINGS, TEXT_METADATA, PathRecorder, embedded_shards, image_shard, item_captions,
                         item_path, load_item, paths_digest, read_catalogue, read_catalogue_stamps, read_info,
                         save_vectors, unreadable_reason, write_catalogue, write_image_shard, write_info)
from .probe import disagreeing, probe_features, read_probe, write_probe


UNREADABLE_NAMED = 10  # images that could not be read, named with the reason; the rest counted
CAPTION_CHOICES = ("first", "all")  # embed --captions: each image's first caption, or the mean of all its captions


class _DecodedItems(torch.utils.data.Dataset):
    """Item i -> (preprocessed image, metadata row), or None when it cannot be read (counted, then skipped). With
    ``every_caption`` a row also lists all the item's captions (``captions``), the first among them; ``decoding``:
    how images are decoded (``preprocess.Decoding``), the row keeping the size each is shown at."""

    def __init__(self, items: list[dict], preprocess, every_caption: bool = False, decoding=None):
        self.items, self.preprocess, self.every_caption = items, preprocess, every_caption
        self.decoding = decoding

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            image, caption = load_item(item, self.decoding)
        except (BadImageError, KeyError, StopIteration, OSError):
            return None
        width, height = full_size(image)
        row = {"path": item_path(item), "caption": caption, "width": width, "height": height}
        if self.every_caption:  # a CSV's caption column has no other lines: that caption alone
            try:
                row["captions"] = item_captions(item) or ([caption] if caption.strip() else [])
            except (KeyError, OSError):
                row["captions"] = [caption] if caption.strip() else []
        return self.preprocess(image), row


def decoded_batches(items: list[dict], preprocess, batch_size: int, workers: int, every_caption: bool = False,
                    decoding=None):
    """Batches (lists, in order) of decoded items; worker processes decode ahead of the model."""
    loader = torch.utils.data.DataLoader(_DecodedItems(items, preprocess, every_caption, decoding),
                                         batch_size=batch_size, num_workers=workers, collate_fn=list, pin_memory=False,
                                         prefetch_factor=2 if workers else None)
    return iter(loader)


# what a shard's vectors depend on besides the weights: resuming into a folder embedded with other values would mix
# two kinds of vectors (the model's config holds its architecture and image size; decoding, whether a phone's
# sideways photo was turned upright). "model" and "decoding" are compared only where recorded (older folders lack them)
RESUME_SETTINGS = ("model", "max_patches", "force_image_size", "captions", "decoding")
RECORDED_LATER = ("model", "decoding")


def _check_resumable(output: Path, summary: dict, n_shards: int, probe: dict) -> None:
    """Refuse to add shards to a collection whose finished shards were embedded by another architecture, at other
    image settings, or by other weights (their features of the probe images, ``retrieval.probe``, disagree), or that
    was adopted from another tool. The weights' precision may differ: its vectors are the same up to rounding."""
    previous = read_info(output)
    if not previous or not any(image_shard(output, shard)[0].exists() for shard in range(n_shards)):
        return
    if previous.get("adopted_from"):  # its rows follow the other tool's partitions, not this input's order
        raise ValueError(f"{output} was adopted from {previous['adopted_from']}'s embeddings: its rows follow "
                         "that tool's partitions, not this input, so embed cannot add to it; embed the new images "
                         "into a folder of their own and serve both (clipforge serve OLD NEW)")
    current = json.loads(json.dumps({key: summary.get(key) or None for key in RESUME_SETTINGS}, default=str))
    named = {"model": "the model's config",
             "decoding": "decoding (--full-decode " + ("given" if current["decoding"] is None else "left out") + " now)"}
    changed = [named.get(key, f"{key} {previous.get(key)!r} (now {current[key]!r})")
               for key in RESUME_SETTINGS
               if (key in previous or key not in RECORDED_LATER) and (previous.get(key) or None) != current[key]]
    if not changed and (differs := disagreeing(read_probe(output), probe, sides=("image",))):
        changed = [f"other weights ({differs})"]
    if changed:
        raise ValueError(f"{output} holds shards embedded with other settings than this run's: {'; '.join(changed)}. "
                         "Resuming would mix two kinds of vectors: embed into a new folder, or resume with the same "
                         "model and settings")


def catalogue_record(paths: list[str], shard_size: int) -> dict:
    """What ``embed_info.json`` keeps of the input: how many images, in shards of how many, and a digest of their
    recorded paths in order (what decides which image lands in which row)."""
    return {"images": len(paths), "shard_size": shard_size, "sha256": paths_digest(paths)}


def catalogue_order(output: Path, previous: dict, paths: list[str]) -> list[int] | None:
    """Where images were added among the embedded ones (a photo named earlier, a new subfolder, a CSV row inserted):
    the order that keeps every embedded image in its row, the embedded ones as listed in ``catalogue.parquet`` and
    then the added ones in the input's order, as indices into ``paths``. None where the input's own order keeps them
    (nothing embedded yet, the input as it was or added to at its end) or where the collection lists no paths (then
    ``stale_shards`` judges by the digest alone). Embedded images gone from the input are refused by name: their rows
    would still be found by searches."""
    before = previous.get("catalogue")
    if not before or not embedded_shards(output):
        return None
    count = before["images"]
    if count <= len(paths) and paths_digest(paths[:count]) == before["sha256"]:
        return None
    listed = read_catalogue(output)
    # a run killed between writing the list and embed_info.json left the list of the order it was about to embed:
    # the embedded images first, so the recorded count of them is its start
    if listed is None or len(listed) < count or paths_digest(listed[:count]) != before["sha256"]:
        return None
    listed = listed[:count]
    position = {path: i for i, path in enumerate(paths)}
    if len(position) < len(paths):  # a path twice (a shard's key repeated): rows cannot be told apart by path
        return None
    gone = [path for path in listed if path not in position]
    if gone:
        raise ValueError(f"{len(gone)} of the {count} images embedded into {output} are no longer in the input (such "
                         f"as {gone[0]}): embed does not remove rows, so searches would still find them. Embed into "
                         "a new folder (images only added to the input are embedded by running again)")
    kept = set(listed)
    return [position[path] for path in listed] + [i for i, path in enumerate(paths) if path not in kept]


def stale_shards(output: Path, previous: dict, paths: list[str], shard_size: int) -> set[int]:
    """Finished shards to embed again for the input's ``paths``: none when the input is the one embedded; the last
    one when images were added after the embedded ones and some join it; an error for any other change (images
    added among, removed from or renamed within the embedded ones, or another shard size), which would put images in
    other rows than their shards hold."""
    if not embedded_shards(output):
        return set()
    before = previous.get("catalogue")
    if before is None:  # embedded before inputs were recorded: the finished run's image count is all there is
        if previous.get("images") not in (None, len(paths)):
            raise ValueError(f"{output} was embedded from {previous['images']} images and the input now has "
                             f"{len(paths)}; resuming would put images in other rows than its shards hold: embed "
                             "into a new folder")
        return set()
    if before["shard_size"] != shard_size:
        raise ValueError(f"--shard-size {shard_size}: the shards in {output} hold {before['shard_size']} images "
                         f"each; resume with --shard-size {before['shard_size']} (or embed into a new folder)")
    count = before["images"]
    if count > len(paths) or paths_digest(paths[:count]) != before["sha256"]:
        raise ValueError(f"the input's first {count} images are no longer the ones embedded into {output} (images "
                         f"added among them, removed or renamed; {len(paths)} now), and it was embedded before "
                         "clipforge kept the list of them that would tell which: resuming would put images in other "
                         "rows than its shards hold. Embed into a new folder; images added where they sort after all "
                         "the embedded ones (new files named later, new shards) are added by running the same embed "
                         "again")
    if count == len(paths):
        return set()
    last = (count - 1) // shard_size if count else 0
    return {last} if count % shard_size and image_shard(output, last)[0].exists() else set()


def _barrier(world_size: int) -> None:
    """Wait for every rank, where the processes are a torch.distributed group (torchrun's ``clipforge embed``)."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def file_stamps(items: list[dict]) -> list[tuple[int, int] | None]:
    """Each item's file ``(size, mtime_ns)``, None for a shard's member or a file gone (it is skipped as unreadable)."""
    stamps = []
    for item in items:
        try:
            stat = os.stat(item["path"]) if "path" in item else None
        except OSError:
            stat = None
        stamps.append((stat.st_size, stat.st_mtime_ns) if stat else None)
    return stamps


def changed_since_embedded(before: dict, previous: dict, recorded: list[str], stamps: list, redone: set[int],
                           shard_size: int) -> list[str]:
    """The embedded images whose file changed since (its size or modification time; ``before``: the stamps the
    catalogue kept), outside the shards ``redone`` now: their rows hold the vectors of the earlier pictures. Only
    said: a changed row would need the index built over it rebuilt, and a row is kept by its path, as
    clip-retrieval keeps it."""
    count = previous.get("catalogue", {}).get("images", 0)
    return [path for i, (path, stamp) in enumerate(zip(recorded[:count], stamps[:count]))
            if stamp is not None and path in before and before[path] != stamp and i // shard_size not in redone]


def embed_collection(model, preprocess, input_spec: str, output: str | Path, shard_size: int = 10_000,
                     batch_size: int = 256, texts: list[str] | None = None, tokenizer=None, rank: int = 0,
                     world_size: int = 1, progress: bool = True, device=None, workers: int = 0,
                     model_spec: dict | None = None, max_patches: int | None = None,
                     force_image_size: int | None = None, captions: bool | str = False,
                     decoding=None) -> dict:
    """Embed every image of ``input_spec`` into ``output``; returns counts (embedded, skipped, shards reused).

    ``workers`` > 0 decodes and preprocesses in that many processes while the model runs (what keeps a GPU fed).
    ``model_spec`` (``{"model", "pretrained"}``) is recorded so that search and serve reload the same model, and
    ``max_patches`` (a SigLIP 2 NaFlex model's sequence length) and ``force_image_size`` (a model run at another size
    than its own) so that they take query images as these were taken. ``captions``: each image's caption embedded
    too, row for row (``caption_emb/``; zeros for an image without one), whose dot product with the image's vector is
    its CLIP score (``clipforge filter``): "first" (or True) its first caption, "all" the mean of all its captions'
    unit vectors, renormalised (a Flickr- or COCO-style collection with several captions per image: its caption
    index then finds an image by any of them, docs/BENCHMARKS.md). ``decoding`` (``preprocess.Decoding``, recorded):
    large JPEGs decoded reduced and photos turned upright by their EXIF orientation (the CLI's default:
    ``Decoding.for_model``); None decodes every pixel as stored, as open_clip's preprocess does. Paths are recorded
    relative to ``output`` (``retrieval.collection`` says how).

    The folder's run lock is held meanwhile: a second embed into it stops at once, naming this one
    (``files.run_lock``); under torchrun rank 0 holds it for the run.
    """
    with run_lock(output, "embed", enabled=rank == 0):
        return _embed_collection(model, preprocess, input_spec, Path(output), shard_size, batch_size, texts, tokenizer,
                                 rank, world_size, progress, device, workers, model_spec, max_patches,
                                 force_image_size, captions, decoding)


@torch.no_grad()
def _embed_collection(model, preprocess, input_spec, output: Path, shard_size, batch_size, texts, tokenizer, rank,
                      world_size, progress, device, workers, model_spec, max_patches, force_image_size, captions,
                      decoding) -> dict:
    """The work of ``embed_collection``, under its lock."""
    if captions not in (False, None, True) + CAPTION_CHOICES:
        raise ValueError(f"captions {captions!r}: choose one of {', '.join(CAPTION_CHOICES)}")
    every_caption = captions == "all"
    captions = "all" if every_caption else bool(captions)  # recorded: True for the first caption, as before "all"
    paths = PathRecorder(output)
    (output / "img_emb").mkdir(parents=True, exist_ok=True)
    (output / "metadata").mkdir(parents=True, exist_ok=True)
    device = device or next(model.parameters()).device
    source = open_source(input_spec, shuffle_buffer=0)  # what the spec names; catalogue(): items, undecoded
    items = source.catalogue()
    summary = {"input": paths.spec(input_spec), "dim": model.embed_dim, "model": getattr(model, "config", None),
               "model_spec": {key: paths.spec(value) for key, value in (model_spec or {}).items()},
               "weights_dtype": str(weights_dtype(model)).removeprefix("torch."), **paths.mark(),
               "captions": captions, "decoding": decoding._asdict() if decoding else None,
               **({"max_patches": int(max_patches)} if max_patches else {}),
               **({"force_image_size": int(force_image_size)} if force_image_size else {})}
    n_shards = (len(items) + shard_size - 1) // shard_size
    if captions and tokenizer is None:
        raise ValueError("embedding captions needs the model's tokenizer")
    probe = probe_features(model, preprocess, tokenizer, device)
    _check_resumable(output, summary, n_shards, probe)
    recorded = [paths.item(item_path(item)) for item in items]
    previous = read_info(output)
    order = catalogue_order(output, previous, recorded)
    if order is not None:  # images added among the embedded ones: they go after them
        items, recorded = [items[i] for i in order], [recorded[i] for i in order]
    stale = stale_shards(output, previous, recorded, shard_size)
    summary["catalogue"] = catalogue_record(recorded, shard_size)
    stamps = file_stamps(items)
    earlier = read_catalogue_stamps(output) if embedded_shards(output) else {}
    changed = changed_since_embedded(earlier, previous, recorded, stamps, stale, shard_size)
    # under torchrun every rank reads the collection's record before rank 0 rewrites it, and rank 0 removes the
    # shards to redo before any rank writes one: without these, a rank writing its redone shard before rank 0 got to
    # the removal lost it (seen on a loaded box), and one reading the new record took the old shard as done
    _barrier(world_size)
    if rank == 0:  # before any shard: a collection cut short reads its paths and weights' fingerprint the same way
        added = len(items) - previous.get("catalogue", {}).get("images", len(items))
        if added > 0 and embedded_shards(output):
            print(f"note: {added} images added to the input since {output} was embedded: embedding them"
                  + (" after the embedded ones, whose rows stay theirs" if order is not None else "")
                  + (f" (shard {min(stale)} again, which they join)" if stale else ""), file=sys.stderr)
        for shard in stale:  # first: were this run killed, the next one still finds the shard to redo
            image_shard(output, shard)[0].unlink()
        if changed:
            print(f"warning: {len(changed)} image{'s' if len(changed) > 1 else ''} embedded into {output} changed "
                  f"since, by file size or modification time (such as {changed[0]}): where the pictures changed, "
                  "their vectors are of the earlier ones; embed into a new folder to take them", file=sys.stderr)
        # the stamps of the images as embedded: a changed one keeps its earlier stamp, so that it is said again
        changed_paths = set(changed)
        kept = [earlier[path] if path in changed_paths else stamp for path, stamp in zip(recorded, stamps)]
        write_catalogue(output, recorded, kept)  # before the record of its digest: catalogue_order reads a newer list
        write_info(output, summary)
        write_probe(output, probe)
    _barrier(world_size)
    stats = {"images": len(items), "embedded": 0, "skipped": 0, "reused_shards": 0, "shards": n_shards,
             "bad_input_shards": getattr(source, "bad_shards", 0), "changed_since_embedded": len(changed)}
    unreadable = []  # the first few items this process could not decode, named with why at the end
    bar = tqdm(total=len(items), desc="embedding", unit="img", disable=not progress)
    for shard in range(rank, n_shards, world_size):
        emb_path, meta_path = image_shard(output, shard)
        chunk = items[shard * shard_size:(shard + 1) * shard_size]
        # finished before a restart; a stale shard is redone even where rank 0 has not unlinked it yet (torchrun)
        if emb_path.exists() and meta_path.exists() and shard not in stale:
            stats["reused_shards"] += 1
            bar.update(len(chunk))
            continue
        features, caption_features, rows = [], [], []
        position = shard * shard_size  # the catalogue index of the batch's first item: its path is recorded already
        for batch in decoded_batches(chunk, preprocess, batch_size, workers, every_caption, decoding):
            good = [(position + i, sample) for i, sample in enumerate(batch) if sample is not None]
            bad = [items[position + i] for i, sample in enumerate(batch) if sample is None]
            position += len(batch)
            stats["skipped"] += len(bad)
            unreadable += bad[:UNREADABLE_NAMED - len(unreadable)]
            if good:
                out = model.encode_image(image_batch([t for _, (t, _) in good], device, non_blocking=True),
                                         normalize=True)
                features.append(out.float().cpu().numpy().astype(np.float16))
                rows.extend({**row, "path": recorded[i]} for i, (_, row) in good)
                if captions:
                    lines = [row["captions"] if every_caption else [row["caption"]] for _, (_, row) in good]
                    caption_features.append(_caption_vectors(model, tokenizer, lines, device))
            bar.update(len(batch))
        empty = np.zeros((0, model.embed_dim), np.float16)
        array = np.concatenate(features) if features else empty
        write_image_shard(output, shard, array, rows,
                          (np.concatenate(caption_features) if caption_features else empty) if captions else None)
        stats["embedded"] += len(rows)
    bar.close()
    stats["unreadable_examples"] = [unreadable_reason(item) for item in unreadable]
    if texts and rank == 0:
        embed_texts(model, tokenizer, texts, output, batch_size, device)
        stats["texts"] = len(texts)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank's counts, and rank 0 writes the summary only once all shards are on disk
        counts = ["embedded", "skipped", "reused_shards"]
        totals = torch.tensor([stats[k] for k in counts], dtype=torch.long)
        torch.distributed.all_reduce(totals)
        stats.update(zip(counts, totals.tolist()))
    if rank == 0:
        write_info(output, {**summary, **stats})
    return stats


@torch.no_grad()
def _caption_vectors(model, tokenizer, captions: list[list[str]], device) -> np.ndarray:
    """One float16 unit vector per image from its ``captions``: the mean of their unit features, renormalised (a
    single caption's own features); zeros for an image without a caption."""
    vectors = np.zeros((len(captions), model.embed_dim), np.float16)
    owners = [i for i, texts in enumerate(captions) for text in texts if text.strip()]
    if owners:
        tokens = tokenizer([text for texts in captions for text in texts if text.strip()]).to(device)
        features = model.encode_text(tokens, normalize=True).float()
        sums = torch.zeros(len(captions), features.shape[1], device=features.device)
        sums.index_add_(0, torch.tensor(owners, device=features.device), features)
        present = sorted(set(owners))
        vectors[present] = torch.nn.functional.normalize(sums[present], dim=1).cpu().numpy()
    return vectors


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], output: Path, batch_size: int = 256, device=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (output / "text_emb").mkdir(parents=True, exist_ok=True)
    device = device or next(model.parameters()).device
    parts = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float().cpu().numpy()
             for i in range(0, len(texts), batch_size)]
    save_vectors(output / TEXT_EMBEDDINGS, np.concatenate(parts))
    with atomic_path(output / TEXT_METADATA) as tmp:
        pq.write_table(pa.Table.from_pylist([{"caption": t} for t in texts]), tmp)
