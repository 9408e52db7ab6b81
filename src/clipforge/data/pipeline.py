"""From raw samples to training batches, inside DataLoader workers, resumable to the exact sample.

Every rank x worker pair reads its own *part* of the data as an endless stream of epochs. Randomness is tied to
positions, not to process state: the order comes from ``(seed, epoch)``, and a sample's crop and caption choice from
``(seed, epoch, part, position)``. Each batch reports where its part's stream stands after it, so a checkpoint can
record the exact position of every part and a resumed run skips the consumed samples without decoding them.
Corrupt or unusable samples are skipped and counted, never fatal.
"""
from __future__ import annotations

import random
import signal
from collections import Counter, deque
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..preprocess import BadImageError, HeldPixels, Preprocess, TrainTransform, open_image
from .captions import label_caption, swap_left_right
from .sources import IMAGE_EXTENSIONS, ShardSource


class SkipSample(Exception):
    """A sample that cannot be used; its ``reason`` is counted, its ``detail`` (the decoder's message, naming the
    sample) shown where a few examples are."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def caption_lines(raw: dict) -> list[str]:
    """The non-blank lines of a sample's text: its captions (img2dataset shards may carry several, one per line)."""
    return [line.strip() for line in raw["txt"].decode("utf-8", "replace").splitlines() if line.strip()]


def decode_sample(raw: dict, rng: random.Random, classnames=None, caption_templates=None,
                  label_captions: bool = False, exclude_labels=frozenset()):
    """``raw`` sample -> (RGB PIL image, caption). Raises ``SkipSample`` for anything unusable."""
    label = None
    if "cls" in raw:
        try:
            label = int(raw["cls"])
        except ValueError:
            raise SkipSample("bad_label") from None
        if label in exclude_labels:
            raise SkipSample("excluded_class")
    if "txt" in raw and not label_captions:
        lines = caption_lines(raw)
        if not lines:
            raise SkipSample("empty_caption")
        text = rng.choice(lines)  # several captions: draw one each time
    elif label is not None and classnames is not None:
        if not 0 <= label < len(classnames):
            raise SkipSample("label_out_of_range")
        text = label_caption(classnames[label], rng, caption_templates)
    else:
        raise SkipSample("no_caption")
    if "image" in raw:
        image = raw["image"]
    else:
        data = raw.get("image_bytes")
        if data is None:
            data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if data is None:
            raise SkipSample("no_image")
        try:
            image = open_image(data, name=str(raw.get("__key__")))
        except BadImageError as error:
            raise SkipSample("corrupt_image", str(error)) from None
    return image.convert("RGB"), text


class ContrastiveStream(IterableDataset):
    """Endless batches ``{"images", "tokens", "state", "skipped"}`` for one rank; split further across workers.

    ``resume``: ``{part: {"epoch", "position", "skipped"}}`` as collected from the ``state`` of consumed batches.
    ``teacher``: a distillation teacher's inputs (``train.distill.TeacherInputs``): batches then also carry
    ``teacher_tokens`` (each caption by its tokenizer) and, when it takes other images than the student,
    ``teacher_images`` (the same crop of the same image at its size and normalisation).
    """

    def __init__(self, source, transform, tokenizer, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, classnames=None, caption_templates=None, label_captions: bool = False,
                 exclude_labels=(), resume: dict | None = None, hflip: bool = False, targets: str = "tokens",
                 teacher=None):
        self.source, self.transform, self.tokenizer = source, transform, tokenizer
        if teacher is not None and (targets != "tokens" or (teacher.transform is not None
                                                            and not isinstance(transform, TrainTransform))):
            raise ValueError("a distillation teacher takes captioned batches with the training crop "
                             "(targets 'tokens', a TrainTransform)")
        self.teacher = teacher
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.classnames, self.caption_templates = classnames, caption_templates
        self.label_captions = label_captions
        self.exclude_labels = frozenset(exclude_labels)
        self.resume = {int(k): v for k, v in (resume or {}).items()}
        self.hflip = hflip
        if targets not in ("tokens", "labels", "views"):
            raise ValueError(f"targets must be tokens, labels or views, got {targets!r}")
        # what each image is paired with under "tokens" in a batch: its caption's tokens, its integer label
        # (fine-tuning, classes), or a second augmented view of it (self-supervised)
        self.targets = targets

    def _view(self, raw: dict, rng: random.Random) -> torch.Tensor:
        """One augmented view of the sample's image, captions ignored (self-supervised training)."""
        from ..ssl import colour_augment

        image, _ = decode_sample(dict(raw, txt=b"-"), rng)
        return self.transform(colour_augment(image, rng), rng)

    def _teacher_view(self, image, rng: random.Random):
        """The teacher's tensor of the crop the student's transform is about to draw from ``rng`` (replayed on a
        copy, so the student's draws are unchanged); None when the teacher takes the student's tensor."""
        if self.teacher is None or self.teacher.transform is None:
            return None
        replay = random.Random()
        replay.setstate(rng.getstate())
        return self.teacher.transform(image, replay)

    def _sample_rng(self, epoch: int, part: int, position: int) -> random.Random:
        return random.Random(f"sample-{self.seed}-{epoch}-{part}-{position}")

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        part, parts = self.rank * workers + worker, self.world_size * workers
        state = self.resume.get(part, {})
        epoch, skip = int(state.get("epoch", 0)), int(state.get("position", 0))
        skipped = Counter(state.get("skipped", {}))
        images, texts, teacher_images = [], [], []
        while True:
            position, usable = 0, 0
            for raw in self.source.samples(part, parts, epoch, self.seed, skipped):
                position += 1
                if position <= skip:
                    usable += 1
                    continue
                rng = self._sample_rng(epoch, part, position)
                try:
                    if self.targets == "views":
                        images.append(self._view(raw, rng))
                        texts.append(self._view(raw, rng))
                        usable += 1
                        if len(images) == self.batch_size:
                            yield {"images": torch.stack(images), "tokens": torch.stack(texts),
                                   "state": {"part": part, "epoch": epoch, "position": position,
                                             "skipped": dict(skipped)}}
                            images, texts = [], []
                        continue
                    image, text = decode_sample(raw, rng, self.classnames, self.caption_templates,
                                                self.label_captions, self.exclude_labels)
                    if self.hflip and rng.random() < 0.5:  # the mirror image, described as such
                        image, text = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), swap_left_right(text)
                    teacher_view = self._teacher_view(image, rng)  # before the student's crop draws from rng
                    tensor = self.transform(image, rng) if isinstance(self.transform, TrainTransform) \
                        else self.transform(image)
                except SkipSample as exc:
                    skipped[exc.reason] += 1
                    continue
                usable += 1
                images.append(tensor)
                texts.append(int(raw["cls"]) if self.targets == "labels" else text)
                if teacher_view is not None:
                    teacher_images.append(teacher_view)
                if len(images) == self.batch_size:
                    targets = torch.tensor(texts) if self.targets == "labels" else self.tokenizer(texts)
                    batch = {"images": torch.stack(images), "tokens": targets,
                             "state": {"part": part, "epoch": epoch, "position": position, "skipped": dict(skipped)}}
                    if self.teacher is not None:
                        batch["teacher_tokens"] = self.teacher.tokenizer(texts)
                        if teacher_images:
                            batch["teacher_images"] = torch.stack(teacher_images)
                    yield batch
                    images, texts, teacher_images = [], [], []
            if usable == 0:
                raise RuntimeError(f"data part {part} of {parts} has no usable samples in epoch {epoch} "
                                   f"(skipped: {dict(skipped) or 'none'}); check the data and the shard count")
            epoch, skip = epoch + 1, 0


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A Ctrl-C or a scheduler's SIGTERM reaches every process of the group: the workers keep feeding batches while
    the training process finishes its step and saves (they exit with it, as DataLoader workers do)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers(batches) -> None:
    """End a loader iterator's worker processes now (what its own clean-up does when it is collected). They ignore
    SIGTERM (above), so they must not be left to the interpreter's exit, which ends daemonic children with SIGTERM and
    waits for them: a run that fails with an error (a diverged loss, a failing step) would hang there forever."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # a multi-process DataLoader iterator's
    if shutdown is not None:
        shutdown()


def continue_interleaving(batches, workers: int, consumed: int):
    """The loader's batches in the order an uninterrupted run would have met them. A DataLoader takes one batch
    from each worker in turn, always starting at worker 0; a run resumed after ``consumed`` batches must start at
    worker ``consumed % workers`` (each worker's own stream resumes exactly at its recorded position), else the
    same batches arrive in another order and the run is no longer the one it continues. The first few batches of
    the workers before that one are held back until their turn comes."""
    start = consumed % workers if workers > 1 else 0
    if start == 0:
        yield from batches
        return
    waiting = {worker: deque() for worker in range(workers)}
    turn = start
    for batch in batches:
        waiting[batch["state"]["part"] % workers].append(batch)  # part = rank * workers + worker
        while waiting[turn]:
            yield waiting[turn].popleft()
            turn = (turn + 1) % workers


def make_loader(stream: ContrastiveStream, workers: int = 2, pin_memory: bool = False) -> DataLoader:
    """Batches from worker processes. ``pin_memory`` (for CUDA) lets the step's non-blocking copies overlap compute."""
    # Its own generator, so creating the loader never consumes the global torch RNG (exact resume).
    return DataLoader(stream, batch_size=None, num_workers=workers, generator=torch.Generator(),
                      persistent_workers=False, prefetch_factor=4 if workers else None, pin_memory=pin_memory,
                      worker_init_fn=_leave_stop_signals_to_the_trainer if workers else None)


@dataclass
class EvaluationSet:
    """Fixed validation samples: preprocessed images, every caption of each (``caption_images[t]``: the image caption
    ``t`` describes), and integer labels when every sample has one and the class names are known (then zero-shot
    accuracy can be measured too)."""

    images: list[torch.Tensor]  # or HeldPixels, read as such a list
    captions: list[str]
    caption_images: torch.Tensor
    labels: torch.Tensor | None = None
    classnames: list[str] | None = None
    skipped: Counter = field(default_factory=Counter)
    captions_from_labels: bool = False  # every caption was made from its class name, none written for the image
    prior_images: list[torch.Tensor] | None = None  # training images: a word-by-word model's prompt prior


def evaluation_set(source, transform, limit: int | None = None, classnames=None, caption_templates=None,
                   label_captions: bool = False, seed: int = 0, compact: bool = False) -> EvaluationSet:
    """The first ``limit`` usable samples of ``source`` in order (``evaluation_samples``), their images transformed
    and held, as a list. ``compact`` (``transform`` a ``Preprocess``): held as uint8 pixels instead (``HeldPixels``,
    a quarter of the memory, the same tensors when read; what training's validation holds for the whole run).
    Unusable samples are counted."""
    if compact and not isinstance(transform, Preprocess):
        raise TypeError(f"evaluation_set(compact=True) holds a Preprocess's pixels, not {type(transform).__name__}'s "
                        "outputs")
    images = HeldPixels(transform) if compact else []
    captions, owners, labels, skipped, from_labels = [], [], [], Counter(), []
    for image, texts, label, from_label in evaluation_samples(source, limit, classnames, caption_templates,
                                                              label_captions, seed, skipped):
        captions += texts
        owners += [len(images)] * len(texts)
        images.append(transform.pixels(image) if compact else transform(image))
        labels.append(label)
        from_labels.append(from_label)
    labelled = bool(labels) and classnames is not None and None not in labels
    return EvaluationSet(images, captions, torch.tensor(owners, dtype=torch.long),
                         torch.tensor(labels) if labelled else None, list(classnames) if labelled else None,
                         skipped, labelled and all(from_labels))


def evaluation_samples(source, limit: int | None = None, classnames=None, caption_templates=None,
                       label_captions: bool = False, seed: int = 0, skipped: Counter | None = None):
    """``(PIL image, captions, label or None, whether the captions were made from the label)`` for the first
    ``limit`` usable samples of ``source`` in order: each with all its caption lines (or, for labelled samples without
    text or with ``label_captions``, one label caption). Unusable samples are counted in ``skipped``."""
    skipped = Counter() if skipped is None else skipped
    kept = 0
    for raw in source.samples(0, 1, 0, seed, skipped):
        rng = random.Random(f"eval-{seed}-{kept}")
        try:
            image, text = decode_sample(raw, rng, classnames, caption_templates, label_captions)
        except SkipSample as exc:
            skipped[exc.reason] += 1
            continue
        written = "txt" in raw and not label_captions
        kept += 1
        yield image, caption_lines(raw) if written else [text], int(raw["cls"]) if "cls" in raw else None, not written
        if limit and kept >= limit:
            break


def iter_captioned_images(source, classnames=None, seed: int = 0, skipped: Counter | None = None):
    """``(PIL image, caption list, label)`` per usable sample of ``source``, read once in order: every caption line of
    a sample's text (label None), or, for labelled samples when ``classnames`` is given, four label captions and the
    integer label. Unusable samples are skipped and counted in ``skipped``."""
    skipped = Counter() if skipped is None else skipped
    kept = 0
    for raw in source.samples(0, 1, 0, seed, skipped):
        rng = random.Random(f"caption-{seed}-{kept}")
        try:
            image, first = decode_sample(raw, rng, classnames, None, label_captions=classnames is not None)
        except SkipSample as exc:
            skipped[exc.reason] += 1
            continue
        kept += 1
        if classnames is not None:
            label = int(raw["cls"])
            yield image, [first] + [label_caption(classnames[label], rng) for _ in range(3)], label
        else:  # decode_sample has checked there is at least one non-empty line
            yield image, caption_lines(raw), None


def captioned_images(source, classnames=None, max_images: int | None = None, seed: int = 0):
    """``(PIL images, caption list per image, skipped counts)``: ``iter_captioned_images`` collected."""
    images, captions, skipped = [], [], Counter()
    for image, lines, _ in iter_captioned_images(source, classnames, seed, skipped):
        images.append(image)
        captions.append(lines)
        if max_images and len(images) >= max_images:
            break
    return images, captions, skipped


def caption_texts(source, seed: int = 0) -> list[str]:
    """Every caption line of every sample of ``source``, read once in order without decoding an image (every shard
    an epoch can draw, once, for upsampled shard lists)."""
    texts, skipped = [], Counter()
    source = source.distinct() if isinstance(source, ShardSource) else source
    for raw in source.samples(0, 1, 0, seed, skipped):
        if "txt" in raw:
            texts += caption_lines(raw)
    return texts
