"""Structured output and tool calls for /v1/chat/completions.

`plan_chat(req, tokenizer, vocab_size)` reads a request's `response_format`, `tools` and `tool_choice`:

- `response_format` `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"schema": ...}}`:
  every sequence decodes under a JSON-schema constraint (inference/constrained.py), so the reply parses
  and validates (finish_reason "stop").
- `tools` (OpenAI function specs) go to the chat template (`tools=`), which lists them for the model.
  A call is a JSON object `{"name": ..., "arguments": {...}}` in the reply. `tool_choice` `"required"` or
  `{"type": "function", "function": {"name": ...}}` forces one: decoding is constrained to a call of
  (one of) those functions whose arguments validate against its `parameters`. `"auto"` (the default
  with tools) decodes freely and returns `tool_calls` when the reply is such a call; `"none"` never does.
- Replies that are tool calls come back as `message.tool_calls` (arguments a JSON string, as OpenAI
  sends them) with finish_reason "tool_calls"; follow-up turns send `role: "tool"` messages, rendered
  by the chat template.

Every problem a user can cause -- an invalid schema, a tool whose parameters cannot be constrained, an
unknown forced tool name, tool_choice without tools -- is an APIError 400 naming the parameter.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import SeekformerError
from .protocol import APIError, bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def chat_messages(messages) -> list[dict]:
    """Request messages -> chat-template messages ({"role", "content"} + tool_calls / tool_call_id)."""
    out = []
    for k, m in enumerate(messages):
        role = ROLES.get(m.role)
        if role is None:
            raise bad_request(f"messages[{k}].role must be one of {', '.join(ROLES)}, got {m.role!r}",
                              f"messages.{k}.role")
        msg: dict[str, Any] = {"role": role, "content": m.text()}
        calls = getattr(m, "tool_calls", None)
        if calls:
            if role != "assistant":
                raise bad_request(f"messages[{k}]: only assistant messages carry tool_calls", f"messages.{k}")
            msg["tool_calls"] = [_call_for_template(c, k) for c in calls]
        if role == "tool" and getattr(m, "tool_call_id", None):
            msg["tool_call_id"] = m.tool_call_id
        if getattr(m, "name", None):
            msg["name"] = m.name
        out.append(msg)
    return out


def _call_for_template(call: Any, k: int) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request(f"messages[{k}].tool_calls entries need a function with a name", f"messages.{k}.tool_calls")
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": call.get("type", "function"),
            "function": {"name": fn["name"], "arguments": args}}


def call_schema(tools: list[dict]) -> dict:
    """JSON schema of one call of any of `tools`: {"name": <const>, "arguments": <parameters>}."""
    options = [{"type": "object",
                "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


@dataclass
class ChatPlan:
    """What a chat request asks beyond plain text (see the module docstring)."""

    tools: list[dict] | None = None  # OpenAI specs, for the chat template
    functions: list[dict] = field(default_factory=list)  # [{"name", "parameters"}]
    tool_mode: str = "none"  # none | auto | forced
    constraint: Any = None  # a GrammarConstraint to fork for each sequence

    @property
    def buffers(self) -> bool:
        """Tool calls are recognised once the reply is complete, so such replies are not streamed piecewise."""
        return self.tool_mode != "none"

    def params_for(self, params):
        """The SamplingParams of one choice: with its own copy of the constraint (each choice walks the
        grammar on its own)."""
        return params if self.constraint is None else params.replace(constraint=self.constraint.fork())

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """(assistant message, finish_reason) of a finished reply: tool_calls when it is a valid call."""
        calls = parse_tool_calls(text, self.functions) if self.tool_mode != "none" else None
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        return {"role": "assistant", "content": text}, finish_reason


def parse_tool_calls(text: str, functions: list[dict]) -> list[dict] | None:
    """OpenAI tool_calls of a reply that is a call (or a list of calls, or one per line) of `functions`
    with valid arguments; None otherwise."""
    import jsonschema

    text = text.strip()
    if not text.startswith(("{", "[")):
        return None
    try:
        value = json.loads(text)
        items = value if isinstance(value, list) else [value]
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return None
    by_name = {f["name"]: f for f in functions}
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in by_name or not isinstance(item.get("arguments"), dict):
            return None
        try:
            jsonschema.validate(item["arguments"], by_name[item["name"]]["parameters"])
        except jsonschema.ValidationError:
            return None
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": item["name"], "arguments": json.dumps(item["arguments"], ensure_ascii=False)}})
    return calls or None


def _functions(tools: Any) -> list[dict]:
    if not isinstance(tools, list) or not tools:
        raise bad_request("tools must be a non-empty list of {'type': 'function', 'function': {...}}", "tools")
    out, seen = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                              "{...}}}}", f"tools.{i}")
        if name in seen:
            raise bad_request(f"tools[{i}]: the function name {name!r} is used twice", f"tools.{i}.function.name")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        out.append({"name": name, "parameters": params})
    return out


def _response_schema(fmt: Any) -> tuple[bool, dict | None]:
    """(constrain?, schema) of a response_format (schema None: any JSON object)."""
    if fmt is None:
        return False, None
    kind = fmt.get("type", "text") if isinstance(fmt, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad_request("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                              "response_format.json_schema")
        return True, spec["schema"]
    raise bad_request(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                      "response_format.type")


def plan_chat(req, tokenizer, vocab_size: int, stop_ids) -> ChatPlan:
    """Check `response_format`, `tools` and `tool_choice` and build the request's ChatPlan (APIError 400)."""
    from ..inference.constrained import SchemaError, UnconstrainableSchema, compile_schema, json_constraint

    plan = ChatPlan()
    choice = req.tool_choice
    if req.tools:
        plan.tools = req.tools
        plan.functions = _functions(req.tools)
        for i, f in enumerate(plan.functions):  # every tool must be enforceable when forced
            try:
                compile_schema(call_schema([f]), tokenizer, vocab_size, stop_ids)
            except SchemaError as e:
                raise bad_request(f"tools[{i}] ({f['name']}): {e}", f"tools.{i}.function.parameters") from None
            except UnconstrainableSchema as e:
                raise bad_request(f"tools[{i}] ({f['name']}): {e}", f"tools.{i}.function.parameters",
                                  "unsupported_schema") from None
        plan.tool_mode = "auto"
    elif choice not in (None, "none"):
        raise bad_request("tool_choice needs tools", "tool_choice")
    forced: list[dict] = []
    if choice == "none":
        plan.tool_mode = "none"
    elif choice == "required":
        forced = plan.functions
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        forced = [f for f in plan.functions if f["name"] == name]
        if not forced:
            raise bad_request(f"tool_choice names the function {name!r}, which is not among the tools",
                              "tool_choice")
    elif choice not in (None, "auto"):
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                          "{'name': ...}}", "tool_choice")
    try:
        if forced:
            plan.tool_mode = "forced"
            plan.constraint = json_constraint(tokenizer, vocab_size, call_schema(forced), stop_ids)
        else:
            constrain, schema = _response_schema(req.response_format)
            if constrain:
                plan.constraint = json_constraint(tokenizer, vocab_size, schema, stop_ids)
    except SchemaError as e:
        raise bad_request(str(e), "response_format") from None
    except UnconstrainableSchema as e:
        raise bad_request(str(e), "response_format", "unsupported_schema") from None
    except SeekformerError as e:
        raise APIError(500, str(e), None, "internal_error") from None
    return plan
