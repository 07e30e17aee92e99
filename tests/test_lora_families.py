"""LoRA / QLoRA on Gemma 3n and Gemma 4 against peft on transformers' model: the modules and
expert weights wrapped, logits and gradients of the same adapter, PEFT adapter files both
ways, merge, a quantized base that trains, and finetune -> eval -> serve through the CLI.

The models are tiny and random, built by transformers here with every feature of the family
on (Gemma 4: PLE, KV sharing, double-wide MLP, K = V, proportional RoPE, MoE; Gemma 3n: PLE,
KV sharing, AltUp, LAuReL, sparsity, per-layer widths), every parameter and buffer random.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from gemmakit import lora
from gemmakit.config import PROJECTIONS
from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.loading import ModelSource, load_model
from tests.test_gemma3n import hf_model as gemma3n_hf_model
from tests.test_gemma4 import COMMON, VOCAB, randomize_saved_tensors
from tests.test_gemma4 import F as FULL
from tests.test_gemma4 import S as SLIDING
from tests.test_lora import perturb
from tests.test_training import SAMPLE, one_thread, write_tiny_tokenizer  # noqa: F401  (autouse fixture)

FAMILIES = ("gemma3n", "gemma4")
# Linear layers beyond the seven projections, targeted by name as peft targets them.
EXTRA_MODULES = {
    "gemma3n": ("per_layer_input_gate", "per_layer_projection", "laurel.linear_left", "laurel.linear_right",
                "altup.modality_router", "altup.prediction_coefs", "altup_projections.0",
                "altup_unembed_projections.1", "per_layer_model_projection", "embed_tokens_per_layer"),
    "gemma4": ("per_layer_input_gate", "per_layer_projection", "router.proj", "per_layer_model_projection",
               "embed_tokens_per_layer"),
}  # fmt: skip
# Weights held as parameters, not linear layers: peft's target_parameters.
EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
TARGET_PARAMETERS = {"gemma3n": (), "gemma4": EXPERTS}
IDS = torch.tensor(
    [[2, 17, 99, 3, 150, 31, 7, 64, 128, 5, 40, 41, 9], [2, 1, 120, 45, 45, 9, 77, 12, 0, 100, 8, 3, 60]]
)


def gemma4_hf_model(seed: int = 0):
    """Gemma4ForCausalLM with PLE, KV sharing, double-wide MLPs, K = V and the MoE block at
    once, every parameter and checkpoint buffer random (as tests/test_gemma4.py does)."""
    import transformers

    cfg = transformers.Gemma4TextConfig(
        **COMMON, num_hidden_layers=4, layer_types=[SLIDING, FULL, SLIDING, FULL], hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=2, use_double_wide_mlp=True,
        attention_k_eq_v=True, global_head_dim=32, num_global_key_value_heads=1,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_saved_tensors(transformers.Gemma4ForCausalLM(cfg).eval())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (HF folder with a tiny tokenizer, the transformers model saved there)."""
    out = {}
    for family, build in (("gemma3n", gemma3n_hf_model), ("gemma4", gemma4_hf_model)):
        ref = build()
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        ref.save_pretrained(folder)
        write_tiny_tokenizer(folder)
        out[family] = folder, ref
    return out


def ours(folder):
    return load_model(ModelSource("hf", folder, folder.name)).eval()


def with_adapter(family, folders, r=4, alpha=8.0):
    """(gemmakit's model with a random adapter on every target, the settings)."""
    folder, _ = folders[family]
    model = ours(folder)
    targets = PROJECTIONS + EXTRA_MODULES[family] + TARGET_PARAMETERS[family]
    settings = lora.apply_lora(model, r=r, alpha=alpha, dropout=0.0, targets=targets)
    perturb(model)
    return model, settings


def peft_model(family, folders, r=4, alpha=8.0):
    import peft

    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(PROJECTIONS + EXTRA_MODULES[family]),
        target_parameters=list(TARGET_PARAMETERS[family]) or None,
    )  # fmt: skip
    return peft.get_peft_model(copy.deepcopy(folders[family][1]), config).eval()


def peft_wrapped(model) -> list[str]:
    """What peft wrapped, named as LoraSettings.wrapped names it: a module, or for a wrapped
    parameter the parameter itself (peft nests those wrappers under `.base_layer`)."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            name = name.removeprefix(lora.PEFT_PREFIX).replace(".base_layer", "")
            out.append(f"{name}.{m.parameter_name}" if hasattr(m, "parameter_name") else name)
    return sorted(out)


def peft_grads(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if "lora_" in n}


def lm_loss(logits):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), IDS[:, 1:].flatten())


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_wrap_what_peft_wraps(folders, family):
    """The seven projections, where they exist: KV-shared layers have no k_proj/v_proj and
    Gemma 4's K = V layers no v_proj, in gemmakit as in transformers."""
    import peft

    model = ours(folders[family][0])
    settings = lora.apply_lora(model, r=2, alpha=2)
    ref = peft.get_peft_model(
        copy.deepcopy(folders[family][1]), peft.LoraConfig(r=2, target_modules=list(PROJECTIONS))
    )
    assert sorted(settings.wrapped) == peft_wrapped(ref)
    c = model.config
    assert len(settings.wrapped) < 7 * c.num_hidden_layers  # the shared layers' K/V are absent
    assert f"model.layers.{c.num_hidden_layers - 1}.self_attn.k_proj" not in settings.wrapped
    if c.attention_k_eq_v:  # Gemma 4's full layer 1: keys are the values, no v_proj
        assert {"model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"} <= set(settings.wrapped)
        assert "model.layers.1.self_attn.v_proj" not in settings.wrapped


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_adapter_same_logits_and_gradients_as_peft(folders, family, training):
    """In training mode too, where Gemma 3n's AltUp clamps its coefficients (the adapted
    prediction_coefs' base weight, in place, in both)."""
    import peft

    model, settings = with_adapter(family, folders)
    ref = peft_model(family, folders)
    model.train(training)
    ref.train(training)
    assert sorted(settings.wrapped) == peft_wrapped(ref)
    if family == "gemma4":
        assert "model.layers.0.experts.gate_up_proj" in settings.wrapped
    result = peft.set_peft_model_state_dict(ref, lora.adapter_state_dict(model))
    assert not result.unexpected_keys
    mine = model(IDS)
    want = ref(IDS).logits
    torch.testing.assert_close(mine, want, atol=1e-4, rtol=0)
    # The adapter matters: the logits differ from the base model's.
    assert (want - folders[family][1](IDS).logits).abs().max() > 1e-2
    lm_loss(mine).backward()
    lm_loss(want).backward()
    got, expected = {k: p.grad for k, p in lora.adapter_parameters(model).items()}, peft_grads(ref)
    assert sorted(got) == sorted(expected)
    for key, g in expected.items():
        assert g is not None and g.norm() > 0, key
        assert (got[key] - g).norm() <= 1e-4 * g.norm(), key


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_files_load_both_ways(folders, family, tmp_path):
    import peft

    model, _ = with_adapter(family, folders)
    lora.save_adapter(model, tmp_path / "ours", str(folders[family][0]))
    cfg = json.loads((tmp_path / "ours" / lora.ADAPTER_CONFIG).read_text())
    assert cfg.get("target_parameters", []) == list(TARGET_PARAMETERS[family])
    with torch.no_grad():
        want = model(IDS)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(folders[family][1]), tmp_path / "ours").eval()
        torch.testing.assert_close(theirs(IDS).logits, want, atol=1e-4, rtol=0)
        # And back: what peft saves, gemmakit loads.
        theirs.save_pretrained(tmp_path / "peft")
        fresh = ours(folders[family][0])
        assert sorted(lora.load_adapter(fresh, tmp_path / "peft").wrapped) == peft_wrapped(theirs)
        torch.testing.assert_close(fresh(IDS), want, atol=1e-5, rtol=0)


def test_adapter_of_the_multimodal_model_loads_on_its_text_tower(folders, tmp_path, caplog):
    """peft on Gemma4ForConditionalGeneration names the text model `model.language_model.`
    and may adapt the towers too: the text tower's adapters load, the towers' are skipped
    with one line."""
    import peft
    import transformers

    text = folders["gemma4"][1]
    vision = transformers.Gemma4VisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8,
    )  # fmt: skip
    cfg = transformers.Gemma4Config(text_config=text.config.to_dict(), vision_config=vision.to_dict())
    full = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    full.model.language_model.load_state_dict(text.model.state_dict())
    full.lm_head.load_state_dict(text.lm_head.state_dict())
    modules = "|".join(PROJECTIONS + EXTRA_MODULES["gemma4"]).replace(".", r"\.")
    config = peft.LoraConfig(
        r=2, lora_alpha=4, init_lora_weights=False, target_parameters=list(EXPERTS),
        target_modules=rf".*language_model\.(.*\.)?({modules})|.*vision_tower\..*\.q_proj\.linear",
    )  # fmt: skip
    ref = peft.get_peft_model(full, config).eval()
    ref.save_pretrained(tmp_path / "mm")
    model = ours(folders["gemma4"][0])
    with caplog.at_level("WARNING", logger="gemmakit.lora.peft"):
        settings = lora.load_adapter(model, tmp_path / "mm")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'mm' / lora.ADAPTER_WEIGHTS}: skipped 2 LoRA tensors of the vision/audio towers; "
        "gemmakit runs the text model only"
    ]
    _, text_only = with_adapter("gemma4", folders)
    assert sorted(settings.wrapped) == sorted(text_only.wrapped)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref(input_ids=IDS).logits, atol=1e-4, rtol=0)


def test_adapters_of_kv_shared_projections_are_skipped(folders, tmp_path, caplog):
    """Gemma 3n files and older transformers gave KV-shared layers k/v weights (unused), so
    adapters trained there carry factors for them: they are left out, as those weights are."""
    from safetensors.torch import load_file, save_file

    model, _ = with_adapter("gemma4", folders)
    lora.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / lora.ADAPTER_WEIGHTS
    tensors = load_file(path)
    shared = model.config.num_hidden_layers - 1
    assert not model.config.layer_owns_kv(shared)
    for proj in ("k_proj", "v_proj"):
        tensors[f"{lora.PEFT_PREFIX}model.layers.{shared}.self_attn.{proj}.lora_A.weight"] = torch.randn(
            4, 48
        )
        tensors[f"{lora.PEFT_PREFIX}model.layers.{shared}.self_attn.{proj}.lora_B.weight"] = torch.randn(
            16, 4
        )
    save_file(tensors, path, metadata={"format": "pt"})
    fresh = ours(folders["gemma4"][0])
    with caplog.at_level("WARNING", logger="gemmakit.lora.peft"):
        lora.load_adapter(fresh, tmp_path / "a")
    assert "skipped the adapters of 2 k/v projections" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), model(IDS), atol=1e-6, rtol=0)
    tensors[f"{lora.PEFT_PREFIX}model.layers.0.self_attn.x_proj.lora_A.weight"] = torch.randn(4, 48)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="x_proj, which this model does not have"):
        lora.load_adapter(ours(folders["gemma4"][0]), tmp_path / "a")


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_equals_unmerged(folders, family):
    model, _ = with_adapter(family, folders)
    base_state = ours(folders[family][0]).state_dict()
    base_keys = set(base_state)
    # Wrapped, the base weights keep their names (experts included): a base checkpoint loads.
    keys = set(model.state_dict())
    assert base_keys <= keys and not any(".base." in k or "base_layer" in k for k in keys)
    assert not model.load_state_dict(base_state, strict=False).unexpected_keys
    with torch.no_grad():
        unmerged = model(IDS)
        lora.merge(model)
        assert not lora.lora_modules(model) and set(model.state_dict()) == base_keys
        # W + BA rounded to float32 is the only difference; these random models turn a 1e-7
        # relative change of every weight into ~1e-5 in the logits, hence the parity tolerance.
        torch.testing.assert_close(model(IDS), unmerged, atol=1e-4, rtol=0)


def test_expert_targets_refuse_dropout_and_name_what_to_target(folders):
    model = ours(folders["gemma4"][0])
    with pytest.raises(GemmakitError, match="dropout"):
        lora.apply_lora(model, targets=("q_proj", "gate_up_proj"), dropout=0.05)
    with pytest.raises(GemmakitError, match="experts.gate_up_proj, experts.down_proj"):
        lora.apply_lora(model, targets=("experts",), dropout=0.0)
    assert not lora.lora_modules(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_blocks_give_the_same_adapter_gradients(folders, family):
    """--gradient-checkpointing: a KV-shared layer reads keys and values its source block
    produced inside a recomputed region; the gradients still reach the source's adapters."""
    from gemmakit.training.setup import enable_activation_recomputation

    grads = []
    for recompute in (False, True):
        model, _ = with_adapter(family, folders)
        if recompute:
            enable_activation_recomputation(model)
        lm_loss(model(IDS)).backward()
        grads.append({k: p.grad for k, p in lora.adapter_parameters(model).items()})
    for key, g in grads[0].items():
        torch.testing.assert_close(grads[1][key], g, atol=1e-6, rtol=1e-5, msg=key)


def test_bfloat16_base_keeps_float32_expert_adapters(folders):
    model, _ = with_adapter("gemma4", folders)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    for b in model.buffers():
        b.data = b.data.to(torch.bfloat16) if b.is_floating_point() else b.data
    assert {(p.requires_grad, p.dtype) for p in model.parameters()} == {
        (False, torch.bfloat16),
        (True, torch.float32),
    }
    logits = model(IDS)
    assert logits.dtype == torch.bfloat16
    lm_loss(logits).backward()
    experts = model.model.layers[0].experts
    for p in (*experts.lora_A.parameters(), *experts.lora_B.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("family,kind", [("gemma3n", "nf4"), ("gemma4", "int8")])
def test_qlora_on_a_quantized_base_trains(folders, family, kind):
    from gemmakit.quant import quantize_model

    model = ours(folders[family][0])
    quantize_model(model, kind)
    targets = PROJECTIONS + TARGET_PARAMETERS[family]
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0, targets=targets)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q.base).__name__ != "Linear" and q.lora_A.weight.requires_grad
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = lm_loss(model(IDS))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_finetune_eval_and_serve_through_the_cli(folders, tmp_path, capsys):
    """`gemmakit finetune` with adapters on the experts too, then `eval perplexity` and the
    server with that adapter, all unchanged for Gemma 4."""
    from fastapi.testclient import TestClient

    from gemmakit.cli import main
    from gemmakit.inference.api import LLM
    from gemmakit.serving.app import create_app
    from gemmakit.serving.config import ServerConfig

    folder = folders["gemma4"][0]
    out = tmp_path / "run"
    targets = ",".join(PROJECTIONS + EXPERTS)
    args = ["finetune", "--model", str(folder), "--data", SAMPLE, "--output", str(out), "--recipe", "lora",
            "--max-length", "48", "--ce-chunk", "16", "--eval-max-rows", "4", "--lr", "0.01", "--warmup-steps",
            "1", "--max-steps", "3", "--eval-every", "3", "--save-every", "3", "--batch-size", "2",
            "--lora-r", "4", "--lora-targets", targets]  # fmt: skip
    assert main(args) == 2  # experts with the recipe's dropout: one line, no traceback
    assert "dropout" in capsys.readouterr().err
    assert main([*args, "--lora-dropout", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 3 and summary["last_eval_loss"] < summary["first_eval_loss"]
    adapter = out / "adapter"
    saved = json.loads((adapter / lora.ADAPTER_CONFIG).read_text())
    assert saved["target_parameters"] == list(EXPERTS)

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    eval_args = ["eval", "perplexity", "--text", str(text), "--context", "16", "--stride", "8", "--json"]
    assert main([*eval_args, "--model", str(folder)]) == 0
    base = json.loads(capsys.readouterr().out)
    assert main([*eval_args, "--model", str(folder), "--adapter", str(adapter)]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["tokens"] == base["tokens"] and tuned["perplexity"] != base["perplexity"]

    llm = LLM(model=str(folder), adapter=str(adapter))
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(folder), "--adapter", str(adapter), "-o", str(merged)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(ours(merged)(IDS), llm.model(IDS), atol=1e-4, rtol=0)
    app = create_app(llm, ServerConfig(served_model_name="tiny4", max_batch=2, max_queue=4))
    client = TestClient(app, base_url="http://127.0.0.1")  # the server serves loopback names only
    body = {"model": "tiny4", "prompt": "### Human: Hi", "max_tokens": 5, "temperature": 0}
    with client:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    from gemmakit.inference.sampling import SamplingParams

    want = llm.generate("### Human: Hi", SamplingParams(temperature=0, max_tokens=5))[0].outputs[0].text
    assert r.json()["choices"][0]["text"] == want


def test_altup_correction_coefs_adapter_matches_peft(folders):
    import peft

    model = ours(folders["gemma3n"][0])
    lora.apply_lora(model, r=2, alpha=2, dropout=0.0, targets=("altup.correction_coefs",))
    perturb(model)
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["altup.correction_coefs"])
    ref = peft.get_peft_model(copy.deepcopy(folders["gemma3n"][1]), config).eval()
    peft.set_peft_model_state_dict(ref, lora.adapter_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref(IDS).logits, atol=1e-4, rtol=0)
