"""The data that crosses boundaries: chat messages, tool calls, and one episode as a Trajectory.

A Trajectory holds the token ids of a whole episode exactly as the inference engine saw and
produced them (token-in, token-out: never re-tokenised), a loss mask that is 1 only on tokens the
policy sampled, and the engine's log-prob of each sampled token. Trainers read nothing else.
Trajectories serialise to JSON Lines, one episode per line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticSerializationError

from alp_agents.errors import TrajectoryError

Role = Literal["system", "user", "assistant", "tool"]
EpisodeFinish = Literal["", "terminated", "max_turns", "max_tokens", "context", "error"]
"""Why an episode ended (see Trajectory.finish_reason); "" while it runs."""
M = TypeVar("M", bound=BaseModel)


def valid_text(text: str) -> str:
    """`text` with every lone surrogate (U+D800..U+DFFF) replaced by U+FFFD, and surrogate pairs joined.

    A Python str can hold surrogates (bytes decoded with errors="surrogateescape", a tool that slices
    UTF-16), but UTF-8 cannot: a tokenizer or a JSON writer fails on them. Text that is already valid
    comes back unchanged (the same object).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


class ToolCall(BaseModel):
    """One call of a tool, as the model wrote it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Name of the tool to call."""
    arguments: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments, already decoded from JSON."""
    id: str | None = None
    """Optional id that a tool message can refer back to."""

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI/Hugging Face chat-template shape: {"type": "function", "function": {...}}."""
        call: dict[str, Any] = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if self.id is not None:
            call["id"] = self.id
        return call


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    """Who speaks: system, user, assistant, or tool (a tool's result)."""
    content: str = ""
    """The text of the message (for an assistant message with tool calls: the text outside the calls)."""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    """Tool calls made in an assistant message."""
    name: str | None = None
    """For a tool message: the tool that produced it."""
    tool_call_id: str | None = None
    """For a tool message: the id of the call it answers, when the call had one."""

    @field_validator("content")
    @classmethod
    def _valid_utf8(cls, content: str) -> str:
        # The boundary where tool output and env text become conversation: a lone surrogate here
        # would fail the tokenizer mid-episode, so it becomes U+FFFD and the episode goes on.
        return valid_text(content)

    def to_chat(self) -> dict[str, Any]:
        """The dict a Hugging Face chat template or an OpenAI-compatible server expects."""
        chat: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            chat["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        if self.name is not None:
            chat["name"] = self.name
        if self.tool_call_id is not None:
            chat["tool_call_id"] = self.tool_call_id
        return chat


class TurnFacts(BaseModel):
    """What an environment found in one assistant turn: its tool calls, whether it was void, its graded answer."""

    tool_calls: int = Field(default=0, ge=0)
    """Tool calls the turn attempted, malformed ones included (one tool message each)."""
    parsed_tool_calls: list[ToolCall] = Field(default_factory=list)
    """The well-formed calls among them, in order."""
    tool_errors: int = Field(default=0, ge=0)
    """Calls that failed: unparseable, unknown tool, invalid arguments, or the tool itself failed."""
    void: bool = False
    """The turn made no progress: no final answer and no successful tool call. Trainers count these."""
    answer: str | None = None
    """The final answer the turn gave, as extracted from its text; None when it gave none."""
    correct: bool | None = None
    """Whether that answer matches the gold answer; None when the turn was not graded."""

    @model_validator(mode="after")
    def _check_counts(self) -> TurnFacts:
        if self.tool_errors > self.tool_calls:
            raise ValueError(f"tool_errors ({self.tool_errors}) cannot exceed tool_calls ({self.tool_calls})")
        if len(self.parsed_tool_calls) > self.tool_calls:
            raise ValueError(f"{len(self.parsed_tool_calls)} parsed_tool_calls but only {self.tool_calls} tool_calls")
        return self


class StepInfo(TurnFacts):
    """The `info` of an environment's step, typed: the TurnFacts of the turn just played and its number.

    gymnasium's `step` returns info as a dict (`as_info()`); the agent loop reads it back with
    `StepInfo.model_validate(info)`, so an ill-typed field fails the episode saying which. Keys an
    environment adds of its own are kept (`model_extra`) and end in the trajectory's metadata.
    """

    model_config = ConfigDict(extra="allow")

    turn: int = Field(default=0, ge=0)
    """The turn's number in its episode, from 1."""

    def as_info(self) -> dict[str, Any]:
        """The gymnasium info dict: the fields by name, values as they are (parsed calls stay ToolCall objects)."""
        return dict(self)


class Turn(BaseModel):
    """What happened in one assistant turn of an episode."""

    model_config = ConfigDict(extra="forbid")

    text: str
    """The assistant's text for this turn, decoded from the sampled tokens."""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    """Tool calls parsed from the text."""
    tool_results: list[str] = Field(default_factory=list)
    """What came back from each call (or the error the env reported for it)."""
    tool_errors: int = 0
    """How many of this turn's calls failed (malformed, unknown tool, invalid arguments, tool raised)."""
    num_sampled_tokens: int = 0
    """Number of tokens the engine sampled in this turn."""
    generation_s: float = 0.0
    """Wall time spent waiting for the engine, in seconds."""
    env_s: float = 0.0
    """Wall time spent in the environment's step (tools, grading), in seconds."""
    reward: float = 0.0
    """Reward the environment gave for this turn."""
    void: bool = False
    """True when the turn had neither a valid tool call nor a final answer."""


class Trajectory(BaseModel):
    """One episode, as the trainer will see it.

    Invariants (checked at construction): `token_ids`, `loss_mask` and `infer_logprobs` have the
    same length; the mask is 0 on the prompt (the first `prompt_length` tokens); log-probs are
    finite and exactly 0.0 where the mask is 0; `token_policy_versions`, when present, has the same
    length too, with a version (>= 0) wherever the mask is 1.
    """

    model_config = ConfigDict(extra="forbid")

    token_ids: list[int]
    """Prompt and every turn, exactly as the engine saw and produced them."""
    loss_mask: list[Literal[0, 1]]
    """1 on tokens the policy sampled; 0 on prompt, tool output and template tokens the loop inserted."""
    infer_logprobs: list[float]
    """The engine's log-prob of each sampled token, recorded at sampling time; 0.0 where the mask is 0."""
    prompt_length: int = Field(ge=0)
    """Number of leading tokens that form the opening prompt."""
    reward: float = 0.0
    """The episode's total reward."""
    messages: list[Message] = Field(default_factory=list)
    """The conversation as chat messages (for reading and for re-rendering)."""
    turns: list[Turn] = Field(default_factory=list)
    """Per-turn record: text, tool calls, tool results, timings."""
    group_id: str = ""
    """Episodes sampled for the same task in one batch share a group id (GRPO baselines per group)."""
    task_id: str = ""
    """Identifier of the task the episode was played on."""
    policy_version: int = 0
    """Weights version that sampled the episode's first sampled token."""
    policy_version_last: int | None = None
    """Weights version that sampled its last sampled token (differs from policy_version only when weights
    changed during the episode: between turns, or inside a generation under an in-flight update)."""
    token_policy_versions: list[int] = Field(default_factory=list)
    """Per token, aligned with token_ids: the weights version that sampled it, or -1 for a token the policy
    did not sample (prompt, tool output, template tokens the loop inserted). Every token with loss_mask 1
    has a version; a sampled token whose loss was masked afterwards (overlong masking) keeps its version.
    Empty in files written before it existed (versions unknown per token: use policy_version)."""
    finish_reason: EpisodeFinish = ""
    """Why the episode ended: 'terminated' (by the env), 'max_turns', 'max_tokens' (a turn hit its
    token limit), 'context' (the episode hit its total token limit) or 'error' (see `error`)."""
    correct: bool | None = None
    """Whether the environment graded the final answer correct (None: it did not say, e.g. no answer was given)."""
    answer: str | None = None
    """The final answer the environment read from the last turn (None: none)."""
    error: str | None = None
    """Why a failed episode (finish_reason 'error') failed: the exception's type and message; None otherwise."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Extras: the keys the environment added to its steps' info (the last step's value of each), and batch shaping's records."""

    @model_validator(mode="before")
    @classmethod
    def _outcome_out_of_metadata(cls, data: Any) -> Any:
        """Files written before `correct`, `answer` and `error` were fields kept them in metadata: read them from there."""
        moved = ("correct", "answer", "error")
        if isinstance(data, dict) and isinstance(data.get("metadata"), dict) and any(key in data["metadata"] for key in moved):
            metadata = dict(data["metadata"])
            data = {**data, "metadata": metadata}
            for key in moved:
                if key in metadata:
                    data.setdefault(key, metadata.pop(key))
        return data

    @model_validator(mode="after")
    def _check_alignment(self) -> Trajectory:
        n = len(self.token_ids)
        if len(self.loss_mask) != n:
            raise ValueError(f"loss_mask has {len(self.loss_mask)} entries, token_ids has {n}: they must be equal")
        if len(self.infer_logprobs) != n:
            raise ValueError(f"infer_logprobs has {len(self.infer_logprobs)} entries, token_ids has {n}: they must be equal")
        if self.token_policy_versions:
            if len(self.token_policy_versions) != n:
                raise ValueError(f"token_policy_versions has {len(self.token_policy_versions)} entries, token_ids has {n}: "
                                 "they must be equal (or empty)")  # fmt: skip
            for i, (m, version) in enumerate(zip(self.loss_mask, self.token_policy_versions)):
                if version < -1 or (m == 1 and version < 0):
                    raise ValueError(f"token_policy_versions[{i}] is {version} where loss_mask is {m}: expected the "
                                     "version that sampled the token (>= 0), or -1 for a token the policy did not sample "
                                     "(never where the mask is 1)")  # fmt: skip
        if self.prompt_length > n:
            raise ValueError(f"prompt_length is {self.prompt_length} but token_ids has only {n} tokens")
        if any(self.loss_mask[: self.prompt_length]):
            first = self.loss_mask.index(1)
            raise ValueError(f"loss_mask is 1 at position {first}, inside the prompt (prompt_length={self.prompt_length})")
        for i, (m, lp) in enumerate(zip(self.loss_mask, self.infer_logprobs)):
            if not math.isfinite(lp):
                raise ValueError(f"infer_logprobs[{i}] is {lp}: log-probs must be finite")
            if m == 0 and lp != 0.0:
                raise ValueError(f"infer_logprobs[{i}] is {lp} where loss_mask is 0: it must be 0.0")
            if m == 1 and lp > 1e-4:
                raise ValueError(f"infer_logprobs[{i}] is {lp}: a log-probability cannot be positive")
        return self

    @property
    def num_sampled_tokens(self) -> int:
        """How many tokens the policy sampled (the tokens that carry loss)."""
        return sum(self.loss_mask)

    @property
    def num_tool_calls(self) -> int:
        """How many tool calls the episode made (one tool result each, failed ones included)."""
        return sum(len(turn.tool_results) for turn in self.turns)

    @property
    def num_tool_errors(self) -> int:
        """How many of them failed (see Turn.tool_errors)."""
        return sum(turn.tool_errors for turn in self.turns)


def write_jsonl(path: str | Path, records: Iterable[BaseModel]) -> Path:
    """Write pydantic records to `path` as JSON Lines (one per line) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(_json_line(record) + "\n")
    return path


def _json_line(record: BaseModel) -> str:
    try:
        return record.model_dump_json()
    except PydanticSerializationError:
        # Most likely a lone surrogate in free-form text (an error message in metadata): UTF-8 cannot
        # encode it, but a JSON escape (\udXXX) can, and reading the line gives back the same str.
        return json.dumps(record.model_dump(mode="json"))


def read_jsonl(path: str | Path, model: type[M], *, what: str) -> list[M]:
    """Read a JSON Lines file of `model` records; a malformed line raises TrajectoryError naming its line number."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(model.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError) as e:
                raise TrajectoryError(f"{path}:{line_number}: not a valid {what}: {e}") from e
    return records


def group_by_id(trajectories: Iterable[Trajectory]) -> dict[str, list[Trajectory]]:
    """Episodes by group_id (the episodes of one task, which GRPO compares), groups in order of first appearance."""
    groups: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        groups.setdefault(t.group_id, []).append(t)
    return groups


def write_trajectories(path: str | Path, trajectories: Iterable[Trajectory]) -> Path:
    """Write trajectories to `path` as JSON Lines (one episode per line) and return the path."""
    return write_jsonl(path, trajectories)


def read_trajectories(path: str | Path) -> list[Trajectory]:
    """Read a JSON Lines trajectory file; a malformed line raises TrajectoryError naming its line number."""
    return read_jsonl(path, Trajectory, what="trajectory")
