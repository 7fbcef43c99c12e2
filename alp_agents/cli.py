"""The `alp` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

app = typer.Typer(help="ALP Agents: train tool-using LLM agents with multi-turn RL and ALP.", no_args_is_help=True)
console = Console()
stderr = Console(stderr=True, soft_wrap=True, emoji=False)  # one line however narrow the terminal: a scheduler can grep it

NEVER_UPDATED_EXIT_CODE = 3

if TYPE_CHECKING:
    from alp_agents.envs.tasks import FieldMap
    from alp_agents.evaluation import RolloutStats
    from alp_agents.generate import GenerationReport

Model = Annotated[Path, typer.Option(help="Model directory (any Hugging Face causal LM).")]
EnvId = Annotated[str, typer.Option("--env", help="gymnasium id of the environment.")]
EnvArgs = Annotated[str, typer.Option(help='Environment arguments as JSON, e.g. \'{"max_turns": 3}\'.')]
Fields = Annotated[str, typer.Option(help='Columns of a task file or Hub dataset as JSON (data.fields of a run config), e.g. '
                                            '\'{"prompt": "question", "answer": "final", "id": "uid"}\'.')]
MaxTurns = Annotated[Optional[int], typer.Option(help="The environment's turn budget (its max_turns argument); default: the environment's own.",
                                                 min=1)]
Servers = Annotated[Optional[list[str]], typer.Option("--server", help="vLLM server base URL (repeat for several); default: vLLM in-process.")]
TaskData = Annotated[str, typer.Option("--data", help="Tasks: a built-in eval set (gsm8k, math500, aime24, aime25, minerva, olympiadbench), "
                                      "a .jsonl/.json/.csv/.parquet file with problem (or question, prompt) and answer columns, "
                                      "hf:REPO[:SUBSET]\\[@SPLIT] for a Hugging Face Hub dataset, "  # \\[: rich would read [@...] as markup
                                      "or arithmetic:N[:difficulty[:seed]].")]
Limit = Annotated[int, typer.Option(help="Use only the first N tasks of --data (0: all).")]
Transport = Annotated[Literal["file", "http"], typer.Option(help="How --model's weights reach the servers: file (a directory they share) or http (uploaded).")]
ChatTemplate = Annotated[str, typer.Option(help="Chat template in place of the model's own: a .jinja file, or the template's text.")]


@app.command("init-model")
def init_model(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model into.")],
    seed: Annotated[int, typer.Option(help="Seed of the weights (same seed, same bytes).")] = 0,
    size: Annotated[str, typer.Option(help="tiny (~1M parameters, tests), small (~10M, demo) or 0.5b (Qwen2.5-0.5B's shape, 494M, for measurements).")] = "tiny",
) -> None:
    """Build the embedded default model (tokenizer + Qwen2 weights) from a seed."""
    from alp_agents.tiny import build_tiny_model

    path = build_tiny_model(out_dir, seed=seed, size=size)
    console.print(f"wrote {size} model (seed {seed}) to {path}")


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more user messages.")],
    model: Model,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to sample per reply.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
) -> None:
    """Answer each prompt as a chat with vLLM and print the replies and tokens/s."""
    from alp_agents.generate import generate_chat
    from alp_agents.jobs import model_directory

    print_generation_report(generate_chat(model_directory(model, option="--model"), prompts, max_tokens=max_tokens, temperature=temperature))


@app.command("make-demos")
def make_demos(
    out: Annotated[Path, typer.Option(help="JSON Lines file to write.")],
    env: EnvId = "alp_agents/ToolMath-v0",
    env_args: EnvArgs = "{}",
    data: Annotated[Optional[str], typer.Option(help="Tasks (as for alp eval); default: the env's own, else --n arithmetic problems.")] = None,
    n: Annotated[int, typer.Option(help="Number of synthetic arithmetic tasks when --data is not given.")] = 500,
    difficulty: Annotated[int, typer.Option(help="Difficulty of the synthetic arithmetic tasks (1-3).")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic arithmetic tasks.")] = 0,
    fields: Fields = "{}",
) -> None:
    """Write demonstrations by the environment's scripted expert (expert_action), one per task, for `alp sft`."""
    from alp_agents import jobs
    from alp_agents.trainers.run_config import EnvSection

    path, count, held_out = jobs.make_demos(out, EnvSection(id=env, kwargs=parse_env_args(env_args)), data, n=n, difficulty=difficulty,
                                            seed=seed, fields=parse_fields(fields))
    left_out = f" ({held_out} of the env's tasks left out: those `alp train` holds out to evaluate on by default)" if held_out else ""
    console.print(f"wrote {count} demonstrations to {path}{left_out}")


@app.command()
def sft(
    model: Model,
    data: Annotated[Path, typer.Option(help="Demonstrations (JSON Lines, from `alp make-demos`).")],
    out: Annotated[Path, typer.Option(help="Directory for the fine-tuned model.")],
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="SFT setting, e.g. lr=1e-3 (repeatable).")] = None,
) -> None:
    """Supervised warm start: loss only on assistant tokens (tool results masked, as in RL)."""
    from alp_agents import jobs
    from alp_agents.config import load_config
    from alp_agents.trainers.sft import SFTConfig

    history = jobs.sft(jobs.model_directory(model, option="--model"), data, out, load_config(SFTConfig, None, overrides or []))
    console.print(f"SFT: {len(history)} steps, final loss {history[-1]['sft/loss']:.3f}; model saved to {out}")


@app.command("train")
def train_command(
    run_dir: Annotated[Path, typer.Option(help="Run directory (metrics, checkpoints, plots).")] = Path("runs/train"),
    config: Annotated[Optional[Path], typer.Option(help="TOML config (see the README's configuration reference).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override, e.g. trainer.lr=1e-6 (repeatable).")] = None,
    algo: Annotated[Optional[str], typer.Option(help="alp | bypass | grpo | tis | mis | gspo (sets trainer.algo).")] = None,
    servers: Servers = None,
    resume: Annotated[bool, typer.Option(help="Continue RUN_DIR from its last checkpoint.")] = False,
) -> None:
    """The RL loop: rollouts, ALP update, weight sync, evaluation, checkpoints."""
    from alp_agents import jobs

    from alp_agents.plots import read_metrics
    from alp_agents.trainers.loop import held_out_summary, why_never_updated

    extra = ([f"trainer.algo={algo}"] if algo else []) + ([f"engine.servers={json.dumps(servers)}"] if servers else [])
    rows = jobs.train_from_config(config, (overrides or []) + extra, run_dir, resume=resume)
    if not rows:
        return
    history = read_metrics(run_dir / "metrics.jsonl")  # the whole run: a resumed one's rows are only its last part
    model = run_dir / "checkpoint" / "model"
    console.print(f"done: iteration {rows[-1]['iteration']}; metrics, checkpoint and plots in {run_dir}; the trained model is {model} "
                  f"(alp eval --model {model} ...; more iterations: alp train --run-dir {run_dir} --resume --set schedule.iterations=N)")
    if summary := held_out_summary(history):
        console.print(summary)
    if problem := why_never_updated(history):
        stderr.print("[bold red]warning:[/]", escape(problem))
        raise SystemExit(NEVER_UPDATED_EXIT_CODE)


@app.command()
def update(
    model: Model,
    trajectories: Annotated[Path, typer.Option(help="JSON Lines trajectory file: the batch, split over the ranks by whole groups.")],
    steps: Annotated[int, typer.Option(min=1, help="Calls of step() on the batch (each runs updates_per_batch updates).")] = 1,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of TrainerConfig fields (algo, lr, loss, ...).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="TrainerConfig override, e.g. algo=bypass (repeatable).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Save the policy and tokenizer here (Hugging Face model directory).")] = None,
) -> None:
    """The update alone, on saved trajectories, under torchrun (FSDP2); rank 0 prints one JSON line of metrics per step."""
    from alp_agents import jobs
    from alp_agents.config import load_config
    from alp_agents.trainers.trainer import TrainerConfig

    cfg = load_config(TrainerConfig, config, overrides or [])
    jobs.update_on_ranks(model, trajectories, cfg, steps=steps, out=out, on_step=lambda metrics: print(json.dumps(metrics), flush=True))


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="Run directory with metrics.jsonl.")]) -> None:
    """Draw the run's figures (reward, ratio envelope, KL, sigma, entropy) as PNG files."""
    from alp_agents.plots import plot_run

    for path in plot_run(run_dir):
        console.print(str(path))


@app.command("eval")
def eval_command(
    model: Model,
    data: TaskData,
    limit: Limit = 0,
    env: EnvId = "alp_agents/ToolMath-v0",
    env_args: EnvArgs = "{}",
    k: Annotated[int, typer.Option(help="Samples per task (avg@k, pass@k).")] = 4,
    out: Annotated[Optional[Path], typer.Option(help="Write the trajectories here (JSON Lines).")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    max_turns: MaxTurns = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per turn.")] = 256,
    fields: Fields = "{}",
    servers: Servers = None,
    weights_transport: Transport = "file",
    chat_template: ChatTemplate = "",
) -> None:
    """Multi-turn evaluation: avg@k, pass@k, turns, tool use and errors, truncation, tokens."""
    from alp_agents import jobs
    from alp_agents.engines.base import SamplingConfig
    from alp_agents.rollout import RolloutLimits
    from alp_agents.trainers.run_config import EnvSection

    report = jobs.evaluate(model, EnvSection(id=env, kwargs=parse_env_args(env_args, max_turns)), data, limit=limit, k=k, out=out,
                           sampling=SamplingConfig(temperature=temperature),
                           limits=RolloutLimits(max_tokens_per_turn=max_tokens), servers=servers or [],
                           weights_transport=weights_transport, chat_template=chat_template, fields=parse_fields(fields))
    print_stats(report.stats, title=f"{model} on {data} ({report.seconds:.0f} s)")
    print(report.model_dump_json())


@app.command()
def rollout(
    model: Model,
    data: TaskData,
    out: Annotated[Path, typer.Option(help="Trajectories file to write (JSON Lines).")],
    limit: Limit = 0,
    env: EnvId = "alp_agents/ToolMath-v0",
    env_args: EnvArgs = "{}",
    k: Annotated[int, typer.Option(help="Episodes per task.")] = 1,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    max_turns: MaxTurns = None,
    fields: Fields = "{}",
    servers: Servers = None,
    weights_transport: Transport = "file",
    chat_template: ChatTemplate = "",
) -> None:
    """Play episodes and write the trajectories, for inspection with `alp show`."""
    from alp_agents import jobs
    from alp_agents.engines.base import SamplingConfig
    from alp_agents.rollout import RolloutLimits
    from alp_agents.trainers.run_config import EnvSection
    from alp_agents.trajectory import write_trajectories

    trajectories = jobs.rollout_tasks(model, EnvSection(id=env, kwargs=parse_env_args(env_args, max_turns)),
                                      jobs.tasks_from_argument(data, limit=limit, fields=parse_fields(fields)), k=k,
                                      sampling=SamplingConfig(temperature=temperature), limits=RolloutLimits(),
                                      servers=servers or [], weights_transport=weights_transport, chat_template=chat_template)
    console.print(f"wrote {len(trajectories)} trajectories to {write_trajectories(out, trajectories)}")


@app.command()
def serve(
    model: Model,
    host: Annotated[str, typer.Option(help="Interface to listen on; 0.0.0.0 for trainers on other machines (trusted networks only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    dtype: Annotated[Optional[str], typer.Option(help="Engine dtype (default: float32 on CPU, the model's on GPU).")] = None,
    max_model_len: Annotated[int, typer.Option(help="Longest sequence served; the trainer's max_total_tokens must fit.")] = 4096,
    gpu_memory_utilization: Annotated[float, typer.Option(help="Share of the GPU's memory vLLM takes.")] = 0.9,
    tensor_parallel_size: Annotated[int, typer.Option(help="GPUs the model is sharded over.")] = 1,
) -> None:
    """Serve a model with vLLM for `alp train/eval --server URL`: token-in/token-out generation and weight updates."""
    from alp_agents.engines.server import start_vllm_server
    from alp_agents.engines.vllm_setup import VLLMSettings
    from alp_agents.errors import EngineUnavailable
    from alp_agents.jobs import model_directory

    settings = VLLMSettings(dtype=dtype, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                            tensor_parallel_size=tensor_parallel_size)
    with start_vllm_server(model_directory(model, option="--model"), host=host, port=port, settings=settings) as server:
        console.print(f"serving {model} at {server.url} (weights over file or http); Ctrl-C stops it")
        server.process.wait()
        raise EngineUnavailable(f"the vLLM server exited with code {server.process.returncode}; its log ends with:\n{server.log_tail()}")


@app.command()
def show(
    path: Annotated[Path, typer.Argument(help="Trajectories file (JSON Lines).")],
    model: Annotated[Path, typer.Option(help="Model directory whose tokenizer decodes the tokens.")],
    index: Annotated[int, typer.Option(help="Which trajectory of the file.")] = 0,
) -> None:
    """Print one trajectory token by token: trained tokens (mask 1) bold green, the rest dimmed."""
    from transformers import AutoTokenizer

    from alp_agents.jobs import model_directory
    from alp_agents.trajectory import read_trajectories

    tokenizer = AutoTokenizer.from_pretrained(model_directory(model, option="--model"))
    trajectory = read_trajectories(path)[index]
    text = Text()
    for token, mask in zip(trajectory.token_ids, trajectory.loss_mask):
        text.append(tokenizer.decode([token]), style="bold green" if mask else "dim")
    console.print(text)
    console.print(f"\nreward {trajectory.reward}  finish {trajectory.finish_reason}  turns {len(trajectory.turns)}  "
                  f"tool calls {trajectory.num_tool_calls} (failed {trajectory.num_tool_errors})  "
                  f"tokens {len(trajectory.token_ids)} (trained {trajectory.num_sampled_tokens})  policy v{trajectory.policy_version}")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option(help="Where the demo writes models, runs and plots.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the model's weights, the SFT shuffle and the RL run (the tasks stay the same).")] = 0,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override the recipe (demo.toml), e.g. rl.schedule.iterations=10.")] = None,
    recipe: Annotated[Literal["calculator", "python"], typer.Option(help="The tool the agent learns: the calculator, or Python run in the sandbox.")] = "calculator",
) -> None:
    """The main job: default model -> demonstrations -> SFT -> ALP RL on a tool env, before/after."""
    from alp_agents.demo import RECIPES, run_demo, seed_overrides

    run_demo(out_dir, RECIPES[recipe] + seed_overrides(seed) + (overrides or []), console=console)


lab_app = typer.Typer(help="The mismatch lab: ALP against every baseline under train/inference mismatch, over seeds.")
app.add_typer(lab_app, name="lab")


@lab_app.callback(invoke_without_command=True)
def lab(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(help="Lab TOML (default: the shipped alp_agents/lab.toml).")] = None,
    out: Annotated[Path, typer.Option(help="Lab directory: runs, report.md, figures (an existing one is resumed).")] = Path("runs/lab"),
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override the lab config, e.g. rl.schedule.iterations=20.")] = None,
    arms: Annotated[Optional[str], typer.Option(help="Comma-separated arms to run (default: all).")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Run seeds 0..N-1 (default: the config's seeds).")] = None,
    quick: Annotated[bool, typer.Option(help="The quick grid: 1 seed, 3 arms, fewer iterations (about 10 minutes).")] = False,
) -> None:
    """Run the lab's grid (resumable), then write LAB_DIR/report.md with its verdicts and figures."""
    if ctx.invoked_subcommand is not None:
        return
    from alp_agents.lab import load_lab_config, run_lab
    from alp_agents.lab_report import write_report

    cfg = load_lab_config(config, overrides or [])
    finished = run_lab(cfg, out, arms=arms.split(",") if arms else None, seeds=list(range(seeds)) if seeds else None, quick=quick,
                       console=console)
    console.print(f"{len(finished)} runs finished; report: {write_report(out)}")


@lab_app.command("report")
def lab_report(lab_dir: Annotated[Path, typer.Argument(help="A lab directory written by `alp lab`.")]) -> None:
    """(Re)write LAB_DIR/report.md and LAB_DIR/figures from the runs' metrics."""
    from alp_agents.lab_report import write_report

    console.print(str(write_report(lab_dir)))


def json_option(text: str, option: str, *, example: str) -> Any:
    """The JSON value an option holds; ConfigError naming the option, where the JSON breaks, and an `example` object."""
    from alp_agents.errors import ConfigError

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option} is not valid JSON ({e.msg} at column {e.colno}): pass an object, e.g. '{example}'") from e


def parse_fields(fields: str) -> FieldMap:
    """The `--fields` JSON object as a FieldMap; ConfigError naming the option and the key if it is not one."""
    from pydantic import ValidationError

    from alp_agents.envs.tasks import FieldMap
    from alp_agents.errors import ConfigError

    try:
        return FieldMap.model_validate(json_option(fields, "--fields", example='{"prompt": "question", "answer": "final"}'))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'the value'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"--fields {fields}: {problems} (keys: {', '.join(FieldMap.model_fields)})") from e


def parse_env_args(env_args: str, max_turns: int | None = None) -> dict[str, Any]:
    """The `--env-args` JSON object, with `--max-turns` as its max_turns when given; ConfigError naming the option if it
    is not an object, or if the two options disagree."""
    from alp_agents.errors import ConfigError

    kwargs = json_option(env_args, "--env-args", example='{"max_turns": 3}')
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--env-args must be a JSON object of keyword arguments, got {type(kwargs).__name__}: "
                          "e.g. '{\"max_turns\": 3}'")
    if max_turns is not None and kwargs.setdefault("max_turns", max_turns) != max_turns:
        raise ConfigError(f"--max-turns {max_turns} and --env-args max_turns {kwargs['max_turns']} disagree: give the turn budget once")
    return kwargs


def print_generation_report(report: GenerationReport) -> None:
    table = Table("prompt", "reply", "tokens", "finish")
    for completion in report.completions:
        table.add_row(completion.prompt, completion.text, str(len(completion.token_ids)), completion.finish_reason)
    console.print(table)
    console.print(f"{report.tokens_per_second:.0f} tokens/s ({report.seconds:.2f} s for the batch)")


def print_stats(stats: RolloutStats, *, title: str) -> None:
    table = Table("metric", "value", title=title)
    for name, value in stats.model_dump().items():
        table.add_row(name, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)


def main() -> None:
    """Entry point of the `alp` script: errors we raise on purpose print as one line, not a traceback.

    Exit codes: 0 done; 2 an error we raised on purpose (bad input, lost engine); 3 a training run that
    finished without one update; 128 + the signal's number when SIGINT (130) or SIGTERM (143) stopped it.
    """
    from alp_agents.errors import AlpError, Interrupted

    if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m` does: your env, task and tool modules
        sys.path.insert(0, os.getcwd())  # import from the directory you run `alp` in (env.id = "my_module:MyEnv-v0")
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM unwinds like Ctrl-C: engines close, nothing is left behind
    try:
        app()
    except Interrupted as stopped:
        stderr.print("[bold yellow]interrupted:[/]", escape(str(stopped)))
        raise SystemExit(stopped.exit_code) from None
    except AlpError as error:
        stderr.print("[bold red]error:[/]", escape(str(error)))  # a message may hold [brackets]: print them as they are
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        _exit_interrupted()
    except SystemExit as exiting:
        if exiting.code == 130:  # typer turns a KeyboardInterrupt (Ctrl-C, or SIGTERM through _interrupt) into exit 130
            _exit_interrupted()
        raise


def _exit_interrupted() -> NoReturn:
    signal_number = _signals_received[-1] if _signals_received else signal.SIGINT
    stderr.print(f"[bold yellow]interrupted:[/] {signal.Signals(signal_number).name}")
    raise SystemExit(128 + signal_number) from None


_signals_received: list[int] = []


def _interrupt(signal_number: int, _frame: object) -> None:
    _signals_received.append(signal_number)
    raise KeyboardInterrupt(signal_number)


if __name__ == "__main__":
    main()
