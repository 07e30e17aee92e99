"""gemmakit.ops is the one door to the C kernels: the model, quantization, LoRA and the loss
reach gemmakit.kernels.cpu through it only, and its training paths agree with plain torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gemmakit
from gemmakit import ops
from gemmakit.kernels import cpu as cpu_kernels

PACKAGE = Path(gemmakit.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_only_ops_and_kernels_import_the_c_kernels():
    # Per op, the kernels are reached through ops; the whole C decode step (a forward pass of
    # its own, chosen or not by the generation engine) through inference/c_decode.py, and
    # without torch (no kernels/cpu.py) through the torch-free path's modules, its tokenizer's
    # BPE (kernels/bpe.py) included.
    inference = PACKAGE / "inference"
    allowed = (PACKAGE / "ops", PACKAGE / "kernels", inference / "c_decode.py")
    torch_free = (inference / "step_structs.py", inference / "gguf_step.py", inference / "lean.py",
                  PACKAGE / "formats" / "sentencepiece_bpe.py")  # fmt: skip
    kernels = (
        "gemmakit.kernels.cpu",
        "gemmakit.kernels.build",
        "gemmakit.kernels.bindings",
        "gemmakit.kernels.candidates",
        "gemmakit.kernels.bpe",
    )
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if not any(path.is_relative_to(folder) for folder in allowed)
        and path not in torch_free
        and any(k in _imported_modules(path) for k in kernels)
    ]
    assert offenders == []


def test_ops_imports_nothing_above_the_kernels():
    # ops sits between the kernels and the model: it must not import the layers that use it.
    above = ("gemmakit.model", "gemmakit.quant", "gemmakit.lora", "gemmakit.training", "gemmakit.loading")
    for path in (PACKAGE / "ops").rglob("*.py"):
        assert not [m for m in _imported_modules(path) if m.startswith(above)], path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_training_path_matches_torch(dtype):
    if cpu_kernels.library() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    gate = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    up = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    got = ops.geglu(gate, up)
    assert "GeGLU" in type(got.grad_fn).__name__  # the C path was taken
    want = F.gelu(gate, approximate="tanh") * up
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, [gate, up], g), torch.autograd.grad(want, [gate, up], g)):
        torch.testing.assert_close(a, b, **tol)


def test_folded_gqa_training_attention_matches_sdpa():
    # The CPU training path stacks each KV head's query heads as rows; same values and
    # gradients as SDPA with enable_gqa.
    torch.manual_seed(0)
    B, H, K, T, D = 2, 4, 2, ops.dot_product_attention.SMALL_CHUNK + 4, 8
    q = torch.randn(B, H, T, D, requires_grad=True)
    k, v = torch.randn(B, K, T, D), torch.randn(B, K, T, D)
    mask = torch.triu(torch.full((T, T), float("-inf")), 1).expand(B, 1, T, T)
    got = ops.attention(q, k, v, mask, 0.5)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(got, q, g)[0], torch.autograd.grad(want, q, g)[0], rtol=1e-5, atol=1e-6
    )
