"""The checkpoint's own chat template: rendered as transformers renders it, from every place a
checkpoint keeps it (tokenizer_config.json, chat_template.jinja, GGUF metadata), through the
converted-GGUF cache and both exports, with template errors as one clear line (400 in the server).

The templates are the published ones (tests/data/chat_templates/SOURCES.md); the tokenizer is a
character-level tokenizer.json with Gemma 3's and Gemma 4's control tokens, so transformers and
gemmakit tokenize the rendered text the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.formats.chat_template import ChatTemplate, ChatTemplateError
from gemmakit.formats.tokenizer import Tokenizer, render_chat

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
GEMMA2 = (TEMPLATES / "gemma-2-2b-it.jinja").read_text()
GEMMA3 = (TEMPLATES / "gemma-3-it.jinja").read_text()
GEMMA4 = (TEMPLATES / "gemma-4-31B-it.jinja").read_text()
REAL = {"gemma3": GEMMA3, "gemma4": GEMMA4}

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
            "<start_of_image>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>",
            "<|image|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
            "<tool_response|>", '<|"|>']  # fmt: skip
CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
          "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}  # fmt: skip

SYSTEM_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  Hi there \n"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a <b>bold</b> colour & why."},
]
PARTS_CHAT = [
    {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
    {"role": "user", "content": [{"type": "text", "text": "Good "}, {"type": "text", "text": "morning"}]},
]
CONVERSATIONS = {
    "system": SYSTEM_CHAT,
    "parts": PARTS_CHAT,
    "one_user": [{"role": "user", "content": "Hi"}],
    # transformers drops None-valued keys: the template then sees no content at all.
    "none_content": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Again", "name": None},
    ],
}


def write_tokenizer_json(folder: Path) -> None:
    """A character-level tokenizer.json whose control tokens cover Gemma 3's and Gemma 4's turns."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))


def tokenizer_folder(folder: Path, template, where: str = "config") -> Path:
    """tokenizer.json + tokenizer_config.json, the template in the config or in chat_template.jinja."""
    write_tokenizer_json(folder)
    config = dict(CONFIG)
    if where == "config":
        config["chat_template"] = template
    else:
        (folder / "chat_template.jinja").write_text(template)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def reference(folder: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder)


def theirs(ref, conversation, gen=True, **kw):
    return ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen, **kw)


# --- rendering: the real Gemma 3 and Gemma 4 templates against transformers ----------------------


@pytest.mark.parametrize("where", ["config", "jinja"])
@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_renders_and_tokenizes_like_transformers(tmp_path, family, where):
    folder = tokenizer_folder(tmp_path / "tok", REAL[family], where)
    ours, ref = Tokenizer.from_folder(folder), reference(folder)
    assert ours.chat_template.text == REAL[family]  # byte for byte from either file
    for name, conv in CONVERSATIONS.items():
        for gen in (True, False):
            text = ours.apply_chat_template(conv, add_generation_prompt=gen)
            assert text == theirs(ref, conv, gen), (name, gen)
        # The rendered BOS is the only one: encode adds none, as transformers' add_special_tokens=False.
        ids = ours.encode(ours.apply_chat_template(conv))
        assert ids == ref.apply_chat_template(conv, add_generation_prompt=True, return_dict=False), name
        assert ids.count(ours.bos_id) == 1 and ids[0] == ours.bos_id


def test_gemma4_system_role_and_thinking_switch(tmp_path):
    """Gemma 4 has a real system turn (Gemma 3 folds it into the user's); template variables
    such as enable_thinking reach the template."""
    folder = tokenizer_folder(tmp_path / "tok", GEMMA4)
    ours, ref = Tokenizer.from_folder(folder), reference(folder)
    text = ours.apply_chat_template(SYSTEM_CHAT)
    assert text.startswith("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi there<turn|>\n")
    thinking = ours.apply_chat_template(SYSTEM_CHAT, enable_thinking=True)
    assert thinking != text and thinking == theirs(ref, SYSTEM_CHAT, enable_thinking=True)
    reasoning = [*SYSTEM_CHAT[:2], {"role": "assistant", "content": "", "reasoning_content": "Think.",
                 "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}]  # fmt: skip
    assert ours.apply_chat_template(reasoning) == theirs(ref, reasoning)


def test_template_rejection_is_one_clear_error(tmp_path):
    import jinja2

    folder = tokenizer_folder(tmp_path / "g3", GEMMA3)
    ours, ref = Tokenizer.from_folder(folder), reference(folder)
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="Conversation roles must alternate"):
        theirs(ref, twice)
    with pytest.raises(
        ChatTemplateError, match="rejected the conversation: Conversation roles must alternate"
    ) as e:
        ours.apply_chat_template(twice)
    assert isinstance(e.value, ValueError) and isinstance(e.value, GemmakitError)
    gemma2 = Tokenizer.from_folder(tokenizer_folder(tmp_path / "g2", GEMMA2))
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        gemma2.apply_chat_template(SYSTEM_CHAT)
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        ours.apply_chat_template([])
    # A content the template cannot handle is the conversation's error too, not a crash.
    with pytest.raises(ChatTemplateError, match="Invalid content type"):
        ours.apply_chat_template([{"role": "user", "content": 42}])


def test_jinja_environment_is_transformers(tmp_path):
    """Block tags on their own lines leave no blank lines or indents (trim_blocks,
    lstrip_blocks); tojson keeps HTML characters; strftime_now, namespace and loop controls
    work; the {% generation %} tag renders its body; reasoning is seen under every name; the
    sandbox refuses Python internals."""
    template = (
        "{{ bos_token }}{{ messages | tojson }}|{{ tools | tojson(indent=1) }}|{{ strftime_now('%Y') | length }}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% endfor %}|{{ ns.n }}|{% generation %}{{ eos_token }}{% endgeneration %}"
        "{{ dict(a=1) | tojson }}{{ documents is none }}{{ extra }}\n"
        "{% for m in messages %}\n    {% if m.role == 'assistant' %}\n{{ m.thinking }}/{{ m.reasoning_content }}\n"
        "    {% endif %}\n{% endfor %}\n"
    )
    folder = tokenizer_folder(tmp_path / "tok", template)
    ours, ref = Tokenizer.from_folder(folder), reference(folder)
    conv = [{"role": "user", "content": "<b>&'é\""}, {"role": "assistant", "content": "x", "reasoning": "R"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    kw = dict(tools=tools, extra="!")
    assert ours.apply_chat_template(conv, **kw) == theirs(ref, conv, **kw)
    assert '"<b>&\'é\\""' in ours.apply_chat_template(conv, **kw)
    assert ours.apply_chat_template(conv, **kw).endswith("True!\nR/R\n")
    for hostile in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns._x = 1 %}"):
        with pytest.raises(ChatTemplateError):
            ChatTemplate({"default": hostile}, {}).render(conv)


def test_invalid_template_names_the_file_and_line(tmp_path):
    ours = Tokenizer.from_folder(
        tokenizer_folder(tmp_path / "tok", "{{ bos_token }}\n{% for m in messages %}")
    )
    with pytest.raises(ModelFileError, match=r"tok: the chat template is not valid Jinja \(line 2"):
        ours.apply_chat_template(SYSTEM_CHAT)


def test_named_templates_pick_default_or_tool_use(tmp_path):
    named = [{"name": "default", "template": "{{ 'D' }}"}, {"name": "tool_use", "template": "{{ 'T' }}"}]
    folder = tokenizer_folder(tmp_path / "tok", named)
    ours, ref = Tokenizer.from_folder(folder), reference(folder)
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert ours.apply_chat_template(SYSTEM_CHAT) == theirs(ref, SYSTEM_CHAT) == "D"
    assert ours.apply_chat_template(SYSTEM_CHAT, tools=tools) == theirs(ref, SYSTEM_CHAT, tools=tools) == "T"
    assert ours.apply_chat_template(SYSTEM_CHAT, tools=[]) == theirs(ref, SYSTEM_CHAT, tools=[]) == "T"
    assert ours.apply_chat_template(SYSTEM_CHAT, chat_template="tool_use") == "T"
    given = "{{ messages | length }}"
    assert ours.apply_chat_template(SYSTEM_CHAT, chat_template=given) == theirs(
        ref, SYSTEM_CHAT, chat_template=given
    )


def test_folder_precedence_and_legacy_processor_file(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json (transformers' from_pretrained);
    a processor's chat_template.json is read when nothing else has a template."""
    named = [{"name": "default", "template": "{{ 'config' }}"}, {"name": "rag", "template": "{{ 'rag' }}"}]
    folder = tokenizer_folder(tmp_path / "tok", named)
    (folder / "chat_template.jinja").write_text("{{ 'file' }}")
    # The file replaces the config's templates, the named "rag" one included.
    assert reference(folder).chat_template == "{{ 'file' }}"
    assert Tokenizer.from_folder(folder).chat_template.templates == {"default": "{{ 'file' }}"}
    assert Tokenizer.from_folder(folder).apply_chat_template(SYSTEM_CHAT) == theirs(
        reference(folder), SYSTEM_CHAT
    )
    assert Tokenizer.from_folder(folder).apply_chat_template(SYSTEM_CHAT) == "file"
    legacy = tmp_path / "legacy"
    write_tokenizer_json(legacy)
    (legacy / "chat_template.json").write_text(json.dumps({"chat_template": "{{ bos_token }}legacy"}))
    assert Tokenizer.from_folder(legacy).apply_chat_template(SYSTEM_CHAT) == "<bos>legacy"


# --- without a template: Gemma's format stays --------------------------------------------------


def test_without_a_template_gemmas_format_is_used(tmp_path):
    from gemmakit.formats.gguf_writer import GEMMA_CHAT_TEMPLATE

    folder = tmp_path / "plain"
    write_tokenizer_json(folder)
    tok = Tokenizer.from_folder(folder)
    assert tok.chat_template is None
    assert tok.apply_chat_template(SYSTEM_CHAT) == render_chat(SYSTEM_CHAT)
    with pytest.raises(ChatTemplateError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)
    # The template gemmakit writes into exports renders Gemma's format through the same engine.
    written = ChatTemplate({"default": GEMMA_CHAT_TEMPLATE}, {"bos_token": "<bos>"})
    for conv in (SYSTEM_CHAT, SYSTEM_CHAT[1:2]):
        for gen in (True, False):
            assert written.render(conv, gen) == render_chat(conv, gen)


# --- GGUF: read, cached, exported; HF export --------------------------------------------------


@pytest.fixture
def gemma4_folder(hf_folder, monkeypatch, tmp_path):
    """A tiny random Gemma 3 model whose tokenizer carries Gemma 4's chat template."""
    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))
    folder, _ = hf_folder("gemma3")
    tokenizer_folder(folder, GEMMA4)
    return folder


def test_gguf_carries_the_template_through_the_converted_cache(gemma4_folder, tmp_path):
    from gemmakit.export import export
    from gemmakit.formats.gguf import GGUFFile
    from gemmakit.loading import converted_folder, load

    ref = reference(gemma4_folder)
    gguf = tmp_path / "m.gguf"
    export(model=str(gemma4_folder), to="gguf", output=gguf, qtype="f32", progress=False)
    assert GGUFFile(gguf).metadata["tokenizer.chat_template"] == GEMMA4
    first = load(str(gguf), dtype="float32", device="cpu")  # read from the GGUF, writes the cache
    assert (converted_folder(first.source) / "chat_template.jinja").read_text() == GEMMA4
    again = load(str(gguf), dtype="float32", device="cpu")  # read from the converted cache
    for loaded in (first, again):
        assert loaded.tokenizer.chat_template.special_tokens["bos_token"] == "<bos>"
        for conv in CONVERSATIONS.values():
            assert loaded.tokenizer.apply_chat_template(conv) == theirs(ref, conv)


def test_exports_write_the_tokenizers_own_template(gemma4_folder, tmp_path):
    """GGUF -> HF writes chat_template.jinja that transformers reads; a named-template config
    exports its default to GGUF (the writer falls back on the tokenizer's own template)."""
    from gemmakit.export import export
    from gemmakit.formats.gguf import GGUFFile

    gguf, out = tmp_path / "m.gguf", tmp_path / "hf"
    export(model=str(gemma4_folder), to="gguf", output=gguf, qtype="f32", progress=False)
    export(model=str(gguf), to="hf", output=out, qtype="f32", progress=False)
    assert (out / "chat_template.jinja").read_text() == GEMMA4
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert theirs(reference(out), SYSTEM_CHAT) == theirs(reference(gemma4_folder), SYSTEM_CHAT)

    config = json.loads((gemma4_folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": GEMMA3}, {"name": "rag", "template": "x"}]
    (gemma4_folder / "tokenizer_config.json").write_text(json.dumps(config))
    named = tmp_path / "named.gguf"
    export(model=str(gemma4_folder), to="gguf", output=named, qtype="f32", progress=False)
    assert GGUFFile(named).metadata["tokenizer.chat_template"] == GEMMA3


def test_stop_ids_come_from_the_folders_generation_config(hf_folder):
    from gemmakit.loading import load

    folder, _ = hf_folder("gemma3")
    write_tokenizer_json(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 9]}))
    assert load(str(folder), dtype="float32", device="cpu").stop_ids == (1, 9, 6)  # + <end_of_turn>
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 8}))
    # Without the config's say, the tokenizer's <eos>, <end_of_turn> and Gemma 4's <turn|> stop.
    assert load(str(folder), dtype="float32", device="cpu").stop_ids == (8, 1, 6, 9)


# --- the server and the chat command ----------------------------------------------------------


def test_server_renders_the_template_and_rejects_with_400(hf_folder):
    """The server renders the model's own template: Gemma 4's system turn counts in the prompt,
    and Gemma 2's refusal of the system role is a 400 with the template's message."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from gemmakit.inference.api import LLM
    from gemmakit.serving.app import create_app
    from gemmakit.serving.config import ServerConfig

    url = "/v1/chat/completions"
    for family, template in (("gemma3", GEMMA4), ("gemma2", GEMMA2)):
        folder, _ = hf_folder(family)
        tokenizer_folder(folder, template)
        llm = LLM(model=str(folder), dtype="float32", device="cpu")
        app = create_app(llm, ServerConfig(served_model_name="t"))
        with TestClient(app, base_url="http://127.0.0.1") as client:
            r = client.post(url, json={"model": "t", "messages": SYSTEM_CHAT, "max_tokens": 1})
            if template is GEMMA4:
                assert r.status_code == 200, r.text
                rendered = llm.tokenizer.apply_chat_template(SYSTEM_CHAT)
                assert rendered.startswith("<bos><|turn>system\nBe brief.<turn|>")
                assert r.json()["usage"]["prompt_tokens"] == len(llm.tokenizer.encode(rendered))
            else:
                assert r.status_code == 400
                error = r.json()["error"]
                assert (
                    error["message"]
                    == "the chat template rejected the conversation: System role not supported"
                )
                assert error["param"] == "messages"


def test_chat_command_prints_a_template_rejection_on_one_line(hf_folder, capsys, monkeypatch):
    import io

    from gemmakit.cli import main

    folder, _ = hf_folder("gemma2")
    tokenizer_folder(folder, GEMMA2)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", "--model", str(folder), "--system", "be brief", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "gemmakit chat: error: the chat template rejected the conversation: System role not supported"
    )


# --- fine-tuning data in the model's own format ---------------------------------------------------


def test_chat_finetuning_rows_use_the_models_own_template(tmp_path):
    from gemmakit.training import data as sft_data

    tok = Tokenizer.from_folder(tokenizer_folder(tmp_path / "g4", GEMMA4))
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Sure."}]}  # fmt: skip
    (example,), skipped = sft_data.build_examples([row], tok, 512, chat_template=True, responses_only=True)
    assert skipped == 0
    # The example is exactly the conversation as the template renders it, one BOS.
    conversation = [{"role": r, "content": c} for r, c in (("user", "Hi"), ("assistant", "Hello!"),
                                                           ("user", "More?"), ("assistant", "Sure."))]  # fmt: skip
    assert example.input_ids == tok.encode(tok.apply_chat_template(conversation, add_generation_prompt=False))
    # Only the assistant turns (with the template's end-of-turn marker) are labels.
    learned = [t for t in example.labels if t != sft_data.IGNORE]
    responses = "Hello!<turn|>\n", "Sure.<turn|>\n"
    assert learned == [t for r in responses for t in tok.encode(r, add_bos=False)]
    # Without a template of its own, Gemma's built-in format stays.
    plain = Tokenizer.from_folder(tokenizer_folder(tmp_path / "plain", GEMMA3))
    plain.chat_template = None
    (builtin,), _ = sft_data.build_examples([row], plain, 512, chat_template=True)
    want = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>"
    assert builtin.input_ids[: len(tok.encode(want))] == plain.encode(want)
