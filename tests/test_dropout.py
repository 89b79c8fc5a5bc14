"""recpost's CPU dropout behaves as nn.Dropout: the same distribution, scaling, gradient and off switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recpost.models import BackboneConfig
from recpost.models.dropout import Dropout
from recpost.models.frozen import disable_dropout
from recpost.models.registry import build_backbone


def test_training_zeroes_a_fraction_p_and_scales_the_rest_to_keep_the_mean():
    torch.manual_seed(0)
    x = torch.ones(200, 1000)
    y = Dropout(0.2).train()(x)
    assert set(torch.unique(y).tolist()) == {0.0, 1.25}
    assert (y == 0).float().mean().item() == pytest.approx(0.2, abs=0.005)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)


def test_the_gradient_is_the_same_mask_times_the_scale():
    torch.manual_seed(0)
    x = torch.randn(50, 40, requires_grad=True)
    y = Dropout(0.3).train()(x)
    y.sum().backward()
    kept = y.detach() != 0
    torch.testing.assert_close(x.grad, kept.float() / 0.7)


def test_eval_zero_p_and_p_one_are_as_nn_dropout():
    x = torch.randn(8, 5)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def test_keeps_bf16_and_draws_from_the_seeded_generator():
    x = torch.randn(64, 64).bfloat16()
    torch.manual_seed(3)
    a = Dropout(0.2).train()(x)
    torch.manual_seed(3)
    b = Dropout(0.2).train()(x)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_backbones_use_it_and_turning_dropout_off_finds_every_layer(name):
    backbone = build_backbone(BackboneConfig(name=name, d_model=16, n_layers=1, dropout=0.3, attn_dropout=0.1),
                              n_items=20, max_len=8)
    layers = [m for m in backbone.modules() if isinstance(m, nn.Dropout)]
    assert layers and all(isinstance(m, Dropout) for m in layers)
    disable_dropout(backbone)
    assert all(m.p == 0 for m in layers)
