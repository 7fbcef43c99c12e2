"""Tool-call parsing: Hermes/Qwen <tool_call> JSON, ```python blocks, the vLLM formats, and every way they go wrong."""

from __future__ import annotations

import pytest

from alp_agents.envs import Task, ToolEnv
from alp_agents.errors import EnvError
from alp_agents.tools import Calculator, ToolCallError, ToolRegistry, parse_tool_calls
from alp_agents.tools.parsing import TOOL_CALL_STYLES, VLLM_FORMATS, tool_call_parser
from alp_agents.trajectory import ToolCall

SCHEMAS = ToolRegistry([Calculator()]).schemas()


def test_several_hermes_calls_in_one_turn() -> None:
    text = (
        "I will compute both.\n"
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * 34"}}\n</tool_call>\n'
        '<tool_call>{"name":"python","arguments":{"code":"print(1)"}}</tool_call>'
    )
    assert parse_tool_calls(text) == [
        ToolCall(name="calculator", arguments={"expression": "12 * 34"}),
        ToolCall(name="python", arguments={"code": "print(1)"}),
    ]


def test_arguments_as_a_json_string_fences_and_ids_are_tolerated() -> None:
    text = (
        '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1+1\\"}", "id": "c1"}</tool_call>'
        '<tool_call>\n```json\n{"name": "noop"}\n```\n</tool_call>'
        '<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>'
    )
    assert parse_tool_calls(text) == [
        ToolCall(name="calculator", arguments={"expression": "1+1"}, id="c1"),
        ToolCall(name="noop", arguments={}),
        ToolCall(name="f", arguments={"x": 1}),
    ]


def test_text_without_calls_gives_nothing() -> None:
    assert parse_tool_calls("The answer is 42.") == []
    assert parse_tool_calls("stray </tool_call> tag") == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"name": "calculator", "arguments": {"expression": "1"}', "invalid JSON at char 55: Expecting ',' delimiter"),
        ("[1, 2]", 'expected a JSON object with "name" and "arguments", got an array'),
        ('{"arguments": {}}', 'the call has no "name" string'),
        ('{"name": "f", "arguments": [1]}', '"arguments" must be a JSON object, got an array'),
        ('{"name": "f", "arguments": "{oops"}', '"arguments" (a JSON string): not valid JSON (at char 1'),
        ('{"name": "f", "arguments": "[1]"}', '"arguments" (a JSON string): an array, not a JSON object'),
    ],
)
def test_malformed_calls_become_errors_that_say_what_is_wrong(body: str, message: str) -> None:
    raw = f"<tool_call>{body}</tool_call>"
    [error] = parse_tool_calls(f"Let me try. {raw} Done.")
    assert isinstance(error, ToolCallError)
    assert error.raw == raw
    assert error.message.startswith(message), error.message


def test_an_unclosed_tag_is_an_error_and_later_calls_still_count() -> None:
    text = '<tool_call>{"name": "a"}\n<tool_call>{"name": "b"}</tool_call>\n<tool_call>{"name": "c"'
    first, second, third = parse_tool_calls(text)
    assert isinstance(first, ToolCallError) and first.message == "<tool_call> is not closed by </tool_call>"
    assert first.raw == '<tool_call>{"name": "a"}\n'
    assert second == ToolCall(name="b")
    assert isinstance(third, ToolCallError) and third.raw == '<tool_call>{"name": "c"'


def test_python_style_reads_fenced_blocks_as_python_calls() -> None:
    text = "First:\n```python\nprint(1)\n```\nThen:\n```py\ns = '```'\nprint(s)\n```\n```text\nnot code\n```"
    assert parse_tool_calls(text, style="python") == [
        ToolCall(name="python", arguments={"code": "print(1)\n"}),
        ToolCall(name="python", arguments={"code": "s = '```'\nprint(s)\n"}),
    ]


def test_python_style_unclosed_block_is_an_error() -> None:
    [call, error] = parse_tool_calls("```python\nprint(1)\n```\n```python\nprint(2", style="python")
    assert call == ToolCall(name="python", arguments={"code": "print(1)\n"})
    assert isinstance(error, ToolCallError) and "not closed" in error.message and error.raw.endswith("print(2")


def test_parsed_calls_to_unknown_tools_or_with_bad_arguments_fail_readably() -> None:
    registry = ToolRegistry([Calculator()])
    text = (
        '<tool_call>{"name": "calc", "arguments": {"expression": "1"}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>'
    )
    results = [registry.execute(call) for call in parse_tool_calls(text) if isinstance(call, ToolCall)]
    assert [r.ok for r in results] == [False, False, False]
    assert "unknown tool 'calc'" in results[0].content and "Did you mean 'calculator'" in results[0].content
    assert "missing required argument 'expression'" in results[1].content
    assert "unexpected argument 'expr'" in results[1].content
    assert results[2].content == "Error: CalculatorError: division by zero"


def test_unknown_style_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown tool-call style 'xml': choose one of hermes, python, llama3_json, mistral, pythonic, qwen3_coder"):
        tool_call_parser("xml")
    with pytest.raises(ValueError, match="hermes"):
        parse_tool_calls("x", style="xml")


# --- vLLM's parsers, by vLLM's names ------------------------------------------------------------------

WELL_FORMED = {
    "llama3_json": ('{"name": "calculator", "parameters": {"expression": "1234 * 56"}}',
                    [ToolCall(name="calculator", arguments={"expression": "1234 * 56"})]),
    "mistral": ('[TOOL_CALLS]calculator[ARGS]{"expression": "1234 * 56"}[TOOL_CALLS]calculator[ARGS]{"expression": "2"}',
                [ToolCall(name="calculator", arguments={"expression": "1234 * 56"}), ToolCall(name="calculator", arguments={"expression": "2"})]),
    "pythonic": ('[calculator(expression="1234 * 56"), calculator(expression="2")]',
                 [ToolCall(name="calculator", arguments={"expression": "1234 * 56"}), ToolCall(name="calculator", arguments={"expression": "2"})]),
    "qwen3_coder": ("Let me compute.\n<tool_call>\n<function=calculator>\n<parameter=expression>\n1234 * 56\n</parameter>\n</function>\n</tool_call>",
                    [ToolCall(name="calculator", arguments={"expression": "1234 * 56"})]),
}
MALFORMED = {  # (text, what the error message says)
    "llama3_json": ('{"name": "calculator", "parameters": {"expression": "1234 * 56"}', "this llama3_json tool call cannot be read; write a call as {\"name\""),
    "mistral": ('[TOOL_CALLS]calculator[ARGS]{"expression": "1234 *', "the arguments of 'calculator': not valid JSON"),
    "pythonic": ('[calculator(expression="1234 * 56"]', "this pythonic tool call cannot be read; write a call as [calculator("),
    "qwen3_coder": ('<tool_call>\n{"name": "calculator", "arguments": {}}\n</tool_call>',  # hermes JSON where XML belongs
                    "this qwen3_coder tool call cannot be read; write a call as <tool_call>\n<function=calculator>"),
}


def test_every_vllm_format_has_its_cases() -> None:
    assert set(WELL_FORMED) == set(MALFORMED) == set(VLLM_FORMATS)
    assert TOOL_CALL_STYLES == ("hermes", "python", *VLLM_FORMATS)


@pytest.mark.parametrize("style", sorted(VLLM_FORMATS))
def test_vllm_formats_read_well_formed_calls(style: str) -> None:
    text, calls = WELL_FORMED[style]
    parse = tool_call_parser(style, SCHEMAS)
    assert parse(text) == calls
    assert parse("The answer is \\boxed{69104}.") == []


@pytest.mark.parametrize("style", sorted(VLLM_FORMATS))
def test_vllm_formats_turn_malformed_calls_into_errors(style: str) -> None:
    text, message = MALFORMED[style]
    [error] = tool_call_parser(style, SCHEMAS)(text)
    assert isinstance(error, ToolCallError)
    assert error.message.startswith(message), error.message


def test_qwen3_coder_arguments_take_their_schema_types() -> None:
    schemas = [{"type": "function", "function": {"name": "repeat", "parameters": {
        "type": "object", "properties": {"word": {"type": "string"}, "times": {"type": "integer"}}}}}]
    text = "<tool_call>\n<function=repeat>\n<parameter=word>\n42\n</parameter>\n<parameter=times>\n3\n</parameter>\n</function>\n</tool_call>"
    assert tool_call_parser("qwen3_coder", schemas)(text) == [ToolCall(name="repeat", arguments={"word": "42", "times": 3})]


def test_tool_env_reads_calls_in_a_vllm_format_and_answers_malformed_ones() -> None:
    task = Task(id="bags", prompt="Ava has 1234 bags with 56 apples in each bag. How many apples?", answer="69104")
    with ToolEnv(tasks=[task], tool_call_style="llama3_json") as env:
        _, info = env.reset(seed=0)
        assert info["tool_call_style"] == "llama3_json" and info["tools"] == SCHEMAS  # the template shows the model its tools
        [result], _, terminated, _, step_info = env.step('<|python_tag|>{"name": "calculator", "parameters": {"expression": "1234 * 56"}}')
        assert (result.role, result.content, terminated, step_info["tool_errors"]) == ("tool", "69104", False, 0)
        [error], _, _, _, step_info = env.step('{"name": "calculator", "parameters": {"expression": ')
        assert error.content.startswith("Error: this llama3_json tool call cannot be read") and step_info["tool_errors"] == 1


def test_tool_env_refuses_an_unknown_format_listing_the_names() -> None:
    with pytest.raises(EnvError, match=r"tool_call_style must be 'hermes' or 'python' \(our own parsers\) or a vLLM format "
                                       r"\(llama3_json, mistral, pythonic, qwen3_coder\), got 'llama3'"):
        ToolEnv(tool_call_style="llama3")


@pytest.mark.parametrize(
    "text", ["<tool_call>", "<tool_call></tool_call>", "<tool_call>\x00\ud800</tool_call>", "```python", "{}" * 1000]
)
def test_garbage_never_raises(text: str) -> None:
    for style in TOOL_CALL_STYLES:
        tool_call_parser(style, SCHEMAS)(text)
