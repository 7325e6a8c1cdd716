"""Tool calling: schema validation, forced calls through structured outputs, and parsing model output.

- `tool_choice` "required" or a named function: the engine is constrained to JSON matching the tool
  schemas (vLLM structured outputs), so the call is well-formed whatever the model's training.
- `tool_choice` "auto": the model decides; calls are parsed from the Hermes format
  (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) where the model emits it.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for

from server.api.chat.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from server.errors import InvalidRequest

_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
_MAX_SCHEMA_BYTES = 64 * 1024


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def check_json_schema(schema: dict[str, Any], param: str) -> None:
    """Refuse schemas that are invalid or too large to compile cheaply."""
    if len(json.dumps(schema)) > _MAX_SCHEMA_BYTES:
        raise InvalidRequest(
            f"The JSON schema in {param} is larger than {_MAX_SCHEMA_BYTES} bytes.", param=param, code="invalid_schema"
        )
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequest(
            f"The JSON schema in {param} is invalid: {exc.message}", param=param, code="invalid_schema"
        ) from None


def validate_tools(request: ChatCompletionRequest, max_tools: int) -> None:
    tools = request.tools or []
    if len(tools) > max_tools:
        raise InvalidRequest(f"At most {max_tools} tools are allowed; got {len(tools)}.", param="tools")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("Tool function names must be unique.", param="tools")
    for i, tool in enumerate(tools):
        if tool.function.parameters is not None:
            check_json_schema(tool.function.parameters, f"tools[{i}].function.parameters")
    if isinstance(request.tool_choice, NamedToolChoice) and request.tool_choice.function.name not in names:
        raise InvalidRequest(
            f"tool_choice names {request.tool_choice.function.name!r}, which is not among the tools.",
            param="tool_choice",
        )


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def forced_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema the output must follow when a tool call is forced, else None."""
    tools = request.tools or []
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return _parameters(tool)
    if choice == "required":
        return {
            "type": "array",
            "minItems": 1,
            "items": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "enum": [t.function.name]},
                            "parameters": _parameters(t),
                        },
                        "required": ["name", "parameters"],
                    }
                    for t in tools
                ]
            },
        }
    return None


def parse_forced(request: ChatCompletionRequest, text: str) -> list[ParsedCall]:
    """Calls from output that was constrained by `forced_schema` (empty if it was cut short)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return []
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        return [ParsedCall(choice.function.name, json.dumps(data))]
    if isinstance(data, list):
        return [
            ParsedCall(str(c["name"]), json.dumps(c.get("parameters", {})))
            for c in data
            if isinstance(c, dict) and "name" in c
        ]
    return []


def parse_auto(text: str, allowed: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """Split model output into remaining content and Hermes-format tool calls to known functions."""
    calls: list[ParsedCall] = []
    for match in _TOOL_CALL.finditer(text):
        try:
            data = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        name = data.get("name") if isinstance(data, dict) else None
        if name in allowed:
            args = data.get("arguments", {})
            calls.append(ParsedCall(name, args if isinstance(args, str) else json.dumps(args)))
    if not calls:
        return text, []
    content = _TOOL_CALL.sub("", text).strip()
    return content or None, calls
