"""Several LoRA adapters on one model: each batch row computes what its adapter alone gives."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from gemmakit import lora
from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.inference.engine import Request, generate_steps, prefill
from gemmakit.inference.sampling import SamplingParams
from gemmakit.loading import ModelSource, load_model
from gemmakit.lora import multi

# Different ranks, alphas and targets: attention only; MLP + rsLoRA; everything + the embedding.
ADAPTERS = {
    "attn": dict(r=2, alpha=4, targets=("q_proj", "v_proj")),
    "mlp": dict(r=8, alpha=3, targets=("gate_proj", "up_proj", "down_proj", "o_proj"), use_rslora=True),
    "all": dict(r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens")),
}
ROWS = ["attn", None, "mlp", "all", "attn"]  # three adapters and the base in one batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base model, {name: adapter folder}) for a tiny random Gemma 3."""
    from tests.conftest import random_hf_model, save_random_adapter

    root = tmp_path_factory.mktemp("multi")
    random_hf_model("gemma3").save_pretrained(root / "base")
    base = load_model(ModelSource("hf", root / "base", "base")).eval()
    folders = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        folders[name] = root / name
        save_random_adapter(base, folders[name], seed=10 + i, scale=0.2, **kw)
    return base, folders


def merged(base, folder):
    """The reference: a copy of the model with the one adapter merged into its weights."""
    model = copy.deepcopy(base)
    if folder is not None:
        lora.load_adapter(model, folder)
        lora.merge(model)
    return model.eval()


@pytest.fixture(scope="module")
def served(setup):
    base, folders = setup
    model = copy.deepcopy(base)
    for name, folder in folders.items():
        multi.attach(model, name, folder)
    return model


def prompts(rows: int, length: int = 9):
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, 256, (rows, length), generator=g)


@torch.inference_mode()
def prefill_and_decode(model, ids):
    """Logits after the prompt (prefill shape) and after one more token (decode shape)."""
    cache = model.make_cache(ids.shape[0], ids.shape[1] + 1)
    first = prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), cache)
    step = first.argmax(-1, keepdim=True)  # (B, 1)
    second = model(step, torch.ones_like(step, dtype=torch.bool), cache=cache)[:, -1]
    return first, second


def test_each_row_equals_its_adapter_merged_alone(setup, served):
    base, folders = setup
    ids = prompts(len(ROWS))
    multi.select_rows(served, ROWS)
    first, second = prefill_and_decode(served, ids)
    for row, name in enumerate(ROWS):
        ref = merged(base, folders.get(name) if name else None)
        ref_first, ref_second = prefill_and_decode(ref, ids[row : row + 1])
        torch.testing.assert_close(first[row], ref_first[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(second[row], ref_second[0], rtol=1e-4, atol=1e-4)
    # The adapters really change the output, so the comparison above can fail.
    assert (first[0] - first[1]).abs().max() > 1e-2 and (first[2] - first[3]).abs().max() > 1e-2


def test_one_adapter_for_the_whole_batch_and_the_base_alone(setup, served):
    base, folders = setup
    ids = prompts(2)
    for name in ("mlp", None):
        multi.select_rows(served, [name, name])
        got, _ = prefill_and_decode(served, ids)
        want, _ = prefill_and_decode(merged(base, folders.get(name) if name else None), ids)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_base_weights_and_state_dict_names_are_untouched(setup, served):
    base, _ = setup
    assert served.state_dict().keys() == base.state_dict().keys()
    for key, value in base.state_dict().items():
        assert torch.equal(served.state_dict()[key], value), key
    assert multi.adapter_names(served) == list(ADAPTERS) and multi.has_adapters(served)
    assert not multi.has_adapters(base)


def test_generate_steps_runs_each_request_with_its_adapter(setup, served):
    base, folders = setup
    ids = prompts(len(ROWS), 6).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    requests = [Request(p, params, adapter=name) for p, name in zip(ids, ROWS)]
    for _ in generate_steps(served, requests):
        pass
    for req, name in zip(requests, ROWS):
        alone = Request(req.prompt_ids, params)
        for _ in generate_steps(merged(base, folders.get(name) if name else None), [alone]):
            pass
        assert req.output_ids == alone.output_ids, name
        # A batch of one, where the C step would run on a plain model, keeps its adapter too.
        single = Request(req.prompt_ids, params, adapter=name)
        for _ in generate_steps(served, [single]):
            pass
        assert single.output_ids == alone.output_ids, name


def test_mistakes_are_clear_errors(setup, served, tmp_path):
    base, folders = setup
    with pytest.raises(GemmakitError, match="no LoRA adapter named 'nope'"):
        multi.select_rows(served, ["attn", "nope"])
    with pytest.raises(GemmakitError, match="none is attached"):
        multi.select_rows(base, ["attn"])
    multi.select_rows(base, [None, None])  # a plain model takes a base-only batch
    with pytest.raises(GemmakitError, match="attached already"):
        multi.attach(served, "attn", folders["attn"])
    with pytest.raises(GemmakitError, match="adapter name"):
        multi.attach(served, "bad name", folders["attn"])
    with pytest.raises(ModelFileError, match="no such adapter folder"):
        multi.attach(served, "x", tmp_path / "missing")
    multi.select_rows(served, ["attn", None, "mlp"])
    with pytest.raises(GemmakitError, match="a batch of 2 rows"):  # neither 3 rows nor 3 * k
        served(prompts(2))
    single = copy.deepcopy(base)
    lora.load_adapter(single, folders["attn"])
    with pytest.raises(GemmakitError, match="merge it before"):
        multi.attach(single, "mlp", folders["mlp"])


def test_adapters_of_expert_parameters_are_refused(setup, tmp_path):
    from safetensors.torch import save_file

    base, _ = setup
    folder = tmp_path / "experts"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    key = "base_model.model.model.layers.0.experts.base_layer.lora_A.weight"
    save_file({key: torch.zeros(2, 4)}, str(folder / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    with pytest.raises(GemmakitError, match="weight parameters"):
        multi.attach(model, "experts", folder)
    assert not multi.has_adapters(model)


def test_a_shape_mismatch_leaves_the_model_unchanged(setup, tmp_path):
    from safetensors.torch import save_file

    base, _ = setup
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    prefix = "base_model.model.model.layers.0.self_attn."
    save_file(
        {
            prefix + "q_proj.lora_A.weight": torch.zeros(2, 64),
            prefix + "q_proj.lora_B.weight": torch.zeros(64, 2),
            prefix + "k_proj.lora_A.weight": torch.zeros(2, 32),  # another hidden size
            prefix + "k_proj.lora_B.weight": torch.zeros(16, 2),
        },
        str(folder / "adapter_model.safetensors"),
    )
    model = copy.deepcopy(base)
    with pytest.raises(ModelFileError, match="do not fit"):
        multi.attach(model, "other", folder)
    assert not multi.has_adapters(model) and not any(
        isinstance(m, multi.MULTI_TYPES) for m in model.modules()
    )


@pytest.mark.parametrize("family", ["gemma3n", "gemma4"])
def test_mixed_rows_on_gemma3n_and_gemma4(tmp_path, family):
    """AltUp streams, per-layer inputs, KV sharing and MoE blocks still see rows first."""
    from tests.test_lora_families import EXTRA_MODULES, gemma3n_hf_model, gemma4_hf_model

    hf = gemma3n_hf_model() if family == "gemma3n" else gemma4_hf_model()
    hf.save_pretrained(tmp_path / "base")
    base = load_model(ModelSource("hf", tmp_path / "base", "base")).eval()
    folders = {}
    for i, targets in enumerate(
        [("q_proj", "o_proj", "down_proj"), ("v_proj", "up_proj", *EXTRA_MODULES[family][:3])]
    ):
        model = copy.deepcopy(base)
        lora.apply_lora(model, r=2 + 2 * i, alpha=4, dropout=0.0, targets=targets)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        folders[f"a{i}"] = tmp_path / f"a{i}"
        lora.save_adapter(model, folders[f"a{i}"])
    served = copy.deepcopy(base)
    for name, folder in folders.items():
        multi.attach(served, name, folder)
    rows = ["a0", None, "a1"]
    ids = torch.randint(3, 100, (3, 8), generator=torch.Generator().manual_seed(0))
    multi.select_rows(served, rows)
    first, second = prefill_and_decode(served, ids)
    for row, name in enumerate(rows):
        ref = merged(base, folders[name] if name else None)
        ref_first, ref_second = prefill_and_decode(ref, ids[row : row + 1])
        torch.testing.assert_close(first[row], ref_first[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(second[row], ref_second[0], rtol=1e-4, atol=1e-4)


def test_the_c_steps_decline_a_model_with_adapters(setup, tmp_path):
    """Both C steps read plain weights only: attached adapters (even on the embedding alone)
    must send every step to the torch model, which applies them per row."""
    from gemmakit.inference import c_decode
    from tests.test_c_batch import slot_cache

    base, _ = setup
    model = copy.deepcopy(base)
    lora.apply_lora(model, r=2, alpha=2, dropout=0.0, targets=("embed_tokens",))
    lora.save_adapter(model, tmp_path / "embed")
    model = copy.deepcopy(base)
    with torch.inference_mode():
        kv = slot_cache(model, 2, 8)
        if c_decode.batch_decoder(model, kv) is None:
            pytest.skip("the C kernels are not built here")
        multi.attach(model, "embed", tmp_path / "embed")
        assert c_decode.batch_decoder(model, kv) is None
        assert c_decode.decoder(model, model.make_cache(1, 8), 1) is None


def test_the_engine_reuses_a_prefix_only_under_the_same_adapter(setup, served):
    """Keys and values computed under one adapter are wrong for another: a second request with
    the same prompt and another adapter prefills from scratch and matches that adapter alone."""
    from gemmakit.inference.batching import Engine

    base, folders = setup
    prompt = prompts(1, 12).tolist()[0]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine = Engine(served, slots=1, capacity=64)
    outputs = {}
    for name in ("attn", "mlp", "mlp"):
        req = Request(prompt, params, adapter=name)
        engine.add(req)
        while engine.has_work():
            engine.step()
        outputs.setdefault(name, []).append(req.output_ids)
    # Only the third request (same adapter as the second) reused the prompt.
    assert engine.counters.prefix_hit_tokens == len(prompt) - 1
    for name in ("attn", "mlp"):
        alone = Request(prompt, params)
        for _ in generate_steps(merged(base, folders[name]), [alone]):
            pass
        assert all(out == alone.output_ids for out in outputs[name]), name
