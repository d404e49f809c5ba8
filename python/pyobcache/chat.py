"""Renders a GGUF's chat template (Jinja2, as Hugging Face tokenizers do)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Optional, Sequence

__all__ = ["render_chat"]

# Used when a GGUF carries no template: ChatML, which both registry models use.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render_chat(model, messages: Sequence[dict], add_generation_prompt: bool = True, tools: Optional[list] = None,
                **template_kwargs) -> str:
    """Renders ``messages`` as Hugging Face's ``apply_chat_template`` does: the template sees
    ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``tools`` and any
    ``template_kwargs`` (Llama 3.x's ``date_string``, Qwen3's ``enable_thinking``), with the
    globals templates call (``raise_exception``, ``strftime_now``) and a ``tojson`` filter that,
    like Hugging Face's, does not escape HTML characters."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError("each message must be a dict with 'role' and 'content'")

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)   # Llama 3.x's date line
    env.filters["tojson"] = tojson
    tmpl = env.from_string(model.chat_template or CHATML)
    bos = model._m.token_text(model._m.bos).decode("utf-8", "replace") if model._m.bos >= 0 else ""
    eos = model._m.token_text(model._m.eos).decode("utf-8", "replace") if model._m.eos >= 0 else ""
    return tmpl.render(**template_kwargs, messages=list(messages), add_generation_prompt=add_generation_prompt,
                       bos_token=bos, eos_token=eos, tools=tools)
