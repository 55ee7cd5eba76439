"""Whether a hook could keep a tensor that a kernel is about to overwrite (the in-place paths' one test)."""

from __future__ import annotations

from torch import nn


def unhooked(*hook_dicts: dict, backward: bool = False) -> bool:
    """No hook in ``hook_dicts`` (modules' hook dicts) and no global module hook is registered: forward and
    forward-pre hooks, and also backward hooks when ``backward``."""
    if any(hook_dicts):
        return False
    m = nn.modules.module
    if m._global_forward_hooks or m._global_forward_pre_hooks:
        return False
    return not (backward and (m._global_backward_hooks or m._global_backward_pre_hooks))
