"""Hugging Face transformers' CLIP and SigLIP classes answered by clipforge: a script that does
``from clipforge.transformers_api import CLIPModel, CLIPProcessor`` (or ``SiglipModel``, ``AutoModel``,
``AutoProcessor``, ``pipeline``) in place of ``from transformers import ...`` gets the same token ids, pixels and
features (``get_image_features`` / ``get_text_features``, ``model(...)``'s logits and loss) from the same folders and
hub repos, without transformers installed.

``get_*_features`` return the features as a tensor, as transformers 4 did, that also answers transformers 5's
``.pooler_output`` (the same values), so scripts written for either run. ``CLIPVisionModel`` / ``CLIPTextModel`` and
``SiglipVisionModel`` / ``SiglipTextModel`` give one tower's hidden states and attention maps (what vision-language
models read); ``interpolate_pos_encoding`` takes images of other sizes; ``Siglip2Model`` (``Siglip2VisionModel``)
with its ``Siglip2ImageProcessor`` takes SigLIP 2's NaFlex patches. What is not built here is refused by name:
SentencePiece tokenizers other than SigLIP's without a ``tokenizer.json`` (``clipforge.load`` reads those), for
one.

The modules, as transformers splits its own: ``loading`` (folders, hub repos, ``from_pretrained``'s keywords),
``configuration``, ``tokenization``, ``image_processing``, ``processing``, ``modeling`` (the whole models),
``towers`` (one tower), ``outputs`` and ``pipelines``."""
from __future__ import annotations

from .outputs import (Features, ModelOutput, CLIPOutput, BatchEncoding, SiglipOutput, BaseModelOutputWithPooling,
                      CLIPVisionModelOutput, CLIPTextModelOutput)
from .configuration import AutoConfig, CLIPTextConfig, CLIPVisionConfig
from .tokenization import CLIPTokenizer
from .image_processing import CLIPImageProcessor, CLIPImageProcessorPil, Siglip2ImageProcessor, Siglip2ImageProcessorPil
from .processing import CLIPProcessor
from .modeling import CLIPModel, Projection, SiglipModel, Siglip2Model, AutoModel
from .towers import (CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel, CLIPTextModel,
                     CLIPTextModelWithProjection, SiglipTextModel, Siglip2VisionModel, Siglip2TextModel)
from .pipelines import ZeroShotImageClassificationPipeline, pipeline

# transformers' other names for the classes above, for the CLIP and SigLIP folders and repos these read
AutoProcessor, AutoTokenizer, AutoImageProcessor = CLIPProcessor, CLIPTokenizer, CLIPImageProcessor
CLIPConfig = SiglipConfig = AutoConfig
SiglipTextConfig, SiglipVisionConfig = CLIPTextConfig, CLIPVisionConfig
AutoModelForZeroShotImageClassification = AutoModel
CLIPFeatureExtractor = CLIPImageProcessor  # transformers 4's older name
CLIPTokenizerFast, CLIPImageProcessorFast = CLIPTokenizer, CLIPImageProcessor
SiglipProcessor, SiglipImageProcessor, SiglipImageProcessorFast = CLIPProcessor, CLIPImageProcessor, CLIPImageProcessor
Siglip2Processor, Siglip2ImageProcessorFast = CLIPProcessor, Siglip2ImageProcessor
SiglipTokenizer = GemmaTokenizerFast = CLIPTokenizer

__all__ = [
    "AutoConfig", "AutoImageProcessor", "AutoModel", "AutoModelForZeroShotImageClassification", "AutoProcessor",
    "AutoTokenizer", "BaseModelOutputWithPooling", "BatchEncoding", "CLIPConfig", "CLIPFeatureExtractor",
    "CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "CLIPModel", "CLIPOutput",
    "CLIPProcessor", "CLIPTextConfig", "CLIPTextModel", "CLIPTextModelOutput", "CLIPTextModelWithProjection",
    "CLIPTokenizer", "CLIPTokenizerFast", "CLIPVisionConfig", "CLIPVisionModel", "CLIPVisionModelOutput",
    "CLIPVisionModelWithProjection", "Features", "GemmaTokenizerFast", "ModelOutput", "Projection",
    "Siglip2ImageProcessor", "Siglip2ImageProcessorFast", "Siglip2ImageProcessorPil", "Siglip2Model",
    "Siglip2Processor", "Siglip2TextModel", "Siglip2VisionModel", "SiglipConfig", "SiglipImageProcessor",
    "SiglipImageProcessorFast", "SiglipModel", "SiglipOutput", "SiglipProcessor", "SiglipTextConfig",
    "SiglipTextModel", "SiglipTokenizer", "SiglipVisionConfig", "SiglipVisionModel",
    "ZeroShotImageClassificationPipeline", "pipeline",
]
