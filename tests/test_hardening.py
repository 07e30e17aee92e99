"""Hostile-but-fair inputs at the edges: each gets one clear error (or a correct result), never a
traceback, and never harms other work. Sampling values, token ids, the server's request schema,
a fine-tune killed before its first checkpoint, damaged run files, bad training rows, bad
command-line flags, and the modes of written files.
"""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest
import torch

from gemmakit.cli import main
from gemmakit.errors import GemmakitError
from gemmakit.inference.sampling import MIN_TEMPERATURE, SamplingParams, sample
from gemmakit.training import data as sft_data
from gemmakit.training.checkpoints import STATE_FILE, checkpoints
from gemmakit.training.trainer import Trainer, train
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
    gen = random.Random(0)
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


# --- a fine-tune killed before its first checkpoint; damaged run files (item 2) ----------------


class Killed(Exception):
    """Stands for SIGKILL: the run stops where it is, with no handler and no checkpoint."""


def kill_at(step: int):
    def callback(event):
        if event["step"] == step:
            raise Killed

    return callback


def leave_killed_run(cfg, step: int = 2):
    """The folder as a SIGKILL at `step` leaves it (no checkpoint yet): config.json, the metrics
    written so far with the last line cut mid-write, and a half-written checkpoint temporary."""
    with pytest.raises(Killed):
        train(cfg, callbacks=[kill_at(step)], progress=False)
    out = Path(cfg.output)
    assert (out / "config.json").exists() and not checkpoints(out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1')
    tmp = out / "checkpoints" / f".step-{step + 1:06d}.tmp-999999"
    (tmp / "adapter").mkdir(parents=True)
    (tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 100)


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, resume):
    folder = tiny_model_folder(tmp_path)
    kw = dict(max_steps=4, save_every=10, eval_every=2)
    fresh = train(tiny_config(folder, tmp_path / "fresh", **kw), progress=False)
    cfg = tiny_config(folder, tmp_path / "killed", **kw)
    leave_killed_run(cfg)
    notes = []
    again = train(cfg, resume=resume, progress=False, log=notes.append)
    assert again.step == fresh.step == 4 and not again.interrupted
    assert any("before its first checkpoint" in n and "step 0" in n for n in notes), notes
    assert records(tmp_path / "killed") == records(tmp_path / "fresh")  # as if never killed
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*"))  # the temporary is gone
    # the adapter is readable by the group and others, as its siblings are (item 11)
    assert stat.S_IMODE((again.adapter / "adapter_model.safetensors").stat().st_mode) == (
        stat.S_IMODE((tmp_path / "killed" / "config.json").stat().st_mode)
    )


def test_resume_of_an_empty_folder_is_still_refused(tmp_path):
    folder = tiny_model_folder(tmp_path)
    with pytest.raises(GemmakitError, match="no checkpoint to resume from"):
        Trainer(tiny_config(folder, tmp_path / "typo"), resume=True)


@pytest.mark.parametrize("resume", [False, True])
def test_a_model_folder_given_as_output_is_left_alone(tmp_path, resume):
    """Its config.json is not a run's: refused, not taken for a killed run and overwritten."""
    folder = tiny_model_folder(tmp_path)
    before = (folder / "config.json").read_bytes()
    with pytest.raises(GemmakitError, match="not a fine-tuning run's settings"):
        Trainer(tiny_config(folder, folder), resume=resume)
    assert (folder / "config.json").read_bytes() == before


@pytest.fixture
def checkpointed_run(tmp_path):
    """A run stopped by Ctrl-C at step 2 (checkpoint step-000002) and its config."""
    folder = tiny_model_folder(tmp_path)
    cfg = tiny_config(folder, tmp_path / "run", max_steps=4, save_every=10, eval_every=10)

    def ctrl_c(event):
        if event["step"] == 2:
            raise KeyboardInterrupt

    part = train(cfg, callbacks=[ctrl_c], progress=False)
    assert part.interrupted and part.checkpoint.name == "step-000002"
    return cfg, part.checkpoint


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_state"])
def test_a_damaged_trainer_state_is_one_clear_error(checkpointed_run, damage):
    cfg, ckpt = checkpointed_run
    state = ckpt / STATE_FILE
    if damage == "truncated":
        data = state.read_bytes()
        state.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        state.write_bytes(b"this is not a checkpoint")
    else:
        torch.save({"step": 2}, state)
    with pytest.raises(GemmakitError) as e:
        train(cfg, resume=True, progress=False)
    assert str(state) in str(e.value) and f"remove {ckpt}" in str(e.value)
    assert "\n" not in str(e.value)


def test_metrics_cut_mid_write_resume_and_damaged_metrics_are_an_error(checkpointed_run):
    cfg, _ = checkpointed_run
    metrics = Path(cfg.output) / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + '\n{"step": 3, "lo')  # a kill inside Metrics.write
    result = train(cfg, resume=True, progress=False)
    assert result.step == 4 and [r["step"] for r in records(Path(cfg.output)) if "loss" in r] == [1, 2, 3, 4]
    metrics.write_text("\n".join(["{oops", *metrics.read_text().splitlines()[1:]]) + "\n")
    with pytest.raises(GemmakitError, match=r"metrics.jsonl:1: not a metrics record"):
        Trainer(cfg, resume=True).fit(progress=False)


# --- fine-tuning data (item 5) -----------------------------------------------------------------


class CharTokenizer:
    bos_id, eos_id, pad_id = 2, 1, 0

    def encode(self, text, add_bos=True):
        return ([self.bos_id] if add_bos else []) + [3 + ord(c) % 200 for c in text]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"prompt": None, "completion": "x"}, "'prompt' must be a string, got null"),
        ({"prompt": "x", "completion": None}, "'completion' must be a string, got null"),
        ({"prompt": "x", "completion": 4}, "'completion' must be a string, got a number"),
        ({"text": None}, "'text' must be a string, got null"),
        ({"messages": [{"role": "user", "content": None}]}, "message content must be a string, got null"),
        ("[1, 2]", "a row must be a JSON object, got an array"),
    ],
)
def test_bad_rows_name_the_file_line_after_the_split(tmp_path, bad, message):
    """Line 41 of the file, whatever its place in the shuffled split."""
    good = {"prompt": "q", "completion": "a"}
    rows = [good] * 30 + [""] * 5 + [good] * 5 + [bad] + [good] * 9
    path = write_rows(tmp_path / "data.jsonl", rows)
    with pytest.raises(GemmakitError) as e:
        read = sft_data.read_rows(path)
        train_rows, eval_rows = sft_data.split_rows(read, 0.2, seed=1)
        for part in (train_rows, eval_rows):
            sft_data.build_examples(part, CharTokenizer(), 64)
    assert str(e.value) == f"{path}:41: {message}"


def test_rows_with_nothing_to_learn_are_skipped_and_counted():
    rows = [
        {"text": ""},
        {"text": "   "},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
        {"text": "### Human: a question and no answer"},
        {"prompt": "q", "completion": ""},
        {"prompt": "q", "completion": "a"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    for chat in (False, True):
        examples, skipped = sft_data.build_examples(rows, CharTokenizer(), 64, chat_template=chat)
        assert skipped == 6 and len(examples) == 2
        # no example is a bare <bos><eos>: each has a response token to learn
        assert all(len([t for t in e.labels if t != sft_data.IGNORE]) >= 2 for e in examples)


def test_the_trainer_reports_how_many_rows_it_skipped(tmp_path):
    folder = tiny_model_folder(tmp_path)
    data = write_rows(tmp_path / "d.jsonl", [{"text": ""}, {"prompt": "q", "completion": "a"}] * 6)
    notes = []
    Trainer(tiny_config(folder, tmp_path / "o", data=str(data), eval_fraction=0.0), log=notes.append)
    assert any("skipped 6 row(s) with nothing to learn from" in n for n in notes), notes


def test_non_utf8_data_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(GemmakitError, match=r"latin1.jsonl:2: not UTF-8 text"):
        sft_data.read_rows(path)


class StrictCharTokenizer(CharTokenizer):
    """Refuses what the real tokenizer refuses (a lone surrogate: tokenizers raises TypeError)."""

    def encode(self, text, add_bos=True):
        text.encode("utf-8")
        return super().encode(text, add_bos)


FUZZ_ROWS = [
    {"text": "### Human: What is 2+2?### Assistant: 4."},
    {"prompt": "Capital of France?", "completion": "Paris."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]},
]  # fmt: skip
FUZZ_VALUES = [None, 0, -1.5, True, "", "   ", "\ud800", [], {}, [1, "a"], {"role": 3}, "### Assistant:"]


def mutate(rng, data: bytes) -> bytes:
    """One random damage: flipped, inserted or deleted bytes, a cut, or a field set to an odd value."""
    kind = rng.randrange(5)
    if kind == 0:
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 1:
        i = rng.randrange(len(data))
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 6))) + data[i:]
    if kind == 2:
        return data[: rng.randrange(len(data))]
    if kind == 3:
        i, j = sorted(rng.randrange(len(data)) for _ in range(2))
        return data[:i] + data[j:]
    rows = [json.loads(line) for line in data.decode().splitlines()]
    row = rng.choice(rows)
    target = rng.choice(row["messages"]) if "messages" in row and rng.random() < 0.5 else row
    target[rng.choice([*target, "text", "prompt"])] = rng.choice(FUZZ_VALUES)
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def fuzz_data_reader(tmp_path, cases: int, seed: int) -> int:
    """Reads `cases` damaged files; each must give rows or a GemmakitError. Returns how many erred."""
    import random

    base = "".join(json.dumps(r) + "\n" for r in FUZZ_ROWS * 3).encode()
    rng, errors = random.Random(seed), 0
    for case in range(cases):
        path = tmp_path / f"case{case % 7}.{'json' if case % 11 == 0 else 'jsonl'}"
        data = mutate(rng, base)
        path.write_bytes(b"[" + data.replace(b"}\n{", b"},{") + b"]" if path.suffix == ".json" else data)
        try:
            rows = sft_data.read_rows(path)
            for part in sft_data.split_rows(rows, 0.25, seed=case):
                for chat in (False, True):
                    sft_data.build_examples(part, StrictCharTokenizer(), 48, chat_template=chat)
        except GemmakitError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
            errors += 1
    return errors


def test_fuzzed_data_files_give_rows_or_one_clear_error(tmp_path):
    errors = fuzz_data_reader(tmp_path, 400, seed=0)
    assert 0 < errors < 400  # both outcomes were reached


@pytest.mark.slow
def test_fuzzed_data_files_long(tmp_path):
    errors = fuzz_data_reader(tmp_path, 20000, seed=1)
    assert 0 < errors < 20000


def test_deeply_nested_json_and_lone_surrogates_are_one_line(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 100_000 + "\n")
    with pytest.raises(GemmakitError, match="deep.jsonl:1: JSON nested too deeply"):
        sft_data.read_rows(deep)
    surrogate = write_rows(tmp_path / "s.jsonl", [{"prompt": "hi \ud800", "completion": "x"}])
    with pytest.raises(GemmakitError, match=r"s.jsonl:1: 'prompt' holds a lone surrogate \(U\+D800\)"):
        sft_data.build_examples(sft_data.read_rows(surrogate), StrictCharTokenizer(), 48)


# --- command-line flags (item 6) ---------------------------------------------------------------


def test_cli_flag_mistakes_are_one_line(tmp_path, capsys, tiny_folder):
    cases = [
        (["generate", "Hi", "--seed", "100000000000000000000000"], "generate", "--seed must fit in 64 bits"),
        (["generate", "Hi", "--device", "banana"], "generate", "--device must be cpu, cuda or cuda:N"),
        (["eval", "perplexity", "--device", "cuda:x"], "eval", "--device must be"),
        (["serve", "--port", "99999", "--model", "/no/such"], "serve", "--port must be in 0..65535"),
        (["serve", "--port", "-1", "--model", "/no/such"], "serve", "--port must be in 0..65535"),
        (["eval", "perplexity", "--text", str(tmp_path)], "eval", "is a folder"),
        (
            ["finetune", "--seed", str(2**70), "--data", SAMPLE, "--output", str(tmp_path / "o")],
            "finetune",
            "--seed",
        ),
    ]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    resume = ["finetune", "--data", SAMPLE, "--output", str(broken), "--resume"]
    cases.append((resume, "finetune", "config.json: not the JSON a run writes"))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "\xff\xfe"}\n')
    args = ["finetune", "--model", str(tiny_folder), "--data", str(bad), "--output", str(tmp_path / "f")]
    cases.append((args + ["--recipe", "lora"], "finetune", "bad.jsonl:1: not UTF-8 text"))
    for argv, command, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        one_line_error(err, command)
        assert message in err, (argv, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_only_torch_is_one_line(capsys):
    assert main(["generate", "Hi", "--device", "cuda", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    one_line_error(err, "generate")
    assert "--device cuda" in err and ("without CUDA" in err or "no CUDA device" in err)


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
