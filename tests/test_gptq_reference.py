"""gemmakit-written GPTQ and AWQ folders loaded by the reference library: transformers with
gptqmodel (its GPTQ and AWQ paths run on the CPU through gptqmodel's torch kernels).

gptqmodel pulls in numpy, pandas, datasets and torchao versions of its own, so it is kept out
of gemmakit's environment: these tests run the reference in `GEMMAKIT_REFERENCE_PYTHON`, a
Python that imports transformers, optimum and gptqmodel (e.g. a venv whose .pth points at
gemmakit's site-packages, with `pip install gptqmodel optimum` on top), and skip without one.
Marker `reference` (not in the default run): `pytest -m reference tests/test_gptq_reference.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.reference

# Runs in the reference Python: loads the folder with transformers and saves its logits.
LOAD = """
import sys, torch, transformers
folder, ids_path, out = sys.argv[1:4]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
with torch.no_grad():
    torch.save({"logits": model(torch.load(ids_path)).logits, "kinds": kinds}, out)
"""


def _reference_python() -> str:
    python = os.environ.get("GEMMAKIT_REFERENCE_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import gptqmodel, optimum, transformers"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no Python with gptqmodel + optimum (set GEMMAKIT_REFERENCE_PYTHON)")
    return python


def _reference_logits(folder, ids, tmp_path) -> tuple[torch.Tensor, list[str]]:
    python = _reference_python()
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([python, "-c", LOAD, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "ref.pt")],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = torch.load(tmp_path / "ref.pt")
    return result["logits"], result["kinds"]


@pytest.mark.parametrize("method,desc_act", [("gptq", False), ("gptq", True), ("awq", False)])
def test_reference_library_reads_gemmakits_folder_with_the_same_logits(method, desc_act, hf_folder, tmp_path):
    from gemmakit.formats.gptq_folder import awq_config, gptq_config, write_gptq_folder
    from gemmakit.quant.awq import awq_quantize_model
    from gemmakit.quant.gptq import GPTQSettings, gptq_quantize_model
    from gemmakit.quant.gptq_linear import GPTQLinear
    from gemmakit.quant.packed4 import gptq_state_to_awq
    from tests.test_gptq_awq import _tiny_loaded

    _reference_python()
    folder, loaded = _tiny_loaded(hf_folder)
    model = loaded.model
    windows = [torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    if method == "awq":
        awq_quantize_model(model, windows, group_size=32)
        state, qconfig = gptq_state_to_awq(model.state_dict()), awq_config(32)
    else:
        gptq_quantize_model(model, windows, settings=GPTQSettings(32, desc_act=desc_act))
        state, qconfig = model.state_dict(), gptq_config(32, desc_act)
    out = tmp_path / method
    write_gptq_folder(out, state, model.config, loaded.tokenizer, qconfig, torch.float32,
                      source_folder=folder, progress=False)  # fmt: skip
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(9))
    for m in model.modules():  # gemmakit's logits on the exact dequantized weights
        if isinstance(m, GPTQLinear):
            m._kernel = ()
    with torch.no_grad():
        ours = model(ids)
    theirs, kinds = _reference_logits(out, ids, tmp_path)
    assert kinds, "the reference loaded no quantized linear layers"
    # gptqmodel's CPU kernels round scales (and activations) to bfloat16: close, not equal. A
    # wrong layout (zeros off by one, a nibble order, act-order's g_idx) moves logits by O(1).
    assert (theirs - ours).abs().max() <= 0.02 * ours.abs().max()
    assert torch.cosine_similarity(theirs.flatten(), ours.flatten(), dim=0) > 0.9999
