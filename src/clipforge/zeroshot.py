"""Zero-shot classification: class embeddings from prompt templates (prompt ensembling, Radford et al. 2021 §3.1.4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def _fill(template: str, classname: str) -> str:
    if "{}" in template:
        return template.replace("{}", classname)
    if "{c}" in template:
        return template.replace("{c}", classname)
    raise ValueError(f"template {template!r} has no '{{}}' placeholder for the class name")


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames, templates=DEFAULT_TEMPLATES, device=None,
                         batch_size: int = 256) -> torch.Tensor:
    """Weights [embed_dim, n_classes]: each class is the renormalised mean of its L2-normalised prompt embeddings."""
    classnames, templates = list(classnames), list(templates)
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    device = device or next(model.parameters()).device
    texts = [_fill(t, c) for c in classnames for t in templates]
    features = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        features.append(model.encode_text(tokens, normalize=True).float())
    per_prompt = torch.cat(features).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).T


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk=(1,)) -> dict[str, float]:
    labels = torch.as_tensor(labels)
    top = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
    return {f"top{k}": (top[:, :k] == labels[:, None]).any(dim=1).float().mean().item() for k in topk}
