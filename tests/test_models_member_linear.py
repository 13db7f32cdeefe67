"""The fused linear operator: same values and gradients as F.linear, per member under vmap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from bdlens.models.member_linear import Linear, linear, member_batched


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shared_input", [True, False])
def test_vmap_over_weights_equals_each_member_alone(with_bias: bool, shared_input: bool) -> None:
    g = torch.Generator().manual_seed(0)
    k = 4
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64) if shared_input else torch.randn(k, 3, 5, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(k, 6, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(k, 6, generator=g, dtype=torch.float64) if with_bias else None
    in_dims = (None if shared_input else 0, 0, 0 if with_bias else None)
    got = vmap(linear, in_dims=in_dims)(x, weight, bias)
    for m in range(k):
        expected = F.linear(x if shared_input else x[m], weight[m], None if bias is None else bias[m])
        torch.testing.assert_close(got[m], expected, rtol=1e-12, atol=1e-12)
    # shared weights, batched input: an ordinary linear
    torch.testing.assert_close(vmap(linear, in_dims=(0, None, None))(x if not shared_input else x[None].expand(k, 3, 5, 8), weight[0], None),
                               F.linear(x if not shared_input else x[None].expand(k, 3, 5, 8), weight[0]), rtol=1e-12, atol=1e-12)


def test_gradients_match_autograd_of_f_linear() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda a, w: linear(a, w, None), (x, weight))
    # through vmap over member weights (the perturbation trainer back-propagates into the inputs)
    members = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    inputs = torch.randn(3, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    reference = inputs.detach().clone().requires_grad_()
    vmap(linear, in_dims=(0, 0, None))(inputs, members, bias.detach()).square().sum().backward()
    vmap(F.linear, in_dims=(0, 0, None))(reference, members, bias.detach()).square().sum().backward()
    torch.testing.assert_close(inputs.grad, reference.grad, rtol=1e-12, atol=1e-12)


def test_linear_module_is_nn_linear_inside_and_outside_the_member_context() -> None:
    torch.manual_seed(2)
    layer, plain = Linear(4, 3), nn.Linear(4, 3)
    plain.load_state_dict(layer.state_dict())  # same parameters and keys
    x = torch.randn(2, 4)
    with member_batched():
        inside = layer(x)
    torch.testing.assert_close(inside, plain(x), rtol=0, atol=0)
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16), member_batched():
        assert layer(x).dtype == torch.bfloat16  # autocast keeps working: F.linear is used
