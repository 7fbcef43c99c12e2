"""Trajectory invariants are enforced at construction, and JSON Lines round-trips."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from alp_agents import Message, ToolCall, Trajectory, TrajectoryError, Turn, read_trajectories, write_trajectories


def make(**overrides) -> Trajectory:
    fields = dict(
        token_ids=[5, 6, 7, 8, 9],
        loss_mask=[0, 0, 1, 1, 0],
        infer_logprobs=[0.0, 0.0, -0.5, -1.25, 0.0],
        prompt_length=2,
        reward=1.0,
        messages=[Message(role="user", content="hi"), Message(role="assistant", content="", tool_calls=[ToolCall(name="calculator", arguments={"expression": "1+1"})])],
        turns=[Turn(text="x", num_sampled_tokens=2)],
        group_id="g0",
        policy_version=3,
        finish_reason="terminated",
    )
    fields.update(overrides)
    return Trajectory(**fields)


def test_valid_trajectory_counts_its_sampled_tokens():
    assert make().num_sampled_tokens == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(loss_mask=[0, 0, 1, 1]), "loss_mask has 4 entries, token_ids has 5"),
        (dict(infer_logprobs=[0.0, 0.0, -0.5]), "infer_logprobs has 3 entries, token_ids has 5"),
        (dict(loss_mask=[0, 1, 1, 1, 0], infer_logprobs=[0.0, -0.1, -0.5, -1.25, 0.0]), "inside the prompt"),
        (dict(infer_logprobs=[0.0, 0.0, math.nan, -1.25, 0.0]), "infer_logprobs[2] is nan"),
        (dict(infer_logprobs=[0.0, 0.0, -0.5, -1.25, -2.0]), "infer_logprobs[4] is -2.0 where loss_mask is 0"),
        (dict(infer_logprobs=[0.0, 0.0, 0.5, -1.25, 0.0]), "cannot be positive"),
        (dict(prompt_length=9), "prompt_length is 9"),
        (dict(loss_mask=[0, 0, 2, 1, 0]), "loss_mask"),
    ],
)
def test_inconsistent_trajectories_are_rejected_naming_the_field(overrides, message):
    with pytest.raises(ValidationError) as excinfo:
        make(**overrides)
    assert message in str(excinfo.value)


def test_jsonl_round_trip(tmp_path):
    trajectories = [make(), make(reward=0.0, group_id="g1", metadata={"error": "tool crashed"})]
    path = write_trajectories(tmp_path / "out" / "t.jsonl", trajectories)
    assert read_trajectories(path) == trajectories


def test_bad_line_names_its_line_number(tmp_path):
    path = write_trajectories(tmp_path / "t.jsonl", [make()])
    with path.open("a") as f:
        f.write('{"token_ids": [1], "loss_mask": [1, 1], "infer_logprobs": [0.0], "prompt_length": 0}\n')
    with pytest.raises(TrajectoryError, match=r"(?s)t\.jsonl:2: .*loss_mask has 2 entries"):
        read_trajectories(path)
    path.write_text(make().model_dump_json() + "\nnot json\n")
    with pytest.raises(TrajectoryError, match=r"t\.jsonl:2"):
        read_trajectories(path)


def test_message_renders_for_chat_templates():
    message = Message(role="assistant", content="ok", tool_calls=[ToolCall(name="calc", arguments={"x": 1})])
    assert message.to_chat() == {
        "role": "assistant",
        "content": "ok",
        "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": {"x": 1}}}],
    }
    with pytest.raises(ValidationError, match="role"):
        Message(role="robot", content="x")


def test_lone_surrogates_never_stop_a_trajectory_from_being_written(tmp_path):
    # A tool that decodes bytes with errors="surrogateescape", or an exception quoting such text.
    trajectory = make(messages=[Message(role="tool", content="caf\udce9 \ud83d\ude00")], error="ValueError: bad byte \udcff")
    assert trajectory.messages[0].content == "caf\ufffd 😀"  # replaced (and the pair joined) at the message boundary
    [read] = read_trajectories(write_trajectories(tmp_path / "t.jsonl", [trajectory]))
    assert read == trajectory and read.error == "ValueError: bad byte \udcff"


def test_outcome_fields_are_typed_and_old_files_are_read():
    old = make().model_dump() | {"metadata": {"correct": True, "answer": "2", "error": "E: x", "env": "x"}}
    del old["correct"], old["answer"], old["error"]
    read = Trajectory.model_validate(old)  # a file written when the outcome was parked in metadata
    assert (read.correct, read.answer, read.error, read.metadata) == (True, "2", "E: x", {"env": "x"})
    with pytest.raises(ValueError, match="finish_reason"):
        make(finish_reason="stopped")
