"""LoRA: wrapping, merging, and the PEFT adapter format both ways (against peft itself)."""

from __future__ import annotations

import json

import pytest
import torch

from gemmakit import lora
from gemmakit.config import PROJECTIONS
from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.formats.hf_folder import save_hf_folder
from gemmakit.loading import ModelSource, load_model
from tests.conftest import FAMILIES, random_hf_model
from tests.test_training import one_thread, write_tiny_tokenizer  # noqa: F401  (autouse fixture)

ALL = PROJECTIONS


def ours(folder):
    return load_model(ModelSource("hf", folder, folder.name))


def perturb(model, seed=1):
    """Random adapter weights (a freshly applied adapter is a no-op: B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


IDS = torch.tensor([[2, 17, 99, 3, 250, 31, 7, 64, 128, 5], [2, 1, 200, 45, 45, 9, 77, 12, 0, 100]])


def test_fresh_adapter_is_a_no_op_and_keeps_state_dict_names(hf_folder):
    folder, _ = hf_folder("gemma3")
    model = ours(folder)
    before = model(IDS)
    base_keys = set(model.state_dict())
    settings = lora.apply_lora(model, r=4, alpha=8)
    assert len(settings.wrapped) == 2 * 7
    keys = set(model.state_dict())
    assert base_keys <= keys and not any(".base." in k for k in keys)
    assert {k for k in keys - base_keys} == {
        f"model.layers.{i}.{m}.lora_{ab}.weight" for i in range(2) for m in
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj") for ab in "AB"
    }  # fmt: skip
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    torch.testing.assert_close(model(IDS), before, rtol=0, atol=0)
    # A base checkpoint still loads into the wrapped model under its own names.
    state = ours(folder).state_dict()
    model.load_state_dict(state, strict=False)
    assert torch.equal(
        model.model.layers[0].self_attn.q_proj.weight, state["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_our_adapter_with_identical_logits(hf_folder, tmp_path, family):
    import peft

    folder, hf = hf_folder(family)
    model = ours(folder)
    lora.apply_lora(model, r=4, alpha=8, dropout=0.05)
    perturb(model)
    model.eval()
    lora.save_adapter(model, tmp_path / "adapter", str(folder))
    with torch.no_grad():
        base_logits = hf(IDS).logits
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert cfg["lora_dropout"] == 0.05 and cfg["base_model_name_or_path"] == str(folder)
    assert sorted(cfg["target_modules"]) == sorted(ALL)
    with torch.no_grad():
        mine = model(IDS)
        ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(IDS).logits
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    assert (mine - base_logits).abs().max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_we_load_an_adapter_made_by_peft(hf_folder, tmp_path, family):
    import peft

    folder, hf = hf_folder(family)
    cfg = peft.LoraConfig(
        r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = pm(IDS).logits
    model = ours(folder)
    settings = lora.load_adapter(model, tmp_path / "peft")
    assert len(settings.wrapped) == 2 * 3
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_equals_unmerged_including_tied_head_and_embedding(hf_folder, tmp_path, family):
    folder, hf = hf_folder(family)
    write_tiny_tokenizer(folder)
    model = ours(folder)
    lora.apply_lora(model, r=4, alpha=4, targets=ALL + ("lm_head", "embed_tokens"))
    perturb(model)
    with torch.no_grad():
        unmerged = model(IDS)
        embed_before = model.model.embed_tokens.base.weight.clone()
    lora.merge(model)
    assert not lora.lora_modules(model) and not hasattr(model, "lora_settings")
    # Both sides were trained separately: the tied pair is untied, each with its own update.
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.model.embed_tokens.weight, embed_before)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), unmerged, rtol=1e-5, atol=1e-5)
    from gemmakit.formats.tokenizer import Tokenizer

    save_hf_folder(model, Tokenizer.from_folder(folder), tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False
    with torch.no_grad():
        torch.testing.assert_close(ours(tmp_path / "merged")(IDS), unmerged, rtol=1e-5, atol=1e-5)


def test_peft_round_trip_with_lm_head_on_a_tied_model(hf_folder, tmp_path):
    import peft

    folder, hf = hf_folder("gemma3")
    model = ours(folder)
    lora.apply_lora(model, r=4, alpha=8, targets=("q_proj", "lm_head"))
    perturb(model, seed=3)
    lora.save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()(IDS).logits
        torch.testing.assert_close(model(IDS), ref, rtol=1e-5, atol=1e-5)


def test_lora_gradients_reach_only_the_adapter(hf_folder):
    folder, _ = hf_folder("gemma2")
    model = ours(folder)
    lora.apply_lora(model, r=2, alpha=2, dropout=0.0)
    perturb(model)
    model(IDS).float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n)
    assert all(g is None for n, g in grads.items() if "lora_" not in n)


def test_adapter_errors(hf_folder, tmp_path):
    folder, _ = hf_folder("gemma3")
    with pytest.raises(ModelFileError, match="no such adapter"):
        lora.load_adapter(ours(folder), tmp_path / "missing")
    model = ours(folder)
    lora.apply_lora(model, r=4, alpha=4)
    lora.save_adapter(model, tmp_path / "a")
    with pytest.raises(GemmakitError, match="already has LoRA"):
        lora.load_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 96)  # as if made for a model with another MLP width
    save_file(tensors, weights)
    with pytest.raises(ModelFileError, match="do not fit"):
        lora.load_adapter(ours(folder), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(ModelFileError, match="pickle"):
        lora.load_adapter(ours(folder), tmp_path / "a")
    with pytest.raises(GemmakitError, match="no module matches"):
        lora.apply_lora(ours(folder), targets=("nope_proj",))


def test_qlora_wraps_a_quantized_base(hf_folder):
    quantization = pytest.importorskip("gemmakit.quant")
    folder, _ = hf_folder("gemma3")
    model = ours(folder)
    quantization.quantize_model(model, "nf4")
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0)
    perturb(model)
    out = model(IDS)
    out.float().pow(2).mean().backward()
    b = model.model.layers[0].self_attn.q_proj.lora_B.weight
    assert b.grad is not None and b.grad.abs().sum() > 0
    with torch.no_grad():
        unmerged = model(IDS)
        lora.merge(model)
        assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
        torch.testing.assert_close(model(IDS), unmerged, rtol=1e-3, atol=1e-3)


def test_random_hf_model_helper_is_deterministic():
    a, b = random_hf_model("gemma3"), random_hf_model("gemma3")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _plain_update(layer: lora.LoRALinear, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The LoRA formula written out, with an explicit dropout mask (already scaled)."""
    xd = x if keep is None else x * keep
    a, b = layer.lora_A.weight.to(x.dtype), layer.lora_B.weight.to(x.dtype)
    return layer.base(x) + (xd @ a.T @ b.T) * layer.scaling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("frozen_base", [True, False])
def test_fused_cpu_update_matches_the_formula_with_its_dropout_mask(dtype, p, frozen_base):
    """The training paths (one autograd function, mask rebuilt from a seed in the backward;
    with a frozen plain base its product joins the function) give the values and gradients
    of base(x) + s * B(A(x * mask)) for the mask they drew."""
    from gemmakit.kernels import cpu as cpu_kernels

    if p and cpu_kernels.library() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    layer = lora.LoRALinear(torch.nn.Linear(48, 40, bias=False).to(dtype), r=4, alpha=8, dropout=p)
    layer.base.weight.requires_grad_(not frozen_base)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.5)
    layer.train()
    x = torch.randn(2, 7, 48, dtype=dtype, requires_grad=True)
    torch.manual_seed(5)
    got = layer(x)
    keep = None
    if p:
        torch.manual_seed(5)  # the seed the layer drew from torch's generator
        seed = int(torch.randint(0, 2**62, ()))
        keep = cpu_kernels.dropout(torch.ones(2 * 7 * 48, dtype=dtype), p, seed).view(2, 7, 48)
        dropped = (keep == 0).float().mean()
        assert 0.2 < dropped < 0.4 and torch.all(keep[keep != 0] == torch.tensor(1 / (1 - p), dtype=dtype))
    g = torch.randn_like(got)
    params = [x, layer.lora_A.weight, layer.lora_B.weight] + ([] if frozen_base else [layer.base.weight])
    got_grads = torch.autograd.grad(got, params, g)
    want = _plain_update(layer, x, keep)
    want_grads = torch.autograd.grad(want, params, g)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == b.dtype
        if dtype == torch.bfloat16:  # sums of 14 bfloat16 products: judge against their scale
            tol = dict(atol=2e-2 * float(b.abs().max()), rtol=2e-2)
        torch.testing.assert_close(a, b, **tol)
    # Evaluation and no-grad calls take the plain path: no dropout, same function.
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _plain_update(layer, x, None), **tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_gradients_match_peft(hf_folder, family):
    """One LoRA training step's loss and every adapter gradient equal those of peft on the
    transformers model: the CPU training path (fused LoRA linears, C norms and GeGLU, RoPE's
    autograd function, folded GQA attention, the fused loss) changes nothing but speed."""
    import peft

    from gemmakit.training import loss as training_loss

    folder, hf = hf_folder(family)
    model = ours(folder)
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0)  # no random masks to match
    perturb(model)
    model.train()
    labels = IDS.clone()
    labels[:, :3] = -100  # loss on the rest only
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS, dtype=torch.bool), "labels": labels}
    n = int((labels[:, 1:] != -100).sum())
    loss = training_loss.batch_loss_sum(model, batch) / n
    loss.backward()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    named = dict(pm.named_parameters())
    with torch.no_grad():  # the same adapter weights
        for name, p in model.named_parameters():
            if "lora_" in name:
                named["base_model.model." + name.replace(".weight", ".default.weight")].copy_(p)
    pm.train()
    ref = pm(input_ids=IDS, labels=labels).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grads = [(p.grad, named["base_model.model." + name.replace(".weight", ".default.weight")].grad)
             for name, p in model.named_parameters() if "lora_" in name]  # fmt: skip
    assert len(grads) == 2 * 2 * 7 and all(g.abs().max() > 0 for g, _ in grads)  # 2 layers
    for got, want in grads:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()) + 1e-9)
