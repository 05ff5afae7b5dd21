"""Chat templates: the Jinja `chat_template` of a tokenizer directory, rendered as `transformers` renders it.

    text = render_chat(template, messages, add_generation_prompt=True, bos_token="<s>", ...)

Templates from the hub are untrusted code, so they run in jinja2's `ImmutableSandboxedEnvironment`
with the settings and helpers of `transformers` (trim_blocks, lstrip_blocks, loop controls, a `tojson`
that does not escape HTML, `raise_exception`, `strftime_now`, and a pass-through `{% generation %}`
block). A template error -- a `raise_exception(...)` in the template, a syntax error, an undefined
field -- raises `TokenizerError` with the template's message.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from .errors import TokenizerError


def _tojson(x, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str):
    """A compiled, sandboxed jinja2 Template for `source` (cached)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"the chat template does not compile ({e}); fix `chat_template` in "
                             "tokenizer_config.json") from None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False,
                tools: list[dict] | None = None, documents: list[dict] | None = None, **variables) -> str:
    """Render `messages` ({"role", "content", ...} dicts) with `template`; `variables` are the special
    tokens (bos_token, eos_token, ...) and any extra template variables."""
    import jinja2

    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TokenizerError("a chat must be a list of {'role': ..., 'content': ...} dicts")
    compiled = compile_template(template)
    try:
        # keys whose value is None are dropped, as transformers does (templates test for missing keys)
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return compiled.render(messages=plain, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"the chat template refused the conversation: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise TokenizerError(f"the chat template failed on the conversation ({type(e).__name__}: {e}); check the "
                             "messages' roles and contents") from None
