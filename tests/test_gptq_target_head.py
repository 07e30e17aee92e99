"""GPTAQ's float target, the stage statistics GPTQ collects, and the bf16 output head a GPTQ/AWQ
checkpoint keeps (torch and C steps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.quant.gptq import (
    GPTQSettings,
    HessianCollector,
    _StageInputs,
    block_linears,
    block_states,
    dequantize,
    gptq_quantize,
    gptq_quantize_model,
)
from gemmakit.quant.gptq_linear import GPTQLinear, StoredHalfLinear
from gemmakit.quant.linear import QuantizedEmbedding
from tests.test_gptq_awq import _correlated_layer, _tiny_loaded
from tests.test_gptq_c_decode import assert_c_steps_match

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler here")


def _drifted_inputs(seed=1):
    """A layer's float inputs X and the quantized model's X~ = X plus a correlated drift."""
    W, X = _correlated_layer()
    g = torch.Generator().manual_seed(seed)
    X_q = X + 0.3 * X @ (torch.randn(X.shape[1], X.shape[1], generator=g) / X.shape[1] ** 0.5)
    return W, X, X_q


def _float_target_error(W, X, X_q, alpha: float) -> float:
    collector = HessianCollector(X.shape[1], [X])
    collector(None, (X_q,))
    settings = GPTQSettings(64, desc_act=True, float_target=alpha)
    q = gptq_quantize(W, collector.hessian(), settings=settings, cross=collector.cross())
    return float((X_q @ dequantize(q).t() - X @ W.t()).pow(2).sum())


def test_gptaq_cross_term_is_the_inputs_drift_at_the_hessians_scale():
    W, X, X_q = _drifted_inputs()
    collector = HessianCollector(X.shape[1], [X[:300], X[300:]])
    collector(None, (X_q[:300],)), collector(None, (X_q[300:],))  # two windows, in order
    n = len(X)
    torch.testing.assert_close(collector.hessian(), (2 * X_q.t() @ X_q / n).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(collector.cross(), (2 * (X - X_q).t() @ X_q / n).float(), rtol=1e-5, atol=1e-4)


def test_gptaq_matches_the_float_models_outputs_better_than_gptq():
    W, X, X_q = _drifted_inputs()
    plain, gptaq = _float_target_error(W, X, X_q, 0.0), _float_target_error(W, X, X_q, 0.25)
    full = _float_target_error(W, X, X_q, 1.0)
    assert gptaq < 0.9 * plain and full < gptaq


def test_gptaq_without_drift_is_gptq():
    W, X = _correlated_layer()
    assert _float_target_error(W, X, X, 0.25) == _float_target_error(W, X, X, 0.0)


def _tiny_model(hf_folder):
    return _tiny_loaded(hf_folder)[1].model


def test_a_stage_shares_one_hessian_per_input_and_stops_early(hf_folder):
    model = _tiny_model(hf_folder)
    windows = [torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    block = model.model.layers[0]
    linears = block_linears(block)
    stage = {n: m for n, m in linears.items() if n.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj")}
    with torch.no_grad():
        states = block_states(model, windows)
        inputs = _StageInputs(stage, None)
        inputs.run(block, states)
        reference = HessianCollector(block.self_attn.q_proj.in_features)
        hook = block.self_attn.k_proj.register_forward_pre_hook(reference)
        seen = []
        mlp_hook = block.mlp.register_forward_pre_hook(lambda m, a: seen.append(1))
        for s in states:
            block(s["h"], s["ropes"][block.layer_type], s["masks"][block.layer_type], None, s["shared"])
        hook.remove(), mlp_hook.remove()
    assert len(inputs.collectors) == 1  # q, k and v read one tensor: one X^T X
    assert inputs.collector("self_attn.q_proj") is inputs.collector("self_attn.v_proj")
    assert torch.equal(inputs.collector("self_attn.k_proj").hessian(), reference.hessian())
    assert len(seen) == 3  # the reference pass reached the MLP; the stage's own passes stopped before


def test_gptaq_leaves_the_first_layers_first_stage_as_gptq(hf_folder):
    """Block 0's q/k/v read the same inputs in the float and quantized models: no drift, the
    same weights. Later stages read drifted inputs and move."""
    windows = [torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    models = {}
    for alpha in (0.0, 0.25):
        models[alpha] = gptq_quantize_model(
            _tiny_model(hf_folder), windows, settings=GPTQSettings(32, float_target=alpha)
        )
    plain, gptaq = (models[a].model.layers for a in (0.0, 0.25))
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(
            getattr(plain[0].self_attn, name).qweight, getattr(gptaq[0].self_attn, name).qweight
        )
    assert not torch.equal(plain[1].mlp.down_proj.qweight, gptaq[1].mlp.down_proj.qweight)


def _bf16_gptq_folder(hf_folder, tmp_path):
    from gemmakit.formats.gptq_folder import gptq_config, write_gptq_folder

    folder, loaded = _tiny_loaded(hf_folder)
    model = loaded.model
    windows = [torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    gptq_quantize_model(model, windows, group_size=32, desc_act=True)
    out = tmp_path / "gptq-bf16"
    write_gptq_folder(out, model.state_dict(), model.config, loaded.tokenizer, gptq_config(32, True),
                      torch.bfloat16, source_folder=folder, progress=False)  # fmt: skip
    return out


def _float_head_copy(model, dequantize_linears: bool = False):
    """The same model with its tied head widened to an ordinary float32 embedding + linear
    (and, with `dequantize_linears`, its 4-bit linears replaced by their exact float weights,
    which the C step computes with)."""
    if dequantize_linears:
        from gemmakit.quant.gptq import replace_linear

        for block in model.model.layers:
            for name, m in list(block.named_modules()):
                if isinstance(m, GPTQLinear):
                    plain = nn.Linear(m.in_features, m.out_features, bias=False)
                    plain.weight.data = m.dequantize(torch.float32)
                    replace_linear(block, name, plain)
    weight = model.lm_head.weight.float()
    model.model.embed_tokens = nn.Embedding.from_pretrained(weight, freeze=True)
    model.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def test_a_bf16_checkpoints_head_stays_bf16_with_the_float32_copys_logits(hf_folder, tmp_path):
    from gemmakit.loading import load

    out = _bf16_gptq_folder(hf_folder, tmp_path)
    model = load(out, dtype="float32", device="cpu").model
    assert isinstance(model.lm_head, StoredHalfLinear) and model.lm_head.weight.dtype == torch.bfloat16
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert model.model.embed_tokens.source is model.lm_head  # stored once
    assert "lm_head.weight" in model.state_dict() and "model.embed_tokens.weight" not in model.state_dict()
    widened = _float_head_copy(load(out, dtype="float32", device="cpu").model)
    ids = torch.randint(3, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), widened(ids), rtol=1e-5, atol=1e-5)


def test_stored_head_chunks_give_the_whole_products(monkeypatch):
    import gemmakit.quant.gptq_linear as gptq_linear

    weight = torch.randn(100, 64).bfloat16()
    head, x = StoredHalfLinear(weight), torch.randn(3, 64)
    monkeypatch.setattr(gptq_linear, "HEAD_CHUNK_ROWS", 7)
    torch.testing.assert_close(head(x), x @ weight.float().t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(head.rows(torch.tensor([5, 2])), weight[[5, 2]].float())


def test_a_float32_or_float16_head_is_left_as_before(hf_folder, tmp_path):
    from gemmakit.formats.gptq_folder import gptq_config, write_gptq_folder
    from gemmakit.loading import load

    folder, loaded = _tiny_loaded(hf_folder)
    windows = [torch.randint(3, 256, (1, 48))]
    gptq_quantize_model(loaded.model, windows, group_size=32, desc_act=False)
    for dtype in (torch.float32, torch.float16):
        out = tmp_path / str(dtype)
        write_gptq_folder(out, loaded.model.state_dict(), loaded.model.config, loaded.tokenizer,
                          gptq_config(32, False), dtype, source_folder=folder, progress=False)  # fmt: skip
        model = load(out, dtype="float32", device="cpu").model
        assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32


@needs_kernel
def test_c_step_reads_the_bf16_head_as_the_torch_model_computes(hf_folder, tmp_path):
    from gemmakit.loading import load

    out = _bf16_gptq_folder(hf_folder, tmp_path)
    model = load(out, dtype="float32", device="cpu").model
    reference = _float_head_copy(load(out, dtype="float32", device="cpu").model, dequantize_linears=True)
    assert any(isinstance(m, GPTQLinear) for m in model.modules())
    assert_c_steps_match(model, reference, steps=8)  # the bf16 head runs in C
