"""Image processors: ``CLIPImageProcessor`` (transformers 5's pixels: the 8-bit image resized by PyTorch),
``CLIPImageProcessorPil`` (Pillow), ``Siglip2ImageProcessor`` (SigLIP 2's NaFlex patches) and its Pillow twin."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..preprocess import (INTERPOLATIONS, OPENAI_MEAN, OPENAI_STD, Preprocess, center_crop, resize_short_side,
                          short_side_size, to_tensor)
from .loading import _checkpoint_processor_files, _folder, _hub_options
from .outputs import BatchEncoding


class CLIPImageProcessor:
    """transformers' ``CLIPImageProcessor``: transparency composited on white, the short side resized (bicubic, or
    as the folder's ``resample`` says), the centre cropped as transformers crops it (half the margin rounded down,
    where open_clip's crop, and ``clipforge.load``'s, rounds half to even: a pixel apart for some sizes), or the whole
    image squashed; scaled and normalised with the folder's mean and std. The 8-bit image is resized by PyTorch's
    antialiased interpolation, as transformers 5 (torchvision) resizes it: its pixels, exactly, faster (1.5-1.7x here).
    ``CLIPImageProcessorPil`` resizes with Pillow instead: transformers' class of that name (4.x's default)."""

    pillow = False
    siglip = False  # read from a SiglipImageProcessor's settings: saved as one (SigLIP's own class, which squashes)

    def __init__(self, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode: str = "shortest",
                 interpolation: str = "bicubic"):
        self.settings = Preprocess(image_size, mean, std, resize_mode, interpolation)  # checked there

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "CLIPImageProcessor":
        from ..checkpoint.hf import IMAGE_PROCESSOR_FILES, processor_preprocess, read_image_processor

        with _hub_options(f"{cls.__name__}.from_pretrained", kwargs):
            with _checkpoint_processor_files(name_or_path, kwargs.get("subfolder"), IMAGE_PROCESSOR_FILES) as converted:
                config = None if converted is None else read_image_processor(converted)  # as convert --to hf writes it
            if config is None:
                folder = _folder(name_or_path, IMAGE_PROCESSOR_FILES, kwargs.get("subfolder"))
                config = read_image_processor(folder)
        if not config:
            raise FileNotFoundError(f"{name_or_path}: no image processor ({' or '.join(IMAGE_PROCESSOR_FILES)})")
        kind = config.get("image_processor_type", "CLIPImageProcessor")
        if kind.startswith("Siglip2ImageProcessor"):  # SigLIP 2's NaFlex patches (AutoImageProcessor's answer)
            return (Siglip2ImageProcessorPil if cls.pillow else Siglip2ImageProcessor).from_config(config)
        if not kind.startswith(("CLIPImageProcessor", "SiglipImageProcessor")):
            raise ValueError(f"{name_or_path}: a {kind}, not CLIP's or SigLIP's image processor (clipforge.load "
                             "reads the model with its own preprocessing)")
        if config.get("resample", 3) not in (2, 3):
            raise ValueError(f"{name_or_path}: resample {config['resample']} (PIL's code): bilinear (2) and bicubic "
                             "(3) are built here")
        crop, size = config.get("crop_size"), config.get("size")
        size = crop if config.get("do_center_crop", True) and crop else size
        side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
        if not isinstance(side, int):
            raise ValueError(f"{name_or_path}: its image processor gives no image size (size / crop_size)")
        processor = cls(side, **processor_preprocess(config))
        processor.siglip = kind.startswith("SiglipImageProcessor")
        return processor

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> str:
        return _save_image_processor(self.settings, folder, kwargs,
                                     as_siglip=self.siglip and self.settings.resize_mode == "squash")

    def __call__(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchEncoding:
        """``pixel_values`` [N, 3, size, size] from a PIL image, an [H, W, 3] uint8 array or a [3, H, W] uint8
        tensor, or a list of them."""
        pixels = torch.stack([self._pixels(image) for image in _rgb_images(images, return_tensors, kwargs)])
        return BatchEncoding(pixel_values=pixels.numpy() if return_tensors == "np" else pixels)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        p = self.settings
        size, squash = p.image_size, p.resize_mode == "squash"
        if self.pillow:
            image = image.resize((size, size), INTERPOLATIONS[p.interpolation]) if squash else \
                center_crop(resize_short_side(image, size, p.interpolation), size, floor=True)
            return to_tensor(image, p.mean, p.std)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 [3, H, W]
        height, width = pixels.shape[1:]
        target = (size, size) if squash else short_side_size(width, height, size)[::-1]  # (height, width)
        if target != (height, width):  # on the 8-bit image, as torchvision resizes one
            pixels = F.interpolate(pixels[None], size=target, mode=p.interpolation, antialias=True,
                                   align_corners=False)[0]
        top, left = (target[0] - size) // 2, (target[1] - size) // 2
        pixels = pixels[:, top:top + size, left:left + size].float() / 255
        return (pixels - torch.tensor(p.mean).view(3, 1, 1)) / torch.tensor(p.std).view(3, 1, 1)


class CLIPImageProcessorPil(CLIPImageProcessor):
    """``CLIPImageProcessor`` resized by Pillow: transformers' ``CLIPImageProcessorPil`` pixels (transformers 4's
    ``CLIPImageProcessor``), exactly."""

    pillow = True


class Siglip2ImageProcessor:
    """transformers' ``Siglip2ImageProcessor`` (SigLIP 2's NaFlex models): each image resized (bilinear) at its own
    aspect ratio to the most whole patches that fit ``max_num_patches``, normalised, cut into patches and padded:
    ``pixel_values`` [N, max_num_patches, 3 * patch**2], ``pixel_attention_mask`` [N, max_num_patches],
    ``spatial_shapes`` [N, 2]. The 8-bit image is resized by PyTorch's antialiased interpolation, as transformers 5
    (torchvision) resizes it; ``Siglip2ImageProcessorPil`` resizes with Pillow (``preprocess.NaFlexPreprocess``), as
    transformers' class of that name and 4.x's default do."""

    pillow = False

    def __init__(self, patch_size: int = 16, max_num_patches: int = 256, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5)):
        from ..preprocess import NaFlexPreprocess

        self.settings = NaFlexPreprocess(patch_size, max_num_patches, image_mean, image_std)  # checked there

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs):
        processor = CLIPImageProcessor.from_pretrained(name_or_path, **kwargs)
        if not isinstance(processor, Siglip2ImageProcessor):
            raise ValueError(f"{name_or_path}: its image processor is not SigLIP 2's (Siglip2ImageProcessor)")
        return processor if processor.pillow == cls.pillow else cls(*processor._arguments())

    @classmethod
    def from_config(cls, config: dict) -> "Siglip2ImageProcessor":
        if config.get("resample", 2) != 2 or not config.get("do_resize", True):
            raise ValueError("a Siglip2ImageProcessor that does not resize bilinearly is not built here")
        return cls(config.get("patch_size", 16), config.get("max_num_patches", 256),
                   config.get("image_mean", (0.5,) * 3), config.get("image_std", (0.5,) * 3))

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> str:
        return _save_image_processor(self.settings, folder, kwargs)

    def _arguments(self) -> tuple:
        p = self.settings
        return p.patch_size, p.max_patches, p.mean, p.std

    @property
    def patch_size(self) -> int:
        return self.settings.patch_size

    @property
    def max_num_patches(self) -> int:
        return self.settings.max_patches

    def __call__(self, images, return_tensors: str | None = "pt", max_num_patches: int | None = None,
                 **kwargs) -> BatchEncoding:
        """A PIL image, an [H, W, 3] uint8 array or a [3, H, W] uint8 tensor, or a list of them; ``max_num_patches``
        for this call (more detail: up to the model's position grid, which is resized to each image's)."""
        from ..preprocess import NaFlexPreprocess, naflex_batch

        batch = _rgb_images(images, return_tensors, kwargs)
        settings = self.settings
        if max_num_patches is not None:
            settings = NaFlexPreprocess(settings.patch_size, max_num_patches, settings.mean, settings.std)
        out = naflex_batch([self._patches(settings, image) for image in batch])
        return BatchEncoding({k: v.numpy() if return_tensors == "np" else v for k, v in out.items()})

    def _patches(self, settings, image: Image.Image) -> dict:
        if self.pillow:
            return settings(image)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 [3, H, W]
        target = settings.target_size(*pixels.shape[1:])
        if target != tuple(pixels.shape[1:]):  # on the 8-bit image, as torchvision resizes one
            pixels = F.interpolate(pixels[None], size=target, mode="bilinear", antialias=True, align_corners=False)[0]
        return settings.patches((pixels.float() / 255 - torch.tensor(settings.mean).view(3, 1, 1))
                                / torch.tensor(settings.std).view(3, 1, 1))


class Siglip2ImageProcessorPil(Siglip2ImageProcessor):
    """``Siglip2ImageProcessor`` resized by Pillow: transformers' ``Siglip2ImageProcessorPil`` pixels."""

    pillow = True


def _save_image_processor(preprocess, folder, options: dict, as_siglip: bool = False) -> str:
    """``preprocessor_config.json`` in ``folder``, which transformers and ``from_pretrained`` read back as the same
    transform (``checkpoint.hf.image_processor_settings``; ``as_siglip``: a squash as SigLIP's own
    ``SiglipImageProcessor``, whose processor transformers' ``AutoProcessor`` then builds); its path."""
    from ..checkpoint.hf import image_processor_settings
    from ..files import write_json

    if options:
        raise TypeError(f"save_pretrained: {', '.join(sorted(options))} not built here")
    path = Path(folder) / "preprocessor_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = image_processor_settings(preprocess)
    if as_siglip:  # SigLIP's class squashes, and has no crop
        settings = {k: v for k, v in settings.items() if k not in ("do_center_crop", "crop_size")}
        settings["image_processor_type"] = "SiglipImageProcessor"
    write_json(path, settings)
    return str(path)


def _rgb_images(images, return_tensors: str | None, unknown: dict) -> list[Image.Image]:
    """An image processor's input (a PIL image, an [H, W, 3] uint8 array or a [3, H, W] uint8 tensor, or a list of
    them) as RGB PIL images; its options checked."""
    if unknown:
        raise TypeError(f"image processor: {', '.join(sorted(unknown))} not built here")
    if return_tensors not in (None, "pt", "np"):
        raise ValueError(f"return_tensors={return_tensors!r}: 'pt' and 'np' are built here")
    batch = images if isinstance(images, (list, tuple)) else [images]
    if not batch:
        raise ValueError("no images given")
    return [_rgb(_as_pil(image)) for image in batch]


def _rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited on white (as transformers' processors convert; Pillow's convert drops it)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if torch.is_tensor(image):
        if image.ndim != 3 or image.shape[0] not in (1, 3) or image.dtype != torch.uint8:
            raise ValueError(f"an image tensor must be [3, H, W] (or [1, H, W]) uint8; got {tuple(image.shape)} "
                             f"{image.dtype}")
        image = image.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"an image array must be [H, W, 3] or [H, W] uint8; got {image.shape} {image.dtype}")
        return Image.fromarray(image)
    raise TypeError(f"expected a PIL image, a uint8 array or tensor; got {type(image).__name__}")
