"""Hostile-but-fair inputs at the edges: each gets one clear error (or a correct result), never a
traceback, and never harms other work. Sampling values, token ids, the server's request schema,
a fine-tune killed before its first checkpoint, damaged run files, bad training rows, bad
command-line flags, and the modes of written files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from gemmakit.cli import main
from gemmakit.errors import GemmakitError
from gemmakit.inference.sampling import MIN_TEMPERATURE, SamplingParams, sample
from tests.test_training import SAMPLE, one_thread, records, tiny_config, tiny_model_folder  # noqa: F401

NAN, INF = float("nan"), float("inf")

# (field values, the field the message must name first)
BAD_SAMPLING = [
    ({"temperature": NAN}, "temperature"),
    ({"temperature": INF}, "temperature"),
    ({"temperature": 1e-40}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": None}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": NAN}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": NAN}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"seed": 10**23}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"stop": 5}, "stop"),
    ({"stop": ["ok", None]}, "stop"),
    ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_llm(tiny_folder):
    from gemmakit.inference.api import LLM

    return LLM(model=str(tiny_folder), dtype="float32", device="cpu")


def one_line_error(err: str, command: str) -> None:
    assert err.startswith(f"gemmakit {command}: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err


# --- sampling values (issue 19, items 1 and 12) ------------------------------------------------


@pytest.mark.parametrize("values,field", BAD_SAMPLING, ids=[repr(v) for v, _ in BAD_SAMPLING])
def test_sampling_params_refuse_bad_values_naming_the_field(values, field):
    with pytest.raises(GemmakitError) as e:
        SamplingParams(**values)
    assert str(e.value).startswith(field + " ")


def test_sampling_params_keep_the_valid_edges():
    p = SamplingParams(temperature=MIN_TEMPERATURE, top_k=0, seed=2**64 - 1, stop="x", max_tokens=1)
    assert p.stop == ["x"] and p.top_k == 0 and not p.greedy
    assert SamplingParams(top_k=-1, seed=-(2**63)).top_k == -1
    assert SamplingParams(temperature=0).greedy
    # numpy-style numbers are numbers: a temperature from a config array is fine
    assert SamplingParams(temperature=torch.tensor(0.5).item()).temperature == 0.5


def test_the_smallest_temperature_still_samples_the_likeliest_token():
    """The bound is where it is because the scaled logits stay finite: no inf, no NaN."""
    logits = torch.tensor([120.0, -80.0, 119.0, 30.0])
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=MIN_TEMPERATURE), gen) for _ in range(20)}
    assert picks == {0}
    picks = {
        sample(logits, SamplingParams(temperature=MIN_TEMPERATURE, top_p=0.9, top_k=3), gen) for _ in range(5)
    }
    assert picks == {0}


@pytest.mark.parametrize(
    "flags,field",
    [
        (["--temperature", "nan"], "temperature"),
        (["--temperature", "1e-40"], "temperature"),
        (["--top-k", "-3"], "top_k"),
        (["--top-p", "inf"], "top_p"),
        (["--seed", "100000000000000000000000"], "seed"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_refuses_bad_sampling_flags_before_loading(capsys, command, flags, field):
    """The missing model is never reached: the flags are checked first, in one line."""
    argv = [command, *(["Hi"] if command == "generate" else []), "--model", "/no/such/model", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    one_line_error(err, command)
    assert field in err or field.replace("_", "-") in err


# --- the Python API's edges (item 12) ----------------------------------------------------------


def test_llm_edges(tiny_llm):
    assert tiny_llm.generate([]) == []
    assert list(tiny_llm.stream([])) == []
    vocab = tiny_llm.model.config.vocab_size
    for prompt in ([5, vocab], [-1, 5], {"prompt_token_ids": [5, 10**12]}, [5, True], [5, 2.0]):
        with pytest.raises(GemmakitError, match=r"prompt 0: token id .* is not an integer in \[0, "):
            tiny_llm.generate(prompt, SamplingParams(max_tokens=1))
    with pytest.raises(GemmakitError, match="non-empty"):
        tiny_llm.generate({"prompt_token_ids": []})
    with pytest.raises(GemmakitError, match="one per prompt"):
        tiny_llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(GemmakitError, match="must be a SamplingParams"):
        tiny_llm.generate(["a"], [{"temperature": 0}])
    # the largest id is a valid prompt
    (out,) = tiny_llm.generate([[5, vocab - 1]], SamplingParams(temperature=0, max_tokens=2))
    assert out.prompt_token_ids == [5, vocab - 1] and len(out.outputs[0].token_ids) >= 1


# --- the server's request schema (item 1; real server over loopback) --------------------------


@pytest.fixture(scope="module")
def server(tiny_llm):
    pytest.importorskip("fastapi")
    from gemmakit.serving.app import create_app
    from gemmakit.serving.config import ServerConfig
    from gemmakit.serving.transport import serve_in_thread

    srv = serve_in_thread(create_app(tiny_llm, ServerConfig(served_model_name="tiny")))
    yield srv
    srv.stop()


BAD_BODIES = [
    ('"temperature": NaN', "temperature"),
    ('"temperature": Infinity', "temperature"),
    ('"temperature": 1e-40', "temperature"),
    ('"temperature": -1', "temperature"),
    ('"temperature": "hot"', "temperature"),
    ('"top_p": NaN', "top_p"),
    ('"top_p": 1.5', "top_p"),
    ('"top_k": -3', "top_k"),
    ('"min_p": -0.5', "min_p"),
    ('"frequency_penalty": 2.5', "frequency_penalty"),
    ('"presence_penalty": NaN', "presence_penalty"),
    ('"seed": 100000000000000000000000', "seed"),
    ('"max_tokens": true', "max_tokens"),
    ('"max_tokens": 0', "max_tokens"),
    ('"max_tokens": 2.0', "max_tokens"),
    ('"stop": 5', "stop"),
    ('"stream": "yes"', "stream"),
]


@pytest.mark.parametrize("field_json,param", BAD_BODIES, ids=[b for b, _ in BAD_BODIES])
def test_server_answers_bad_sampling_values_with_400(server, field_json, param):
    import httpx

    for path, base in (
        ("completions", '"prompt": "Hi"'),
        ("chat/completions", '"messages": [{"role": "user", "content": "Hi"}]'),
    ):
        body = f'{{"model": "tiny", {base}, {field_json}}}'.encode()
        r = httpx.post(f"{server.url}/v1/{path}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"].startswith(param), error


def test_server_refuses_non_integer_token_prompts_and_still_serves(server):
    import httpx

    for prompt in ("[true, false]", "[2.0, 3.0]", "[[1, true]]"):
        body = f'{{"model": "tiny", "prompt": {prompt}, "max_tokens": 1}}'.encode()
        r = httpx.post(
            f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, r.text
    ok = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=ok)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


# --- modes of written files (item 11) ----------------------------------------------------------


@pytest.fixture
def umask():
    def set_umask(mask):
        os.umask(mask)

    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, mode):
    from safetensors.torch import save_file

    from gemmakit.files import atomic_folder, atomic_write
    from gemmakit.formats.safetensors import save_safetensors

    umask(mask)
    save_safetensors({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    atomic_write(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("x"))
    with atomic_folder(tmp_path / "folder") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "c.safetensors"))  # safetensors creates it 0600
        (tmp / "sub").mkdir()
        (tmp / "sub" / "d.json").write_text("{}")
    (tmp_path / "sibling.txt").write_text("x")
    for f in ("a.safetensors", "b.txt", "folder/c.safetensors", "folder/sub/d.json", "sibling.txt"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == mode, f


def test_an_executable_keeps_its_execute_bits(tmp_path, umask):
    from gemmakit.files import atomic_write

    def write(tmp):
        Path(tmp).write_bytes(b"\x7fELF")
        os.chmod(tmp, 0o700)  # as a compiler leaves its output

    atomic_write(tmp_path / "lib.so", write)
    assert stat.S_IMODE((tmp_path / "lib.so").stat().st_mode) == 0o755
