"""``CLIPProcessor``: a folder's tokenizer and image processor called as one."""
from __future__ import annotations

import os

from .image_processing import CLIPImageProcessor, Siglip2ImageProcessor
from .outputs import BatchEncoding
from .tokenization import CLIPTokenizer


class CLIPProcessor:
    """transformers' ``CLIPProcessor``: ``processor(text=..., images=..., return_tensors="pt", padding=True)`` gives
    ``input_ids``, ``attention_mask`` and ``pixel_values`` in one batch. Text and images may also be given by
    position in either order (transformers 4 took text first, 5 takes images first)."""

    def __init__(self, image_processor: CLIPImageProcessor | None = None, tokenizer: CLIPTokenizer | None = None):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "CLIPProcessor":
        """The folder's (or hub repo's) image processor and tokenizer; transformers' hub keywords as
        ``CLIPModel.from_pretrained`` takes them."""
        return cls(CLIPImageProcessor.from_pretrained(name_or_path, **kwargs),
                   CLIPTokenizer.from_pretrained(name_or_path, **kwargs))

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> list[str]:
        """The image processor's and the tokenizer's files in ``folder`` (what ``from_pretrained`` and transformers'
        ``CLIPProcessor`` read), each naming the processor class (``processor_class``, as transformers writes it:
        its ``AutoProcessor`` reads a folder without a model's ``config.json`` by it, else gives the tokenizer
        alone); their paths."""
        from ..files import read_json, write_json

        if kwargs:
            raise TypeError(f"CLIPProcessor.save_pretrained: {', '.join(sorted(kwargs))} not built here")
        written = [self.image_processor.save_pretrained(folder), *self.tokenizer.save_pretrained(folder)]
        image_processor_file = written[0]
        tokenizer_file = next(f for f in written if str(f).endswith("tokenizer_config.json"))
        image_type = read_json(image_processor_file)["image_processor_type"]
        processor_class = image_type.removesuffix("Fast").removesuffix("Pil").replace("ImageProcessor", "Processor")
        for path in (image_processor_file, tokenizer_file):
            write_json(path, {**read_json(path), "processor_class": processor_class})
        return written

    def __call__(self, *args, text=None, images=None, return_tensors: str | None = None, **kwargs) -> BatchEncoding:
        for value in args:
            is_text = isinstance(value, str) or (isinstance(value, (list, tuple)) and value
                                                 and all(isinstance(v, str) for v in value))
            if is_text and text is None:
                text = value
            elif not is_text and images is None:
                images = value
            else:
                raise TypeError("CLIPProcessor takes one text batch and one image batch")
        if text is None and images is None:
            raise ValueError("give text=..., images=..., or both")
        out = BatchEncoding()
        image_options = {k: kwargs.pop(k) for k in ("max_num_patches",) if k in kwargs}  # Siglip2's, per call
        if text is None and kwargs:
            raise TypeError(f"CLIPProcessor: {', '.join(sorted(kwargs))} apply to text, and none was given")
        if isinstance(self.image_processor, Siglip2ImageProcessor):  # Siglip2Processor's text defaults
            kwargs = {"padding": "max_length", "truncation": True, "max_length": 64, **kwargs}
        if text is not None:
            out.update(self.tokenizer(text, return_tensors=return_tensors, **kwargs))
        if images is not None:
            out.update(self.image_processor(images, return_tensors=return_tensors, **image_options))
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(rows, skip_special_tokens)
