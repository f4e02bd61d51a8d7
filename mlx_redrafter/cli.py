"""The `mlx-redrafter` command line."""

import math
import pickle
import sys
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional

import typer

import click

from .beam_search import DEFAULT_SHAPE, MAX_LENGTH, MAX_LOOKUP_BEAMS, MAX_WIDTH, BeamShape, default_shape
from .interrupts import sigint_flag
from .progress import close_bars

_GPU_W, _GPU_L, _GPU_N, _GPU_LL, _GPU_MP = DEFAULT_SHAPE["gpu"]
_CPU_W, _CPU_L, _CPU_N, _CPU_LL, _CPU_MP = DEFAULT_SHAPE["cpu"]
WIDTH_DEFAULT = f"default: {_GPU_W} on a GPU, {_CPU_W} on the CPU"
LENGTH_DEFAULT = f"default: {_GPU_L} on a GPU, {_CPU_L} on the CPU"
NODES_HELP = (f"Drafted prefixes verified per step, the most probable first; 0 = all W x (L - 1) "
              f"(default: {_GPU_N or 'all'} on a GPU, {_CPU_N or 'all'} on the CPU).")
LOOKUP_LENGTH_HELP = (f"Tokens the context-lookup beam proposes; 0 = beam length - 1 "
                      f"(default: {_GPU_LL or 'L - 1'} on a GPU, {_CPU_LL or 'L - 1'} on the CPU).")
LOOKUP_BEAMS_HELP = ("Context-lookup beams, each copying what followed another earlier occurrence of the "
                     "context's end (default: 1).")
MIN_PROB_HELP = (f"Verify only the drafted nodes whose prefix the drafter gives at least this probability; "
                 f"0 = every node of the budget (default: {_GPU_MP or 0} on a GPU, {_CPU_MP or 0} on the CPU).")
TREE_HELP = "ranked: the most probable prefixes of every depth; beams: Apple's final W beams only."


def tree_option():
    return typer.Option("ranked", "--tree", help=TREE_HELP)


def nodes_option():
    return typer.Option(None, "--nodes", min=0, max=MAX_WIDTH * (MAX_LENGTH - 1), help=NODES_HELP)


def lookup_length_option(default=None):
    return typer.Option(default, "--lookup-length", min=0, max=MAX_LENGTH, help=LOOKUP_LENGTH_HELP)


def lookup_beams_option():
    return typer.Option(None, "--lookup-beams", min=1, max=MAX_LOOKUP_BEAMS, help=LOOKUP_BEAMS_HELP)


def min_prob_option():
    return typer.Option(None, "--min-prob", min=0.0, max=0.999, help=MIN_PROB_HELP)



app = typer.Typer(add_completion=False, no_args_is_help=True, help="Lossless ReDrafter speculative decoding on MLX.")


def fail(message: str):
    close_bars()
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def or_packaged(drafter: Optional[str]) -> str:
    """--drafter left out: the model's packaged drafter ("auto"). An empty one is passed on, and refused."""
    return "auto" if drafter is None else drafter


SEED_MAX = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer


def interrupted(note: str = "interrupted"):
    """Ctrl-C: one short line on standard error, exit status 130 (128 + SIGINT)."""
    close_bars()
    typer.echo(note, err=True)
    raise typer.Exit(130)


def guarded(fn):
    """Turn expected failures (bad paths, bad configs, no memory) into exactly one `error:` line, exit 2.

    typer.Exit and click's own exceptions (usage errors, exits chosen by the command) pass through
    untouched; Ctrl-C anywhere prints one line and exits 130.
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, click.exceptions.Exit, click.ClickException, click.Abort, BrokenPipeError):
            raise  # `generate | head`: the command line's main exits quietly (status 1), as click does
        except KeyboardInterrupt:
            interrupted()
        except MemoryError:
            fail("out of memory: try a smaller model, batch, beam shape or --max-tokens")
        except (ValueError, RuntimeError, KeyError, OSError, OverflowError, pickle.UnpicklingError) as e:
            fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)

    return wrapper


def check_seed(seed: Optional[int]):
    """Seeds are 0 .. 2**64 - 1; negative or larger ones are refused (not wrapped, so runs stay reproducible)."""
    if seed is not None and not 0 <= seed <= SEED_MAX:
        fail(f"--seed must be between 0 and 2**64 - 1, got {seed}")


def read_stdin_prompt() -> str:
    """Standard input as UTF-8; other encodings are refused with a hint (no guessing, nothing replaced)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        return sys.stdin.read()
    data = stream.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"standard input is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
             "convert it first, e.g. `iconv -f latin1 -t utf-8`")


@app.command()
@guarded
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt ('-' reads standard input)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory, Hub id or .gguf file (default: SmolLM2-135M-Instruct)."),
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Drafter directory (default: the model's packaged drafter)."),
    autoregressive: bool = typer.Option(False, "--autoregressive", help="Decode with the base model alone."),
    beam_width: Optional[int] = typer.Option(None, "--beam-width", "-W", min=1, max=MAX_WIDTH, help=f"Beams drafted per step ({WIDTH_DEFAULT})."),
    beam_length: Optional[int] = typer.Option(None, "--beam-length", "-L", min=2, max=MAX_LENGTH, help=f"Tokens per beam, the base model's own next token included ({LENGTH_DEFAULT})."),
    nodes: Optional[int] = nodes_option(),
    tree: str = tree_option(),
    lookup: bool = typer.Option(BeamShape.lookup, "--lookup/--no-lookup", help="Also verify a beam copied from earlier in the context."),
    lookup_length: Optional[int] = lookup_length_option(),
    lookup_beams: Optional[int] = lookup_beams_option(),
    min_prob: Optional[float] = min_prob_option(),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens to generate (and at most up to the model's context window)."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", min=1, help="Use only the prompt's last N tokens (a prompt longer than the context window is refused without it)."),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature (0, or below 1e-5, = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely tokens (0 = all)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed, 0 .. 2**64 - 1."),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Use the prompt as raw text."),
    dtype: str = typer.Option("auto", "--dtype", help="float32 | float16 | bfloat16 | auto (fp32 on CPU, 16-bit on GPU)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Report tokens/s, tokens per step and acceptance."),
):
    """Generate text, speculatively with a drafter when one is available."""
    from . import load, stream_generate
    from .generate import context_window, print_report
    from .sampling import SamplingConfig

    check_seed(seed)
    if prompt == "-":
        prompt = read_stdin_prompt()
    sampling = SamplingConfig(temperature=temp, top_p=top_p, top_k=top_k, seed=seed)
    shape = None  # explicit settings are checked before the model loads
    if any(v is not None for v in (beam_width, beam_length, nodes, lookup_length, min_prob, lookup_beams)) or tree != "ranked" or not lookup:
        shape = default_shape(beam_width, beam_length, lookup, nodes, tree, lookup_length, min_prob, lookup_beams)
    base, tokenizer = load(model, drafter=None if autoregressive else or_packaged(drafter), dtype=dtype)
    draft = getattr(base, "drafter", None)
    if draft is None and not autoregressive:
        typer.echo(
            "note: no drafter for this model; train one (`mlx-redrafter train`) or convert one "
            "(`mlx-redrafter convert drafter`). Decoding autoregressively.",
            err=True,
        )
    last, accepted = None, Counter()
    if shape is None and draft is not None:
        from .generate import chosen_shape
        from .tune import first_use_notice

        notice = first_use_notice(base, draft)
        if notice:
            typer.echo(notice, err=True)
        shape = chosen_shape(base, draft, sampling)
        if shape is None:
            typer.echo("note: `tune` measured plain decoding faster on this machine: decoding plainly", err=True)
            draft = None
    try:
        with sigint_flag(raise_now=True) as ctrl_c:
            for last in stream_generate(
                base, tokenizer, prompt, drafter=draft, max_tokens=max_tokens, sampling=sampling,
                beam=shape, chat_template=not no_chat_template, keep_last=keep_last,
            ):
                typer.echo(last.text, nl=False)
                if not last.from_draft:
                    accepted[last.step_accepted] += 1
                ctrl_c.check()
    except KeyboardInterrupt:
        typer.echo()  # the text so far has been printed as it came
        interrupted()
    typer.echo()
    if last is None:
        return
    limit = context_window(base)
    if last.finish_reason == "length" and limit and last.prompt_tokens + last.generation_tokens >= limit:
        typer.echo(f"note: stopped at the model's context window ({limit} tokens: {last.prompt_tokens} "
                   f"of prompt, {last.generation_tokens} generated)", err=True)
    print_report(last)
    if verbose and draft is not None and shape is not None:
        print_acceptance(accepted, last, shape.emit_length)


def print_acceptance(accepted: Counter, last, emit_length: int):
    steps = sum(accepted.values())
    typer.echo(f"Steps: {steps}, mean tokens per step: {last.generation_tokens / max(steps, 1):.2f}")
    typer.echo("Accepted drafted tokens per step:")
    for k in range(emit_length):
        share = accepted[k] / max(steps, 1)
        typer.echo(f"  {k}: {accepted[k]:5d} {'#' * round(40 * share)} {100 * share:.0f}%")


def command_line(name: str, params: dict, unused=()) -> str:
    """The command as it could be retyped, from the parsed options (a list option repeats its flag;
    `unused`: options the command ignored, left out so the record does not claim them)."""
    words = ["mlx-redrafter", name]
    for key, value in params.items():
        flag = "--" + key.replace("_", "-")
        if key in unused or value is None or value is False:
            continue
        if value is True:
            words.append(flag)
        else:
            for item in value if isinstance(value, (list, tuple)) else [value]:
                words += [flag, str(item)]
    return " ".join(words)


INIT_KEEPS = ("head", "draft_vocab", "layers", "exit_dim")  # train --init keeps the drafter's own


def parse_grid(text: str, name: str, low: int = 1, high: Optional[int] = None):
    """A comma-separated list of integers in low..high (for beam widths: 1..MAX_WIDTH; lengths: 2..MAX_LENGTH)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{name} must be a comma-separated list of integers, got {text!r}")
    if not values or min(values) < low or (high is not None and max(values) > high):
        fail(f"{name} needs integers in {low}..{high}, got {text!r}" if high is not None
             else f"{name} needs integers >= {low}, got {text!r}")
    return values


def grid_widths(text: str, name: str):
    return parse_grid(text, name, 1, MAX_WIDTH)


def grid_lengths(text: str, name: str):
    return parse_grid(text, name, 2, MAX_LENGTH)


@app.command()
@guarded
def train(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: drafter/, checkpoint/, data/, training.json."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: SmolLM2-135M-Instruct)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="JSON/JSONL prompts or conversations (default: ShareGPT)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Distillation data directory (default: OUT/data)."),
    extra_data: Optional[List[Path]] = typer.Option(None, "--extra-data", help="Another finished data directory whose examples join training (repeatable)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this drafter's weights; its shape and draft vocabulary are kept (--head, --layers, --exit-dim, --draft-vocab are not used)."),
    num_prompts: int = typer.Option(4000, "--num-prompts", min=1, help="Prompts to use."),
    all_turns: bool = typer.Option(False, "--all-turns", help="Every user turn of a chat is a prompt (earlier turns as context), not only the first."),
    responses: str = typer.Option("model", "--responses", help="model: distill the base model's responses; dataset: the data's own replies."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Response length when generating data."),
    gen_batch_size: int = typer.Option(32, "--gen-batch-size", min=1, help="Prompts generated at once."),
    gen_temp: float = typer.Option(0.0, "--gen-temp", min=0.0, help="Sampling temperature for the data (0 = greedy)."),
    head: str = typer.Option("shared", "--head", help="shared (base LM head) | full | reduced."),
    draft_vocab: int = typer.Option(4096, "--draft-vocab", min=2, help="Draft vocabulary size for --head reduced."),
    layers: int = typer.Option(2, "--layers", min=0, help="ResBlocks in the drafter."),
    exit_dim: Optional[int] = typer.Option(None, "--exit-dim", min=1, help="Drafter width E (default: H shared, 2H otherwise)."),
    feature_layers: Optional[str] = typer.Option(None, "--feature-layers", help="Base layers (0-based, below the model's layer count, 1 to 8 of them, e.g. 4,15) the drafter reads beside the last hidden state (default: the last alone, Apple's layout)."),
    unroll: int = typer.Option(5, "--unroll", min=1, help="Positions drafted ahead in training (at least the beam length - 1)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    seq_len: int = typer.Option(640, "--seq-len", min=8),
    epochs: int = typer.Option(2, "--epochs", min=1),
    lr: float = typer.Option(1e-3, "--lr", min=0.0),
    kl_weight: float = typer.Option(0.0, "--kl-weight", min=0.0, help="Weight of the KL term to the base model's top-k distribution."),
    kl_top_k: int = typer.Option(32, "--kl-top-k", min=1),
    position_decay: float = typer.Option(1.0, "--position-decay", min=0.0, max=1.0, help="Loss weight decay**k for drafted position k (1: all alike; 0.8 weighs the first positions, which gate the rest, more)."),
    seed: int = typer.Option(0, "--seed", help="Random seed, 0 .. 2**64 - 1."),
    holdout: int = typer.Option(0, "--holdout", min=0, help="Examples kept out of training; their per-position top-1 accuracy is reported."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", min=1),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint."),
    data_only: bool = typer.Option(False, "--data-only", help="Stop once the distillation data is written."),
    save_bits: Optional[int] = typer.Option(None, "--save-bits", help="Store the drafter's weight matrices quantized to 8 or 4 bits."),
    dtype: str = typer.Option("auto", "--dtype", help="Base model dtype."),
):
    """Train a drafter by distillation from the base model."""
    from .distributed import world
    from .training import TrainConfig, TrainingInterrupted, train as run_training

    check_seed(seed)
    cfg = TrainConfig(num_draft_layers=layers, exit_dim=exit_dim, head=head, draft_vocab_size=draft_vocab,
                      unroll=unroll, seq_len=seq_len, batch_size=batch_size, epochs=epochs, lr=lr,
                      kl_weight=kl_weight, kl_top_k=kl_top_k, position_decay=position_decay, seed=seed, holdout=holdout, checkpoint_every=checkpoint_every,
                      max_steps=max_steps, init=str(init) if init else None,
                      feature_layers=parse_grid(feature_layers, "--feature-layers", 0) if feature_layers is not None else None)
    try:
        result = run_training(out, model, prompts=prompts, data=data, extra_data=extra_data or (),
                              num_prompts=num_prompts, all_turns=all_turns,
                              responses=responses, max_new_tokens=max_new_tokens, gen_batch_size=gen_batch_size,
                              gen_temp=gen_temp, config=cfg, resume=resume, data_only=data_only, save_bits=save_bits,
                              dtype=dtype, command=command_line("train", ctx.params, INIT_KEEPS if init else ()))
    except TrainingInterrupted as e:
        interrupted(str(e))
    if world().is_main:  # under mlx.launch, rank 0 reports
        typer.echo(result.summary())


MAX_SELF_PROMPTS = 10_000_000  # a bound on what one run holds in memory (~1 GB of text)
MAX_STARTS, MAX_START_CHARS = 10_000, 1_000  # steering texts: bounded so a huge list is refused, not loaded


def read_start_file(path: Path) -> List[str]:
    """--start-file: one start text per line (stripped; blank lines skipped), read bounded in memory."""
    limit = MAX_STARTS * (4 * MAX_START_CHARS + 2)  # UTF-8 takes up to 4 bytes a character
    how = "give a UTF-8 text file with one start per line"
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        fail(f"--start-file {path} does not exist: {how}")
    except OSError as e:
        fail(f"cannot read --start-file {path} ({e.strerror or type(e).__name__}): {how}")
    if len(raw) > limit:
        fail(f"--start-file {path} is over {limit} bytes, more than {MAX_STARTS} starts can take: shorten it")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not part of the first start
    except UnicodeDecodeError as e:
        fail(f"--start-file {path} is not UTF-8 text (byte {e.start}): {how}")
    starts = [line.strip() for line in text.split("\n") if line.strip()]
    if not starts:
        fail(f"--start-file {path} holds no start text: write one per line")
    return starts


@app.command("prompts")
@guarded
def prompts_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Prompts file to write (.jsonl or .jsonl.gz), for `train --prompts`."),
    num: int = typer.Option(..., "--num", "-n", min=1, max=MAX_SELF_PROMPTS, help="Distinct prompts to write."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: SmolLM2-135M-Instruct); it needs a chat template."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, max=4096, help="Prompts sampled at once."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, max=4096, help="Most tokens the model writes per prompt (after any start); longer ones are dropped."),
    temperature: float = typer.Option(1.0, "--temp", min=0.0, help="Sampling temperature (0: one prompt, or one per start)."),
    seed: int = typer.Option(0, "--seed", help="Random seed, 0 .. 2**64 - 1."),
    start: Optional[List[str]] = typer.Option(None, "--start", help="Words each prompt begins with, to steer topics "
                                              "(repeat it: rows cycle through them in an order the seed shuffles), e.g. --start Solve --start 'Write a story'."),
    start_file: Optional[Path] = typer.Option(None, "--start-file", help="More start texts, one per line (e.g. scripts/prompt_starts.txt)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    dtype: str = typer.Option("auto", "--dtype", help="Base model dtype."),
):
    """Prompts the base model writes itself (sampled from its chat template's user turn), for `train --prompts`."""
    from .loading import load
    from .outputs import check_new_files, check_writable_file
    from .self_prompts import sample_prompts, write_prompts

    check_seed(seed)
    if not math.isfinite(temperature):
        fail(f"--temp must be a finite number, got {temperature}")
    starts = (start or []) + (read_start_file(start_file) if start_file is not None else [])
    bad = next((s for s in starts if not s.strip() or len(s) > MAX_START_CHARS), None)
    if len(starts) > MAX_STARTS or bad is not None:
        what = f"got {len(starts)}" if len(starts) > MAX_STARTS else f"not {bad[:40]!r}{'...' if len(bad) > 40 else ''}"
        fail(f"--start takes up to {MAX_STARTS} texts of 1 to {MAX_START_CHARS} characters, not blank: {what}")
    check_new_files([out], force)  # before the model loads: a refusal costs nothing
    check_writable_file(out)
    base, tokenizer = load(model, drafter=None, dtype=dtype)
    texts = sample_prompts(base, tokenizer, num, batch_size=batch_size, max_tokens=max_tokens, temperature=temperature,
                           seed=seed, starts=starts)
    write_prompts(out, texts, force=force)
    note = "" if len(texts) == num else f" (of {num} asked: the rest repeated or ran past --max-tokens)"
    typer.echo(f"wrote {len(texts)} prompt{'s' if len(texts) != 1 else ''} to {out}{note}")


@app.command("eval-drafter")
@guarded
def eval_drafter(
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Drafter directory (default: the packaged one)."),
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Held-out prompts (default: MT-Bench first turns)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use the first N prompts."),
    every: int = typer.Option(1, "--every", min=1, help="Use every K-th prompt (MT-Bench is ordered by category: 10 spans all 8)."),
    widths: str = typer.Option("4,32", "--widths", help="Beam widths to try, comma-separated."),
    lengths: str = typer.Option("4,8", "--lengths", help="Beam lengths to try, comma-separated."),
    nodes: int = typer.Option(0, "--nodes", min=0, max=MAX_WIDTH * (MAX_LENGTH - 1), help="Drafted prefixes verified per step, the most probable first (0 = all W x (L - 1))."),
    tree: str = tree_option(),
    lookup: str = typer.Option("both", "--lookup", help="Context-lookup beam: off | on | both."),
    lookup_length: int = lookup_length_option(0),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1),
    decode: bool = typer.Option(False, "--decode", help="Count by running speculative decoding (slow) instead of replaying greedy references."),
    temperature: float = typer.Option(0.0, "--temp", min=0.0, help="Count while sampling at this temperature (decodes; each prompt seeded with --seed)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Sampling seed for --temp."),
    out: Path = typer.Option(Path("results"), "--out", help="Where the JSON, Markdown table and plot go."),
    force: bool = typer.Option(False, "--force", help="Replace earlier acceptance.json/.md/.png in --out."),
    dtype: str = typer.Option("auto", "--dtype"),
):
    """Mean accepted tokens per step on held-out prompts (greedy, or sampled with --temp), over a grid of W x Lb."""
    from .evaluate import eval_drafter as run_eval

    ws, ls = grid_widths(widths, "--widths"), grid_lengths(lengths, "--lengths")
    result = run_eval(model, drafter=or_packaged(drafter), prompts=prompts, limit=limit, every=every, widths=ws,
                      lengths=ls, lookup=lookup, nodes=nodes, tree=tree, lookup_length=lookup_length, max_tokens=max_tokens, decode=decode,
                      temperature=temperature, seed=seed, out=out, force=force, dtype=dtype)
    typer.echo(result.table())
    typer.echo(f"saved {out}/acceptance.json, .md and .png")


@app.command()
@guarded
def benchmark(
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts file (default: MT-Bench first turns)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use the first N prompts."),
    every: int = typer.Option(1, "--every", min=1, help="Use every K-th prompt (MT-Bench is ordered by category: 10 spans all 8)."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1),
    beam_width: Optional[int] = typer.Option(None, "--beam-width", "-W", min=1, max=MAX_WIDTH, help=f"Beams drafted per step ({WIDTH_DEFAULT})."),
    beam_length: Optional[int] = typer.Option(None, "--beam-length", "-L", min=2, max=MAX_LENGTH, help=f"Tokens per beam, g0 included ({LENGTH_DEFAULT})."),
    nodes: Optional[int] = nodes_option(),
    tree: str = tree_option(),
    lookup: bool = typer.Option(BeamShape.lookup, "--lookup/--no-lookup", help="Also verify a beam copied from earlier in the context."),
    lookup_length: Optional[int] = lookup_length_option(),
    lookup_beams: Optional[int] = lookup_beams_option(),
    min_prob: Optional[float] = min_prob_option(),
    temp: float = typer.Option(0.7, "--temp", min=0.0, help="Temperature of the sampled ReDrafter run."),
    sweep_widths: str = typer.Option("", "--sweep-widths", help="Also sweep these beam widths (e.g. 1,2,4)."),
    sweep_lengths: str = typer.Option("3,4,5,6", "--sweep-lengths"),
    sweep_limit: Optional[int] = typer.Option(None, "--sweep-limit", min=1, help="Prompts used by the sweep."),
    no_mlx_lm_spec: bool = typer.Option(False, "--no-mlx-lm-spec", help="Skip mlx-lm's draft-model speculative decoding."),
    prefill_tokens: int = typer.Option(3000, "--prefill-tokens", min=0, help="Also time the prefill of a prompt this long, ours against mlx-lm's (0: skip)."),
    out: Path = typer.Option(Path("results"), "--out"),
    tag: Optional[str] = typer.Option(None, "--tag", help="Name of the saved files (default: cpu or gpu)."),
    force: bool = typer.Option(False, "--force", help="Replace earlier speed-TAG.json/.md (and speedup-TAG.png) in --out."),
    dtype: str = typer.Option("auto", "--dtype"),
):
    """Benchmark ReDrafter against plain decoding and mlx-lm, with an optional W x Lb sweep."""
    from .speed import benchmark as run_benchmark, default_tag

    sweep = grid_widths(sweep_widths, "--sweep-widths") if sweep_widths else None
    lengths = grid_lengths(sweep_lengths, "--sweep-lengths") if sweep_widths else ()
    tag = tag or default_tag()
    result = run_benchmark(model, drafter=or_packaged(drafter), prompts=prompts, limit=limit, every=every,
                           max_tokens=max_tokens, beam=default_shape(beam_width, beam_length, lookup, nodes, tree, lookup_length, min_prob, lookup_beams),
                           temp=temp, mlx_lm_speculative=not no_mlx_lm_spec, sweep_widths=sweep, sweep_lengths=lengths,
                           sweep_limit=sweep_limit, out=out, tag=tag, force=force, dtype=dtype,
                           prefill_tokens=prefill_tokens)
    typer.echo(result.table())
    typer.echo(f"saved {out}/speed-{tag}.json and .md" + (f", {out}/speedup-{tag}.png" if result.sweep else ""))


@app.command()
@guarded
def tune(
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d"),
    max_tokens: int = typer.Option(32, "--max-tokens", min=8, max=512, help="Tokens per measured prompt."),
    temp: float = typer.Option(0.7, "--temp", min=1e-5, max=10.0, help="Temperature of the sampled measurements."),
    seconds: float = typer.Option(30.0, "--seconds", min=1.0, max=3600.0,
                                  help="Decoding time to measure for, after warm-ups (at least two rounds; beyond those, no round that would overrun): more rounds, less noise."),
    dtype: str = typer.Option("auto", "--dtype"),
):
    """Measure the draft settings on this machine and keep the fastest (generate uses them by default)."""
    from . import load
    from .tune import format_table, save_tuned, tune as run_tune, writable_settings_path

    start = time.perf_counter()
    base, tokenizer = load(model, drafter=or_packaged(drafter), dtype=dtype)
    draft = getattr(base, "drafter", None)
    if draft is None:
        fail("no drafter given and none packaged for this model: pass --drafter")
    writable_settings_path(base, draft)  # before the measuring, not after it
    loaded = time.perf_counter()
    tuned = run_tune(base, tokenizer, draft, max_tokens=max_tokens, temp=temp, seconds=seconds)
    typer.echo(format_table(tuned))
    typer.echo(f"saved {save_tuned(base, draft, tuned)}")
    typer.echo(f"took {time.perf_counter() - start:.0f} s (loading {loaded - start:.0f} s; on a GPU the first run "
               "also builds each setting's kernels)")


convert_app = typer.Typer(no_args_is_help=True, help="Convert PyTorch checkpoints to MLX weights.")
app.add_typer(convert_app, name="convert")


@convert_app.command("base")
@guarded
def convert_base_cmd(
    src: Path = typer.Argument(..., help="Hugging Face checkpoint directory (config.json + *.bin or *.safetensors)."),
    out: Path = typer.Argument(..., help="Output MLX directory."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 | bfloat16 | float32"),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize linear layers and embeddings."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight (2, 3, 4, 6 or 8)."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Weights per quantization group (32, 64 or 128)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if mlx-redrafter wrote it (or it is empty)."),
):
    """A Hugging Face Llama-family model (PyTorch or safetensors) -> MLX (loads in mlx-lm too)."""
    from .convert import convert_base

    if q_bits not in (2, 3, 4, 5, 6, 8) or q_group_size not in (32, 64, 128):
        fail(f"--q-bits must be one of 2,3,4,5,6,8 and --q-group-size one of 32,64,128 (got {q_bits}, {q_group_size})")
    path = convert_base(src, out, dtype, quantize, q_bits, q_group_size, force)
    typer.echo(f"converted {src} -> {path}")


@convert_app.command("drafter")
@guarded
def convert_drafter_cmd(
    src: Path = typer.Argument(..., help="Apple ReDrafter drafter: directory or pytorch_model.bin / model.safetensors / .pt"),
    out: Path = typer.Argument(..., help="Output drafter directory."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model to check the drafter against."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 | bfloat16 | float32"),
    force: bool = typer.Option(False, "--force", help="Replace OUT if mlx-redrafter wrote it (or it is empty)."),
):
    """A ReDrafter drafter from Apple's PyTorch code (or TensorRT-LLM's key layout) -> MLX."""
    from .convert import convert_drafter, output_dtype

    output_dtype(dtype)  # an unknown --dtype is refused before the base model loads
    base_model = None
    if base is not None:
        from . import load

        base_model = load(base, drafter=None)[0]
    path = convert_drafter(src, out, base_model, dtype, force)
    typer.echo(f"converted {src} -> {path}")


@app.command("export")
@guarded
def export_cmd(
    drafter: Path = typer.Argument(..., help="Drafter directory (or a `train --out` directory)."),
    out: Path = typer.Argument(..., help="Output folder: config.json + model.safetensors."),
    fmt: str = typer.Option("trtllm", "--format", help="trtllm: what TensorRT-LLM's examples/redrafter/convert_checkpoint.py reads as --drafter_model_dir."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model: checks the drafter against it; needed for a drafter that shares its LM head."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 | bfloat16 | float32 (the converter casts to its own --dtype)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if mlx-redrafter wrote it (or it is empty)."),
):
    """Export a drafter for another engine (TensorRT-LLM's ReDrafter)."""
    from .convert import output_dtype
    from .export import FORMATS, export_drafter

    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    output_dtype(dtype)  # an unknown --dtype is refused before the base model loads
    base_model = None
    if base is not None:
        from . import load

        base_model = load(base, drafter=None)[0]
    path = export_drafter(drafter, out, fmt, base_model, dtype, force)
    typer.echo(f"exported {drafter} -> {path} (TensorRT-LLM: convert_checkpoint.py --drafter_model_dir {path})")


@app.command()
@guarded
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory, Hub id or .gguf file (default: SmolLM2-135M-Instruct)."),
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Drafter directory (default: the model's packaged drafter)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8080, "--port", min=1, max=65535),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Default most tokens per answer (a request's max_tokens overrides it)."),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="Default sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Default nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Default top-k (0 = all)."),
    queue_size: int = typer.Option(16, "--queue-size", min=0, help="Requests waiting behind those being decoded; more get 503."),
    max_batch: int = typer.Option(4, "--max-batch", min=1, max=64, help="Requests decoded together as rows of one speculative batch."),
    prompt_cache_size: int = typer.Option(4, "--prompt-cache-size", min=1, help="Conversations whose KV cache is kept for reuse."),
    allowed_origins: str = typer.Option("", "--allowed-origins", help="Comma-separated origins allowed by CORS, for browser front ends (default: none)."),
    dtype: str = typer.Option("auto", "--dtype", help="float32 | float16 | bfloat16 | auto."),
    log_level: str = typer.Option("info", "--log-level", help="debug | info | warning | error."),
):
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions), speculative."""
    from . import load
    from .openai_api import Served
    from .sampling import SamplingConfig
    from .server import check_port, serve as run_server
    from .serving import Worker

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        fail(f"--log-level must be debug, info, warning or error, got {log_level!r}")
    check_port(host, port)  # before the model loads
    defaults = SamplingConfig(temperature=temp, top_p=top_p, top_k=top_k)
    base, tokenizer = load(model, drafter=or_packaged(drafter), dtype=dtype)
    if getattr(base, "drafter", None) is None:
        typer.echo("note: no drafter for this model: decoding plainly", err=True)
    served = Served.named(model, model=base, tokenizer=tokenizer, default_max_tokens=max_tokens, defaults=defaults)
    worker = Worker(base, tokenizer, queue_size, prompt_cache_size, max_batch=max_batch)
    origins = tuple(o.strip() for o in allowed_origins.split(",") if o.strip())
    run_server(served, worker, host, port, origins, log_level)


@app.command()
@guarded
def chat(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory, Hub id or .gguf file (default: SmolLM2-135M-Instruct)."),
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Drafter directory (default: the model's packaged drafter)."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Most tokens per answer."),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    top_k: int = typer.Option(0, "--top-k", min=0),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed, 0 .. 2**64 - 1."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="A system message starting every conversation."),
    dtype: str = typer.Option("auto", "--dtype", help="float32 | float16 | bfloat16 | auto."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tokens/s and tokens per step after each answer."),
):
    """An interactive chat in the terminal, speculative, reusing the conversation's cache between turns."""
    from . import load
    from .chat import Chat
    from .sampling import SamplingConfig

    check_seed(seed)
    sampling = SamplingConfig(temperature=temp, top_p=top_p, top_k=top_k, seed=seed)
    base, tokenizer = load(model, drafter=or_packaged(drafter), dtype=dtype)
    if getattr(base, "drafter", None) is None:
        typer.echo("note: no drafter for this model: decoding plainly", err=True)
    Chat(base, tokenizer, max_tokens, sampling, verbose, system_prompt).run()


def main():
    """The console entry: usage errors (a bad option value, an unknown command) as one `error:` line."""
    try:
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):  # before a command's own handling (`guarded`) starts
        close_bars()
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if not (hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)):
            raise  # not a click usage error
        where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "mlx-redrafter"
        if e.format_message().strip():  # none after the help shown for no arguments
            typer.echo(f"error: {e.format_message()} (see {where} --help)", err=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
