"""Common corruptions (Hendrycks & Dietterich 2019, CIFAR-10-C) at five severities, on numpy, Pillow and torch.

Applied to a decoded image at its own resolution, before preprocessing. Deterministic: the random draws of image
``index`` under ``seed`` are the same at every severity (so severities differ only in strength) and on every run.
The severity parameters are those of the CIFAR-10-C generation code as published for 32 x 32 images; sizes that
scale with the image (motion and snow streaks, elastic displacements) are scaled from 32 px to the image's size.
Two are re-spaced so that a higher severity always moves the image further from the original (mean absolute pixel
difference over CIFAR-10 test images; docs/BENCHMARKS.md has the measurements): at 32 px, CIFAR-10-C's glass blur
smooths away its own pixel shuffling at severity 3 and 5, and its elastic transform trades a shrinking affine warp
for a growing but finer displacement field, so its distance falls with severity. Here glass blur keeps CIFAR-10-C's
strongest blur (sigma 0.4) and grows the shuffling (iterations, reach), and the elastic transform grows both parts.

Not available: ``frost`` blends in photographs of frost that ship with the original code (a download), so it is
left out; every other corruption of the 15 is here.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SEVERITIES = (1, 2, 3, 4, 5)
UNAVAILABLE = {"frost": "blends in photographs of frost that come with the original code (a download)"}


# ------------------------------------------------------------------------------------------------------ helpers

def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Each channel of ``x`` [H, W, C] convolved with ``kernel`` [k, k] (reflected borders)."""
    k = kernel.shape[0]
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[:, None].float()
    pad = k // 2
    t = F.pad(t, (pad, pad, pad, pad), mode="reflect" if pad < min(x.shape[:2]) else "replicate")
    weight = torch.from_numpy(np.ascontiguousarray(kernel[::-1, ::-1]))[None, None].float()
    return F.conv2d(t, weight)[:, 0].numpy().transpose(1, 2, 0)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(4 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = np.outer(g, g)
    return kernel / kernel.sum()


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    squeeze = x.ndim == 2
    out = _convolve(x[..., None] if squeeze else x, _gaussian_kernel(sigma))
    return out[..., 0] if squeeze else out


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    size = 8 if radius <= 8 else int(math.ceil(radius))
    t = np.arange(-size, size + 1)
    xx, yy = np.meshgrid(t, t)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    blur = _gaussian_kernel(alias_blur)
    disk = _convolve(disk[..., None], blur)[..., 0]
    keep = np.argwhere(disk > 1e-6 * disk.max())
    lo, hi = keep.min(0), keep.max(0)
    half = max(size - lo.min(), hi.max() - size)  # a centred square around the support
    disk = disk[size - half:size + half + 1, size - half:size + half + 1]
    return disk / disk.sum()


def _motion_kernel(radius: int, sigma: float, angle: float) -> np.ndarray:
    """A one-sided line of Gaussian weights, ``radius`` long at ``angle`` degrees (ImageMagick's motion blur)."""
    size = 2 * radius + 1
    kernel = np.zeros((size, size))
    direction = np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
    for step in range(radius + 1):
        x, y = radius + step * direction[0], radius + step * direction[1]
        weight = math.exp(-step ** 2 / (2 * sigma ** 2))
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):  # bilinear splat
            share = (1 - abs(x - (x0 + dx))) * (1 - abs(y - (y0 + dy)))
            if 0 <= x0 + dx < size and 0 <= y0 + dy < size and share > 0:
                kernel[y0 + dy, x0 + dx] += weight * share
    return kernel / kernel.sum()


def _clipped_zoom(x: np.ndarray, zoom: float) -> np.ndarray:
    """The centre of ``x`` [H, W, C] (or [H, W]) enlarged ``zoom`` times, cropped back to H x W."""
    h, w = x.shape[:2]
    ch, cw = int(math.ceil(h / zoom)), int(math.ceil(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[top:top + ch, left:left + cw]
    t = torch.from_numpy(np.ascontiguousarray(crop if crop.ndim == 3 else crop[..., None])).permute(2, 0, 1)[None]
    big = F.interpolate(t.float(), size=(int(round(ch * zoom)), int(round(cw * zoom))), mode="bicubic",
                        align_corners=False)[0].permute(1, 2, 0).numpy()
    top, left = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
    out = big[top:top + h, left:left + w]
    return out if x.ndim == 3 else out[..., 0]


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square noise on a ``size`` x ``size`` torus (``size`` a power of two), values in [0, 1]; the noise
    added at each halving of the step shrinks by ``decay`` (smaller decay: rougher fog)."""
    grid = np.zeros((size, size))
    step, scale = size, 1.0
    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        right, below = np.roll(corners, -1, axis=1), np.roll(corners, -1, axis=0)
        centres = (corners + right + below + np.roll(right, -1, axis=0)) / 4
        centres = centres + scale * rng.uniform(-1, 1, centres.shape)
        grid[half:size:step, half:size:step] = centres
        grid[0:size:step, half:size:step] = ((corners + right + centres + np.roll(centres, 1, axis=0)) / 4
                                             + scale * rng.uniform(-1, 1, corners.shape))
        grid[half:size:step, 0:size:step] = ((corners + below + centres + np.roll(centres, 1, axis=1)) / 4
                                             + scale * rng.uniform(-1, 1, corners.shape))
        step, scale = half, scale / decay
    grid -= grid.min()
    return grid / max(grid.max(), 1e-12)


def _rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    c = v - x.min(-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0)
    safe = np.maximum(c, 1e-12)
    h = np.where(v == r, ((g - b) / safe) % 6, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return np.stack([np.where(c > 0, h / 6, 0), s, v], -1)


def _hsv_to_rgb(x: np.ndarray) -> np.ndarray:
    h, s, v = x[..., 0] * 6, x[..., 1], x[..., 2]
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.stack([np.choose(i, [c[k] for c in choices]) for k in range(3)], -1)


def _pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))


# -------------------------------------------------------------------------------------------------- corruptions
# Each takes an image as float32 [H, W, 3] in [0, 1], a severity 1..5 and a generator; returns the same shape.

def gaussian_noise(x, severity, rng):
    c = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    return x + rng.standard_normal(x.shape) * c


def shot_noise(x, severity, rng):
    c = (500, 250, 100, 75, 50)[severity - 1]
    return rng.poisson(x * c) / c


def impulse_noise(x, severity, rng):
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    u, salt = rng.uniform(size=x.shape), rng.uniform(size=x.shape) < 0.5
    return np.where(u < amount, salt.astype(x.dtype), x)


def defocus_blur(x, severity, rng):
    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))[severity - 1]
    return _convolve(x, _disk_kernel(radius, alias))


# (sigma, shuffle reach, iterations) per severity: here, and as CIFAR-10-C published them (for comparison:
# benchmarks/corruption_distances.py measures both)
GLASS_BLUR = ((0.4, 1, 1), (0.4, 1, 2), (0.4, 1, 3), (0.4, 2, 2), (0.4, 2, 3))
CIFAR10C_GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
# (displacement strength, its smoothness, affine shift) per severity, as fractions of the image size
ELASTIC = ((0.05, 0.2, 0.03), (0.08, 0.06, 0.04), (0.1, 0.04, 0.05), (0.1, 0.03, 0.06), (0.12, 0.03, 0.08))
CIFAR10C_ELASTIC = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))


def glass_blur(x, severity, rng, table=GLASS_BLUR):
    sigma, delta, iterations = table[severity - 1]
    x = _gaussian_blur(x, sigma)
    h, w = x.shape[:2]
    shifts = rng.integers(0, 1 << 30, size=(max(t[2] for t in table), h, w, 2))  # the same draws at every severity
    for it in range(iterations):
        for row in range(h - delta, delta, -1):
            for col in range(w - delta, delta, -1):
                dy, dx = shifts[it, row, col] % (2 * delta) - delta  # in -delta .. delta - 1, as CIFAR-10-C
                r2, c2 = row + dy, col + dx
                x[row, col], x[r2, c2] = x[r2, c2].copy(), x[row, col].copy()
    return _gaussian_blur(x, sigma)


def motion_blur(x, severity, rng):
    radius, sigma = ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3))[severity - 1]
    radius = max(1, round(radius * min(x.shape[:2]) / 32))
    return _convolve(x, _motion_kernel(radius, sigma * min(x.shape[:2]) / 32, rng.uniform(-45, 45)))


def zoom_blur(x, severity, rng):
    top = (1.06, 1.11, 1.16, 1.21, 1.26)[severity - 1]
    zooms = np.arange(1, top, 0.01)
    out = x.copy()
    for zoom in zooms:
        out += _clipped_zoom(x, zoom)
    return out / (len(zooms) + 1)


def snow(x, severity, rng):
    loc, scale, zoom, threshold, radius, sigma, blend = (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))[severity - 1]
    h, w = x.shape[:2]
    layer = loc + scale * rng.standard_normal((h, w))
    layer = _clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    factor = min(h, w) / 32
    kernel = _motion_kernel(max(1, round(radius * factor)), sigma * factor, rng.uniform(-135, -45))
    layer = np.clip(_convolve(layer[..., None], kernel), 0, 1)
    gray = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
    x = blend * x + (1 - blend) * np.maximum(x, gray * 1.5 + 0.5)
    return x + layer + np.rot90(layer, 2)


def fog(x, severity, rng):
    strength, decay = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))[severity - 1]
    h, w = x.shape[:2]
    size = 1 << max(5, int(math.ceil(math.log2(max(h, w)))))
    top = x.max()
    x = x + strength * _plasma_fractal(size, decay, rng)[:h, :w, None]
    return x * top / (top + strength)


def brightness(x, severity, rng):
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    hsv = _rgb_to_hsv(np.clip(x, 0, 1))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _hsv_to_rgb(hsv)


def contrast(x, severity, rng):
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


def elastic_transform(x, severity, rng, table=ELASTIC):
    h, w = x.shape[:2]
    size = min(h, w)
    alpha, sigma, affine = table[severity - 1]
    alpha, sigma, affine = alpha * size, sigma * size, affine * size
    # a random affine map: three points moved by up to ``affine`` pixels
    points = rng.uniform(-1, 1, (3, 2))
    centre, square = np.array([w / 2, h / 2]), size // 3
    source = np.array([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    target = source + points * affine
    matrix = np.linalg.solve(np.c_[target, np.ones(3)], source).T  # output -> input, as PIL's AFFINE wants
    image = _pil(x).transform((w, h), Image.AFFINE, tuple(matrix.ravel()), resample=Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / 255
    # a smooth random displacement field
    fields = rng.uniform(-1, 1, (2, h, w))
    dx, dy = ((_gaussian_blur(f, sigma) if sigma > 0 else f) * alpha for f in fields)
    grid_x = (np.arange(w)[None, :] + dx) / (w - 1) * 2 - 1
    grid_y = (np.arange(h)[:, None] + dy) / (h - 1) * 2 - 1
    grid = torch.from_numpy(np.stack([grid_x, grid_y], -1)[None]).float()
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    return out[0].numpy().transpose(1, 2, 0)


def pixelate(x, severity, rng):
    c = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
    h, w = x.shape[:2]
    small = _pil(x).resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX), dtype=np.float32) / 255


def jpeg_compression(x, severity, rng):
    quality = (80, 65, 58, 50, 40)[severity - 1]
    buffer = io.BytesIO()
    _pil(x).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255


CORRUPTIONS = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur, snow, fog,
    brightness, contrast, elastic_transform, pixelate, jpeg_compression)}


def resolve(names: str | list[str]) -> list[str]:
    """``"all"`` or a list (or comma-separated string) of corruption names, checked."""
    if isinstance(names, str):
        names = list(CORRUPTIONS) if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    for name in names:
        if name in UNAVAILABLE:
            raise ValueError(f"corruption {name!r} is not available here: it {UNAVAILABLE[name]}")
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; choose from all, {', '.join(CORRUPTIONS)}")
    if not names:
        raise ValueError("no corruption named")
    return list(names)


def check_severity(severity: int) -> int:
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity} is outside 1..5")
    return severity


def corrupt(image: Image.Image, name: str, severity: int, seed: int = 0, index: int = 0) -> Image.Image:
    """``image`` with corruption ``name`` at ``severity``; the same (seed, index) gives the same draws."""
    function = CORRUPTIONS[resolve([name])[0]]
    rng = np.random.default_rng([seed, index, list(CORRUPTIONS).index(name)])
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return _pil(function(x.copy(), check_severity(severity), rng))
