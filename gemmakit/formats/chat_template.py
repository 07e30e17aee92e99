"""The checkpoint's own chat template: where it is kept, and rendering it as transformers does.

A Hugging Face folder keeps its template in `chat_template.jinja` (with named extras under
`additional_chat_templates/`), in `tokenizer_config.json`'s `chat_template` (a string, or a list
of `{"name", "template"}`), or in a processor's legacy `chat_template.json`; a GGUF file in
`tokenizer.chat_template` (named extras as `tokenizer.chat_template.NAME`). The file wins over
the config, as in transformers' `PreTrainedTokenizerBase.from_pretrained`.

Rendering follows transformers 5 (`utils/chat_template_utils.py`, `render_jinja_template`, and
`PreTrainedTokenizerBase.apply_chat_template`): an immutable sandboxed Jinja environment with
`trim_blocks` and `lstrip_blocks`, the loop-control extension, a `{% generation %}` tag, the
globals `raise_exception`, `strftime_now`, `dict` and `namespace`, a `tojson` filter that does
not escape HTML, and the variables `messages`, `tools`, `documents`, `add_generation_prompt`,
the named special tokens (`bos_token`, ...) and any extra keyword. A template that rejects the
conversation (`raise_exception("Conversation roles must alternate ...")`) raises
`ChatTemplateError`, a `ValueError` as well, so the server answers 400 and the CLI one line.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from gemmakit.errors import GemmakitError, ModelFileError

# The named special tokens transformers hands to every template
# (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")  # fmt: skip
# Where a message's reasoning may be given; templates read the first (transformers
# chat_template_utils._REASONING_FIELDS), gpt-oss style ones read `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
DEFAULT = "default"


class ChatTemplateError(GemmakitError, ValueError):
    """The chat template rejected a conversation, or could not render it."""


class ChatTemplate:
    """A model's own chat template(s) and the special tokens they are rendered with.

    Attributes:
        templates: name -> Jinja source; "default" is the one used unless a caller names another
            (or passes tools and a "tool_use" template exists).
        special_tokens: `bos_token` etc. -> token string, as the template sees them.
        source: where the templates were read (for error messages).
    """

    def __init__(self, templates: dict[str, str], special_tokens: dict[str, str], source: str = "the model"):
        if not templates:
            raise ValueError("a ChatTemplate needs at least one template")
        self.templates = dict(templates)
        self.special_tokens = dict(special_tokens)
        self.source = source

    @property
    def text(self) -> str:
        """The default template's source (the one a GGUF export writes)."""
        return self.templates[DEFAULT] if DEFAULT in self.templates else next(iter(self.templates.values()))

    def select(self, name: str | None = None, tools=None) -> str:
        """The template source to render, chosen as transformers' `get_chat_template` does:
        `name` is one of the templates' names or else a Jinja template itself; without it,
        "tool_use" when tools are given (even an empty list) and there is one, else "default"."""
        if name is not None:
            return self.templates.get(name, name)
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if DEFAULT in self.templates:
            return self.templates[DEFAULT]
        if len(self.templates) == 1:
            return next(iter(self.templates.values()))
        raise ChatTemplateError(
            f"{self.source} has several chat templates and no default: {', '.join(sorted(self.templates))}"
        )

    def render(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
        documents: list[dict] | None = None, chat_template: str | None = None, **kwargs,
    ) -> str:  # fmt: skip
        """The conversation as text, exactly as transformers' `apply_chat_template(tokenize=False)`.

        Args:
            messages: `{"role", "content", ...}` dicts; content may be a string or a list of parts.
            add_generation_prompt: end with the opening of the model's turn.
            tools, documents: passed to the template as JSON-schema dicts.
            chat_template: the name of one of the templates, or a Jinja template to use instead
                (as in transformers).
            **kwargs: further template variables (`enable_thinking=True`, ...); they override
                the special tokens of the same name.

        Raises:
            ChatTemplateError: the template rejected the conversation or failed on it.
        """
        if not messages:
            raise ChatTemplateError("cannot apply the chat template to an empty conversation")
        compiled = compile_template(self.select(chat_template, tools), self.source)
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return compiled.render(
                messages=_template_messages(messages), tools=_plain(tools), documents=_plain(documents),
                add_generation_prompt=add_generation_prompt, **variables,
            )  # fmt: skip
        except ChatTemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the template is the conversation's
            raise _render_error(e, self.source) from None


# --- finding the template -----------------------------------------------------------------------


def from_folder(folder: Path, pieces: list[str]) -> ChatTemplate | None:
    """The template(s) of a Hugging Face folder, or None when it has none.

    `pieces` (the vocabulary) supplies the special tokens a folder's configs do not name.
    """
    config = _read_json(folder / "tokenizer_config.json")
    # Template files replace the config's templates altogether, as in transformers.
    templates: dict[str, str] = {}
    if (folder / "chat_template.jinja").is_file():
        templates[DEFAULT] = _read_text(folder / "chat_template.jinja")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            templates[f.stem] = _read_text(f)
    if not templates:
        templates = _named_templates(config.get("chat_template"), folder / "tokenizer_config.json")
    if not templates:  # only a processor reads this file, but the template is the model's
        legacy = _read_json(folder / "chat_template.json").get("chat_template")
        templates = _named_templates(legacy, folder / "chat_template.json")
    if not templates:
        return None
    specials = default_special_tokens(pieces)
    specials.update(_configured_special_tokens(_read_json(folder / "special_tokens_map.json")))
    specials.update(_configured_special_tokens(config))
    return ChatTemplate(templates, specials, str(folder))


def from_gguf_metadata(metadata: dict, pieces: list[str], source: str = "GGUF") -> ChatTemplate | None:
    """The template(s) a GGUF file carries (llama.cpp's `tokenizer.chat_template` keys), or None."""
    templates = {}
    prefix = "tokenizer.chat_template."
    for key in metadata:  # keys only: a lazy mapping (GGUFMetadata) decodes a value when read
        if key.startswith(prefix) and isinstance(metadata[key], str):
            templates[key[len(prefix) :]] = metadata[key]
    if isinstance(metadata.get("tokenizer.chat_template"), str):
        templates[DEFAULT] = metadata["tokenizer.chat_template"]
    if not templates:
        return None
    specials = default_special_tokens(pieces)
    for name, key in _GGUF_SPECIAL_IDS.items():
        token_id = metadata.get(key)
        if token_id is not None and 0 <= int(token_id) < len(pieces):
            specials[name] = pieces[int(token_id)]
    return ChatTemplate(templates, specials, source)


# The GGUF keys of the special ids a template sees (gguf-py constants.Keys.Tokenizer; llama.cpp
# spells "seperator").
_GGUF_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "sep_token": "tokenizer.ggml.seperator_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
    "mask_token": "tokenizer.ggml.mask_token_id",
}


def folder_files(template: ChatTemplate) -> dict[str, str]:
    """The files that carry `template` in a Hugging Face folder, as transformers' `save_pretrained`
    writes them: the default in chat_template.jinja, others under additional_chat_templates/."""
    default = DEFAULT if DEFAULT in template.templates else next(iter(template.templates))
    files = {"chat_template.jinja": template.templates[default]}
    for name, text in template.templates.items():
        # A name becomes a file name: one that could leave the folder is not written.
        if name != default and name and "/" not in name and "\\" not in name and not name.startswith("."):
            files[f"additional_chat_templates/{name}.jinja"] = text
    return files


def default_special_tokens(pieces: list[str]) -> dict[str, str]:
    """Gemma's special tokens, where the vocabulary has them (GemmaTokenizer's defaults)."""
    defaults = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                "mask_token": "<mask>"}  # fmt: skip
    # Five membership tests, not a set of the whole vocabulary (`pieces` may be a lazy view).
    return {k: v for k, v in defaults.items() if v in pieces}


def _named_templates(value, path: Path) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {DEFAULT: value}
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= set(t) for t in value):
        return {t["name"]: t["template"] for t in value}
    if isinstance(value, dict) and all(isinstance(t, str) for t in value.values()):
        return dict(value)
    raise ModelFileError(f"{path}: chat_template is neither a string nor a list of named templates")


def _configured_special_tokens(config: dict) -> dict[str, str]:
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):  # a serialized AddedToken
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: cannot read it ({e})") from None


# --- rendering ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def compile_template(text: str, source: str = "the model"):
    """The compiled template (cached: a Gemma 4 template takes milliseconds to compile)."""
    import jinja2

    try:
        return _environment().from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ModelFileError(
            f"{source}: the chat template is not valid Jinja (line {e.lineno}: {e.message})"
        ) from None


@functools.cache
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _generation_tag()]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_make_dict,
                       namespace=_namespace_class())  # fmt: skip
    return env


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the JSON as is
    # (transformers chat_template_utils, the tojson override).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _make_dict(*args, **kwargs):
    # A plain function rather than the `dict` type, so a template cannot reach the type's
    # attributes.
    return dict(*args, **kwargs)


@functools.cache
def _namespace_class():
    import jinja2
    import jinja2.utils

    class Namespace(jinja2.utils.Namespace):
        """Jinja's namespace, refusing underscore names (a way towards Python internals)."""

        def __init__(*args, **kwargs):  # noqa: N805 - Jinja's own signature trick: `namespace(self=...)` works
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    return Namespace


@functools.cache
def _generation_tag():
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its
    body; gemmakit does not track the spans."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationTag


def _template_messages(messages: list[dict]) -> list[dict]:
    """Plain copies of the messages, as transformers prepares them: keys whose value is None
    dropped (`_normalize_chat_messages`), reasoning copied under every name templates read
    (`_alias_reasoning_fields`)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"message {i} is not an object with a role and a content")
        m = {k: v for k, v in _plain(m).items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _plain(value):
    """JSON-like data rebuilt from plain types; anything else becomes an inert placeholder
    (transformers' `_plain_template_data`: the sandbox cannot vet arbitrary objects' methods)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _render_error(e: Exception, source: str) -> ChatTemplateError:
    import jinja2

    if isinstance(e, jinja2.TemplateError) and not isinstance(e, jinja2.UndefinedError):
        # raise_exception("...") in the template: its message is meant for the user.
        return ChatTemplateError(f"the chat template rejected the conversation: {e.message or e}")
    return ChatTemplateError(
        f"the chat template of {source} failed on this conversation ({type(e).__name__}: {e})"
    )
