"""Run under FastChat's venv: print, as JSON, every FastChat conversation template with the
prompts FastChat's own `get_prompt` builds from a few conversations. The test renders the same
conversations with chatgate's code and compares."""

from __future__ import annotations

import dataclasses
import json

from fastchat.conversation import conv_templates, get_conv_template

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Only a user message"}],
]


def prompt(name: str, messages: list[dict[str, str]]) -> str:
    conv = get_conv_template(name)
    for m in messages:
        if m["role"] == "system":
            conv.set_system_message(m["content"])
        else:
            conv.append_message(conv.roles[0 if m["role"] == "user" else 1], m["content"])
    conv.append_message(conv.roles[1], None)
    return str(conv.get_prompt())


cases = []
for name in sorted(conv_templates):
    template = get_conv_template(name)
    if template.sep_style is None:
        continue
    data = dataclasses.asdict(template)
    data["sep_style"] = int(data["sep_style"])
    try:
        prompts = [prompt(name, messages) for messages in CONVERSATIONS]
    except Exception:  # templates FastChat itself cannot render this way
        continue
    cases.append({"template": data, "conversations": CONVERSATIONS, "prompts": prompts})
print(json.dumps(cases))
