"""Table-driven invariants run against every registered method, on the tiny SD UNet + CLIP text encoder."""

import copy

import pytest
import torch

from stamina_core.config import ConfigError, MethodConfig, TrainConfig, parse
from stamina_core.errors import FoldError, TokenError
from stamina_core.methods import available, begin_concept, get, reference_weights
from stamina_core.train import ConceptData, train_concept

METHODS = available()


def test_builtin_methods_are_registered():
    assert {"stamina", "lora_seq", "clora", "textual_inversion"} <= set(METHODS)


def _cfg(method, steps=3, **train):
    return MethodConfig(name=method, train=TrainConfig(max_train_steps=steps, train_batch_size=2, **train))


def _inputs(b, prompt="a photo of <c0>"):
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, *b.model_shape()), generator=g)
    t = torch.tensor([10, 500])
    return x, t, prompt


def _eps(b, x, t, prompt):
    with torch.no_grad():
        ctx = b.encode_prompt([prompt] * x.shape[0])
        return b.unet(x, t, encoder_hidden_states=ctx).sample, ctx


def _perturb(state):
    """Make every adapter non-trivial (as after training) without training."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for ad in state.adapters.values():
            ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.5)
        if state.token_embedding is not None:
            for p in state.token_embedding.source.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("method", METHODS)
def test_zero_init_changes_nothing(micro_bundle, method):
    b = micro_bundle
    x, t, _ = _inputs(b)
    prompt = "a photo of a cat"  # no concept token: the adapters alone must be a no-op at init
    ref, _ = _eps(b, x, t, prompt)
    begin_concept(get(method), _cfg(method), b.unet, b.text_encoder, b.tokenizer, "<c0>")
    out, _ = _eps(b, x, t, prompt)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", METHODS)
def test_fold_preserves_outputs_architecture_and_keys(micro_bundle, method):
    b = micro_bundle
    unet_keys = list(b.unet.state_dict())
    te_keys = list(b.text_encoder.state_dict())
    n_unet = sum(p.numel() for p in b.unet.parameters())
    n_te = sum(p.numel() for p in b.text_encoder.parameters())
    st = begin_concept(get(method), _cfg(method), b.unet, b.text_encoder, b.tokenizer, "<c0>")
    _perturb(st)
    x, t, prompt = _inputs(b)
    before, ctx_before = _eps(b, x, t, prompt)
    rep = st.fold()
    after, ctx_after = _eps(b, x, t, prompt)
    torch.testing.assert_close(ctx_after, ctx_before, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert list(b.unet.state_dict()) == unet_keys
    assert list(b.text_encoder.state_dict()) == te_keys
    assert sum(p.numel() for p in b.unet.parameters()) == n_unet
    d = b.text_encoder.get_input_embeddings().embedding_dim
    assert sum(p.numel() for p in b.text_encoder.parameters()) == n_te + d  # exactly one new token row
    assert rep.added_inference_params == 0
    assert type(b.text_encoder.get_input_embeddings()).__name__ == "Embedding"
    with pytest.raises(FoldError, match="already folded"):
        st.fold()


@pytest.mark.parametrize("method", METHODS)
def test_training_changes_only_adapter_and_token_params(micro_bundle, method):
    b = micro_bundle
    st = begin_concept(get(method), _cfg(method, steps=3), b.unet, b.text_encoder, b.tokenizer, "<c0>")
    frozen_unet = {k: v.clone() for k, v in b.unet.state_dict().items() if "lora_" not in k and "mask_gen" not in k}
    table = b.text_encoder.get_input_embeddings().weight.detach().clone()
    frozen_te = {k: v.clone() for k, v in b.text_encoder.state_dict().items() if ".source." not in k}
    trainable_before = {k: v.detach().clone() for k, v in st.named_trainable().items()}
    data = ConceptData(torch.rand(3, *b.model_shape()) * 2 - 1, ["a photo of <c0>"])
    res = train_concept(b, st, data)
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    for k, v in b.unet.state_dict().items():
        if k in frozen_unet:
            assert torch.equal(v, frozen_unet[k]), k
    for k, v in b.text_encoder.state_dict().items():
        if k in frozen_te:
            assert torch.equal(v, frozen_te[k]), k
    changed = [k for k, v in st.named_trainable().items() if not torch.equal(v.detach(), trainable_before[k])]
    assert changed, "nothing trained"
    st.fold()
    new_table = b.text_encoder.get_input_embeddings().weight
    tid = b.tokenizer.convert_tokens_to_ids("<c0>")
    assert torch.equal(new_table[:tid], table[:tid])  # every old row bit-identical


def test_clora_penalty_equals_brute_force(micro_bundle):
    b = micro_bundle
    cfg = _cfg("clora")
    cfg.clora.weight = 0.37
    W0 = reference_weights(b.unet, cfg.adapter.targets)
    # pretend earlier concepts drifted the weights
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name in W0:
            b.unet.get_submodule(name).weight.add_(torch.randn(W0[name].shape, generator=g) * 0.1)
    st = begin_concept(get("clora"), cfg, b.unet, b.text_encoder, b.tokenizer, "<c0>", reference=W0)
    _perturb(st)
    pen, _ = st.penalty(0)
    brute = 0.0
    for name, ad in st.adapters.items():
        W = b.unet.get_submodule(name).base.weight.detach().double()
        drift = W - W0[name].double()
        dW = (ad.alpha / ad.rank) * (ad.lora_B.detach().double() @ ad.lora_A.detach().double())
        for i in range(drift.shape[0]):
            for j in range(drift.shape[1]):
                brute += float((drift[i, j] * dW[i, j]) ** 2)
    assert abs(float(pen.detach()) - 0.37 * brute) <= 1e-4 * max(1.0, 0.37 * brute)
    assert pen.requires_grad


def test_clora_penalty_is_zero_without_earlier_drift(micro_bundle):
    b = micro_bundle
    st = begin_concept(get("clora"), _cfg("clora"), b.unet, b.text_encoder, b.tokenizer, "<c0>")
    _perturb(st)
    pen, _ = st.penalty(0)
    assert float(pen.detach()) == 0.0


def test_stamina_sparsity_and_overlap_losses(micro_bundle):
    b = micro_bundle
    cfg = _cfg("stamina")
    cfg.mask.sparsity_weight = 0.5
    cfg.mask.overlap_weight = 2.0
    cfg.mask.warmup_steps = 2
    W0 = reference_weights(b.unet, cfg.adapter.targets)
    first = next(iter(W0))
    with torch.no_grad():
        b.unet.get_submodule(first).weight[0, 0] += 1.0  # one entry changed by an earlier concept
    st = begin_concept(get("stamina"), cfg, b.unet, b.text_encoder, b.tokenizer, "<c0>", reference=W0)
    pen0, _ = st.penalty(0)
    assert float(pen0.detach()) == 0.0  # warm-up: no sparsity pressure while B = 0
    pen, logs = st.penalty(5)
    layers = st.masked_layers()
    sp = sum(float(ad.soft_mask().mean().detach()) for ad in layers) / len(layers)
    ov = float(layers[0].soft_mask()[0, 0].detach()) / layers[0].soft_mask().numel() / len(layers)
    assert abs(logs["sparsity"] - sp) < 1e-6
    assert abs(float(pen.detach()) - (0.5 * sp + 2.0 * ov)) < 1e-6
    pen.backward()
    assert all(ad.mask_gen.b.grad is not None for ad in layers)


def test_temperature_anneal_schedule(micro_bundle):
    b = micro_bundle
    cfg = _cfg("stamina")
    cfg.mask.schedule = "anneal"
    cfg.mask.s_max = 8.0
    st = begin_concept(get("stamina"), cfg, b.unet, b.text_encoder, b.tokenizer, "<c0>")
    assert st.temperature_at(0, 11) == pytest.approx(1 / 8)
    assert st.temperature_at(10, 11) == pytest.approx(8.0)
    st.set_progress(5, 11)
    assert all(ad.temperature == pytest.approx(1 / 8 + (8 - 1 / 8) * 0.5) for ad in st.masked_layers())
    # the initial hard mask is fully open, and b is calibrated at the final (sharpest) s:
    # sigmoid(s_max * b) = init_open, so the masks stay closable at the end of the schedule
    assert all(ad.density() == 1.0 for ad in st.masked_layers())
    for ad in st.masked_layers():
        assert float(torch.sigmoid(8.0 * ad.mask_gen.b).mean()) == pytest.approx(cfg.mask.init_open, rel=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "anneal"])
def test_sparsity_loss_closes_masks_under_either_schedule(micro_bundle, schedule):
    """A sparsity-only objective must be able to flip entries whatever the schedule (regression: b calibrated
    at the anneal's starting s = 1/s_max sat s_max^2 times too far out and no entry could ever close)."""
    b = micro_bundle
    cfg = _cfg("stamina")
    cfg.mask.schedule, cfg.mask.s_max, cfg.mask.temperature = schedule, 4.0, 4.0
    cfg.mask.sparsity_weight, cfg.mask.warmup_steps = 1.0, 0
    st = begin_concept(get("stamina"), cfg, b.unet, b.text_encoder, b.tokenizer, "<c0>")
    layers = st.masked_layers()
    opt = torch.optim.Adam([p for ad in layers for p in ad.mask_parameters().values()], lr=0.05)
    steps = 40
    for step in range(steps):
        st.set_progress(step, steps)
        opt.zero_grad()
        pen, _ = st.penalty(step)
        pen.backward()
        opt.step()
    dens = [ad.density() for ad in layers]
    assert max(dens) < 0.5, dens


def test_mlp_token_is_rescaled_and_only_new_row_changes(micro_bundle):
    b = micro_bundle
    st = begin_concept(get("stamina"), _cfg("stamina"), b.unet, b.text_encoder, b.tokenizer, "<c0>")
    src = st.token_embedding.source
    from stamina_core.tokens import word_embedding

    target = float(word_embedding(b.text_encoder, b.tokenizer, "object").norm())
    assert float(src().norm()) == pytest.approx(target, rel=1e-5)


def test_adding_an_existing_token_is_an_error(micro_bundle):
    b = micro_bundle
    st = begin_concept(get("lora_seq"), _cfg("lora_seq"), b.unet, b.text_encoder, b.tokenizer, "<c0>")
    st.fold()
    with pytest.raises(TokenError, match="already exists"):
        begin_concept(get("lora_seq"), _cfg("lora_seq"), b.unet, b.text_encoder, b.tokenizer, "<c0>")


def test_multi_concept_sequence_keeps_earlier_tokens(micro_bundle):
    b = micro_bundle
    for i, m in enumerate(["stamina", "clora", "stamina"]):
        st = begin_concept(get(m), _cfg(m, steps=2), b.unet, b.text_encoder, b.tokenizer, f"<c{i}>")
        train_concept(b, st, ConceptData(torch.rand(2, *b.model_shape()) * 2 - 1, [f"a photo of <c{i}>"]))
        st.fold()
    ids = b.tokenize(["<c0> and <c1> and <c2>"])[0].tolist()
    for i in range(3):
        assert b.tokenizer.convert_tokens_to_ids(f"<c{i}>") in ids


@pytest.mark.parametrize(
    "data,field",
    [
        ({"name": "nope"}, "name"),
        ({"adapter": {"rank": 0}}, "adapter.rank"),
        ({"mask": {"rank": 0}}, "mask.rank"),
        ({"mask": {"temperature": 0}}, "mask.temperature"),
        ({"mask": {"init_open": 0.3}}, "mask.init_open"),
        ({"train": {"learning_rate": -1}}, "train.learning_rate"),
        ({"adapter": {"rnak": 4}}, "adapter.rnak"),
    ],
)
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        parse(MethodConfig, data)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_rank_too_large_for_the_model_names_the_field(micro_bundle):
    b = micro_bundle
    cfg = MethodConfig(name="lora_seq")
    cfg.adapter.rank = 1000
    with pytest.raises(ConfigError, match="adapter.rank"):
        begin_concept(get("lora_seq"), cfg, b.unet, b.text_encoder, b.tokenizer, "<c0>")


def test_config_hash_is_stable_and_sensitive():
    from stamina_core.config import config_hash

    a, b = MethodConfig(), MethodConfig()
    assert config_hash(a) == config_hash(b)
    b.mask.sparsity_weight = 0.01
    assert config_hash(a) != config_hash(b)


def test_deepcopy_of_bundle_is_independent(micro_bundle):
    b2 = copy.deepcopy(micro_bundle)
    st = begin_concept(get("lora_seq"), _cfg("lora_seq"), b2.unet, b2.text_encoder, b2.tokenizer, "<c0>")
    st.fold()
    assert "<c0>" not in micro_bundle.tokenizer.get_vocab()


def test_preserve_penalty_charges_kv_change_on_earlier_prompts_only_when_on(micro_bundle):
    """PreserveConfig: weight * sum ||H D^T||^2 / sum ||H W0^T||^2 over the attn2 layers, H = text states of the
    earlier prompts (+ the empty prompt); off by default, and a default config keeps its old hash."""
    from stamina_core.config import config_hash

    b = micro_bundle
    assert config_hash(MethodConfig()) == "069421e8098c"  # the key before PreserveConfig existed
    off = begin_concept(get("lora_seq"), _cfg("lora_seq"), b.unet, b.text_encoder, b.tokenizer, "<c0>",
                        preserve_prompts=["a photo of a bear"])
    assert off.preserve_rows is None and off.penalty(0) == (None, {})
    off.fold()
    cfg = _cfg("stamina")
    cfg.preserve.weight = 2.0
    st = begin_concept(get("stamina"), cfg, b.unet, b.text_encoder, b.tokenizer, "<c1>",
                       preserve_prompts=["a photo of <c0>"])
    layers = st.preserved_layers()
    assert layers and all(".attn2." in "." + ad.name + "." for ad in layers)
    L = b.tokenizer.model_max_length
    assert st.preserve_rows.shape[0] == 2 * L  # the earlier prompt and the empty prompt
    pen0, _ = st.penalty(0)  # B = 0 at init: no change yet, no cost (the sparsity term is in warm-up)
    assert pen0.detach().item() == 0.0
    with torch.no_grad():
        for ad in layers:
            ad.lora_B.normal_()
    pen, logs = st.penalty(0)
    H = st.preserve_rows
    num = sum(float((H @ ad.delta_weight().T).pow(2).sum()) for ad in layers)
    den = sum(float((H @ st.reference[ad.name].T).pow(2).sum()) for ad in layers)
    assert float(pen.detach()) == pytest.approx(2.0 * num / den, rel=1e-5) and logs["preserve"] == pytest.approx(num / den, rel=1e-5)
    pen.backward()
    assert all(ad.lora_B.grad is not None and float(ad.lora_B.grad.abs().sum()) > 0 for ad in layers)


def test_pipeline_accepts_the_preserve_term_and_validates_it():
    """Since session 8 the pipeline runs method.preserve (the driver passes the earlier prompts; the e2e test
    checks they arrive); a bad weight is still one line naming the field."""
    from components.schemas import SequenceConfig
    from stamina_core.config import ConfigError

    data = {"sequence_id": "s", "concepts": [{"name": "a", "token": "<a>", "images": "/tmp/x"}],
            "method": {"name": "stamina", "preserve": {"weight": 1.0}}}
    assert parse(SequenceConfig, data).method.preserve.weight == 1.0
    data["method"]["preserve"]["weight"] = -1
    with pytest.raises(ConfigError, match="method.preserve.weight"):
        parse(SequenceConfig, data)
