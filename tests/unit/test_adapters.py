"""Adapter-level invariants on toy Linear models (milliseconds)."""

import pytest
import torch
from torch import nn

from stamina_core.adapters import LoRALinear, MaskedLoRALinear, hard_mask
from stamina_core.errors import AttachError, ConfigError, FoldError
from stamina_core.fold import fold_adapters
from stamina_core.inject import adapters_of, attach


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.ModuleDict({"to_k": nn.Linear(12, 10), "to_v": nn.Linear(12, 10), "to_q": nn.Linear(12, 12)})
        self.proj = nn.Linear(10, 6)

    def forward(self, x):
        return self.proj(self.attn["to_k"](x) * torch.tanh(self.attn["to_v"](x))) + self.attn["to_q"](x).sum(-1, keepdim=True)


def _masked(name, lin, g=None, **kw):
    return MaskedLoRALinear(lin, rank=3, alpha=3.0, mask_rank=2, name=name, generator=g, **kw)


def _lora(name, lin, g=None):
    return LoRALinear(lin, rank=3, alpha=3.0, name=name, generator=g)


FACTORIES = {"masked_lora": _masked, "lora": _lora}


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_zero_init_changes_nothing(kind):
    m = Toy()
    x = torch.randn(5, 12)
    ref = m(x)
    attach(m, ["attn.to_k", "attn.to_v"], FACTORIES[kind])
    assert torch.equal(m(x), ref)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_fold_equals_unfolded_and_restores_architecture(kind):
    m = Toy()
    keys = list(m.state_dict())
    n_params = sum(p.numel() for p in m.parameters())
    ads = attach(m, ["to_k", "to_v"], FACTORIES[kind])
    with torch.no_grad():
        for ad in ads.values():
            ad.lora_B.normal_()
    x = torch.randn(7, 12)
    before = m(x)
    rep = fold_adapters(m, ads)
    after = m(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert list(m.state_dict()) == keys
    assert sum(p.numel() for p in m.parameters()) == n_params
    assert not adapters_of(m)
    assert all(type(mod) is nn.Linear for mod in m.attn.values())
    assert len(rep.layers) == 2 and rep.trainable_params > 0


def test_forward_mask_is_binary_and_equals_G_positive():
    lin = nn.Linear(12, 10)
    ad = _masked("x", lin, init_scale=2.0)  # large init: a mix of open and closed entries
    with torch.no_grad():
        ad.mask_gen.b.zero_()
    M = ad.mask()
    G = ad.mask_logits()
    assert set(M.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(M, (G > 0).float())
    assert 0 < float(M.detach().mean()) < 1


def test_straight_through_gradients_reach_P_Q_b():
    lin = nn.Linear(12, 10)
    ad = _masked("x", lin)
    with torch.no_grad():
        ad.lora_B.normal_()
    ad(torch.randn(4, 12)).pow(2).sum().backward()
    for p in (ad.mask_gen.P, ad.mask_gen.Q, ad.mask_gen.b):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert ad.lora_A.grad.abs().sum() > 0 and ad.lora_B.grad.abs().sum() > 0
    assert lin.weight.grad is None and lin.bias.grad is None


def test_straight_through_gradient_matches_sigmoid_surrogate():
    G = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(4, 5)
    (hard_mask(G, 2.0) * w).sum().backward()
    G2 = G.detach().clone().requires_grad_(True)
    (torch.sigmoid(2.0 * G2) * w).sum().backward()
    torch.testing.assert_close(G.grad, G2.grad)


def test_forced_open_mask_equals_plain_lora_with_same_factors():
    torch.manual_seed(1)
    base = nn.Linear(12, 10)
    m = MaskedLoRALinear(base, 3, 3.0, 2, init_scale=3.0)
    with torch.no_grad():
        m.mask_gen.b.fill_(-1.0)  # a mask that would mostly be closed
        m.lora_B.normal_()
    m.force_open = True
    plain = LoRALinear(nn.Linear(12, 10), 3, 3.0)
    with torch.no_grad():
        plain.base.load_state_dict(base.state_dict())
        plain.lora_A.copy_(m.lora_A)
        plain.lora_B.copy_(m.lora_B)
    x = torch.randn(6, 12)
    torch.testing.assert_close(m(x), plain(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.delta_weight(), plain.delta_weight())


def test_lora_matches_peft_reference():
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(12, 10))
    ours = LoRALinear(nn.Linear(12, 10), 3, 6.0)
    with torch.no_grad():
        ours.base.load_state_dict(net[0].state_dict())
        ours.lora_B.normal_()
    pm = peft.get_peft_model(net, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], lora_dropout=0.0))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), pm(x), atol=1e-6, rtol=1e-6)


def test_safe_fold_refuses_nan_and_leaves_weights_untouched():
    m = Toy()
    ads = attach(m, ["to_k", "to_v"], _masked)
    with torch.no_grad():
        ads["attn.to_k"].lora_B.normal_()  # a healthy layer, folded first in order
        ads["attn.to_v"].lora_B.fill_(float("nan"))
    base = {n: ad.base.weight.clone() for n, ad in ads.items()}
    with pytest.raises(FoldError, match="NaN/Inf"):
        fold_adapters(m, ads)
    for n, ad in ads.items():
        assert torch.equal(ad.base.weight, base[n]), n  # no layer was written, not even the healthy one
        assert not ad.folded
    assert sorted(adapters_of(m)) == sorted(ads)  # still attached, nothing half-folded


def test_fold_twice_is_an_error():
    m = Toy()
    ads = attach(m, ["to_k"], _lora)
    fold_adapters(m, ads)
    with pytest.raises(FoldError, match="already folded"):
        fold_adapters(m, ads)


def test_unmatched_pattern_lists_available_names():
    m = Toy()
    with pytest.raises(AttachError) as e:
        attach(m, ["attn2.to_k"], _lora)
    msg = str(e.value)
    assert "attn2.to_k" in msg and "attn.to_k" in msg and "\n" not in msg


def test_regex_patterns_and_no_double_attach():
    m = Toy()
    ads = attach(m, ["re:attn\\.to_[kv]$"], _lora)
    assert sorted(ads) == ["attn.to_k", "attn.to_v"]
    with pytest.raises(AttachError, match="already carries"):
        attach(m, ["proj"], _lora)


def test_rank_larger_than_layer_is_rejected_naming_the_field():
    with pytest.raises(ConfigError, match="adapter.rank"):
        LoRALinear(nn.Linear(3, 2), rank=4, alpha=1.0, name="tiny")
    with pytest.raises(ConfigError, match="mask.rank"):
        MaskedLoRALinear(nn.Linear(3, 2), rank=1, alpha=1.0, mask_rank=5)


def test_fold_in_fp32_for_half_precision_base():
    lin = nn.Linear(16, 16).to(torch.bfloat16)
    ad = LoRALinear(lin, 2, 2.0)
    with torch.no_grad():
        ad.lora_B.normal_()
    W0 = lin.weight.detach().float().clone()
    d = ad.delta_weight().detach()
    m = nn.Sequential(ad)
    fold_adapters(m, {"0": ad})
    assert m[0].weight.dtype == torch.bfloat16
    torch.testing.assert_close(m[0].weight.float(), (W0 + d).to(torch.bfloat16).float())


@pytest.mark.parametrize("force_open", [False, True])
def test_fused_masked_forward_and_gradients_match_the_dense_reference(force_open):
    """The fused fp32 path (one matmul with W + delta, mask recomputed in backward) equals
    base(x) + F.linear(x, delta_weight()) in outputs and in every gradient."""
    import torch.nn.functional as F

    torch.manual_seed(4)
    lin = nn.Linear(12, 10)
    ad = MaskedLoRALinear(lin, 3, 3.0, 2, init_scale=1.0)
    with torch.no_grad():
        ad.lora_B.normal_()
        ad.mask_gen.b.fill_(0.1)
    ad.force_open = force_open
    ad.temperature = 2.0
    x = torch.randn(3, 5, 12, requires_grad=True)
    params = [x, ad.lora_A, ad.lora_B, ad.mask_gen.P, ad.mask_gen.Q, ad.mask_gen.b]
    y = ad(x)
    g_fused = torch.autograd.grad((y * torch.arange(10.0)).sum(), params, allow_unused=True)
    y_ref = lin(x) + F.linear(x, ad.delta_weight())
    g_ref = torch.autograd.grad((y_ref * torch.arange(10.0)).sum(), params, allow_unused=True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, g_ref):
        if b is None:  # forced-open mask: no gradient reaches the generator on either path
            assert a is None or float(a.abs().sum()) == 0.0
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
