"""PackedLinear: a bf16 linear multiplying by its weight packed once for oneDNN gives the eager bf16 linear's
numbers, falls back to nn.Linear wherever it cannot pack, follows weight changes and survives copies."""
import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

from clap_core.model.clap import ClapModel
from clap_core.model.config import get_model_config
from clap_core.model.packed_linear import PACKED, PackedLinear, pack_linears, packing_supported
from tests.fixtures.audio import decoded_clips

needs_packing = pytest.mark.skipif(not packing_supported(), reason="this torch build cannot pack bf16 linears")


def bf16_linear(inp: int, out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias).to(torch.bfloat16).eval()


def close_to_eager(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to bf16 rounding of the output (one kernel may sum in another order than the other)."""
    return got.dtype == expected.dtype == torch.bfloat16 and got.shape == expected.shape and \
        bool(torch.allclose(got.float(), expected.float(), rtol=2 ** -7, atol=2 ** -7))


@needs_packing
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_gives_the_eager_bf16_linear_under_autocast(bias):
    linear = bf16_linear(48, 40, bias)
    packed = PackedLinear.from_linear(copy.deepcopy(linear))
    torch.manual_seed(1)
    inputs = [torch.randn(5, 48), torch.randn(2, 7, 48), torch.randn(3, 48, 6).transpose(1, 2),  # strided
              torch.randn(48).to(torch.bfloat16)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for x in inputs:
            expected, got = linear(x), packed(x)
            assert close_to_eager(got, expected), (x.shape, (got.float() - expected.float()).abs().max())
            # and not by accident: a transposed weight or a lost bias is far off
            assert not close_to_eager(got, nn.functional.linear(x.to(torch.bfloat16), linear.weight.flip(0),
                                                                linear.bias))
    assert PACKED in packed.__dict__ and packed.state_dict().keys() == linear.state_dict().keys()


@needs_packing
def test_packed_linear_repacks_after_a_weight_change_and_falls_back_for_gradients():
    linear = bf16_linear(16, 8)
    packed = PackedLinear.from_linear(copy.deepcopy(linear))
    x = torch.randn(4, 16).to(torch.bfloat16)
    with torch.no_grad():
        before = packed(x)
        packed.weight.mul_(2)  # in place: the parameter's version moves, the cache follows
        packed.bias.zero_()
        after = packed(x)
    assert close_to_eager(after, 2 * nn.functional.linear(x, linear.weight))
    assert not close_to_eager(after, before)
    # with autograd wanted the packed operator (it has no backward) is not used: gradients as nn.Linear's
    reference = copy.deepcopy(packed)
    reference.__class__ = nn.Linear
    train_x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    packed(train_x).float().square().sum().backward()
    reference(train_x.detach()).float().square().sum().backward()
    assert packed.weight.grad is not None and train_x.grad is not None
    assert close_to_eager(packed.weight.grad, reference.weight.grad)


@needs_packing
def test_a_packed_module_pickles_and_deep_copies_without_its_cache():
    model = nn.Sequential(bf16_linear(12, 12), nn.GELU(), bf16_linear(12, 4, seed=1))
    assert pack_linears(model) == 2 and all(isinstance(model[i], PackedLinear) for i in (0, 2))
    x = torch.randn(3, 12).to(torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert PACKED not in clone[0].__dict__  # oneDNN's opaque tensors cannot be copied: rebuilt on use
            assert torch.equal(clone(x), expected) and PACKED in clone[0].__dict__


def test_pack_linears_turns_only_bf16_cpu_linears():
    model = nn.Sequential(bf16_linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8).to(torch.bfloat16))
    turned = pack_linears(model)
    if not packing_supported():
        assert turned == 0 and type(model[0]) is nn.Linear
        return
    assert turned == 1
    assert isinstance(model[0], PackedLinear) and type(model[1]) is nn.Linear  # fp32 stays nn.Linear
    x = torch.randn(2, 8)
    with torch.no_grad():  # outside autocast an fp32 input to the fp32 layer is plain nn.Linear
        assert torch.equal(model[1](x), nn.functional.linear(x, model[1].weight, model[1].bias))


def test_the_bf16_copy_packs_its_tower_linears_and_embeds_as_the_unpacked_copy(monkeypatch):
    from clap_core.model import inference

    torch.manual_seed(0)
    model = ClapModel(get_model_config("tiny")).eval()
    clips = decoded_clips([2.0, 3.0])
    captions = ["a dog barks", "rain on a roof"]
    packed = model.embed_audio(clips, sample_rate=48_000, precision="bf16")
    packed_text = model.embed_text(captions, precision="bf16")
    fast = inference.bf16_copy(model)
    linears = [m for m in fast.modules() if isinstance(m, nn.Linear)]
    if packing_supported():
        assert linears and all(isinstance(m, PackedLinear) for m in linears)
    else:
        assert not any(isinstance(m, PackedLinear) for m in linears)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())  # the fp32 model is untouched
    copy.deepcopy(model)  # a model holding its cached copy still copies (the packed weights are left out)
    inference.drop_bf16_copy(model)
    with torch.inference_mode():  # a copy made of inference tensors (no version counter) packs and embeds too
        assert np.array_equal(model.embed_audio(clips, sample_rate=48_000, precision="bf16"), packed)
    inference.drop_bf16_copy(model)
    monkeypatch.setattr(inference, "pack_linears", lambda module: 0)
    plain = model.embed_audio(clips, sample_rate=48_000, precision="bf16")
    plain_text = model.embed_text(captions, precision="bf16")
    assert not any(isinstance(m, PackedLinear) for m in inference.bf16_copy(model).modules())
    # unit embeddings: equal up to bf16 rounding inside the towers
    assert np.abs(packed - plain).max() < 2e-2 and np.abs(packed_text - plain_text).max() < 2e-2
    assert (packed * plain).sum(1).min() > 0.9999 and (packed_text * plain_text).sum(1).min() > 0.9999
