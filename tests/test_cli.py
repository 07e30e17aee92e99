import json

from gemmakit.cli import main


def test_help_lists_every_command(capsys):
    from gemmakit.cli import build_parser

    text = build_parser().format_help()
    for name in ("generate", "chat", "inspect"):
        assert name in text


def test_generate_json(capsys):
    rc = main(["generate", "The capital of France is", "Hi", "--greedy", "--max-new-tokens", "6", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"model", "load_seconds", "generation_seconds", "tokens_per_second", "outputs"}
    assert [o["prompt"] for o in out["outputs"]] == ["The capital of France is", "Hi"]
    assert all(len(o["token_ids"]) == 6 for o in out["outputs"])
    assert out["outputs"][0]["text"].startswith(" the capital")


def test_generate_text_prints_timings(capsys):
    assert main(["generate", "Hello", "--max-new-tokens", "4", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello")
    assert "Loading time:" in captured.err and "tokens/s" in captured.err


def test_user_errors_are_one_line(capsys):
    assert main(["generate", "x", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemmakit generate: error: float16 is refused") and "Traceback" not in err
    assert main(["generate", "x", "--model", "/no/such/model"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_generate_quantize_reports_memory(capsys):
    rc = main(["generate", "Hi", "--greedy", "--max-new-tokens", "2", "--quantize", "int8", "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    memory = out["memory"]
    assert 0 < memory["after_bytes"] < memory["before_bytes"]
    mb = [round(memory[k] / 1e6) for k in ("before_bytes", "after_bytes")]
    assert f"quantized (int8): {mb[0]} MB -> {mb[1]} MB" in captured.err


def test_chat_drops_the_oldest_exchanges_to_fit_the_context():
    from gemmakit.commands.chat import _fit_context

    class OneTokenPerMessage:
        def apply_chat_template(self, messages):
            return [m["content"] for m in messages]

        def encode(self, rendered):
            return list(range(len(rendered)))

    turns = [{"role": r, "content": f"{r}{i}"} for i in range(3) for r in ("user", "assistant")][:-1]
    history, ids = _fit_context(OneTokenPerMessage(), "be brief", turns, context=5)
    assert history == turns[2:] and len(ids) == 4  # system + 3 turns leave room for a reply
    history, ids = _fit_context(OneTokenPerMessage(), None, turns, context=2)
    assert history == turns[-1:]  # the last user turn is kept even when it alone is too long


def test_help_and_cache_commands_do_not_import_torch():
    """`gemmakit --help` and `gemmakit cache` start in milliseconds: neither imports torch
    (measured: 0.08 s and 12 MiB resident for --help, against 2.3 s and 221 MiB with torch)."""
    from tests.conftest import run_fresh_python

    code = (
        "import sys\n"
        "from gemmakit.cli import main\n"
        "for argv in (['--help'], ['cache', 'list', '--json']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import gemmakit\n"
        "assert gemmakit.SamplingParams.__name__ == 'SamplingParams'\n"
    )
    run_fresh_python(code)
