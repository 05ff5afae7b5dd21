"""`seekformer serve`: the official openai client against a live server on 127.0.0.1 (uvicorn in a thread).

The model is a tiny random MoE with a tokenizer trained on a little built-in text (see
`seekformer.serving.demo`): its text is noise, so the checks compare the server with direct calls into
seekformer (greedy output, prompt scores), not with expected words.
"""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from seekformer.inference.scoring import score_tokens  # noqa: E402
from seekformer.inference import generate_text  # noqa: E402
from seekformer.serving import ServerConfig, ServerThread, create_app, load_model_dir  # noqa: E402

KEY = "sk-test-key"
NAME = "tiny-seek"
PROMPT = "The United States"


@pytest.fixture(scope="module")
def reference(seek_model_dir):
    """A separate copy of the model (the server's belongs to its worker thread) and the tokenizer."""
    return load_model_dir(seek_model_dir)


@pytest.fixture(scope="module")
def server(seek_model_dir):
    model, tok = load_model_dir(seek_model_dir)
    app = create_app(model, tok, ServerConfig(model_name=NAME, api_key=KEY, max_batch_size=8))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_models_health_and_tokenizer_endpoints(server, client, reference):
    _, tok = reference
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, headers=auth).json()
    assert r["tokens"] == tok.encode(PROMPT)
    r = httpx.post(server.url + "/detokenize", json={"tokens": tok.encode(PROMPT)}, headers=auth).json()
    assert r["prompt"] == PROMPT
    info = httpx.get(server.url + "/tokenizer_info", headers=auth).json()
    assert info["eos_token"] == "<|end_of_text|>" and "chat_template" in info


def test_greedy_completion_matches_generate(client, reference):
    model, tok = reference
    expected = generate_text(model, tok, PROMPT, max_new_tokens=12)
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason in ("length", "stop")
    n_prompt = len(tok.encode(PROMPT))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    # token ids as the prompt give the same answer
    r2 = client.completions.create(model=NAME, prompt=tok.encode(PROMPT), max_tokens=12, temperature=0)
    assert r2.choices[0].text == expected


def test_prompt_lists_n_and_seeded_sampling(client):
    r = client.completions.create(model=NAME, prompt=["Hello there", PROMPT], max_tokens=5, n=2, temperature=0.9,
                                  seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens <= 20
    again = client.completions.create(model=NAME, prompt=["Hello there", PROMPT], max_tokens=5, n=2,
                                      temperature=0.9, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_echo_logprobs_are_prompt_scores(client, reference):
    """What lm-evaluation-harness' local-completions sends for log-likelihood requests."""
    model, tok = reference
    ids = tok.encode("Call me Ishmael. Some years ago")
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True,
                                  seed=1234)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = score_tokens(model, [ids], top_n=1)[0]
    assert lp.token_logprobs[1:-1] == pytest.approx(expected.logprobs.tolist(), abs=1e-4)
    greedy = [tok_lp == max(top.values()) for tok_lp, top in zip(lp.token_logprobs[1:-1], lp.top_logprobs[1:-1])]
    assert greedy == expected.greedy.tolist()
    assert r.choices[0].text.startswith(tok.decode(ids))


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = full.strip()[3:6] if len(full.strip()) > 6 else full.strip()[-1:]
    assert stop
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_streamed_completion_equals_plain(client):
    plain = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_streamed_logprobs_equal_plain(client, reference):
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, echo=True)
    plain = client.completions.create(**kw).choices[0]
    assert plain.logprobs.text_offset[len(reference[1].encode(PROMPT))] == len(PROMPT)  # offsets index the text
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == plain.text
    assert [t for c in chunks for t in c.logprobs.tokens] == plain.logprobs.tokens
    streamed = [x for c in chunks for x in c.logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(plain.logprobs.token_logprobs[1:], abs=1e-5)
    assert [o for c in chunks for o in c.logprobs.text_offset] == plain.logprobs.text_offset


def test_chat_plain_and_streamed(server, client, reference):
    model, tok = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
    prompt_ids = tok.encode(tok.apply_chat_template(messages))
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    expected = generate_text(model, tok, prompt_ids, max_new_tokens=8, stop_token_ids=[tok.special_token_ids[
        "<|end_of_turn|>"]])
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # the raw event stream ends with [DONE]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "messages": messages, "max_tokens": 3, "stream": True}) as resp:
        data = [line[5:].strip() for line in resp.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]" and json.loads(data[0])["object"] == "chat.completion.chunk"


LONG = "word " * 600
BAD_REQUESTS = [
    # (endpoint, raw body or JSON, status, param)
    ("completions", "{not json", 400, None),
    ("completions", "", 400, None),
    ("completions", "[1, 2]", 400, None),
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": 5}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("completions", {"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": "x"}, 400, "model"),
    ("completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": LONG, "max_tokens": 1}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": ""}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": []}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": [1, 2, 10 ** 6]}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"model": NAME, "prompt": "x", "n": 1000}, 400, "n"),
    ("completions", {"model": NAME, "prompt": "x", "temperature": 3.5}, 400, "temperature"),
    ("completions", {"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": NAME, "prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("completions", {"model": NAME, "prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("completions", {"model": NAME, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("completions", {"model": NAME, "prompt": "x", "suffix": "end"}, 400, "suffix"),
    ("completions", {"model": NAME, "prompt": "x", "stop": [""]}, 400, "stop"),
    ("completions", {"model": NAME, "prompt": "x", "stop": ["a"] * 40}, 400, "stop"),
    ("completions", {"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("completions", {"model": NAME, "prompt": "x", "stop_token_ids": [10 ** 7]}, 400, None),
    ("chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 3}]}, 400, None),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400,
     "max_tokens"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": [{"x": 1}]}, 400,
     "tools.0"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("chat/completions", {"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, endpoint, body, status, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server.url}/v1/{endpoint}", content=content, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_unknown_routes_and_methods_are_json(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()


def test_api_key_is_enforced(server):
    no_key = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "x"})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    for bad in (openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0),):
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=NAME, prompt="x", max_tokens=1)
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_metrics_count_requests_and_tokens(server, client):
    def value(text: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    before = httpx.get(server.url + "/metrics").text
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, stop=None)
    after = httpx.get(server.url + "/metrics").text
    ok = 'seekformer_requests_total{endpoint="/v1/completions",status="200"}'
    assert value(after, ok) == value(before, ok) + 1
    assert value(after, "seekformer_generation_tokens_total") >= value(before, "seekformer_generation_tokens_total") + 1
    for name in ("seekformer_queue_depth", "seekformer_running_sequences",
                 'seekformer_request_latency_seconds_bucket{endpoint="/v1/completions",le="+Inf"}',
                 "seekformer_time_to_first_token_seconds_count", "# TYPE seekformer_request_latency_seconds histogram"):
        assert name in after
