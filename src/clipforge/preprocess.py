"""Image preprocessing with Pillow and torch only (no torchvision).

Evaluation follows OpenAI CLIP: bicubic resize of the short side, center crop, RGB, normalise with CLIP's mean/std,
with torchvision's rounding rules so pixels match open_clip's ``preprocess``. Training adds a RandomResizedCrop.
"""
from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Decoded images larger than this are refused (decompression bombs); Pillow's own default is about 89 Mpx.
MAX_IMAGE_PIXELS = 64_000_000


class BadImageError(ValueError):
    """An image that cannot be decoded, or that is too large; the message names the source."""


def open_image(source, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open a path, bytes or file object as a fully decoded PIL image, with a clear error on bad input."""
    label = name or (str(source) if isinstance(source, (str, Path)) else "image")
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        if image.width * image.height > max_pixels:
            raise BadImageError(f"{label}: {image.width}x{image.height} pixels exceeds the limit of {max_pixels}")
        image.load()
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"{label}: no such file") from None
    except UnidentifiedImageError:  # its message names the file object Pillow was given, not the image
        raise BadImageError(f"{label}: not a readable image (no image format recognised)") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise BadImageError(f"{label}: not a readable image ({exc})") from None
    return image


# how an image reaches the model's square input: open_clip's ``resize_mode`` names
RESIZE_MODES = ("shortest", "squash")  # short side to size then a center crop (OpenAI's); both sides to size
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
# the settings weights may bring with them (open_clip's ``preprocess_cfg``), as ``Preprocess`` takes them
PREPROCESS_KEYS = ("mean", "std", "resize_mode", "interpolation")


def resize_short_side(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, INTERPOLATIONS[interpolation])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width < size or height < size:  # only after a resize to a smaller size; pad like torchvision
        padded = Image.new(image.mode, (max(width, size), max(height, size)))
        padded.paste(image, ((max(width, size) - width) // 2, (max(height, size) - height) // 2))
        image, (width, height) = padded, padded.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor [3, H, W]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean) / std


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
        if not isinstance(image, Image.Image):
            image = open_image(image)
        size = self.image_size
        if self.resize_mode == "squash":
            image = image.resize((size, size), INTERPOLATIONS[self.interpolation])
        else:
            image = center_crop(resize_short_side(image, size, self.interpolation), size)
        return to_tensor(image, self.mean, self.std)

    @property
    def settings(self) -> dict:
        """Every ``PREPROCESS_KEYS`` setting, defaults included (what an export writes out)."""
        return {key: getattr(self, key) for key in PREPROCESS_KEYS}

    def __repr__(self) -> str:
        how = "squash to a square" if self.resize_mode == "squash" else "short side, center crop"
        return (f"Preprocess(image_size={self.image_size}, resize={self.interpolation} {how}, mean={self.mean}, "
                f"std={self.std})")


class TrainTransform:
    """Training transform: RandomResizedCrop (scale 0.9-1.0 by default, as open_clip) then normalise."""

    def __init__(self, image_size: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), mean=OPENAI_MEAN, std=OPENAI_STD,
                 rng: random.Random | None = None):
        self.image_size = image_size
        self.scale, self.ratio = scale, ratio
        self.mean, self.std = tuple(mean), tuple(std)
        self.rng = rng or random.Random()

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
        """``rng``: the generator for this sample's crop (the data pipeline ties it to the sample's position)."""
        image = image.convert("RGB")
        box = self.crop_box(*image.size, rng=rng)
        # cropped first: resize(box=) would let pixels outside the box into the edge pixels' filter (open_clip's
        # crop, then resize, does not)
        image = image.crop(box).resize((self.image_size, self.image_size), Image.BICUBIC)
        return to_tensor(image, self.mean, self.std)


def image_transform(image_size: int, train: bool = False, **kwargs):
    return TrainTransform(image_size, **kwargs) if train else Preprocess(image_size, **kwargs)
