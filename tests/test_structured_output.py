"""Structured output and tools in /v1/chat/completions: JSON mode and JSON schemas enforced by constrained
decoding (so even a random tiny model returns JSON that parses and validates), tool calls (auto, required,
named), `role: "tool"` follow-ups, and 400s for schemas that are invalid or cannot be enforced."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

from seekformer.inference import generate_text  # noqa: E402
from seekformer.inference.constrained import SchemaError, UnconstrainableSchema, json_constraint  # noqa: E402
from seekformer.serving import ServerConfig, ServerThread, create_app, load_model_dir  # noqa: E402
from seekformer.serving.demo import build_demo_model_dir  # noqa: E402

NAME = "tiny"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "population", "capital", "tags"],
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "population": {"type": "integer", "minimum": 0, "maximum": 99999},
                         "capital": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["old", "big", "port"]}, "maxItems": 3}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "additionalProperties": False,
                                                           "required": ["city", "unit"],
                                                           "properties": {"city": {"type": "string", "maxLength": 10},
                                                                          "unit": {"enum": ["C", "F"]}}}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "required": ["a", "b"], "additionalProperties": False,
    "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                   "b": {"type": "integer", "minimum": -99, "maximum": 99}}}}}
NEG = {"type": "function", "function": {"name": "neg", "parameters": {
    "type": "object", "required": ["x"], "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}}}}
USER = [{"role": "user", "content": "Tell me about Lima."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_demo_model_dir(tmp_path_factory.mktemp("so") / "m")


@pytest.fixture(scope="module")
def server(model_dir):
    model, tok = load_model_dir(model_dir)
    with ServerThread(create_app(model, tok, ServerConfig(model_name=NAME, max_batch_size=4))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def test_json_schema_output_always_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model=NAME, messages=USER, response_format=fmt, max_tokens=120,
                                           temperature=1.0, seed=seed, n=2)
        for choice in r.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_object_mode(client):
    r = client.chat.completions.create(model=NAME, messages=USER, response_format={"type": "json_object"},
                                       max_tokens=40, temperature=0)
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_streamed_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    chunks = list(client.chat.completions.create(model=NAME, messages=USER, response_format=fmt, max_tokens=120,
                                                 temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_validate(client, choice):
    for seed in range(2):
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "2+3?"}],
                                           tools=[NEG, ADD], tool_choice=choice, max_tokens=60, temperature=1.0,
                                           seed=seed)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        call = c.message.tool_calls[0]
        spec = {"neg": NEG, "add": ADD}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])
        if isinstance(choice, dict):
            assert call.function.name == "add"


def test_auto_tools_and_tool_role_follow_up(client, server, model_dir):
    r = client.chat.completions.create(model=NAME, messages=USER, tools=[WEATHER], max_tokens=8, temperature=0)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and c.message.content is not None  # a random model: plain text
    follow = [{"role": "user", "content": "Weather in Lima?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Lima", "unit": "C"}'}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": "19 degrees, cloudy"}]
    r = client.chat.completions.create(model=NAME, messages=follow, tools=[WEATHER], max_tokens=4, temperature=0)
    _, tok = load_model_dir(model_dir)
    expected = tok.chat_ids([follow[0], {**follow[1], "content": ""}, follow[2]], tools=[WEATHER])
    assert r.usage.prompt_tokens == len(expected)
    text = tok.decode(expected, skip_special_tokens=False)
    assert '{"name": "get_weather", "arguments": {"city": "Lima", "unit": "C"}}' in text
    assert "<|tool|>19 degrees, cloudy<|end_of_turn|>" in text and '"get_weather"' in text.split("<|user|>")[0]


def test_streamed_forced_tool_call(client):
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                 tools=[ADD], tool_choice="required", max_tokens=60, stream=True,
                                                 temperature=0))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "add"
    json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}}}},
     "response_format", "cannot be enforced"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_object"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "(?=x)"}}}}}]},
     "tools.0.function.parameters", "cannot be enforced"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools.0.function.parameters", "invalid JSON schema"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name", "used twice"),
]


@pytest.mark.parametrize("extra,param,fragment", BAD)
def test_bad_schemas_and_tools_are_400(server, extra, param, fragment):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": USER, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


def test_constraint_in_plain_generate(model_dir):
    """The same hook drives `generate`: a constraint in the options."""
    model, tok = load_model_dir(model_dir)
    c = json_constraint(tok, model.config.vocab_size, SCHEMA)
    text = generate_text(model, tok, tok.chat_ids(USER), max_new_tokens=120, do_sample=True, seed=1, constraint=c,
                         stop_token_ids=tok.end_of_turn_token_ids)
    jsonschema.validate(json.loads(text), SCHEMA)
    with pytest.raises(SchemaError):
        json_constraint(tok, model.config.vocab_size, {"type": "objekt"})
    with pytest.raises(UnconstrainableSchema):
        json_constraint(tok, model.config.vocab_size, {"type": "string", "pattern": "(?<=a)b"})
