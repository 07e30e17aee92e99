"""Gemma 4 text model parity with transformers (modeling_gemma4.py), on tiny random models built
by transformers here, every checkpoint parameter and buffer randomized (layer scalars, router
and expert scales included), so a loader that drops one fails."""

from __future__ import annotations

import pytest
import torch

from gemmakit.inference import c_decode
from gemmakit.inference.engine import Request, generate_steps
from gemmakit.inference.sampling import SamplingParams
from gemmakit.loading import ModelSource, load_model
from gemmakit.model.gemma4 import Gemma4

S, F = "sliding_attention", "full_attention"
VOCAB, WINDOW = 160, 4
ROPE = {
    S: {"rope_type": "default", "rope_theta": 10_000.0},
    F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
COMMON = dict(
    vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_attention_heads=4, head_dim=16,
    num_key_value_heads=2, sliding_window=WINDOW, final_logit_softcapping=30.0, rope_parameters=ROPE,
    max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)  # fmt: skip
VARIANTS = {
    # E2B/E4B-like: PLE, KV sharing with double-wide MLPs on the shared layers, K = V with
    # their own head dim and KV heads on global layers, proportional partial RoPE.
    "ple_shared_k_eq_v": dict(
        COMMON, num_hidden_layers=6, layer_types=[S, F, S, F, S, F], hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=3, use_double_wide_mlp=True,
        attention_k_eq_v=True, global_head_dim=32, num_global_key_value_heads=1,
    ),
    # 26B-A4B-like: the experts beside the dense MLP, v_proj on global layers of their own head dim.
    "moe": dict(
        COMMON, num_hidden_layers=4, layer_types=[S, S, F, F], hidden_size_per_layer_input=0,
        enable_moe_block=True, num_experts=5, top_k_experts=2, moe_intermediate_size=24,
        global_head_dim=24,
    ),
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: every test of this module on one thread (conftest's `one_thread`)."""


def random_gemma4(variant: str, seed: int = 0):
    """transformers' Gemma4ForCausalLM for a variant, every saved tensor random."""
    import transformers

    cfg = transformers.Gemma4TextConfig(**VARIANTS[variant])
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_saved_tensors(transformers.Gemma4ForCausalLM(cfg).eval())


def randomize_saved_tensors(model):
    """Every tensor a checkpoint of `model` saves made random (in place; returns `model`)."""
    saved = model.state_dict()
    with torch.no_grad():
        for t in model.parameters():
            # Norm gains and scales near 1 (they multiply, as w, not 1 + w), matrices small.
            t.copy_(1.0 + 0.3 * torch.randn_like(t) if t.dim() == 1 else 0.1 * torch.randn_like(t))
        for name, t in model.named_buffers():
            if name in saved:  # layer_scalar: the checkpoint's buffers, not derived ones
                t.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(gemmakit's load of the saved folder, the transformers model)."""
    ref = random_gemma4(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return load_model(ModelSource("hf", folder, request.param)), ref


def test_every_feature_is_exercised(pair):
    ours, ref = pair
    c = ours.config
    assert isinstance(ours, Gemma4) and c.use_layer_scalar and not c.norm_unit_offset
    assert c.rope_partial_rotary_factor == 0.25 and c.global_head_dim != c.head_dim
    if c.hidden_size_per_layer_input:
        assert c.num_kv_shared_layers and c.use_double_wide_mlp and c.attention_k_eq_v
        assert c.kv_source_layers == (0, 1, 2, 1, 2, 1)
    else:
        assert c.num_experts and not c.attention_k_eq_v
    scalars = [float(b.layer_scalar) for b in ours.model.layers]
    assert len(set(scalars)) == len(scalars) and 1.0 not in scalars  # loaded, not the default


def test_state_dict_is_transformers(pair):
    ours, ref = pair
    want = {k: tuple(t.shape) for k, t in ref.state_dict().items()}
    assert {k: tuple(t.shape) for k, t in ours.state_dict().items()} == want


def test_logits_match_transformers(pair):
    ours, ref = pair
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))  # 13 > window
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers_generate(pair):
    ours, ref = pair
    prompt = [2, 17, 99, 5, 42, 8, 77]
    assert c_decode.decoder(ours, ours.make_cache(1, 32), 1) is None  # the torch step runs it
    request = Request(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for _ in generate_steps(ours, [request]):
        pass
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert request.output_ids == want[0, len(prompt) :].tolist()


def test_cached_decode_equals_full_forward(pair):
    ours, _ = pair
    ids = torch.randint(3, VOCAB, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.make_cache(2, 15)
        steps = [ours(ids[:, :6], cache=cache)]  # a prefill longer than the window
        steps.append(ours(ids[:, 6:11], cache=cache))  # a chunk that wraps the sliding ring
        steps += [ours(ids[:, t : t + 1], cache=cache) for t in range(11, 15)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_holds_only_producing_layers(pair):
    ours, _ = pair
    c = ours.config
    cache = ours.make_cache(1, 8)
    for i, layer_cache in enumerate(cache.for_layer):
        if not c.layer_owns_kv(i):
            assert layer_cache is None
        else:
            assert layer_cache.k.shape == (
                1,
                c.layer_kv_heads(i),
                min(8, cache.groups[c.layer_types[i]].capacity),
                c.layer_head_dim(i),
            )
    assert len(cache.layers) == c.num_hidden_layers - c.num_kv_shared_layers


def test_left_padded_batch_equals_one_by_one(pair):
    ours, _ = pair
    rows = [[2, 9, 14, 33, 5, 61, 7, 70, 12], [2, 40, 3, 88]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    batch = [Request(r, params) for r in rows]
    for _ in generate_steps(ours, batch):
        pass
    for row, request in zip(rows, batch):
        alone = Request(row, params)
        for _ in generate_steps(ours, [alone]):
            pass
        assert request.output_ids == alone.output_ids
    with torch.no_grad():  # the logits too, not only their argmax
        ids = torch.tensor([rows[0], [0] * 5 + rows[1]])
        mask = ids != 0  # row 0 has no padding
        padded = ours(ids, attention_mask=mask)
        torch.testing.assert_close(padded[1, 5:], ours(torch.tensor([rows[1]]))[0], atol=1e-5, rtol=1e-5)


def test_c_step_names_what_it_cannot_run(pair):
    ours, _ = pair
    assert c_decode.unsupported_by_c_step(ours.config) is not None


# --- HF folders: sharded, multimodal, shared-layer K/V, export, the CLI -------------------------


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


IDS = [2, 30, 31, 7, 99, 140, 12, 64, 5, 77, 3]  # longer than the window


def test_sharded_folder_with_tokenizer_loads_and_generates_from_the_cli(tmp_path, capsys):
    import json

    from gemmakit.cli import main
    from gemmakit.loading import load
    from tests.test_training import write_tiny_tokenizer

    ref = random_gemma4("ple_shared_k_eq_v", seed=3)
    folder = tmp_path / "sharded"
    ref.save_pretrained(folder, max_shard_size="100KB")
    write_tiny_tokenizer(folder)
    assert (folder / "model.safetensors.index.json").exists()
    loaded = load(folder, dtype="float32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(
            _logits(loaded.model, IDS), ref(torch.tensor([IDS])).logits[0], atol=1e-4, rtol=0
        )
    args = ["generate", "Hello", "--model", str(folder), "--greedy", "--max-new-tokens", "6", "--json"]
    args += ["--device", "cpu", "--dtype", "float32"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)["outputs"][0]
    prompt = loaded.tokenizer.encode("Hello")
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert out["token_ids"] == want[0, len(prompt) :].tolist()


def test_multimodal_checkpoint_loads_its_text_tower(tmp_path, caplog):
    import transformers

    text = random_gemma4("ple_shared_k_eq_v", seed=4)
    vision = transformers.Gemma4VisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8,
    )  # fmt: skip
    audio = transformers.Gemma4AudioConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        output_proj_dims=16,
        subsampling_conv_channels=[4, 4],
    )
    cfg = transformers.Gemma4Config(
        text_config=text.config.to_dict(), vision_config=vision.to_dict(), audio_config=audio.to_dict()
    )
    full = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    full.model.language_model.load_state_dict(text.model.state_dict())
    folder = tmp_path / "multimodal"
    full.save_pretrained(folder)
    towers = {
        k: t for k, t in full.state_dict().items() if not k.startswith(("model.language_model.", "lm_head."))
    }
    with caplog.at_level("WARNING", logger="gemmakit.loading"):
        ours = load_model(ModelSource("hf", folder, "multimodal"))
    size = sum(t.numel() * t.element_size() for t in towers.values())
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder}: skipped {len(towers)} vision/audio tower tensors ({size / 2**20:.1f} MiB); "
        "gemmakit runs the text model only"
    ]
    with torch.no_grad():
        torch.testing.assert_close(
            _logits(ours, IDS), full(input_ids=torch.tensor([IDS])).logits[0], atol=1e-4, rtol=0
        )


def test_kv_weights_of_shared_layers_in_a_checkpoint_are_dropped(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = random_gemma4("ple_shared_k_eq_v", seed=5)
    folder = tmp_path / "with_shared_kv"
    ref.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    for i in (3, 4, 5):  # the KV-shared layers: Gemma 3n files carry weights for these
        for name, shape in (
            ("k_proj.weight", (16, 48)),
            ("v_proj.weight", (16, 48)),
            ("k_norm.weight", (16,)),
        ):
            state[f"model.layers.{i}.self_attn.{name}"] = torch.randn(shape)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    ours = load_model(ModelSource("hf", folder, "with_shared_kv"))
    assert not hasattr(ours.model.layers[3].self_attn, "k_proj")
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours, IDS), ref(torch.tensor([IDS])).logits[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_export_loads_in_transformers_with_identical_logits(tmp_path, variant):
    import transformers

    from gemmakit.cli import main
    from tests.test_training import write_tiny_tokenizer

    ref = random_gemma4(variant, seed=6)
    ref.save_pretrained(tmp_path / "src")
    write_tiny_tokenizer(tmp_path / "src")
    out = tmp_path / "exported"
    assert (
        main(["export", "--model", str(tmp_path / "src"), "--to", "hf", "-o", str(out), "--type", "f32"]) == 0
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back) is transformers.Gemma4ForCausalLM
    for key, t in ref.state_dict().items():  # layer scalars and expert scales survive too
        assert torch.equal(back.state_dict()[key], t), key
    ours = load_model(ModelSource("hf", out, variant))
    with torch.no_grad():
        torch.testing.assert_close(back(torch.tensor([IDS])).logits[0], _logits(ours, IDS), atol=1e-5, rtol=0)


def test_gradients_match_transformers(pair):
    # Training runs other kernels (ops' autograd paths: C RMSNorm and GeGLU backward, RoPE's).
    ours, ref = pair
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    losses = []
    for model, logits in ((ours, lambda: ours(ids)), (ref, lambda: ref(ids).logits)):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits()[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-4, rtol=1e-3, msg=name)
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
