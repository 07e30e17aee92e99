"""The CUDA paths on tiny models: parity with transformers, NF4 through bitsandbytes' CUDA
kernels, and a QLoRA run with paged 8-bit AdamW. Skipped where there is no GPU (CI); run on
one with `pytest tests/test_cuda.py`. benchmarks/cuda_check.py does the same at full size."""

from __future__ import annotations

import pytest
import torch

from gemmakit.loading import ModelSource, load_model
from gemmakit.training.config import make_config
from gemmakit.training.trainer import train
from tests.conftest import FAMILIES
from tests.test_training import records, tiny_config, tiny_model_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_logits_match_transformers(family, hf_folder):
    folder, ref = hf_folder(family)
    ours = load_model(ModelSource("hf", folder, family), device="cuda")
    ref = ref.cuda()
    ids = torch.randint(
        3, 256, (2, 40), generator=torch.Generator().manual_seed(1)
    ).cuda()  # > SDPA threshold
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask), ref(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=1e-4)


def test_cuda_bfloat16_greedy_generation_runs_and_matches_cpu_float32_start(hf_folder):
    from gemmakit.inference.engine import Request, generate_steps
    from gemmakit.inference.sampling import SamplingParams

    folder, _ = hf_folder("gemma3")
    ids = [2, 17, 42, 99, 7, 8, 9, 10]
    outs = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)):
        model = load_model(ModelSource("hf", folder, "gemma3"), dtype=dtype, device=device)
        req = Request(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), ())
        for _ in generate_steps(model, [req]):
            pass
        outs.append(req.output_ids)
    assert outs[0] == outs[1]  # float32 on the GPU decodes as on the CPU
    assert len(outs[2]) == 12 and outs[2][0] == outs[0][0]


def test_cuda_nf4_matmul_uses_bitsandbytes_and_matches_dequantized():
    pytest.importorskip("bitsandbytes")
    from gemmakit.quant import NF4Linear

    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16) * 0.05
    layer = NF4Linear(w)
    cpu = NF4Linear(w.cpu())
    assert torch.equal(layer.weight.cpu(), cpu.weight)  # the same bytes quantized on either device
    x = torch.randn(3, 7, 512, device="cuda", dtype=torch.bfloat16)
    got = layer(x)
    want = x.float() @ layer.dequantize(torch.float32).T
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_cuda_qlora_recipe_uses_paged_8bit_adamw(tmp_path):
    pytest.importorskip("bitsandbytes")
    folder = tiny_model_folder(tmp_path)
    cfg = tiny_config(folder, tmp_path / "run", recipe="qlora-guanaco", lr=5e-3, warmup_steps=1, max_steps=4,
                      eval_every=4, save_every=2, device="cuda")  # fmt: skip
    res = train(cfg, progress=False)
    assert res.optimizer == "bitsandbytes PagedAdamW8bit"
    assert res.last_eval_loss < res.first_eval_loss
    resumed = make_config("qlora-guanaco", {**cfg.to_dict(), "max_steps": 6})
    train(resumed, resume=True, progress=False)
    steps = [r["step"] for r in records(tmp_path / "run") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
