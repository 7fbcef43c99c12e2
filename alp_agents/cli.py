"""The `alp` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="ALP Agents: train tool-using LLM agents with multi-turn RL and ALP.", no_args_is_help=True)
console = Console()

if TYPE_CHECKING:
    from alp_agents.generate import GenerationReport


@app.command("init-model")
def init_model(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model into.")],
    seed: Annotated[int, typer.Option(help="Seed of the weights (same seed, same bytes).")] = 0,
    size: Annotated[str, typer.Option(help="tiny (~1M parameters, tests) or small (~10M, demo).")] = "tiny",
) -> None:
    """Build the embedded default model (tokenizer + Qwen2 weights) from a seed."""
    from alp_agents.tiny import build_tiny_model

    path = build_tiny_model(out_dir, seed=seed, size=size)
    console.print(f"wrote {size} model (seed {seed}) to {path}")


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more user messages.")],
    model: Annotated[Path, typer.Option(help="Model directory (any Hugging Face causal LM).")],
    max_tokens: Annotated[int, typer.Option(help="Most tokens to sample per reply.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
) -> None:
    """Answer each prompt as a chat with vLLM and print the replies and tokens/s."""
    from alp_agents.generate import generate_chat

    report = generate_chat(model, prompts, max_tokens=max_tokens, temperature=temperature)
    print_generation_report(report)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option(help="Where the demo writes its model and outputs.")] = Path("runs/demo"),
) -> None:
    """The main job on the embedded model: build it, serve it with vLLM, and chat with it."""
    from alp_agents.generate import generate_chat
    from alp_agents.tiny import build_tiny_model

    model_dir = build_tiny_model(out_dir / "model", seed=0, size="small")
    console.print(f"built the small default model in {model_dir}")
    prompts = ["What is 12 * 34?", "Use the calculator to add 1234 and 5678.", "Say hello."]
    print_generation_report(generate_chat(model_dir, prompts, max_tokens=48))


def print_generation_report(report: GenerationReport) -> None:
    table = Table("prompt", "reply", "tokens", "finish")
    for completion in report.completions:
        table.add_row(completion.prompt, completion.text, str(len(completion.token_ids)), completion.finish_reason)
    console.print(table)
    console.print(f"{report.tokens_per_second:.0f} tokens/s ({report.seconds:.2f} s for the batch)")


def main() -> None:
    """Entry point of the `alp` script: errors we raise on purpose print as one line, not a traceback."""
    from alp_agents.errors import AlpError

    try:
        app()
    except AlpError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
