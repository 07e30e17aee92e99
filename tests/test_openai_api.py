"""The OpenAI API as clients use it: penalties, logit bias, log-probabilities, n > 1, structured
output, tools and /metrics, from SamplingParams up to the official `openai` client."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gemmakit.errors import GemmakitError
from gemmakit.inference.logits_processing import RequestLogitsProcessor
from gemmakit.inference.sampling import SamplingParams
from tests.test_training import tiny_model_folder


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from gemmakit.inference.api import LLM

    folder: Path = tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    return LLM(model=str(folder), dtype="float32", device="cpu")


# --- SamplingParams and the logits processor ---------------------------------------------


@pytest.mark.parametrize(
    "values,field",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {5: 101}}, "logit_bias[5]"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"n": 0}, "n"),
        ({"n": 2.0}, "n"),
        ({"json_schema": "object"}, "json_schema"),
    ],
)
def test_sampling_params_refuse_bad_openai_fields(values, field):
    with pytest.raises(GemmakitError) as e:
        SamplingParams(**values)
    assert str(e.value).startswith(field), e.value


def test_penalties_match_a_hand_computation():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    prompt, output = [0, 4], [3, 3, 1]
    # Repetition 2 over prompt + output {0, 1, 3, 4}: positive / 2, negative * 2; then the
    # generated counts (3: twice, 1: once) cost 0.5 each and presence 0.25 once; bias last.
    params = SamplingParams(
        repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, logit_bias={2: 1.0, 4: -0.5}
    )
    got = RequestLogitsProcessor(params, prompt)(output, logits)
    expected = [2.0 / 2, -1.0 * 2 - 0.5 - 0.25, 0.5 + 1.0, 3.0 / 2 - 2 * 0.5 - 0.25, -2.0 * 2 - 0.5]
    assert got.tolist() == pytest.approx(expected)
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0]  # the raw row is left for logprobs


def test_openai_penalties_count_generated_tokens_only():
    logits = torch.zeros(4)
    got = RequestLogitsProcessor(SamplingParams(frequency_penalty=1.0, presence_penalty=1.0), [1, 1, 2])(
        [2, 2, 2], logits
    )
    assert got.tolist() == [0.0, 0.0, -4.0, 0.0]


def test_logit_bias_plus_100_forces_a_token(tiny_llm):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=6, logit_bias={77: 100}, ignore_eos=True)
    out = tiny_llm.generate([[2, 10, 11]], params)[0].outputs[0]
    assert out.token_ids == [77] * 6
    banned = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = tiny_llm.generate([[2, 10, 11]], banned)[0].outputs[0].token_ids[0]
    banned.logit_bias = {first: -100}
    banned.__post_init__()
    assert tiny_llm.generate([[2, 10, 11]], banned)[0].outputs[0].token_ids[0] != first


def test_logprobs_equal_the_models_log_softmax_teacher_forced(tiny_llm):
    prompt = [2, 30, 31, 32]
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=5, logprobs=3, ignore_eos=True)
    out = tiny_llm.generate([prompt], params)[0].outputs[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = tiny_llm.model(ids)[0, len(prompt) - 1 : -1].float()  # (generated, V)
    expected = torch.log_softmax(logits, -1)
    assert len(out.logprobs) == len(out.token_ids) == 5
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert entry[token].logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
        top = torch.topk(expected[step], 3)
        ranked = sorted((lp.rank, t) for t, lp in entry.items() if lp.rank is not None)
        assert [t for _, t in ranked] == top.indices.tolist()
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs))
    )


def test_n_completions_per_prompt_differ_and_reproduce(tiny_llm):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=8, n=3, ignore_eos=True)
    first = tiny_llm.generate(["ab", "cd"], params)
    again = tiny_llm.generate(["ab", "cd"], params)
    assert [len(r.outputs) for r in first] == [3, 3]
    assert [o.index for o in first[0].outputs] == [0, 1, 2]
    runs = [o.token_ids for o in first[0].outputs]
    assert len({tuple(r) for r in runs}) > 1  # n samples, not n copies of one
    assert runs == [o.token_ids for o in again[0].outputs]
    # The first completion is the one the seed gives alone.
    alone = tiny_llm.generate(["ab"], SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True))
    assert alone[0].outputs[0].token_ids == runs[0]
    assert first[1].prompt == "cd" and first[0].metrics["generated_tokens"] == 24


def test_greedy_n_gives_n_equal_completions(tiny_llm):
    out = tiny_llm.generate([[2, 5, 6]], SamplingParams(temperature=0, max_tokens=4, n=2))[0].outputs
    assert out[0].token_ids == out[1].token_ids and out[0].logprobs is None
    assert len(out) == 2


# --- the server, through the official openai client, on the bundled model ----------------

NAME = "gemma-test"
ASK = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(bundled):
    pytest.importorskip("fastapi")
    from gemmakit.inference.api import LLM
    from gemmakit.serving.app import create_app
    from gemmakit.serving.config import ServerConfig
    from gemmakit.serving.transport import serve_in_thread

    app = create_app(LLM(loaded=bundled), ServerConfig(served_model_name=NAME, max_batch=8, max_queue=16))
    srv = serve_in_thread(app)
    srv.scheduler = app.state.scheduler
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_n_logprobs_and_usage_through_the_client(client, bundled):
    r = client.chat.completions.create(
        model=NAME, messages=ASK, n=2, max_tokens=3, temperature=1.0, seed=4, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in r.choices] == [0, 1]
    prompt_ids = bundled.tokenizer.encode(bundled.tokenizer.apply_chat_template(ASK))
    assert r.usage.prompt_tokens == len(prompt_ids)  # the prompt counted once for both choices
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    for c in r.choices:
        assert len(c.logprobs.content) >= 1
        for tok in c.logprobs.content:
            assert tok.logprob <= 0 and len(tok.top_logprobs) == 2
            assert tok.top_logprobs[0].logprob >= tok.top_logprobs[1].logprob
            assert tok.logprob <= tok.top_logprobs[0].logprob + 1e-6
            if not tok.token.startswith("bytes:"):
                assert bytes(tok.bytes) == tok.token.encode()


def test_chat_logprobs_are_the_models_log_softmax(client, bundled):
    r = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=3, temperature=0, logprobs=True)
    tok = bundled.tokenizer
    prompt_ids = tok.encode(tok.apply_chat_template(ASK))
    out_ids = [
        bundled.tokenizer.token_id(t.token.replace(" ", "\u2581")) for t in r.choices[0].logprobs.content
    ]
    assert None not in out_ids
    with torch.no_grad():
        logits = bundled.model(torch.tensor([prompt_ids + out_ids]))[0, len(prompt_ids) - 1 : -1].float()
    expected = torch.log_softmax(logits, -1)
    for step, (token, entry) in enumerate(zip(out_ids, r.choices[0].logprobs.content)):
        assert entry.logprob == pytest.approx(float(expected[step, token]), abs=2e-3)
        assert token == int(expected[step].argmax())  # greedy picked the most likely token


def test_completions_n_logprobs_and_streaming(client):
    r = client.completions.create(
        model=NAME, prompt=["The sky is", "Water is"], n=2, max_tokens=3, temperature=1.0, seed=1, logprobs=2
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
        assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    chunks = list(
        client.completions.create(
            model=NAME, prompt="The sky is", n=2, max_tokens=3, stream=True, logprobs=1, seed=2
        )
    )
    texts = {0: "", 1: ""}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
            if c.logprobs is not None:
                assert len(c.logprobs.token_logprobs) == 1
    assert set(texts) == {0, 1}


def test_chat_streaming_n_and_logprobs(client):
    stream = client.chat.completions.create(
        model=NAME, messages=ASK, n=2, max_tokens=3, stream=True, logprobs=True, top_logprobs=1,
        stream_options={"include_usage": True},
    )  # fmt: skip
    content, logprobs, finish, usage = {0: "", 1: ""}, {0: 0, 1: 0}, {}, None
    for ch in stream:
        usage = ch.usage or usage
        for c in ch.choices:
            content[c.index] += c.delta.content or ""
            logprobs[c.index] += len(c.logprobs.content) if c.logprobs else 0
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert set(finish) == {0, 1} and all(finish.values())
    assert usage.completion_tokens == logprobs[0] + logprobs[1]


def test_penalties_and_logit_bias_through_the_server(client, bundled):
    tok = bundled.tokenizer
    forced = tok.encode(" banana", add_bos=False)[0]
    r = client.chat.completions.create(
        model=NAME, messages=ASK, max_tokens=3, temperature=0, logit_bias={str(forced): 100}
    )
    assert r.choices[0].message.content == tok.decode([forced] * 3)
    r = client.completions.create(
        model=NAME, prompt="one one one one", max_tokens=4, temperature=0,
        frequency_penalty=2.0, presence_penalty=2.0, extra_body={"repetition_penalty": 1.3},
    )  # fmt: skip
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "body,param",
    [
        ({"n": 0}, "n"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 150}}, "logit_bias"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 30}, "logprobs"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"function": {"name": "g"}},
            },
            "tool_choice",
        ),
    ],
)
def test_bad_openai_fields_are_400_naming_the_param(server, body, param):
    import httpx

    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": NAME, "messages": ASK, "max_tokens": 1, **body},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


# --- structured output ---------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["colour", "count", "note"],
    "additionalProperties": False,
}


def test_packed_bitmask_unpacks_as_xgrammar_applies_it():
    xgr = pytest.importorskip("xgrammar")
    from gemmakit.inference.grammar import allowed_tokens, apply_mask

    vocab = 1000
    bitmask = torch.randint(-(2**31), 2**31 - 1, (1, (vocab + 31) // 32), dtype=torch.int32)
    logits = torch.randn(1, vocab)
    theirs = logits.clone()
    xgr.apply_token_bitmask_inplace(theirs, bitmask)
    assert torch.equal(apply_mask(logits[0], allowed_tokens(bitmask[0], vocab)), theirs[0])


def test_json_schema_constraint_allows_a_valid_answer_then_only_stop(bundled):
    from gemmakit.inference.grammar import JsonSchemaConstraint

    tok = bundled.tokenizer
    stops = list(bundled.stop_ids)
    grammar = JsonSchemaConstraint(tok, SCHEMA, stops)
    answer = tok.encode('{"colour": "red", "count": 3, "note": "hi there"}', add_bos=False)
    logits = torch.zeros(bundled.config.vocab_size)
    for i, token in enumerate(answer):
        masked = grammar(answer[:i], logits)
        assert masked[token] == 0, tok.decode(answer[: i + 1])  # the valid next token is allowed
    masked = grammar(answer, logits)
    assert set(torch.nonzero(masked == 0).flatten().tolist()) == set(stops)
    bad = tok.encode('{"colour": "pink"', add_bos=False)
    grammar = JsonSchemaConstraint(tok, SCHEMA, stops)
    assert any(grammar(bad[:i], logits)[t] == float("-inf") for i, t in enumerate(bad))


def test_llm_generate_with_a_json_schema_validates(bundled):
    jsonschema = pytest.importorskip("jsonschema")
    from gemmakit.inference.api import LLM

    llm = LLM(loaded=bundled)
    prompt = tok_prompt(bundled, "Describe a ball as JSON.")
    out = llm.generate([prompt], SamplingParams(temperature=1.0, seed=2, max_tokens=40, json_schema=SCHEMA))
    assert out[0].outputs[0].finish_reason == "stop", out[0].outputs[0].text
    jsonschema.validate(json.loads(out[0].outputs[0].text), SCHEMA)


def tok_prompt(bundled, text: str) -> list[int]:
    tok = bundled.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def test_response_format_json_schema_and_json_object_through_the_client(client):
    jsonschema = pytest.importorskip("jsonschema")
    messages = [{"role": "user", "content": "Describe a ball as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "ball", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=40, response_format=fmt, seed=0
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=8,
        response_format={"type": "json_object"},
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    if chunks[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: the start of an object all the same
        assert text.startswith("{")


# --- tools ---------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def test_json_calls_parse_in_the_gemma3_convention_forms():
    from gemmakit.serving.tools import parse_json_calls

    assert parse_json_calls('{"name": "f", "parameters": {"x": 1}}') == [("f", {"x": 1})]
    assert parse_json_calls('```tool_code\n[{"name": "f", "arguments": {}}, {"name": "g"}]\n```') == [
        ("f", {}),
        ("g", {}),
    ]
    assert parse_json_calls("It is sunny.") is None
    assert parse_json_calls('{"name": "f", "parameters": [1]}') is None


def test_gemma4_tool_calls_round_trip_through_its_template():
    from gemmakit.formats.chat_template import ChatTemplate
    from gemmakit.serving.tools import native_messages, parse_gemma4_calls

    src = (Path(__file__).parent / "data/chat_templates/gemma-4-31B-it.jinja").read_text()
    template = ChatTemplate({"default": src}, {"bos_token": "<bos>", "eos_token": "<eos>"})
    args = {"city": 'Paris "15e"', "days": 3, "metric": True, "tags": ["a", "b"], "at": {"h": 1.5}}
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps(args)},
    }
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    text = template.render(native_messages(messages), True, tools=[WEATHER])
    assert "<|tool_call>call:get_weather{" in text and "sunny" in text
    assert parse_gemma4_calls(text) == [("get_weather", args)]


def test_tool_results_go_back_into_a_gemma3_prompt():
    from gemmakit.serving.tools import convention_messages

    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    out = convention_messages(
        [
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
        ]
    )
    assert [m["role"] for m in out] == ["user", "assistant", "user"]
    assert json.loads(out[1]["content"]) == {"name": "get_time", "parameters": {}}
    assert out[2]["content"] == "Result of get_time:\n12:00"


def test_forced_tool_call_round_trips_through_the_client(client):
    jsonschema = pytest.importorskip("jsonschema")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model=NAME, messages=messages, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=40, temperature=0
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # The next turn: the call and its result go back; the model answers in text.
    messages += [
        c.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C"},
    ]
    r = client.chat.completions.create(
        model=NAME, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=5
    )
    assert isinstance(r.choices[0].message.content, str) and not r.choices[0].message.tool_calls


def test_required_tool_call_streams_as_a_tool_calls_delta(client):
    stream = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "What time is it?"}], tools=[TIME], tool_choice="required",
        max_tokens=30, temperature=0, stream=True,
    )  # fmt: skip
    calls, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and [c.function.name for c in calls] == ["get_time"]
    assert json.loads(calls[0].function.arguments) == {}


# --- /metrics ------------------------------------------------------------------------------


def test_metrics_parse_as_prometheus_text_and_count_requests(server, client):
    parser = pytest.importorskip("prometheus_client.parser")
    import httpx

    client.completions.create(model=NAME, prompt="Hello", max_tokens=2, n=2)
    r = httpx.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in parser.text_string_to_metric_families(r.text)}
    value = {name: f.samples[0].value for name, f in families.items() if f.samples}
    stats = server.scheduler.stats
    assert value["gemmakit_requests_started"] == stats.rows >= 2  # the parser drops "_total"
    assert value["gemmakit_generation_tokens"] == stats.generated_tokens >= 2
    assert value["gemmakit_requests_waiting"] == 0 and value["gemmakit_batch_size_max"] >= 2
    assert (
        "gemmakit_prefix_cache_hit_tokens" in families and "gemmakit_generation_tokens_per_second" in families
    )
    ttft = {
        s.labels.get("quantile"): s.value for s in families["gemmakit_time_to_first_token_seconds"].samples
    }
    assert set(ttft) >= {"0.5", "0.95"}
    assert families["gemmakit_requests_started"].samples[0].labels == {"model_name": NAME}


def test_metric_quantiles_interpolate():
    from gemmakit.serving.metrics import _quantile

    assert _quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and _quantile([5.0], 0.99) == 5.0
    assert math.isnan(_quantile([], 0.5))


def test_native_calls_are_read_from_token_ids_when_markers_are_control_tokens():
    from gemmakit.serving.tools import ToolPlan

    class Tok:  # decodes "<|tool_call>" only when asked to write control tokens
        def decode(self, ids, skip_special=True):
            call = 'call:get_time{zone:<|"|>UTC<|"|>}'
            return call if skip_special else f"<|tool_call>{call}<tool_call|><turn|>"

    plan = ToolPlan([TIME], native=True)
    (call,) = plan.parse(Tok().decode([1]), Tok(), [1, 2, 3])
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert ToolPlan([TIME]).parse(Tok().decode([1]), Tok(), [1, 2, 3]) is None  # not native: text only


def test_streamed_answers_are_held_only_while_they_may_be_a_call():
    from gemmakit.serving.tools import ToolPlan

    auto = ToolPlan([TIME])
    assert auto.holds("") and auto.holds("  \n") and auto.holds(' {"name"') and auto.holds("```tool")
    assert not auto.holds("It is noon") and not ToolPlan([]).holds("")
    assert ToolPlan([TIME], "required").holds("x") and ToolPlan([TIME], native=True).holds("x")


def test_auto_tools_stream_plain_answers_as_content(client, bundled):
    tok = bundled.tokenizer
    # Tokens that would open a call are banned, so the answer is plain text.
    openers = {tok.encode(s, add_bos=False)[0] for s in ("{", "[", "`", "```", " {", '{"', " [", " `")}
    stream = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Say hello."}], tools=[TIME], max_tokens=6,
        temperature=0, stream=True, logit_bias={str(t): -100 for t in openers},
    )  # fmt: skip
    deltas = [c.choices[0].delta for c in stream if c.choices]
    text = "".join(d.content or "" for d in deltas)
    assert text.strip() and not text.lstrip().startswith(("{", "[", "`"))
    assert sum(bool(d.content) for d in deltas) > 1  # streamed as it came, not one held-back chunk
    assert not any(d.tool_calls for d in deltas)
