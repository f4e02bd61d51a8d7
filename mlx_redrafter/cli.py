"""The `mlx-redrafter` command line."""

import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Lossless ReDrafter speculative decoding on MLX.")


def fail(message: str):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def guarded(fn):
    """Turn expected failures (bad paths, bad configs) into a one-line error."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError) as e:
            fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)

    return wrapper


def find_drafter(model_arg: Optional[str], drafter_arg: Optional[str]):
    """The drafter to use: --drafter, else the packaged one for the default model."""
    if drafter_arg:
        return Path(drafter_arg)
    if model_arg is None:
        from .defaults import default_drafter_path

        return default_drafter_path()
    candidate = Path(model_arg) / "drafter"
    return candidate if (candidate / "config.json").exists() else None


@app.command()
@guarded
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt ('-' reads standard input)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory, Hub id or .gguf file (default: SmolLM2-135M-Instruct)."),
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Drafter directory (default: the model's packaged drafter)."),
    autoregressive: bool = typer.Option(False, "--autoregressive", help="Decode with the base model alone."),
    beam_width: int = typer.Option(4, "--beam-width", "-W", min=1, max=64, help="Beams drafted per step."),
    beam_length: int = typer.Option(5, "--beam-length", "-L", min=2, max=16, help="Tokens per beam, the base model's own next token included."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely tokens (0 = all)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Use the prompt as raw text."),
    dtype: str = typer.Option("auto", "--dtype", help="float32 | float16 | bfloat16 | auto (fp32 on CPU, 16-bit on GPU)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Report tokens/s, tokens per step and acceptance."),
):
    """Generate text, speculatively with a drafter when one is available."""
    from . import load, stream_generate
    from .beam_search import BeamShape
    from .drafter import load_drafter
    from .generate import print_report
    from .sampling import SamplingConfig

    if prompt == "-":
        prompt = sys.stdin.read()
    sampling = SamplingConfig(temperature=temp, top_p=top_p, top_k=top_k, seed=seed)
    base, tokenizer, _ = load(model, dtype=dtype)
    draft = None
    if not autoregressive:
        path = find_drafter(model, drafter)
        if path is None:
            typer.echo(
                "note: no drafter for this model; train one (`mlx-redrafter train`) or convert one "
                "(`mlx-redrafter convert drafter`). Decoding autoregressively.",
                err=True,
            )
        else:
            draft = load_drafter(path, base)
    last, accepted = None, Counter()
    for last in stream_generate(
        base, tokenizer, prompt, drafter=draft, max_tokens=max_tokens, sampling=sampling,
        beam=BeamShape(beam_width, beam_length), chat_template=not no_chat_template,
    ):
        typer.echo(last.text, nl=False)
        if not last.from_draft:
            accepted[last.step_accepted] += 1
    typer.echo()
    if last is None:
        return
    print_report(last)
    if verbose and draft is not None:
        print_acceptance(accepted, last, beam_length)


def print_acceptance(accepted: Counter, last, beam_length: int):
    steps = sum(accepted.values())
    typer.echo(f"Steps: {steps}, mean tokens per step: {last.generation_tokens / max(steps, 1):.2f}")
    typer.echo("Accepted drafted tokens per step:")
    for k in range(beam_length):
        share = accepted[k] / max(steps, 1)
        typer.echo(f"  {k}: {accepted[k]:5d} {'#' * round(40 * share)} {100 * share:.0f}%")


def main():
    app()


if __name__ == "__main__":
    main()
