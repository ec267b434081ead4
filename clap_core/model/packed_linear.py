"""Linear layers whose bf16 weight is reordered once into oneDNN's layout, for inference on CPU.

An eager bf16 `nn.Linear` on CPU runs oneDNN's matmul, which reorders the weight into its blocked layout at
every call. torch.compile with inductor's freezing pass reorders each weight once and calls oneDNN's linear on
the packed weight (`mkldnn._reorder_linear_weight` + `mkldnn._linear_pointwise`); it is that which made the
compiled audio tower 1.19-1.24x faster here, after 55 s of compiling in every process (freezing bypasses the
compile cache). PackedLinear calls the same two operators in eager mode: no compile, most of the speed-up
(HTS-AT tiny, bf16, 10-s clips, packed and unpacked alternating: 1.09x at batch 8, 1.02x at batch 1; README,
"Exact or fast inference"), and the eager bf16 linear's numbers (tests/unit/model/test_packed_linear.py).

Used by inference.bf16_copy for the towers of the bf16 copy on CPU. The dense weight stays the module's
parameter (state_dict, hooks and dtype checks see a plain Linear); the packed one is a cache beside it, rebuilt
when the weight changes and never pickled or deep-copied (oneDNN's opaque tensors have no storage to copy).
With autograd in play, off CPU, or where this torch build cannot pack bf16 weights, it is nn.Linear.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

PACKED = "_packed_weight"  # the module's __dict__ entry holding ((weight ptr, version), packed weight)


@lru_cache(maxsize=None)
def packing_supported() -> bool:
    """Whether this torch build packs a bf16 linear for oneDNN and gives F.linear's numbers with it."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=generator).to(torch.bfloat16)  # (out, in)
    bias = torch.randn(24, generator=generator).to(torch.bfloat16)
    x = torch.randn(16, 40, generator=generator).to(torch.bfloat16)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    except RuntimeError:  # e.g. a CPU oneDNN has no bf16 inner product for
        return False
    return bool(torch.allclose(got.float(), F.linear(x, weight, bias).float(), rtol=1e-2, atol=1e-2))


class PackedLinear(nn.Linear):
    """nn.Linear that, for bf16 inference on CPU, multiplies by a copy of its weight packed once for oneDNN."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PackedLinear":
        """The same layer (its weight and bias tensors, not copies) as a PackedLinear, packed now."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module.train(linear.training)
        module.packed_weight()
        return module

    def packed_weight(self) -> torch.Tensor:
        weight = self.weight  # an inference tensor (a copy made under torch.inference_mode) has no version counter
        key = (weight.data_ptr(), None if weight.is_inference() else weight._version)
        cached = self.__dict__.get(PACKED)
        if cached is None or cached[0] != key:
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
            self.__dict__[PACKED] = cached
        return cached[1]

    def packs(self, x: torch.Tensor) -> bool:
        """Whether this call can take the packed path: bf16 weight and input on CPU, no gradient wanted."""
        weight = self.weight
        if weight.device.type != "cpu" or x.device.type != "cpu" or weight.dtype != torch.bfloat16:
            return False
        if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
            return False
        return x.dim() >= 1 and x.shape[-1] == self.in_features and packing_supported()  # else F.linear's error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packs(x):
            return super().forward(x)
        # autocast casts a linear's input to bf16; this operator has no autocast rule, so cast as it would
        bias = None if self.bias is None else self.bias.detach().to(torch.bfloat16)
        rows = x.to(torch.bfloat16).reshape(-1, self.in_features).contiguous()  # (..., in) -> (M, in)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight(), bias, "none", [], "")  # (M, out)
        return out.view(*x.shape[:-1], self.out_features)

    def __getstate__(self) -> dict:  # pickle and deepcopy: the packed cache is rebuilt on the next call
        state = super().__getstate__()
        state.pop(PACKED, None)
        return state


def pack_linears(module: nn.Module) -> int:
    """Turn every plain nn.Linear under `module` whose weight is bf16 on CPU into a PackedLinear, in place
    (nothing when packing_supported() is False). Returns how many were turned."""
    if not packing_supported():
        return 0
    turned = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear.from_linear(child))
                turned += 1
    return turned
