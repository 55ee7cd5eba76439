"""Writes fake_quant_reference.pt: activation fake-quantization computed by the unfused code path.

    PYTHONPATH=<checkout> python tests/data/make_fake_quant_reference.py

The committed file was written from commit 19b7d97 (before the fused kernels existed), where PACT2 computed
``fake_quantize(x.clamp(max=cap), scale, qmin, qmax)``. For every configuration it stores the input ``x``,
the output as integer codes (``out = codes * scale`` exactly, checked here) and the gradient as a mask
(``grad_x = where(mask, grad, 0)`` exactly, checked here); ``grad`` is shared. Integer codes carry no sign of
zero: the old element-wise path (16-bit, or a tensor holding NaN) gave -0.0 for small negative inputs, the
8-bit CPU path and CUDA's kernel +0.0.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from xnnq.layers.fake_quant import fake_quantize, quant_bounds

N = 512


def inputs(scale: float, qmin: int, qmax: int, cap: float | None, g: torch.Generator) -> torch.Tensor:
    span = (qmax - qmin) * scale
    x = (torch.rand(N, generator=g) * 1.4 - 0.2) * span + qmin * scale  # beyond both ends
    special = [qmin - 0.5, qmin, qmin + 0.5, -0.5, 0.5, qmax - 0.5, qmax, qmax + 0.5, 1.5, 2.5, -1.5]
    sp = torch.tensor(special) * scale
    sp = torch.cat([sp, torch.tensor([0.0, -0.0, float("inf"), 1e30, -1e30, 2.0**-140, -(2.0**-140)])])
    if cap is not None:
        sp = torch.cat([sp, torch.tensor([cap, cap + scale / 2, cap - scale / 2])])
    sp = torch.cat(
        [
            sp,
            torch.nextafter(sp, torch.tensor(float("inf"))),
            torch.nextafter(sp, torch.tensor(float("-inf"))),
        ]
    )
    x[: sp.numel()] = sp
    return x[torch.randperm(N, generator=g)]


def main() -> None:
    g = torch.Generator().manual_seed(16)
    grad = torch.randn(N, generator=g)
    cases = []
    for bits, signed, cap, scale in itertools.product((8, 16), (False, True), (None, 6.0), (2.0**-5, 2.0**3)):
        qmin, qmax = quant_bounds(bits, signed)
        x = inputs(scale, qmin, qmax, cap, g)
        xr = x.clone().requires_grad_(True)
        v = xr.clamp(max=cap) if cap is not None else xr
        out = fake_quantize(v, torch.tensor(scale), qmin, qmax)
        out.backward(grad)
        codes = (out.detach() / scale).to(torch.int32)
        mask = xr.grad != 0
        assert torch.equal(codes.float() * scale, out.detach()), "outputs are not codes * scale"
        assert torch.equal(torch.where(mask, grad, 0.0), xr.grad), "the gradient is not a masked copy"
        cases.append(
            {"bits": bits, "signed": signed, "cap": cap, "scale": scale, "x": x, "codes": codes, "mask": mask}
        )
    path = Path(__file__).with_name("fake_quant_reference.pt")
    torch.save({"grad": grad, "cases": cases}, path)
    print(f"wrote {path} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
