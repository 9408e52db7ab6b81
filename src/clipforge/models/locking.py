"""Freezing a tower but its last groups of parameters (open_clip's ``--lock-image-unlocked-groups`` and
``--lock-text-unlocked-layers``): a pretrained tower fine-tuned only near its output."""
from __future__ import annotations

import re

from torch import nn

# A timm-named trunk's groups, as timm's ``group_matcher`` makes them (what open_clip unlocks by): each parameter name's
# rule gives an ordinal, (rule's ordinal, numbers the pattern captures..., suffix...); equal ordinals form one group,
# groups in ordinal order, input side first; names no rule matches form the last group (the head). An ordinal ending
# in MERGE_WITH_PREVIOUS joins the group before it (a final norm joins the last block).
MERGE_WITH_PREVIOUS = 99999
VIT_GROUPS = ((r"(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)", 0, ()), (r"blocks\.(\d+)", 1, ()),
              (r"norm", 1, (MERGE_WITH_PREVIOUS,)))  # timm's VisionTransformer and Eva (EVA, PE, ViTamin)
CONVNEXT_GROUPS = ((r"stem", 0, ()), (r"stages\.(\d+)\.downsample", 1, (0,)), (r"stages\.(\d+)\.blocks\.(\d+)", 1, ()),
                   (r"norm_pre", 1, (MERGE_WITH_PREVIOUS,)))  # a stage's downsampling joins its first block
FASTVIT_GROUPS = ((r"stem", 0, ()), (r"stages\.(\d+)\.downsample", 1, (0,)), (r"stages\.(\d+)\.pos_emb", 1, (0,)),
                  (r"stages\.(\d+)\.\w+\.(\d+)", 1, ()))


def ordinal_groups(named_parameters, rules) -> list[list[nn.Parameter]]:
    """The parameters in the groups ``rules`` (one of the tables above) make of their names, input side first."""
    compiled = [(re.compile(pattern), ordinal, suffix) for pattern, ordinal, suffix in rules]
    by_ordinal: dict[tuple, list] = {}
    for name, parameter in named_parameters:
        key = (float("inf"),)
        for pattern, ordinal, suffix in compiled:
            if found := pattern.match(name):
                key = (ordinal, *map(int, found.groups()), *suffix)
                break
        by_ordinal.setdefault(key, []).append(parameter)
    groups: list[list] = []
    for key in sorted(by_ordinal):
        if groups and key[-1] == MERGE_WITH_PREVIOUS:
            groups[-1].extend(by_ordinal[key])
        else:
            groups.append(list(by_ordinal[key]))
    return groups


def trunk_groups(tower: nn.Module, rules) -> list[list[nn.Parameter]]:
    """A tower's groups when its timm-named ``trunk`` is grouped by ``rules``: parameters outside the trunk (open_clip's
    projection head, which its ``lock`` never freezes) join the last group."""
    groups = ordinal_groups(tower.trunk.named_parameters(), rules)
    in_trunk = {id(p) for p in tower.trunk.parameters()}
    groups[-1].extend(p for p in tower.parameters() if id(p) not in in_trunk)
    return groups


def unlock_last(tower: nn.Module, groups: list, count: int, what: str, unit: str) -> None:
    """Freeze the whole ``tower``, then let the last ``count`` of its ``groups`` (each a list of modules and
    parameters, input side first) train again; parameters in no group (a CoCa's attention pooler) stay frozen, as
    open_clip's ``lock`` leaves them."""
    if not 0 < count <= len(groups):
        raise ValueError(f"{what}: {count} unlocked {unit}; this tower has {len(groups)} (from 1 to {len(groups)})")
    tower.requires_grad_(False)
    for group in groups[len(groups) - count:]:
        for item in group:
            for parameter in ([item] if isinstance(item, nn.Parameter) else item.parameters()):
                parameter.requires_grad_(True)


def frozen_batch_norms(tower: nn.Module) -> list[nn.Module]:
    """The batch norms whose weights a partial lock froze: open_clip's ``freeze_bn_stats`` freezes their statistics
    too (it swaps them for ``FrozenBatchNorm2d``; kept in eval mode, they compute the same)."""
    return [m for m in tower.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.weight is not None and not m.weight.requires_grad]
