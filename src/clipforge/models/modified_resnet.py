"""CLIP's modified ResNet: a 3-conv stem with average pooling, anti-aliased strided bottlenecks (average pool
before the stride instead of a strided conv) and a single attention-pooling layer as the head."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import check_image_batch
from .intermediates import stage_intermediates


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean of the feature map, as the only query, attends over every position."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        batch, length, width = x.shape
        head_dim = width // self.heads
        # Only the pooled (first) token's output is used, so only its query is computed.
        q = self.q_proj(x[:, :1]).view(batch, 1, self.heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(out.transpose(1, 2).reshape(batch, width))


class ModifiedResNet(nn.Module):
    def __init__(self, layers: list[int], output_dim: int, heads: int, image_size: int = 224, width: int = 64):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ModifiedResNet takes 4 stage depths, got {layers}")
        if image_size % 32:
            raise ValueError(f"ModifiedResNet needs image_size divisible by 32, got {image_size}")
        self.image_size = image_size
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)
        self.init_parameters()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_parameters(self) -> None:
        std = self.attnpool.c_proj.in_features ** -0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for name, param in stage.named_parameters():
                if name.endswith("bn3.weight"):  # each residual branch starts as identity
                    nn.init.zeros_(param)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.forward_grid(images))

    def forward_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map ``[N, width * 32, image_size / 32, image_size / 32]``, before attention pooling."""
        check_image_batch(images, self.image_size)
        # Channels-last activations take oneDNN's / cuDNN's NHWC convolution kernels: ~1.25x faster RN50 inference
        # on 2 AVX2 cores, same result to ~1e-8. The layout propagates through every conv that follows.
        x = images.to(self.conv1.weight.dtype).contiguous(memory_format=torch.channels_last)
        for stage in self._stages():
            x = stage(x)
        return x

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def _stages(self) -> list:
        """The stem and the four stages, in order: the five feature maps ``forward_intermediates`` counts."""
        return [self._stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_intermediates(self, images: torch.Tensor, indices=None, stop_early: bool = False,
                              normalize_intermediates: bool = False, intermediates_only: bool = False,
                              output_fmt: str = "NCHW", output_extra_tokens: bool = False) -> dict:
        """open_clip's ``forward_intermediates`` for this tower: ``{"image_intermediates": the feature maps of the
        stem and stages ``indices`` names (5 in all: None for all, n for the last n, a list for those),
        "image_features": the embedding (unless ``intermediates_only``)}``. A ResNet has no final norm nor extra
        tokens (those flags change nothing, as in open_clip); ``stop_early`` runs no stage after the last one asked
        for (before the last stage only with ``intermediates_only``: the pooling needs the last stage's map)."""
        check_image_batch(images, self.image_size)
        x = images.to(self.conv1.weight.dtype).contiguous(memory_format=torch.channels_last)
        return stage_intermediates(x, self._stages(), self.attnpool, indices, stop_early, intermediates_only,
                                   output_fmt)
