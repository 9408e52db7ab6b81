"""Image preprocessing with Pillow and torch only (no torchvision).

Evaluation follows OpenAI CLIP: bicubic resize of the short side, center crop, RGB, normalise with CLIP's mean/std,
with torchvision's rounding rules so pixels match open_clip's ``preprocess``. Training adds a RandomResizedCrop.
"""
from __future__ import annotations

import functools
import io
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Decoded images larger than this are refused (decompression bombs); Pillow's own default is about 89 Mpx.
MAX_IMAGE_PIXELS = 64_000_000
# A JPEG decoded for a transform that shrinks it keeps at least this many times the output's size on each side
# (Pillow's ``reducing_gap``): a model's features then stay about as close to a full decode's as those of the photo
# re-encoded at JPEG quality 90; at 2 the farthest photo's moved 18 times as far (docs/BENCHMARKS.md)
DECODE_GAP = 3
FULL_SIZE = "clipforge_full_size"  # in a reduced image's ``info``: the size it is shown at (stored, turned upright)
EXIF_ORIENTATION = 0x0112  # 1: as stored; 2-8: mirrored and/or turned (5-8: by a quarter turn)
HEIF_HINT = "pip install 'clipforge[heif]' (pillow-heif) to read HEIC/HEIF photos, an iPhone's own format"


class BadImageError(ValueError):
    """An image that cannot be decoded, or that is too large; the message names the source."""


class Decoding(NamedTuple):
    """How a photo is decoded where the work it takes and the way it was meant to be seen matter more than
    open_clip's exact pixels (embed, classify, serve): a JPEG at 1/2, 1/4 or 1/8 scale where both sides keep
    ``min_size`` pixels (libjpeg's DCT scaling: a 12-megapixel photo for a 224-pixel model in a third of the time),
    and ``upright``: turned as its EXIF orientation says (a phone stores a portrait photo sideways with that tag;
    browsers, and img2dataset's OpenCV, show and store it upright)."""
    min_size: int | None = None
    upright: bool = True

    @classmethod
    def for_model(cls, preprocess) -> "Decoding":
        """Upright, reduced to ``preprocess``'s ``decode_size`` (whole where it has none: NaFlex)."""
        return cls(getattr(preprocess, "decode_size", None))


def open_image(source, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
               decoding: Decoding | None = None) -> Image.Image:
    """Open a path, bytes or file object as a fully decoded PIL image, with a clear error on bad input: its pixels
    as stored (open_clip's), or as ``decoding`` says (reduced, upright); ``full_size(image)`` is then the size it
    is shown at."""
    label = name or (str(source) if isinstance(source, (str, Path)) else "image")
    try:
        image = _pillow_open(source, label)
        if image.width * image.height > max_pixels:
            raise BadImageError(f"{label}: {image.width}x{image.height} pixels exceeds the limit of {max_pixels}")
        shown = image.size
        if decoding and decoding.min_size and image.format == "JPEG":
            image.draft(None, (decoding.min_size, decoding.min_size))
        image.load()
        if decoding and decoding.upright:
            image, turned = _upright(image)
            shown = shown[::-1] if turned else shown
        if image.size != shown:
            image.info[FULL_SIZE] = shown
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"{label}: no such file") from None
    except UnidentifiedImageError:  # its message names the file object Pillow was given, not the image
        raise BadImageError(f"{label}: not a readable image (no image format recognised)") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise BadImageError(f"{label}: not a readable image ({exc})") from None
    return image


def _pillow_open(source, label: str) -> Image.Image:
    """``Image.open``; a HEIF container (HEIC photos) that Pillow does not know is opened again through pillow-heif
    where it is installed, or refused with how to read it."""
    stream = lambda: io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source  # noqa: E731
    try:
        return Image.open(stream())
    except UnidentifiedImageError:
        if not _is_heif(source):
            raise
    if not heif_reader():
        raise BadImageError(f"{label}: a HEIF image (HEIC): {HEIF_HINT}")
    if hasattr(source, "seek"):
        source.seek(0)
    return Image.open(stream())


def _is_heif(source) -> bool:
    """Whether ``source`` starts as an ISO media file (HEIF, HEIC, AVIF: an ``ftyp`` box first)."""
    if isinstance(source, (bytes, bytearray)):
        head = bytes(source[:12])
    elif isinstance(source, (str, Path)):
        with open(source, "rb") as file:
            head = file.read(12)
    else:
        source.seek(0)
        head = source.read(12)
    return head[4:8] == b"ftyp"


@functools.cache
def heif_reader() -> bool:
    """Whether HEIC/HEIF images can be read: pillow-heif's opener registered with Pillow (once, where it is
    installed: ``clipforge[heif]``). Only called on an image Pillow alone cannot open, so it costs nothing else."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _upright(image: Image.Image) -> tuple[Image.Image, bool]:
    """(the image turned as its EXIF orientation says, whether by a quarter turn); as it is where it has no such tag
    or one that cannot be read."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        if orientation not in range(2, 9):
            return image, False
        return ImageOps.exif_transpose(image), orientation >= 5
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):  # a malformed EXIF block: shown as stored
        return image, False


def full_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) the image is shown at: as stored in its file, turned upright where ``open_image`` turned it,
    also where it decoded it smaller."""
    return image.info.get(FULL_SIZE, image.size)


# how an image reaches the model's square input: open_clip's ``resize_mode`` names
RESIZE_MODES = ("shortest", "squash")  # short side to size then a center crop (OpenAI's); both sides to size
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
# the settings weights may bring with them (open_clip's ``preprocess_cfg``), as ``Preprocess`` takes them
PREPROCESS_KEYS = ("mean", "std", "resize_mode", "interpolation")


def short_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side at ``size`` and the long one scaled as torchvision's Resize scales it
    (rounded down)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def resize_short_side(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    if min(image.size) == size:
        return image
    return image.resize(short_side_size(*image.size, size), INTERPOLATIONS[interpolation])


def center_crop(image: Image.Image, size: int, floor: bool = False) -> Image.Image:
    """The centre ``size`` x ``size``, its offset half the margin rounded as torchvision rounds it (half to even), or
    with ``floor`` rounded down, as transformers' CLIP image processor does (a margin of 3, 7, 11 ... pixels: one pixel
    apart)."""
    width, height = image.size
    if width < size or height < size:  # only after a resize to a smaller size; pad like torchvision
        padded = Image.new(image.mode, (max(width, size), max(height, size)))
        padded.paste(image, ((max(width, size) - width) // 2, (max(height, size) - height) // 2))
        image, (width, height) = padded, padded.size
    offset = (lambda margin: margin // 2) if floor else (lambda margin: int(round(margin / 2.0)))
    top, left = offset(height - size), offset(width - size)
    return image.crop((left, top, left + size, top + size))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W] (a quarter of the normalised tensor's memory)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def normalise(pixels: torch.Tensor, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """uint8 pixels [3, H, W] -> normalised float32 tensor: ``to_tensor``'s values bit for bit."""
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def to_tensor(image: Image.Image, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor [3, H, W]."""
    return normalise(to_pixels(image), mean, std)


class HeldPixels(Sequence):
    """Preprocessed images held as uint8 pixels and normalised as they are read: a fixed evaluation set in a quarter
    of the memory float32 tensors take (1,000 images at 224 pixels: 150 MB, not 600), with the same values. Reads as
    a list of tensors: ``held[i]`` one image, ``held[a:b]`` a list of them (``torch.stack(held[:])`` for all)."""

    def __init__(self, preprocess: "Preprocess"):
        self._mean, self._std = preprocess.mean, preprocess.std
        self._pixels: list[torch.Tensor] = []

    def append(self, pixels: torch.Tensor) -> None:
        if pixels.dtype != torch.uint8:
            raise TypeError(f"HeldPixels holds uint8 pixels, not {pixels.dtype}")
        self._pixels.append(pixels)

    def __len__(self) -> int:
        return len(self._pixels)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [normalise(pixels, self._mean, self._std) for pixels in self._pixels[index]]
        return normalise(self._pixels[index], self._mean, self._std)

    @property
    def nbytes(self) -> int:
        return sum(pixels.nbytes for pixels in self._pixels)


class Preprocess:
    """Evaluation transform: ``preprocess(pil_image) -> tensor [3, size, size]``.

    ``resize_mode`` and ``interpolation`` follow the weights (open_clip's ``preprocess_cfg``): OpenAI's short side and
    center crop, bicubic, unless they were trained otherwise (Apple's DFN models: "squash", the whole image resized
    to a square)."""

    def __init__(self, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode: str = "shortest",
                 interpolation: str = "bicubic"):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {resize_mode!r} is not built here; choose from {', '.join(RESIZE_MODES)}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r} is not built here; choose from "
                             f"{', '.join(INTERPOLATIONS)}")
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.resize_mode, self.interpolation = resize_mode, interpolation

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalise(self.pixels(image), self.mean, self.std)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The resized and cropped image as uint8 pixels [3, size, size], before normalisation (``HeldPixels``)."""
        if not isinstance(image, Image.Image):
            image = open_image(image)
        size = self.image_size
        if self.resize_mode == "squash":
            image = image.resize((size, size), INTERPOLATIONS[self.interpolation])
        else:
            image = center_crop(resize_short_side(image, size, self.interpolation), size)
        return to_pixels(image)

    @property
    def decode_size(self) -> int:
        """Both sides of a JPEG decoded for this transform keep at least this many pixels (``Decoding.min_size``):
        ``DECODE_GAP`` times the output's."""
        return DECODE_GAP * self.image_size

    @property
    def settings(self) -> dict:
        """Every ``PREPROCESS_KEYS`` setting, defaults included (what an export writes out)."""
        return {key: getattr(self, key) for key in PREPROCESS_KEYS}

    def __repr__(self) -> str:
        how = "squash to a square" if self.resize_mode == "squash" else "short side, center crop"
        return (f"Preprocess(image_size={self.image_size}, resize={self.interpolation} {how}, mean={self.mean}, "
                f"std={self.std})")


class NaFlexPreprocess:
    """SigLIP 2's NaFlex transform, as transformers' ``Siglip2ImageProcessor`` (its Pillow backend) computes it: the
    image resized (bilinear) at its own aspect ratio to the most whole patches that fit ``max_patches``, normalised,
    cut into patches (rows, then columns; each patch row by row, channels last) and padded to ``max_patches``.

    ``preprocess(pil_image)`` -> ``{"pixel_values": [max_patches, 3 * patch**2], "pixel_attention_mask":
    [max_patches], "spatial_shapes": [2]}``; ``torch.utils.data.default_collate`` (or ``naflex_batch``) stacks them
    into the batch a NaFlex model's ``encode_image`` takes. ``NaFlexPreprocess.for_model(model)`` reads the patch size,
    the position grid (transformers' default ``max_num_patches``, 256, for the base models) and the normalisation."""

    def __init__(self, patch_size: int = 16, max_patches: int = 256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        if patch_size < 1 or max_patches < 1:
            raise ValueError(f"patch_size and max_patches must be positive, got {patch_size} and {max_patches}")
        self.patch_size, self.max_patches = patch_size, max_patches
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def for_model(cls, model, max_patches: int | None = None) -> "NaFlexPreprocess":
        from .models import is_naflex

        vision = model.config["vision_cfg"]
        if not is_naflex(vision):
            raise ValueError("NaFlexPreprocess is for SigLIP 2's NaFlex models (a Siglip2Model folder); this model "
                             "takes square images: use the preprocess clipforge.load returns")
        grid = vision["image_size"] // vision["patch_size"]
        settings = getattr(model, "normalisation", None) or {}
        return cls(vision["patch_size"], max_patches or grid * grid, settings.get("mean", (0.5,) * 3),
                   settings.get("std", (0.5,) * 3))

    @property
    def image_size(self) -> int:
        """The side of the square image that fills ``max_patches`` (a NaFlex model's own grid, in pixels)."""
        return math.isqrt(self.max_patches) * self.patch_size

    @property
    def settings(self) -> dict:
        return {"patch_size": self.patch_size, "max_patches": self.max_patches, "mean": self.mean, "std": self.std}

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` in whole patches: one scale for both sides, the largest whose patches fit (found by
        bisection to 1e-5, as transformers finds it, so that the sizes agree at the boundaries)."""
        p = self.patch_size

        def sides(scale: float) -> tuple[int, int]:
            return tuple(max(p, math.ceil(side * scale / p) * p) for side in (height, width))

        low, high = 1e-6, 100.0
        while high - low >= 1e-5:
            middle = (low + high) / 2
            rows, cols = (side // p for side in sides(middle))
            low, high = (middle, high) if rows * cols <= self.max_patches else (low, middle)
        return sides(low)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        if not isinstance(image, Image.Image):
            image = open_image(image)
        image = image.convert("RGB")
        height, width = self.target_size(image.height, image.width)
        return self.patches(to_tensor(image.resize((width, height), Image.BILINEAR), self.mean, self.std))

    def patches(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised pixels [3, H, W] already at ``target_size`` -> the padded patches, mask and grid shape."""
        p = self.patch_size
        rows, cols = pixels.shape[1] // p, pixels.shape[2] // p
        patches = pixels.reshape(3, rows, p, cols, p).permute(1, 3, 2, 4, 0).reshape(rows * cols, 3 * p * p)
        padded = torch.zeros(self.max_patches, 3 * p * p)
        padded[:rows * cols] = patches
        mask = torch.zeros(self.max_patches, dtype=torch.int32)
        mask[:rows * cols] = 1
        return {"pixel_values": padded, "pixel_attention_mask": mask,
                "spatial_shapes": torch.tensor([rows, cols], dtype=torch.long)}

    def __repr__(self) -> str:
        return (f"NaFlexPreprocess(patch_size={self.patch_size}, max_patches={self.max_patches}, mean={self.mean}, "
                f"std={self.std})")


def naflex_batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``NaFlexPreprocess`` outputs stacked into one batch."""
    if not items:
        raise ValueError("naflex_batch needs at least one image")
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def image_batch(items: list, device=None, non_blocking: bool = False):
    """Preprocessed images as one batch on ``device``: image tensors stacked, or NaFlex inputs (``NaFlexPreprocess``'s
    dicts) stacked key by key; what ``encode_image`` takes either way."""
    if items and isinstance(items[0], dict):
        return {key: value.to(device, non_blocking=non_blocking) for key, value in naflex_batch(items).items()}
    return torch.stack(items).to(device, non_blocking=non_blocking)


def preprocess_for(model):
    """The evaluation transform a loaded model takes: ``Preprocess`` at its image size with its normalisation and
    resize, or for a SigLIP 2 NaFlex model ``NaFlexPreprocess`` (each image at its own aspect ratio, as transformers'
    processor gives it)."""
    from .models import is_naflex

    if is_naflex(getattr(model, "config", {})):
        return NaFlexPreprocess.for_model(model)
    return Preprocess(model.image_size, **(getattr(model, "normalisation", None) or {}))


class TrainTransform:
    """Training transform: RandomResizedCrop (scale 0.9-1.0 by default, as open_clip), then open_clip's optional
    colour augmentations (its ``aug_cfg`` without timm): with probability ``color_jitter_prob`` torchvision's
    ``ColorJitter(*color_jitter)`` (brightness, contrast, saturation, hue: ``color_jitter_image``), then with
    probability ``gray_scale_prob`` the grey image in three channels; then normalise. Every draw comes from the
    sample's generator, the crop's first, so a run without colour augmentation crops as before."""

    def __init__(self, image_size: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), mean=OPENAI_MEAN, std=OPENAI_STD,
                 rng: random.Random | None = None, color_jitter=None, color_jitter_prob: float = 0.0,
                 gray_scale_prob: float = 0.0):
        self.image_size = image_size
        self.scale, self.ratio = scale, ratio
        self.mean, self.std = tuple(mean), tuple(std)
        self.rng = rng or random.Random()
        self.color_jitter = check_color_jitter(color_jitter) if color_jitter is not None else None
        for name, p in (("color_jitter_prob", color_jitter_prob), ("gray_scale_prob", gray_scale_prob)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} {p}: a probability, from 0 to 1")
        if color_jitter_prob and self.color_jitter is None:
            raise ValueError(f"color_jitter_prob {color_jitter_prob} without color_jitter: give the four strengths "
                             "(brightness, contrast, saturation, hue), e.g. 0.4 0.4 0.4 0.1")
        self.color_jitter_prob, self.gray_scale_prob = color_jitter_prob, gray_scale_prob

    def augmentation(self) -> dict:
        """The random parts (crop, colour) as keyword arguments, for a transform that must draw the same (a
        distillation teacher's view at its own size and normalisation)."""
        return {"scale": self.scale, "ratio": self.ratio, "color_jitter": self.color_jitter,
                "color_jitter_prob": self.color_jitter_prob, "gray_scale_prob": self.gray_scale_prob}

    def crop_box(self, width: int, height: int, rng: random.Random | None = None) -> tuple[int, int, int, int]:
        rng = rng or self.rng
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = rng.randint(0, width - w)
                top = rng.randint(0, height - h)
                return left, top, left + w, top + h
        # no fit in 10 tries (a 3:2 photo at scale 0.9-1.0 never fits): torchvision's fallback, the center crop of
        # the whole image clamped to the ratio range, as open_clip's training transform takes
        w, h = width, height
        if width / height < min(self.ratio):
            h = int(round(width / min(self.ratio)))
        elif width / height > max(self.ratio):
            w = int(round(height * max(self.ratio)))
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """``rng``: the generator for this sample's crop (the data pipeline ties it to the sample's position).
        ``image`` may also be a path, bytes or file object, as for the evaluation transform."""
        if not isinstance(image, Image.Image):
            image = open_image(image)
        image = image.convert("RGB")
        box = self.crop_box(*image.size, rng=rng)
        # cropped first: resize(box=) would let pixels outside the box into the edge pixels' filter (open_clip's
        # crop, then resize, does not)
        image = image.crop(box).resize((self.image_size, self.image_size), Image.BICUBIC)
        rng = rng or self.rng
        if self.color_jitter_prob and rng.random() < self.color_jitter_prob:
            image = color_jitter_image(image, *jitter_draw(self.color_jitter, rng))
        if self.gray_scale_prob and rng.random() < self.gray_scale_prob:
            image = image.convert("L").convert("RGB")
        return to_tensor(image, self.mean, self.std)


def check_color_jitter(strengths) -> tuple[float, float, float, float]:
    """(brightness, contrast, saturation, hue) from one number (the first three; hue 0), three or four, as
    torchvision's ``ColorJitter`` reads them: each factor drawn from [max(0, 1 - s), 1 + s], the hue shift from
    [-hue, hue] with hue at most 0.5."""
    values = [float(strengths)] if isinstance(strengths, (int, float)) else [float(v) for v in strengths]
    if len(values) == 1:
        values *= 3
    if len(values) == 3:
        values.append(0.0)
    if len(values) != 4 or min(values) < 0 or values[3] > 0.5:
        raise ValueError(f"color_jitter {strengths}: brightness, contrast, saturation (each >= 0) and optionally hue "
                         "(0 to 0.5), e.g. 0.4 0.4 0.4 0.1")
    return tuple(values)


def jitter_draw(strengths, rng: random.Random) -> tuple[list[int], tuple[float, float, float, float]]:
    """One ``ColorJitter`` draw: the order of the four adjustments and their factors (a strength of 0: none)."""
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    brightness, contrast, saturation, hue = strengths
    factors = tuple(rng.uniform(max(0.0, 1 - s), 1 + s) if s else None for s in (brightness, contrast, saturation))
    return order, (*factors, rng.uniform(-hue, hue) if hue else None)


def color_jitter_image(image: Image.Image, order, factors) -> Image.Image:
    """``image`` with brightness, contrast and saturation scaled by ``factors[:3]`` and its hue turned by
    ``factors[3]`` (of a full turn), in ``order``, None factors skipped: the Pillow operations torchvision's
    ``ColorJitter`` applies to a PIL image, so its pixels are the same for the same draw."""
    from PIL import ImageEnhance

    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for i in order:
        if factors[i] is None:
            continue
        if i < 3:
            image = enhancers[i](image).enhance(factors[i])
        else:
            image = _shift_hue(image, factors[i])
    return image


def _shift_hue(image: Image.Image, turn: float) -> Image.Image:
    """The hue channel (0-255 in Pillow's HSV) moved by ``turn`` x 255, wrapping, as torchvision does on PIL images."""
    hue, saturation, value = image.convert("HSV").split()
    shifted = (np.asarray(hue, dtype=np.uint8) + np.uint8(int(turn * 255) % 256)).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(shifted, "L"), saturation, value)).convert(image.mode)


def image_transform(image_size: int, train: bool = False, **kwargs):
    return TrainTransform(image_size, **kwargs) if train else Preprocess(image_size, **kwargs)
