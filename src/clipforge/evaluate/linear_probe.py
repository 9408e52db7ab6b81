"""Linear probes on frozen features, as in the paper (§3.2): L-BFGS logistic regression, L2 strength chosen on a
validation split by a parametric sweep; and few-shot probes with k labelled examples per class."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, n_classes: int, l2: float,
                 max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, full-batch L-BFGS; loss = mean cross-entropy + l2 * ||W||^2."""
    features = features.double()
    weight = torch.zeros(features.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-8, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _logits(features, weight, bias):
    return (features.double() @ weight + bias).float()


def _accuracy(features, labels, weight, bias) -> float:
    return (_logits(features, weight, bias).argmax(dim=1) == labels).float().mean().item()


def sweep_l2(train_x, train_y, val_x, val_y, n_classes, coarse=tuple(10.0 ** e for e in range(-8, 3)),
             refine_steps: int = 4) -> tuple[float, list[tuple[float, float]]]:
    """Best L2 strength on the validation split: a log-spaced coarse sweep, then a finer one around the best
    (a parametric search, as the paper's). Returns (best, [(l2, val accuracy), ...])."""
    tried = {}
    for l2 in coarse:
        tried[l2] = _accuracy(val_x, val_y, *fit_logistic(train_x, train_y, n_classes, l2))
    best = max(tried, key=lambda l2: (tried[l2], l2))
    low, high = math.log10(best) - 1, math.log10(best) + 1
    for i in range(1, 2 * refine_steps):
        l2 = 10 ** (low + (high - low) * i / (2 * refine_steps))
        if l2 not in tried:
            tried[l2] = _accuracy(val_x, val_y, *fit_logistic(train_x, train_y, n_classes, l2))
    best = max(tried, key=lambda l2: (tried[l2], l2))  # ties: the stronger regularisation
    return best, sorted(tried.items())


def split_validation(labels: torch.Tensor, fraction: float = 0.2, seed: int = 0):
    """Indices (train, validation), stratified by class so every class is in both."""
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx), torch.cat(val_idx)


def fit_linear_probe(train_x, train_y, n_classes: int, seed: int = 0):
    """Sweep L2 on a validation split of the training features, refit on all of them; returns
    (``features -> logits``, {"l2", "sweep"})."""
    tr, va = split_validation(train_y, 0.2, seed)
    best, tried = sweep_l2(train_x[tr], train_y[tr], train_x[va], train_y[va], n_classes)
    weight, bias = fit_logistic(train_x, train_y, n_classes, best)
    return (lambda features: _logits(features, weight, bias)), \
        {"l2": best, "sweep": [{"l2": l, "val_acc1": a} for l, a in tried]}


def linear_probe(train_x, train_y, test_x, n_classes: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """``fit_linear_probe``, then the test logits."""
    classify, info = fit_linear_probe(train_x, train_y, n_classes, seed)
    return classify(test_x), info


def few_shot(train_x, train_y, test_x, test_y, n_classes: int, shots=(1, 2, 4, 8, 16), seeds=(0, 1, 2)) -> dict:
    """{k: [test top-1 per seed]}: k examples per class drawn per seed; L2 chosen on training examples not drawn."""
    curve = {}
    for k in shots:
        curve[k] = []
        for seed in seeds:
            g = torch.Generator().manual_seed(1000 * k + seed)
            chosen, rest = [], []
            for c in range(n_classes):
                idx = (train_y == c).nonzero().squeeze(1)
                idx = idx[torch.randperm(len(idx), generator=g)]
                chosen.append(idx[:k])
                rest.append(idx[k:k + 50])  # a small validation pool for the L2 sweep
            chosen, rest = torch.cat(chosen), torch.cat(rest)
            best, _ = sweep_l2(train_x[chosen], train_y[chosen], train_x[rest], train_y[rest], n_classes,
                               refine_steps=0)
            weight, bias = fit_logistic(train_x[chosen], train_y[chosen], n_classes, best)
            curve[k].append(_accuracy(test_x, test_y, weight, bias))
    return curve
