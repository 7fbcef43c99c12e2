"""The README's "Write your own environment in 30 lines" examples, verbatim, and what they do.

Each example sits between `# --- README:` markers exactly as the README shows it (imports included);
importing this module runs its `check_env` calls, and the tests below play episodes by hand.
"""

# --- README: a new tool environment ---------------------------------------------------------
from alp_agents.envs import Task, ToolEnv, check_env
from alp_agents.tools import ToolRegistry, tool

METRES = {"km": 1000.0, "m": 1.0, "cm": 0.01, "mile": 1609.344, "inch": 0.0254}


@tool
def convert(value: float, from_unit: str, to_unit: str) -> float:
    """Convert a length between units: km, m, cm, mile or inch.

    Args:
        value: The length to convert.
        from_unit: The unit it is given in.
        to_unit: The unit to express it in.
    """
    return round(value * METRES[from_unit] / METRES[to_unit], 4)


tasks = [
    Task(id="marathon", prompt="How many miles is a 42.195 km marathon? Round to 2 decimals.", answer="26.22"),
    Task(id="screen", prompt="How many centimetres is a 27 inch screen?", answer="68.58"),
]
env = ToolEnv(tasks=tasks, tools=ToolRegistry([convert]), max_turns=3)
check_env(env)
# --- end of README ----------------------------------------------------------------------------

# --- README: an environment from scratch ----------------------------------------------------
from alp_agents.envs import Task, TextEnv, TurnResult, check_env
from alp_agents.trajectory import Message


class ReverseEnv(TextEnv):
    """Spell a word backwards. After a wrong try the env says which letter is wrong; 3 tries."""

    def __init__(self, words: list[str]) -> None:
        tasks = [Task(id=w, prompt=f"Spell '{w}' backwards. Reply with the word only.", answer=w[::-1]) for w in words]
        super().__init__(tasks=tasks, max_turns=3)

    async def respond(self, action: str) -> TurnResult:
        guess, answer = action.strip().lower(), self.task.answer
        if guess == answer:
            return TurnResult(reward=1.0, terminated=True, answer=guess, correct=True)
        wrong = next((i for i, (g, a) in enumerate(zip(guess, answer)) if g != a), min(len(guess), len(answer)))
        feedback = Message(role="user", content=f"Not yet: letter {wrong + 1} is wrong.")
        return TurnResult(messages=[feedback], answer=guess or None, correct=False, void=not guess)

    def expert_action(self, conversation: list[Message]) -> str:
        return self.task.answer  # optional: the scripted expert that `alp make-demos` records


check_env(ReverseEnv(["gradient", "policy", "token"]))
# --- end of README ----------------------------------------------------------------------------

# --- README: an expert for a ToolEnv ---------------------------------------------------------
import json

from alp_agents.trajectory import Message


class ConvertEnv(ToolEnv):
    """The first example's env with a scripted expert: each task holds the tool's arguments in its metadata."""

    def expert_action(self, conversation: list[Message]) -> str | None:
        if conversation[-1].role != "tool":  # first turn: call the tool
            call = {"name": "convert", "arguments": self.task.metadata}
            return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        return f"\\boxed{{{round(float(conversation[-1].content), 2)}}}"  # then answer from what it returned


expert_tasks = [Task(id="marathon", prompt=tasks[0].prompt, answer="26.22",
                     metadata={"value": 42.195, "from_unit": "km", "to_unit": "mile"})]
check_env(ConvertEnv(tasks=expert_tasks, tools=ToolRegistry([convert]), max_turns=3))
# --- end of README ----------------------------------------------------------------------------

import inspect
from pathlib import Path


def test_each_example_is_at_most_30_lines():
    source = Path(__file__).read_text(encoding="utf-8").split("\n")
    starts = [i for i, line in enumerate(source) if line.startswith("# --- README:")]
    ends = [i for i, line in enumerate(source) if line.startswith("# --- end of README")]
    assert len(starts) == len(ends) == 3
    for start, end in zip(starts, ends):
        code = [line for line in source[start + 1 : end] if line.strip()]
        assert len(code) <= 30, f"README example at line {start + 1} has {len(code)} non-blank lines"


def test_the_tool_env_example_plays_an_episode():
    messages, info = env.reset(options={"task": tasks[0]})
    assert messages[-1].content == tasks[0].prompt
    assert info["tools"][0]["function"]["parameters"]["required"] == ["value", "from_unit", "to_unit"]
    call = {"name": "convert", "arguments": {"value": 42.195, "from_unit": "km", "to_unit": "mile"}}
    [reply], reward, terminated, _, _ = env.step(f"<tool_call>\n{json.dumps(call)}\n</tool_call>")
    assert (reply.content, reward, terminated) == ("26.2188", 0.0, False)
    call["arguments"]["to_unit"] = "furlong"
    [reply], _, _, _, info = env.step(f"<tool_call>\n{json.dumps(call)}\n</tool_call>")
    assert reply.content.startswith("Error:") and "furlong" in reply.content and info["tool_errors"] == 1
    assert env.step("That is \\boxed{26.22} miles.")[1:3] == (1.0, True)


def test_the_from_scratch_example_gives_feedback_until_solved_or_out_of_turns():
    with ReverseEnv(["gradient"]) as reverse:
        messages, info = reverse.reset(seed=0)
        assert (messages[-1].content, info["task_id"]) == ("Spell 'gradient' backwards. Reply with the word only.", "gradient")
        feedback, reward, terminated, truncated, _ = reverse.step("tneidrag")
        assert (feedback[0].content, reward, terminated, truncated) == ("Not yet: letter 6 is wrong.", 0.0, False, False)
        assert reverse.step("  Tneidarg ")[1:4] == (1.0, True, False)

        reverse.reset(seed=0)
        assert [reverse.step("no")[3] for _ in range(3)] == [False, False, True]  # the third wrong try truncates


def test_the_from_scratch_example_implements_only_respond_and_an_optional_expert():
    defined = [name for name, _ in inspect.getmembers(ReverseEnv, inspect.isfunction) if name in vars(ReverseEnv)]
    assert defined == ["__init__", "expert_action", "respond"]


def test_the_tool_env_experts_demonstration_calls_the_tool_then_answers_correctly():
    from alp_agents.envs.demos import demonstrate

    with ConvertEnv(tasks=expert_tasks, tools=ToolRegistry([convert]), max_turns=3) as convert_env:
        demo = demonstrate(convert_env, expert_tasks[0])  # EnvError unless graded correct
    assert [m.role for m in demo.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert (demo.messages[3].content, demo.messages[4].content) == ("26.2188", "\\boxed{26.22}")
