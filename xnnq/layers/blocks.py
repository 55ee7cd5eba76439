"""Modules for the tensor operators that change a range, so each can carry its own quantizer."""

from __future__ import annotations

import torch
from torch import nn

from .hooks import unhooked


class AddBlock(nn.Module):
    """``x + y`` (and ``x + y + ...``) as a module.

    Where the build allowed it (:meth:`accumulate_into_first`), the sum is written into ``x``, as a float
    model's ``out += identity`` does: no new activation-sized tensor (in training, calibration and evaluation).
    """

    def __init__(self) -> None:
        super().__init__()
        self._first_hooks: tuple[dict, ...] | None = None  # see accumulate_into_first
        self._first_input_hooks: tuple[dict, ...] | None = None  # see accumulate_into_first

    def accumulate_into_first(self, quantizer: nn.Module) -> None:
        """``x`` is the output of ``quantizer`` (a :class:`~xnnq.layers.PACT2`) and read by nothing else (the
        build checks): the sum may be written into it when no hook on ``quantizer`` (checked at every call)
        could have kept it and ``x`` is the quantizer's own: with autograd, the fused kernel's output (whose
        backward keeps only a mask); without, whatever it returns (a new tensor, or its input passed through or
        overwritten) when its input is its alone (:meth:`~xnnq.layers.PACT2.input_overwrite_hooks`)."""
        self._first_hooks = (quantizer._forward_hooks,)  # the dict itself: hooks added later are seen
        self._first_input_hooks = quantizer.input_overwrite_hooks()

    def _may_accumulate(self, x: torch.Tensor, others: tuple[torch.Tensor, ...]) -> bool:
        # while compiling: the compiler plans the memory, and autograd's nodes are not visible there
        if torch.compiler.is_compiling():
            return False
        if self._first_hooks is None or not unhooked(
            *self._first_hooks, self._forward_pre_hooks, self._forward_hooks
        ):
            return False
        if x.requires_grad:
            from .fused import _ActFakeQuant  # the fused kernel's autograd node: the output is its own

            if not (x._base is None and type(x.grad_fn) is _ActFakeQuant._backward_cls):
                return False
        elif (
            x._base is not None
            or self._first_input_hooks is None
            or not unhooked(*self._first_input_hooks)
            or (torch.is_grad_enabled() and any(getattr(o, "requires_grad", False) for o in others))
        ):
            return False
        # the in-place sum has the out-of-place sum's shape and dtype (equal shapes are checked without
        # broadcast_shapes, which is pure Python)
        return all(
            isinstance(o, torch.Tensor)
            and o.dtype == x.dtype
            and (o.shape == x.shape or torch.broadcast_shapes(x.shape, o.shape) == x.shape)
            for o in others
        )

    def forward(self, x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        if others and self._may_accumulate(x, others):
            for o in others:
                x = x.add_(o)
            return x
        for o in others:
            x = x + o
        return x


class MultBlock(nn.Module):
    """``x * y`` as a module (e.g. a squeeze-excitation gate)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y


class CatBlock(nn.Module):
    """``torch.cat(tensors, dim)`` as a module."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
            tensors = tuple(tensors[0])
        return torch.cat(tensors, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class ReduceMean(nn.Module):
    """``x.mean(dim, keepdim)`` as a module (a global average pool written as a mean)."""

    def __init__(self, dim: tuple[int, ...], keepdim: bool = False):
        super().__init__()
        self.dim, self.keepdim = tuple(dim), keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dim, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}"
