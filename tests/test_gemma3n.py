"""Gemma 3n text model against transformers' modeling_gemma3n.py: the pieces (LAuReL, the
sparse MLP, AltUp) and the whole causal LM on tiny random models with every feature on
somewhere (PLE, KV sharing, AltUp, LAuReL, sparsity, per-layer widths, windows that bite,
soft-capping)."""

from __future__ import annotations

import pytest
import torch

from gemmakit.hf_config import from_hf_config
from gemmakit.model.gemma3n import AltUp, Gemma3n, Laurel, SparseMLP

S, F = "sliding_attention", "full_attention"
ATOL, RTOL = 1e-4, 1e-4
# Tiny variants: together they switch every Gemma 3n feature on somewhere. The per-layer
# vocabulary is smaller than the token vocabulary, so ids past it read row 0 as the reference
# does; windows of 4 bite on sequences of 12+.
VARIANTS = {
    "shared_kv_altup3_active1": dict(
        num_hidden_layers=6, layer_types=[S, F, S, S, F, S], num_kv_shared_layers=2,
        intermediate_size=[96, 128, 64, 96, 128, 80],
        activation_sparsity_pattern=[0.95, 0.6, 0.0, 0.0, 0.3, 0.0],
        altup_num_inputs=3, altup_active_idx=1, altup_correct_scale=True,
    ),
    "altup4_untied_unscaled": dict(
        num_hidden_layers=4, layer_types=[S, S, F, S], num_kv_shared_layers=0,
        intermediate_size=112, activation_sparsity_pattern=[0.0, 0.8, 0.0, 0.0],
        altup_num_inputs=4, altup_active_idx=0, altup_correct_scale=False,
        tie_word_embeddings=False,
    ),
    "altup2_shared_full": dict(
        num_hidden_layers=5, layer_types=[F, S, F, S, S], num_kv_shared_layers=3,
        intermediate_size=[64, 96, 64, 96, 64], activation_sparsity_pattern=[0.5, 0.0, 0.0, 0.0, 0.9],
        altup_num_inputs=2, altup_active_idx=1, altup_correct_scale=True,
    ),
}  # fmt: skip


def tiny_config(variant: str = "shared_kv_altup3_active1", **overrides):
    import transformers

    args = dict(
        vocab_size=256, vocab_size_per_layer_input=200, hidden_size=64,
        hidden_size_per_layer_input=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=4, laurel_rank=4, final_logit_softcapping=3.0, altup_coef_clip=0.5,
        max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        rope_parameters={S: {"rope_type": "default", "rope_theta": 10_000.0},
                         F: {"rope_type": "default", "rope_theta": 1_000_000.0}},
    )  # fmt: skip
    args.update(VARIANTS[variant])
    args.update(overrides)
    cfg = transformers.Gemma3nTextConfig(**args)
    cfg._attn_implementation = "eager"
    return cfg


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every tensor of the state dict random (norm gains around 1, AltUp scales included), so
    that a loader dropping any of them changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            noise = torch.randn(t.shape, generator=gen)
            if "norm" in name:
                t.copy_(1.0 + 0.3 * noise)
            elif "correct_output_scale" in name or "coefs" in name:
                t.copy_(0.4 * noise)
            else:
                t.copy_(0.1 * noise)


def hf_model(variant: str = "shared_kv_altup3_active1", seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    model = transformers.Gemma3nForCausalLM(tiny_config(variant, **overrides)).eval()
    randomize(model, seed)
    return model


def paired(variant: str = "shared_kv_altup3_active1", seed: int = 0):
    """(ours, transformers') with the same weights: loading is an identity copy."""
    ref = hf_model(variant, seed)
    ours = Gemma3n(from_hf_config(ref.config.to_dict()))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval(), ref


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the pieces -------------------------------------------------------------------------------


def _pieces_config():
    hf = tiny_config()
    return hf, from_hf_config(hf.to_dict())


def test_laurel_matches_transformers():
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextLaurelBlock

    hf_cfg, cfg = _pieces_config()
    ref = Gemma3nTextLaurelBlock(hf_cfg)
    randomize(ref)
    ours = Laurel(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layer", [0, 1, 2, 4])
def test_sparse_mlp_matches_transformers(layer):
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextMLP

    hf_cfg, cfg = _pieces_config()
    ref = Gemma3nTextMLP(hf_cfg, layer_idx=layer)
    randomize(ref, seed=layer)
    ours = SparseMLP(cfg, layer)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.gate_proj.out_features == hf_cfg.intermediate_size[layer]
    assert ours.sparsity == hf_cfg.activation_sparsity_pattern[layer]
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)


def test_gaussian_topk_keeps_about_the_target_fraction():
    from gemmakit.model.gemma3n import gaussian_topk

    x = torch.randn(4, 4096, generator=torch.Generator().manual_seed(0))
    kept = (gaussian_topk(x, 0.95) > 0).float().mean().item()
    assert 0.04 < kept < 0.06


def _altup_pair(training: bool):
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextAltUp

    hf_cfg, cfg = _pieces_config()
    ref = Gemma3nTextAltUp(hf_cfg)
    randomize(ref, seed=3)
    ours = AltUp(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.train(training), ref.train(training)


@pytest.mark.parametrize("training", [False, True])
def test_altup_predict_correct_scale_match_transformers(training):
    ours, ref = _altup_pair(training)
    # Coefficients past the clip of 0.5, so that clipping (training only) changes the result.
    assert ref.prediction_coefs.weight.abs().max() > 0.5
    streams = torch.randn(3, 2, 5, 64)
    activated = torch.randn(2, 5, 64)
    pred_ours, pred_ref = ours.predict(streams), ref.predict(streams)
    torch.testing.assert_close(pred_ours, pred_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.prediction_coefs.weight, ref.prediction_coefs.weight)
    torch.testing.assert_close(
        ours.correct(pred_ours, activated), ref.correct(pred_ref, activated), atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(ours.scale_corrected_output(activated), ref.scale_corrected_output(activated))


def test_altup_clips_coefficients_only_in_training():
    ours, _ = _altup_pair(training=False)
    streams = torch.randn(3, 2, 5, 64)
    before = ours.prediction_coefs.weight.clone()
    eval_out = ours.predict(streams)
    assert torch.equal(ours.prediction_coefs.weight, before)
    ours.train()
    train_out = ours.predict(streams)
    assert ours.prediction_coefs.weight.abs().max() <= 0.5
    assert not torch.allclose(eval_out, train_out)


# --- the causal LM ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_dict_is_transformers(variant):
    ours, ref = paired(variant)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    # KV-shared layers own no keys or values, as in transformers.
    shared = [i for i, m in enumerate(ref.config.kv_sharing_modes) if m == "reuse"]
    for i in shared:
        assert f"model.layers.{i}.self_attn.k_proj.weight" not in theirs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant):
    ours, ref = paired(variant)
    x = ids(2, 13)
    with torch.no_grad():
        got, want = ours(x), ref(x).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    # The soft cap is on and the logits are not degenerate.
    assert 0.5 < want.abs().max() < 3.0 and want.std() > 0.1


def test_every_weight_reaches_the_logits():
    """Each tensor of the checkpoint gets a gradient: none is ignored by the forward."""
    ours, _ = paired()
    ours(ids(2, 10)).square().mean().backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_training_gradients_match_transformers():
    """In training mode (AltUp's coefficients clipped, as transformers does only then) and with
    activation recomputation, every gradient equals transformers'."""
    from gemmakit.training.setup import enable_activation_recomputation

    ours, ref = paired()
    ours.train(), ref.train()
    enable_activation_recomputation(ours)
    x = ids(2, 12)
    ours(x).square().mean().backward()
    ref(x).logits.square().mean().backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    # The clip of 0.5 bit: the coefficients were larger before.
    assert all(layer.altup.prediction_coefs.weight.abs().max() <= 0.5 for layer in ours.model.layers)


@pytest.mark.parametrize("variant", ["shared_kv_altup3_active1", "altup2_shared_full"])
def test_cached_decode_equals_full_forward(variant):
    ours, _ = paired(variant)
    x = ids(2, 15)
    with torch.no_grad():
        full = ours(x)
        cache = ours.make_cache(2, 15)
        steps = [ours(x[:, :6], cache=cache)]  # a prefill longer than the window of 4
        steps.append(ours(x[:, 6:11], cache=cache))  # a chunk that wraps the ring
        steps += [ours(x[:, t : t + 1], cache=cache) for t in range(11, 15)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_one_by_one():
    ours, ref = paired()
    x = ids(3, 12)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, :3] = False
    mask[2, :7] = False
    x[~mask] = 0
    with torch.no_grad():
        batch = ours(x, attention_mask=mask)
        for row in range(3):
            alone = ours(x[row : row + 1, mask[row]])
            torch.testing.assert_close(batch[row, mask[row]], alone[0], atol=1e-5, rtol=1e-5)
        want = ref(x, attention_mask=mask.long()).logits
    torch.testing.assert_close(batch[mask], want[mask], atol=ATOL, rtol=RTOL)


def test_greedy_tokens_match_transformers():
    from gemmakit.inference.engine import Request, generate_steps
    from gemmakit.inference.sampling import SamplingParams

    ours, ref = paired()
    prompt = ids(1, 6)
    with torch.no_grad():
        want = ref.generate(
            prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
            min_new_tokens=24,
        )[0, 6:].tolist()  # fmt: skip
    request = Request(prompt[0].tolist(), SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    for _ in generate_steps(ours, [request]):
        pass
    assert request.output_ids == want
    assert len(set(want)) > 3  # not one token repeated


# --- Hugging Face folders: loading and export ------------------------------------------------


def test_hf_folder_loads_and_exports_back_to_transformers(tmp_path):
    import transformers

    from gemmakit.cli import main
    from gemmakit.loading import load
    from tests.test_export import tiny_sentencepiece

    ref = hf_model("altup4_untied_unscaled", seed=5)
    folder = tmp_path / "gemma-3n-tiny"
    ref.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(tiny_sentencepiece())
    loaded = load(str(folder), dtype="float32", device="cpu")
    assert isinstance(loaded.model, Gemma3n)
    x = ids(2, 13)
    with torch.no_grad():
        want = ref(x).logits
        torch.testing.assert_close(loaded.model(x), want, atol=ATOL, rtol=RTOL)
    out = tmp_path / "exported"
    assert main(["export", "--model", str(folder), "--to", "hf", "--type", "f32", "-o", str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    )
    assert type(back).__name__ == "Gemma3nForCausalLM"
    with torch.no_grad():
        assert torch.equal(back.eval()(x).logits, want)


@pytest.mark.parametrize("name", ["gemma-3n-E2B-it", "gemma-3n-E4B-it"])
def test_released_configs_build_transformers_state_dict(name):
    """The released multimodal config.json files (tests/data/configs) build, on the meta
    device, the text model transformers builds: same tensor names and shapes."""
    import json

    from gemmakit.model.families import model_class
    from tests.test_real_configs import CONFIGS, text_model

    config = from_hf_config(json.loads((CONFIGS / f"{name}.json").read_text()))
    assert model_class(config) is Gemma3n
    with torch.device("meta"):
        ours = Gemma3n(config)
    want = {k: tuple(v.shape) for k, v in text_model(name).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
