"""Speculation per request through the server: `speculative_config` (vLLM's names) on a
completion, run in the batched engine beside plain requests, counted in /metrics."""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.test_openai_api import NAME, client, server  # noqa: F401 - the fixtures

PROMPT = "Repeat exactly: one two three four five six seven eight. one two three four five"


def complete(client, **extra):  # noqa: F811
    r = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True, **extra}
    )
    return r.choices[0].text


def test_speculating_and_plain_requests_side_by_side_give_plain_text(server, client):  # noqa: F811
    import httpx

    plain = complete(client)
    spec = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(complete, client, **(spec if i % 2 else {})) for i in range(4)]
        texts = [f.result() for f in futures]
    assert texts == [plain] * 4
    totals = server.scheduler.engine.speculation.totals
    assert totals.steps > 0 and totals.proposed > 0 and totals.accepted > 0
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert f'gemmakit_speculative_accepted_tokens_total{{model_name="{NAME}"}} {totals.accepted}' in metrics
    assert (
        "gemmakit_speculative_acceptance_rate" in metrics
        and "gemmakit_speculative_tokens_per_step" in metrics
    )


@pytest.mark.parametrize(
    "config, message",
    [
        ({"method": "draft_model"}, "not available on this server"),
        ({"method": "ngram", "num_speculative_tokens": 40}, "num_speculative_tokens must be in [1, 16]"),
        ({"method": "ngram", "k": 4}, "speculative_config.k"),
    ],
)
def test_bad_speculative_configs_are_400s(client, config, message):  # noqa: F811
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        complete(client, speculative_config=config)


@pytest.fixture(scope="module")
def draft_server(bundled):
    """A server whose draft model is the bundled model itself (every proposal kept)."""
    from gemmakit.inference.api import LLM
    from gemmakit.serving.app import create_app
    from gemmakit.serving.config import ServerConfig
    from gemmakit.serving.transport import serve_in_thread

    llm = LLM(loaded=bundled)
    llm.draft = bundled
    app = create_app(llm, ServerConfig(served_model_name=NAME, max_batch=4, max_queue=8))
    srv = serve_in_thread(app)
    srv.scheduler = app.state.scheduler
    yield srv
    srv.stop()


def test_a_server_with_a_draft_model_speculates_with_it(draft_server, client):  # noqa: F811
    import openai

    draft_client = openai.OpenAI(
        base_url=draft_server.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )
    plain = complete(client)
    spec = {"speculative_config": {"method": "draft_model", "num_speculative_tokens": 5}}
    assert complete(draft_client, **spec) == plain
    totals = draft_server.scheduler.engine.speculation.totals
    assert totals.proposed > 0 and totals.accepted == totals.proposed
    with pytest.raises(openai.BadRequestError, match="it runs ngram, draft_model"):
        complete(draft_client, speculative_config={"method": "mtp"})


def test_usage_counts_the_predicted_tokens_kept_and_rejected(client):  # noqa: F811
    body = dict(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    spec = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}}
    r = client.completions.create(**body, extra_body=spec)
    details = r.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens >= 0
    assert details.accepted_prediction_tokens < r.usage.completion_tokens
    plain = client.completions.create(**body)
    assert plain.usage.completion_tokens_details is None
    chunks = list(
        client.completions.create(
            **body, extra_body=spec, stream=True, stream_options={"include_usage": True}
        )
    )
    assert (
        chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens
        == details.accepted_prediction_tokens
    )
