"""GPTQ: the algorithm against round-to-nearest, the packed layouts, the 4-bit module and kernel,
the GPTQ folder written and read back."""

from __future__ import annotations

import json

import pytest
import torch

from gemmakit.quant.gptq import dequantize, gptq_quantize, rtn_quantize
from gemmakit.quant.gptq_linear import GPTQLinear
from gemmakit.quant.packed4 import AWQ_ORDER, awq_pack, awq_unpack, gptq_pack, gptq_unpack


def _correlated_layer(seed=0, N=64, K=256, T=1024):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K**0.5
    X = torch.randn(T, K, generator=g) @ mix + 0.3 * torch.randn(T, K, generator=g)
    X[:, :8] *= 10  # a few outlier channels, as real activations have
    W = 0.05 * torch.randn(N, K, generator=g)
    return W, X


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_output_error_is_lower_than_round_to_nearest(desc_act):
    W, X = _correlated_layer()
    H = 2 * X.t() @ X / len(X)
    q, r = gptq_quantize(W, H, 64, desc_act), rtn_quantize(W, 64)
    gptq_err = ((W - dequantize(q)) @ X.t()).pow(2).sum()
    rtn_err = ((W - dequantize(r)) @ X.t()).pow(2).sum()
    assert gptq_err < 0.8 * rtn_err
    # The grid is GPTQ's: levels 0..15, zeros 1..15, fp16 scales; g_idx maps 64 columns per group.
    assert int(q["levels"].max()) <= 15 and 1 <= int(q["zeros"].min()) and int(q["zeros"].max()) <= 15
    assert torch.bincount(q["g_idx"].long()).tolist() == [64] * 4
    if not desc_act:
        assert torch.equal(q["g_idx"].long(), torch.arange(256) // 64)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    """With uncorrelated inputs there is no error to move: GPTQ's levels are RTN's."""
    W, _ = _correlated_layer(1)
    q, r = gptq_quantize(W, torch.eye(256), 64, damp_percent=0.0), rtn_quantize(W, 64)
    assert torch.equal(q["levels"], r["levels"]) and torch.equal(q["scales"], r["scales"])


def test_packed_layouts_round_trip_and_bit_positions():
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 16, (24, 64), generator=g)
    zeros = torch.randint(1, 16, (24, 2), generator=g)
    qweight, qzeros = gptq_pack(levels, zeros)
    assert qweight.shape == (8, 24) and qzeros.shape == (2, 3) and qweight.dtype == torch.int32
    back, back_zeros = gptq_unpack(qweight, qzeros)
    assert torch.equal(back.long(), levels) and torch.equal(back_zeros.long(), zeros)
    word = int(qweight[1, 5]) & 0xFFFFFFFF  # input rows 8..15 of output column 5, row 8 lowest
    assert [(word >> (4 * j)) & 15 for j in range(8)] == levels[5, 8:16].tolist()
    zword = int(qzeros[0, 1]) & 0xFFFFFFFF  # v1: zero - 1 of output columns 8..15
    assert [(zword >> (4 * j)) & 15 for j in range(8)] == (zeros[8:16, 0] - 1).tolist()

    qweight, qzeros = awq_pack(levels, zeros)
    assert qweight.shape == (64, 3) and qzeros.shape == (2, 3)
    back, back_zeros = awq_unpack(qweight, qzeros)
    assert torch.equal(back.long(), levels) and torch.equal(back_zeros.long(), zeros)
    word = int(qweight[7, 2]) & 0xFFFFFFFF  # input row 7, output columns 16..23 interleaved
    assert [(word >> (4 * j)) & 15 for j in range(8)] == [int(levels[16 + c, 7]) for c in AWQ_ORDER]
    with pytest.raises(ValueError):
        gptq_pack(levels, zeros - 1)


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_linear_kernel_matches_its_dequantized_weight(desc_act):
    W, X = _correlated_layer(2, N=64, K=256)
    q = gptq_quantize(W, 2 * X.t() @ X / len(X), 64, desc_act)
    module = GPTQLinear.from_quantized(q, 64)
    weight = module.dequantize()
    assert torch.equal(weight, dequantize(q))
    x = X[:5]
    with torch.no_grad():
        y = module(x)
    # torch's int4 kernel rounds activations, scales and zeros to bfloat16.
    torch.testing.assert_close(y, x @ weight.t(), rtol=0.02, atol=0.02 * float((x @ weight.t()).abs().max()))
    # The state dict is the checkpoint's tensors, nothing else.
    assert sorted(module.state_dict()) == ["g_idx", "qweight", "qzeros", "scales"]


def _tiny_loaded(hf_folder):
    from gemmakit.loading import load
    from tests.test_export import tiny_sentencepiece

    folder, _ = hf_folder("gemma3", intermediate_size=128)
    (folder / "tokenizer.model").write_bytes(tiny_sentencepiece())
    return folder, load(folder, dtype="float32", device="cpu")


def test_gptq_model_written_folder_reloads_with_identical_logits(hf_folder, tmp_path):
    from gemmakit.formats.gptq_folder import gptq_config, write_gptq_folder
    from gemmakit.loading import load
    from gemmakit.quant.gptq import gptq_quantize_model

    folder, loaded = _tiny_loaded(hf_folder)
    model = loaded.model
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = model(ids)
    windows = [torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    gptq_quantize_model(model, windows, group_size=32, desc_act=True)
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 14
    with torch.no_grad():
        logits = model(ids)
    # 4 bits of random weights: the logits follow the float model's, not equal to them.
    assert torch.cosine_similarity(logits.flatten(), float_logits.flatten(), dim=0) > 0.9
    assert not torch.equal(logits, float_logits)

    out = tmp_path / "gptq"
    write_gptq_folder(out, model.state_dict(), model.config, loaded.tokenizer, gptq_config(32, True),
                      torch.float32, source_folder=folder, progress=False)  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["quantization_config"]["checkpoint_format"] == "gptq"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype == torch.int32
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert "model.layers.1.mlp.down_proj.g_idx" in keys

    reloaded = load(out, dtype="float32", device="cpu").model
    with torch.no_grad():
        assert torch.equal(reloaded(ids), logits)


def test_other_prequantized_folders_are_one_clear_error(hf_folder):
    from gemmakit.errors import GemmakitError
    from gemmakit.loading import load

    folder, _ = hf_folder("gemma3")
    config = json.loads((folder / "config.json").read_text())
    for qconfig, message in [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "GEMM"),
        ({"quant_method": "gptq", "bits": 8, "group_size": 32}, "4-bit only"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}, "v1"),
    ]:
        config["quantization_config"] = qconfig
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(GemmakitError, match=message):
            load(folder, dtype="float32", device="cpu")


def test_quantize_method_gptq_cli_writes_a_folder_gemmakit_loads(hf_folder, tmp_path, capsys):
    from gemmakit.cli import main
    from gemmakit.loading import load

    folder, loaded = _tiny_loaded(hf_folder)
    out = tmp_path / "out"
    rc = main(
        ["quantize", "-m", str(folder), "--method", "gptq", "--group-size", "32", "-o", str(out), "--json"]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["method"] == "gptq" and summary["calibration"] == "eval_text_wiki.txt + guanaco_sample.jsonl"
    )
    assert (out / "tokenizer.model").exists()
    model = load(out, dtype="float32", device="cpu").model
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 14
    # A user mistake is one line, exit code 2.
    assert (
        main(["quantize", "-m", str(folder), "--method", "gptq", "-o", str(out), "--group-size", "32"]) == 2
    )
    assert "not empty" in capsys.readouterr().err
    assert main(["quantize", "-m", str(folder), "--method", "gptq"]) == 2


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_on_load_is_cached_in_its_own_format(method, hf_folder, tmp_path, monkeypatch):
    """GPTQ and AWQ quantized on load are cached (AWQ in AWQ's layout and config, so that the
    cached copy loads as AWQ again) and load from the cache with the same logits."""
    from gemmakit.formats.gptq_folder import awq_config
    from gemmakit.loading import load
    from gemmakit.quant.gptq_linear import StoredHalfLinear

    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GEMMAKIT_NO_CACHE", raising=False)
    folder, _ = _tiny_loaded(hf_folder)
    spec = {"kind": method, "group_size": 32}
    first = load(folder, dtype="float32", device="cpu", quantize=spec).model
    (cached,) = (tmp_path / "cache" / "quantized").glob(f"{method}-*")
    assert (cached / "config.json").exists()
    second = load(folder, dtype="float32", device="cpu", quantize=spec).model
    ids = torch.tensor([[2, 10, 20, 30, 40]])
    with torch.no_grad():
        assert torch.equal(first(ids), second(ids))
    assert isinstance(second.model.layers[0].mlp.down_proj, GPTQLinear)
    for model in (first, second):  # bf16 as a written checkpoint holds it, cached so
        assert isinstance(model.lm_head, StoredHalfLinear) and model.lm_head.weight.dtype == torch.bfloat16
    assert first.quantization["kind"] == second.quantization["kind"] == method
    written = json.loads((cached / "config.json").read_text())["quantization_config"]
    assert written["quant_method"] == method
    if method == "awq":
        assert written == awq_config(32)


# --- AWQ ----------------------------------------------------------------------------------------


def test_awq_scale_search_beats_plain_rounding_with_salient_channels():
    from gemmakit.quant.awq import search_scale

    W, X = _correlated_layer(3)
    X[:, 8:16] *= 20  # salient input channels
    s = search_scale(X, [W], 64)
    awq = dequantize(rtn_quantize(W * s, 64)) / s
    rtn = dequantize(rtn_quantize(W, 64))
    assert ((X @ (W - awq).t()).pow(2).sum()) < 0.9 * (X @ (W - rtn).t()).pow(2).sum()
    assert float(s[8:16].mean()) > float(s[16:].mean())  # the salient channels are scaled up


def test_awq_folding_keeps_the_float_block_and_quantizes_every_linear(hf_folder):
    import functools

    from gemmakit.quant.awq import awq_quantize_model, awq_scale_block
    from gemmakit.quant.gptq import block_states

    _, loaded = _tiny_loaded(hf_folder)
    model = loaded.model
    ids = torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(1))
    states = block_states(model, [ids])

    def run(block):
        return [
            block(s["h"], s["ropes"][block.layer_type], s["masks"][block.layer_type], None, {})
            for s in states
        ]

    block = model.model.layers[0]
    with torch.no_grad():
        before = run(block)[0]
        norm_before = block.input_layernorm.weight.clone()
        awq_scale_block(block, functools.partial(run, block), 32)
        after = run(block)[0]
    assert not torch.equal(norm_before, block.input_layernorm.weight)  # a scale was folded in
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # the same function

    with torch.no_grad():
        float_logits = model(ids)
        awq_quantize_model(model, [ids], group_size=32)
        logits = model(ids)
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 14
    assert torch.cosine_similarity(logits.flatten(), float_logits.flatten(), dim=0) > 0.9


def test_awq_folder_written_and_reloaded_with_identical_logits(hf_folder, tmp_path):
    from gemmakit.formats.gptq_folder import awq_config, write_gptq_folder
    from gemmakit.loading import load
    from gemmakit.quant.awq import awq_quantize_model
    from gemmakit.quant.packed4 import gptq_state_to_awq

    folder, loaded = _tiny_loaded(hf_folder)
    model = loaded.model
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    awq_quantize_model(model, [ids], group_size=32)
    out = tmp_path / "awq"
    write_gptq_folder(out, gptq_state_to_awq(model.state_dict()), model.config, loaded.tokenizer,
                      awq_config(32), torch.float32, source_folder=folder, progress=False)  # fmt: skip
    assert json.loads((out / "config.json").read_text())["quantization_config"]["version"] == "gemm"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert tuple(f.get_tensor("model.layers.0.mlp.down_proj.qweight").shape) == (128, 64 // 8)
        assert "model.layers.0.mlp.down_proj.g_idx" not in set(f.keys())
    reloaded = load(out, dtype="float32", device="cpu").model
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))
    # act-order weights have no AWQ form: one clear error.
    with pytest.raises(ValueError, match="act-order"):
        state = dict(model.state_dict())
        state["model.layers.0.mlp.down_proj.g_idx"] = state["model.layers.0.mlp.down_proj.g_idx"].flip(0)
        gptq_state_to_awq(state)


def test_range_search_never_rounds_worse_than_the_full_range():
    """group_params' mse search includes the full range (shrink 1), so its weighted error per
    row is at most the plain grid's, and for many rows less."""
    from gemmakit.quant.gptq import MSE_NORM, group_params, quantize_columns

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    weights = torch.rand(32, generator=g) + 0.5

    def error(scale, zero):
        q = quantize_columns(w, scale, zero)
        return (((q - zero[:, None]) * scale[:, None] - w).abs().pow(MSE_NORM) * weights).sum(1)

    plain, searched = error(*group_params(w)), error(*group_params(w, mse=True, weights=weights))
    assert (searched <= plain).all() and int((searched < 0.95 * plain).sum()) >= 16
    scale, zero = group_params(w, sym=True)
    assert (zero == 8).all() and torch.allclose(scale, (w.abs().amax(1) * 2 / 15).half().float())


def test_static_groups_keep_g_idx_in_order_and_beat_round_to_nearest():
    from gemmakit.quant.gptq import GPTQSettings

    W, X = _correlated_layer()
    H = 2 * X.t() @ X / len(X)
    q = gptq_quantize(W, H, settings=GPTQSettings(64, desc_act=True, static_groups=True))
    assert torch.equal(q["g_idx"].long(), torch.arange(256) // 64)
    gptq_err = ((W - dequantize(q)) @ X.t()).pow(2).sum()
    rtn_err = ((W - dequantize(rtn_quantize(W, 64))) @ X.t()).pow(2).sum()
    assert gptq_err < 0.7 * rtn_err


def test_true_sequential_calibrates_each_linear_on_quantized_inputs(hf_folder):
    """With true_sequential, o_proj's Hessian comes from the block with q/k/v quantized: its
    result differs from the one-pass run, while q/k/v (quantized first) are the same."""
    from gemmakit.quant.gptq import GPTQSettings, gptq_quantize_model

    _, loaded = _tiny_loaded(hf_folder)
    windows = [torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    runs = {}
    for sequential in (False, True):
        import copy

        model = copy.deepcopy(loaded.model)
        gptq_quantize_model(model, windows, settings=GPTQSettings(32, true_sequential=sequential))
        runs[sequential] = model.model.layers[0].self_attn
    assert torch.equal(runs[False].q_proj.qweight, runs[True].q_proj.qweight)
    assert not torch.equal(runs[False].o_proj.qweight, runs[True].o_proj.qweight)


def test_gptq_config_records_the_settings():
    from gemmakit.formats.gptq_folder import gptq_config
    from gemmakit.quant.gptq import GPTQSettings

    config = gptq_config(32, True, settings=GPTQSettings(32, damp_percent=0.05))
    assert config["true_sequential"] and config["mse"] == 2.4 and config["damp_percent"] == 0.05
    assert not gptq_config(128, False)["true_sequential"]
