"""OpenAI `tools` / `tool_choice` over Gemma's own function-calling formats.

Two formats, chosen by the checkpoint:

- A chat template that reads `tools` (Gemma 4's) renders the declarations, the assistant's
  `tool_calls` and the `role: tool` results itself; the model answers with its tool-call
  tokens, `<|tool_call>call:NAME{key:value,...}<tool_call|>`, strings between `<|"|>`
  (the template's `format_argument` macro), parsed back by `parse_gemma4_calls`.
- Otherwise (Gemma 3 and earlier have no tool tokens) Google's documented Gemma 3 prompt
  convention (ai.google.dev/gemma/docs/capabilities/function-calling): the function
  declarations as JSON in the first turn with an instruction to answer a call as a JSON object
  `{"name": ..., "parameters": {...}}` and nothing else; the call may come fenced as
  ```tool_code``` or ```json```. Earlier calls and results go back into the prompt as text.

`tool_choice` "required" or a named function makes the call a JSON schema the grammar engine
enforces (`inference.grammar`), so the answer is always a valid call; "none" leaves the tools
out of the prompt. A streamed answer that may be a call (`ToolPlan.holds`) is held until it
ends, then sent as one `tool_calls` delta (or as content when it was not a call); one that
visibly is not a call streams as usual.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from gemmakit.serving.schemas import APIError

GEMMA4_CALL = re.compile(r"<\|tool_call>call:([\w.\-]+)(\{.*?\})<tool_call\|>", re.S)
GEMMA4_QUOTE = '<|"|>'
FENCE = re.compile(r"^```(?:tool_code|json|python)?\s*(.*?)\s*```$", re.S)

# The instruction of the Gemma 3 convention, in our words.
TOOL_PREAMBLE = (
    "You can call the functions declared below. To call one, answer with only a JSON object "
    '{{"name": <function name>, "parameters": <object of argument values>}} and no other text; '
    "to call several, answer with a JSON list of such objects. If no function fits, answer "
    "normally.\n\nFunctions:\n{functions}"
)


@dataclass
class ToolPlan:
    """What a chat request's tools change: the prompt, the grammar and how output is read."""

    tools: list[dict] = field(default_factory=list)  # the OpenAI tool objects to offer
    forced: str | None = None  # "required", a function name, or None
    native: bool = False  # set by render_prompt: the chat template renders the tools itself

    @property
    def buffered(self) -> bool:
        """Whether a streamed answer is held back: it may be a call."""
        return bool(self.tools)

    def holds(self, text: str) -> bool:
        """Whether a streamed answer that starts with `text` may still be a call, so must be
        held back: a forced call or a template's own format (its markers are control tokens,
        invisible in the text) always; the Gemma 3 convention until the first visible
        character is known, then only when it opens JSON or a code fence."""
        if not self.tools:
            return False
        if self.forced is not None or self.native:
            return True
        start = text.lstrip()
        return not start or start[0] in "{[`"

    @property
    def schema(self) -> dict | None:
        """The JSON schema of a forced call (Gemma 3 convention), or None."""
        if self.forced is None:
            return None
        names = [self.forced] if self.forced != "required" else [t["function"]["name"] for t in self.tools]
        options = []
        for tool in self.tools:
            fn = tool["function"]
            if fn["name"] in names:
                params = fn.get("parameters") or {"type": "object", "properties": {}}
                options.append(
                    {
                        "type": "object",
                        "properties": {"name": {"const": fn["name"]}, "parameters": params},
                        "required": ["name", "parameters"],
                        "additionalProperties": False,
                    }
                )
        return options[0] if len(options) == 1 else {"anyOf": options}

    def parse(self, text: str, tokenizer=None, token_ids: list[int] | None = None) -> list[dict] | None:
        """The OpenAI `tool_calls` in a finished answer, or None when it is not a call.

        With a template's own format the call markers may be control tokens, which the text
        drops; the answer is then re-read from its `token_ids` with them written out.
        """
        if not self.tools:
            return None
        known = {t["function"]["name"] for t in self.tools}
        written = tokenizer.decode(token_ids, skip_special=False) if self.native and token_ids else text
        calls = parse_gemma4_calls(written) if GEMMA4_CALL.search(written) else parse_json_calls(text)
        if not calls or any(name not in known for name, _ in calls):
            return None
        return [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
            }
            for name, args in calls
        ]


def tool_plan(tools: list[dict] | None, tool_choice) -> ToolPlan:
    """Checks `tools` and `tool_choice` (400 on a malformed one) and plans the request."""
    tools = tools or []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(
                400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", param="tools"
            )
        if not isinstance(fn.get("parameters", {}), dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
    names = [t["function"]["name"] for t in tools]
    if tool_choice is None or tool_choice == "auto":
        return ToolPlan(tools)
    if tool_choice == "none":
        return ToolPlan([])
    if tool_choice == "required":
        if not tools:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        return ToolPlan(tools, "required")
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if name is None:
        raise APIError(
            400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )  # fmt: skip
    if name not in names:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return ToolPlan(tools, name)


# --- the prompt ---------------------------------------------------------------------------


def template_reads_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return template is not None and "tools" in template.select(tools=[])


def render_prompt(tokenizer, messages: list[dict], plan: ToolPlan) -> str:
    """The conversation as prompt text, with the plan's tools in the model's own format."""
    if template_reads_tools(tokenizer):
        plan.native = True
        kwargs = {"tools": plan.tools} if plan.tools else {}
        return tokenizer.apply_chat_template(native_messages(messages), **kwargs)
    messages = convention_messages(messages)
    if plan.tools:
        functions = json.dumps([t["function"] for t in plan.tools], indent=2, ensure_ascii=False)
        preamble = TOOL_PREAMBLE.format(functions=functions)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{preamble}\n\n{_text(messages[0]['content'])}"}
        else:
            messages.insert(0, {"role": "system", "content": preamble})
    return tokenizer.apply_chat_template(messages)


def _text(content) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content or ""


def _arguments(call: dict) -> dict:
    args = call.get("function", {}).get("arguments", {})
    try:
        return json.loads(args) if isinstance(args, str) else dict(args or {})
    except (ValueError, TypeError):
        raise APIError(
            400, "a tool call's function.arguments must be a JSON object", param="messages"
        ) from None


def native_messages(messages: list[dict]) -> list[dict]:
    """Messages for a template that reads tool calls: arguments as objects, as
    transformers' templates expect them; "developer" is "system"."""
    out = []
    for m in messages:
        m = {**m, "role": "system" if m["role"] == "developer" else m["role"]}
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c.get("function", {}), "arguments": _arguments(c)}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def convention_messages(messages: list[dict]) -> list[dict]:
    """Messages for Gemma's plain turns: an assistant's calls become the JSON it would have
    written, a `role: tool` result a user turn naming the function (the results of one turn
    of calls share one user turn: Gemma's turns alternate)."""
    names = {}
    out: list[dict] = []
    for m in messages:
        role, content = ("system" if m["role"] == "developer" else m["role"]), _text(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                names[c.get("id")] = c.get("function", {}).get("name", "")
                calls.append({"name": names[c.get("id")], "parameters": _arguments(c)})
            written = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            content = f"{content}\n{written}".strip()
        elif role == "tool":
            name = names.get(m.get("tool_call_id")) or m.get("name") or "the function"
            role, content = "user", f"Result of {name}:\n{content}"
            if out and out[-1].get("results"):  # several results answer one turn of calls
                out[-1]["content"] += f"\n\n{content}"
                continue
            out.append({"role": role, "content": content, "results": True})
            continue
        out.append({"role": role, "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]


# --- reading calls back ---------------------------------------------------------------------


def parse_json_calls(text: str) -> list[tuple[str, dict]] | None:
    """Calls written as the Gemma 3 convention asks: a JSON object or list, maybe fenced."""
    text = text.strip()
    fenced = FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("parameters", item.get("arguments", {}))
        if not isinstance(args, dict):
            return None
        calls.append((item["name"], args))
    return calls or None


def parse_gemma4_calls(text: str) -> list[tuple[str, dict]] | None:
    """Gemma 4's `<|tool_call>call:NAME{...}<tool_call|>` blocks."""
    calls = []
    for m in GEMMA4_CALL.finditer(text):
        try:
            args, end = _g4_value(m.group(2), 0)
        except (ValueError, IndexError):
            return None
        if end != len(m.group(2)) or not isinstance(args, dict):
            return None
        calls.append((m.group(1), args))
    return calls or None


def _g4_value(s: str, i: int):
    """One value of Gemma 4's argument syntax at s[i:]: (value, end index)."""
    if s.startswith(GEMMA4_QUOTE, i):
        end = s.index(GEMMA4_QUOTE, i + len(GEMMA4_QUOTE))
        return s[i + len(GEMMA4_QUOTE) : end], end + len(GEMMA4_QUOTE)
    if s[i] in "{[":
        close, out = ("}", {}) if s[i] == "{" else ("]", [])
        i += 1
        while s[i] != close:
            if close == "}":
                if s.startswith(GEMMA4_QUOTE, i):
                    key, i = _g4_value(s, i)
                else:
                    colon = s.index(":", i)
                    key, i = s[i:colon], colon
                if s[i] != ":":
                    raise ValueError("expected ':'")
                out[key], i = _g4_value(s, i + 1)
            else:
                item, i = _g4_value(s, i)
                out.append(item)
            if s[i] == ",":
                i += 1
        return out, i + 1
    end = i
    while end < len(s) and s[end] not in ",}]":
        end += 1
    return json.loads(s[i:end]), end  # numbers, true, false, null
