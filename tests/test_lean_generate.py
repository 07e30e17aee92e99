"""`gemmakit generate` without torch (inference/lean.py): never imports torch, and generates
the tokens the torch engine (`LLM.generate`) generates for the bundled model."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gemmakit.cli import main
from gemmakit.commands.generate import lean_applies
from gemmakit.inference import lean
from gemmakit.inference.sampling_params import MAX_SPECULATIVE_TOKENS, SamplingParams
from gemmakit.kernels import cpu as cpu_kernels

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler here")
ROOT = Path(__file__).resolve().parents[1]
# sampler.generator(1234)'s first 12 draws from softmax([1, 0.5, 0.25, 0, -1]), and the second
# seed SamplingParams(seed=9, n=3) gives its rows (test_seeded_draws_are_pinned)
PINNED_DRAWS = [4, 1, 0, 3, 3, 1, 2, 0, 2, 0, 0, 2]
PINNED_CHILD_SEED = 2827956119220495982

# A subprocess that runs the CLI and reports what it imported (the worktree's gemmakit: cwd).
_RUN_CLI = """
import json, sys
from gemmakit.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def _cli_subprocess(*args: str, env: dict | None = None) -> tuple[dict, str]:
    import os

    proc = subprocess.run(
        [sys.executable, "-c", _RUN_CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    facts = json.loads(proc.stderr.strip().splitlines()[-1])
    return facts, proc.stdout


@pytest.fixture(scope="module")
def lean_model():
    model = lean.load(None)
    if model is None:
        pytest.skip("the lean path does not run the bundled model here (no C compiler)")
    return model


@pytest.fixture(scope="module")
def llm():
    from gemmakit.inference.api import LLM

    return LLM()


@needs_kernel
@pytest.mark.parametrize(
    "flags",
    [
        ["--greedy", "--json"],
        ["--max-new-tokens", "4", "--stream"],
        ["--greedy", "--chat", "--device", "cpu", "--json"],
        ["--seed", "5", "--temperature", "1.0"],
    ],
)
def test_generate_never_imports_torch(flags):
    facts, out = _cli_subprocess("generate", "The capital of France is", "--max-new-tokens", "3", *flags)
    assert facts == {"rc": 0, "torch": False}
    if "--json" in flags:
        report = json.loads(out)
        assert set(report) == {"model", "load_seconds", "generation_seconds", "tokens_per_second", "outputs"}
        assert len(report["outputs"][0]["token_ids"]) == 3


@needs_kernel
def test_torch_path_still_taken_where_the_lean_one_does_not_apply():
    facts, _ = _cli_subprocess("generate", "Hi", "--max-new-tokens", "2", "--greedy", "--dtype", "float32")
    assert facts == {"rc": 0, "torch": True}
    facts, _ = _cli_subprocess(
        "generate", "Hi", "--max-new-tokens", "2", env={"GEMMAKIT_TORCH_GENERATE": "1"}
    )
    assert facts == {"rc": 0, "torch": True}


def _args(**given) -> argparse.Namespace:
    base = dict(dtype="auto", device=None, quantize=None, adapter=None, speculative=None, draft_model=None)
    return argparse.Namespace(**(base | given))


def test_lean_applies_only_to_the_file_s_own_types_on_the_cpu(monkeypatch):
    monkeypatch.delenv("GEMMAKIT_TORCH_GENERATE", raising=False)
    monkeypatch.setattr("gemmakit.commands.generate._gpu_present", lambda: False)
    assert lean_applies(_args()) and lean_applies(_args(device="cpu"))
    for other in ({"dtype": "float32"}, {"quantize": "int8"}, {"adapter": "a"}, {"speculative": "ngram"},
                  {"device": "cuda"}):  # fmt: skip
        assert not lean_applies(_args(**other))
    monkeypatch.setattr("gemmakit.commands.generate._gpu_present", lambda: True)
    assert not lean_applies(_args())  # torch would pick CUDA
    assert lean_applies(_args(device="cpu"))


def test_lean_load_declines_what_it_cannot_run(hf_folder):
    folder, _ = hf_folder("gemma3")
    assert lean.load(str(folder)) is None  # an HF folder: the torch path


@needs_kernel
def test_gguf_step_logits_equal_the_torch_c_step(lean_model, bundled):
    """The struct filling without torch (norm gains, RoPE frequencies, embedding scale, the
    tied head, the sliding rings) gives the torch model's C step's logits bit for bit."""
    from gemmakit.inference.c_decode import decoder
    from gemmakit.loading import load

    model = load(None).model  # the file's own types, as `generate` loads it
    ids = [2] + list(range(1000, 1600))  # 601 tokens: two prefill chunks, past the window
    with torch.inference_mode():
        torch_step = decoder(model, model.make_cache(1, 640), 1)
        want = [torch_step.prefill(ids)[0].numpy().copy()]
        want += [torch_step.step(t)[0].numpy().copy() for t in (5, 6, 7)]
    step = lean_model.step_for(640)
    got = [step.prefill(ids).copy()] + [step.step(t).copy() for t in (5, 6, 7)]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def _long_prompt(tokenizer) -> list[int]:
    text = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    ids = tokenizer.encode(text)
    assert len(ids) > 512
    return ids


@needs_kernel
def test_greedy_tokens_equal_llm_generate(lean_model, llm):
    prompts = [[2, 818], llm.tokenizer.encode("The capital of France is"), _long_prompt(llm.tokenizer)]
    params = SamplingParams(temperature=0, max_tokens=24)
    want = llm.generate(prompts, params)
    for prompt, output in zip(prompts, want):
        got = lean.generate(lean_model, prompt, params)
        expected = output.outputs[0]
        assert (got.token_ids, got.text, got.finish_reason) == (
            expected.token_ids, expected.text, expected.finish_reason,
        )  # fmt: skip


@needs_kernel
@pytest.mark.parametrize(
    "flags",
    [
        ["--chat", "--max-new-tokens", "40"],  # ends at <end_of_turn> (a stop id)
        ["--stop", " France", "--stop", "Paris", "--max-new-tokens", "30"],
        ["--max-new-tokens", "7"],
        # sampled: one sampler, the same seeds (the CLI's LLM(seed=0) without --seed)
        ["--temperature", "1.0", "--top-k", "0", "--top-p", "0.95", "--max-new-tokens", "24", "--seed", "7"],
        ["--temperature", "1.5", "--max-new-tokens", "24"],
        ["--temperature", "0.9", "--top-k", "0", "--top-p", "1.0", "--max-new-tokens", "12"],
    ],
)
def test_cli_output_equals_the_torch_path(flags, capsys, monkeypatch):
    greedy = [] if "--temperature" in flags else ["--greedy"]
    command = ["generate", "The capital of France is", "Tell me a story", *greedy, "--json", *flags]
    assert main(command) == 0
    lean_report = json.loads(capsys.readouterr().out)
    monkeypatch.setenv("GEMMAKIT_TORCH_GENERATE", "1")
    assert main(command) == 0
    torch_report = json.loads(capsys.readouterr().out)
    assert lean_report["outputs"] == torch_report["outputs"]
    assert lean_report["model"] == torch_report["model"]


@needs_kernel
def test_stream_prints_the_text_it_generates(capsys):
    assert main(["generate", "Hello", "--greedy", "--max-new-tokens", "5", "--stream"]) == 0
    streamed = capsys.readouterr()
    assert main(["generate", "Hello", "--greedy", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr()
    assert "Hello" + streamed.out.rstrip("\n") == printed.out.rstrip("\n")
    assert "Loading time:" in streamed.err and "tokens/s" not in streamed.err


@needs_kernel
def test_context_errors_are_one_line(capsys, lean_model):
    context = lean_model.config.max_position_embeddings
    with pytest.raises(Exception, match="context is"):
        lean.generate(lean_model, [2] * context, SamplingParams(temperature=0, max_tokens=2))


def test_speculative_cap_is_the_ring_slack():
    from gemmakit.model.cache import RING_SLACK

    assert MAX_SPECULATIVE_TOKENS == RING_SLACK


def test_draws_follow_the_weights_and_skip_dropped_tokens():
    import random

    from gemmakit.inference import sampler

    weights = np.array([0.5, 0.0, 0.3, 0.2, 0.0])
    rng = random.Random(3)
    counts = np.bincount([sampler.draw_index(weights, rng) for _ in range(20000)], minlength=5)
    assert counts[1] == counts[4] == 0
    assert 0.5 * np.abs(counts / counts.sum() - weights).sum() < 0.015
    values = np.array([np.log(0.5), -np.inf, np.log(0.3), np.log(0.2)], dtype=np.float32)
    counts = np.bincount([sampler.categorical(values, rng) for _ in range(20000)], minlength=4)
    assert counts[1] == 0 and 0.5 * np.abs(counts / counts.sum() - [0.5, 0, 0.3, 0.2]).sum() < 0.015
    with pytest.raises(ValueError, match="no token"):
        sampler.categorical(np.full(3, -np.inf, dtype=np.float32), rng)


def test_seeded_draws_are_pinned():
    """A seed's tokens are Python's random stream for it and this inverse-CDF draw: a change
    to either changes every user's seeded outputs, so it must be deliberate."""
    from gemmakit.inference import sampler

    values = np.array([1.0, 0.5, 0.25, 0.0, -1.0], dtype=np.float32)
    rng = sampler.generator(1234)
    assert [sampler.categorical(values, rng) for _ in range(12)] == PINNED_DRAWS
    assert SamplingParams(seed=9, n=3).expand_n()[1].seed == PINNED_CHILD_SEED


@pytest.mark.parametrize(
    "head_dim,base,scale", [(256, 1e4, 1.0), (256, 1e6, 8.0), (128, 5e5, 1.5), (96, 1e4, 1.0)]
)
def test_rope_frequencies_are_transformers_to_one_ulp(head_dim, base, scale):
    from gemmakit.rope_frequencies import rope_frequencies

    got = torch.tensor(rope_frequencies(head_dim, base, scale).tolist())
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    want = 1.0 / (base**exponent) / scale  # transformers' compute_default_rope_parameters
    ulp = torch.finfo(torch.float32).eps * want.abs()
    assert ((got - want).abs() <= ulp).all()
    assert (got == want).float().mean() > 0.95


@needs_kernel
@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_lean_tokens_equal_llm_on_each_family(tiny_gguf, family):
    """A tiny random model of each family as a Q8_0 GGUF: the lean path's struct filling
    (norms present or not, softcaps, sliding layers, the tied head) and its in-place tokenizer
    (a small SentencePiece vocabulary with user-defined pieces) give the torch engine's tokens."""
    from gemmakit.inference.api import LLM

    path = tiny_gguf(family, "q8_0")
    model = lean.load(str(path))
    assert model is not None
    llm = LLM(model=str(path))
    text = "The  quick brown fox\njumps over the lazy dog. " * 3
    ids = llm.tokenizer.encode(text)
    assert model.tokenizer.encode(text) == ids
    for params in (SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                   SamplingParams(temperature=1.0, top_k=0, max_tokens=20, ignore_eos=True, seed=3)):  # fmt: skip
        want = llm.generate([ids], params)[0].outputs[0]
        got = lean.generate(model, ids, params)
        assert (got.token_ids, got.text) == (want.token_ids, want.text)


@needs_kernel
def test_lean_declines_float_matrices(tiny_gguf):
    assert lean.load(str(tiny_gguf("gemma3", "f32"))) is None  # the torch path runs it


@pytest.fixture
def tiny_gguf(tiny, tmp_path):
    from gemmakit.export import export

    def make(family: str, qtype: str) -> Path:
        folder = tiny(family)
        out = tmp_path / f"{family}-{qtype}.gguf"
        export(model=str(folder), to="gguf", output=out, qtype=qtype, progress=False)
        return out

    return make


def test_step_threads_are_torch_s():
    """The lean path's C steps run on as many threads as the torch path's (torch's default:
    one per physical core, or OMP_NUM_THREADS)."""
    import os

    code = "import torch; from gemmakit.inference.step_structs import step_threads; print(torch.get_num_threads(), step_threads())"
    for given in (None, "1"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | (
            {"OMP_NUM_THREADS": given} if given else {}
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
        )
        torch_threads, ours = out.stdout.split()
        assert torch_threads == ours


def test_a_torch_generator_still_samples_deterministically():
    from gemmakit.inference.sampling import sample

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_k=50)

    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        return [sample(logits, params, gen) for _ in range(8)]

    assert draws(1) == draws(1) and len(set(draws(1) + draws(2))) > 1


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_READ and /proc/self/smaps are Linux's")
def test_load_maps_the_whole_file_in(lean_model):
    """`lean.load` maps every page of the GGUF at load (GGUFFile.map_in), so a prompt's first
    step takes no page faults on the weights: the mapping's resident size is the file's."""
    path = str(Path(lean_model.source.path).resolve())  # smaps names the file, not a link to it
    size = Path(path).stat().st_size
    resident, inside = None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":  # a mapping's header: "start-end perms ... path"
            inside = line.endswith(path) and resident is None
        elif inside and line.startswith("Rss:"):
            resident = int(line.split()[1]) * 1024
    assert resident is not None, "the GGUF is not mapped"
    assert resident >= size - 4096
