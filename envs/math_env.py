"""MathEnv: one question, one answer; the reward says whether the answer is right.

    reward = 1.0 if grade(response, gold) else 0.0,  minus `format_penalty` when no answer is marked

`grade` reads the last `\\boxed{...}` (or "The final answer is ...", `#### ...`) and compares it
with the gold answer mathematically (see `alp_agents.envs.grading`); with no marker it compares the
whole response. The episode always ends after the first turn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from alp_agents.envs.base import GRADING_THREADS, TextEnv, TurnResult
from alp_agents.envs.grading import extract_answer
from alp_agents.envs.matching import AnswerMatch, Matcher, answer_matcher
from alp_agents.envs.tasks import Task
from alp_agents.errors import EnvError

MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


class MathEnv(TextEnv):
    """Single-turn math problems graded against their gold answer."""

    def __init__(
        self,
        *,
        tasks: Sequence[Task] | None = None,
        system_prompt: str | None = None,
        format_penalty: float = 0.0,
        grade_timeout_s: float = 2.0,
        answer_match: AnswerMatch | str | Matcher = "math",
    ) -> None:
        """`system_prompt`: None for MATH_SYSTEM_PROMPT, "" for no system message; `format_penalty`:
        subtracted from the reward when the response marks no final answer (0 by default);
        `grade_timeout_s`: budget of the symbolic comparison, after which the answer counts as wrong; `answer_match`:
        how the answer is compared with the gold one ("math", "exact", "numeric", "module:function" or a callable)."""
        super().__init__(tasks=tasks, max_turns=1, system_prompt=MATH_SYSTEM_PROMPT if system_prompt is None else system_prompt)
        if not (math.isfinite(format_penalty) and format_penalty >= 0):
            raise EnvError(f"format_penalty must be a finite number >= 0 (it is subtracted), got {format_penalty}")
        self.format_penalty = format_penalty
        self.grade_timeout_s = grade_timeout_s
        self.answer_matches = answer_matcher(answer_match, timeout_s=grade_timeout_s)

    async def respond(self, action: str) -> TurnResult:
        """Grade the response; the episode ends here."""
        answer = extract_answer(action)
        # No marked answer: the whole response is the answer (a bare `42`).
        correct = bool(await GRADING_THREADS.run(self.answer_matches, action.strip() if answer is None else answer, self.task.answer))
        penalty = self.format_penalty if answer is None else 0.0
        return TurnResult(reward=float(correct) - penalty, terminated=True, void=answer is None, answer=answer, correct=correct)
