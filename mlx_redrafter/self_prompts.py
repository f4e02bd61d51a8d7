"""Prompts the base model writes itself, for distillation data without a prompt dataset.

An instruct model's chat template opens a user turn with a header (SmolLM2:
"<|im_start|>user\\n" after its default system prompt). Sampled from there, the
model writes what it learned users ask, until it closes the turn (the
end-of-sequence token, or the template's closing text such as "[/INST]"; Magpie:
Xu et al., 2024). Its replies to those prompts are then distillation data like its
replies to ShareGPT's; the prompts are as varied as sampling makes them and
need no dataset or license.

    prefix, closing = user_turn(tokenizer)  # (24,) token ids for SmolLM2, ending "<|im_start|>user\\n"; "<|im_end|>"
    texts = sample_prompts(model, tokenizer, 1024, batch_size=512)
    # e.g. "Can you help me track the logs I've stored in the database directly (using Python)?"
    steered = sample_prompts(model, tokenizer, 1024, starts=["Write a poem", "Solve"])  # rows cycle through the starts
    # e.g. "Solve for x: 3x + 7 = 22."
    write_prompts("self.jsonl.gz", texts)   # {"prompt": ...} per line: `train --prompts self.jsonl.gz`

A row that does not close its turn within `max_tokens`, an empty one and a
repeat are dropped; sampling stops after 4x the asked count of rows (none
kept: an error), or after one row per start when greedy. Rows cycle through the
starts in an order shuffled by the seed: each is used as often as the others (give
or take one row), and fewer prompts than starts take a seeded sample of them, not
the first. Starts steer the topics: the model writes its users' questions mostly as
requests for advice ("Can you ..."), and a user turn begun with "Solve" or "Write a
story" is continued as such a task.
"""

import gzip
import itertools
import json
import re
from pathlib import Path
from typing import List, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .distill import batch_generate
from .generate import chat_text, encode_messages
from .outputs import check_new_files, write_file
from .progress import progress as progress_bar
from .sampling import SamplingConfig

MARK = "\x00user-text\x00"  # stands for the user's text, to find what the template writes after it
CLOSING = re.compile(r"\s*(<\|[^|]*\|>|\S+)")  # "<|im_end|>", "<|eot_id|>", "[/INST]", "<end_of_turn>"
TRIES = 4  # rows sampled per prompt asked, at most


def _turn_parts(tokenizer) -> Tuple[List[int], int, int, str]:
    """(a one-message chat's ids, how many lead its user text, how many follow it, the text closing the turn),
    from two chats that differ only in the user's text ("Hello", "What")."""
    if not getattr(tokenizer, "has_chat_template", False):
        raise ValueError("the model has no chat template, so it cannot write its own prompts: use an instruct model "
                         "with one, or give your own prompts to `train --prompts`")
    one, other = (encode_messages(tokenizer, [{"role": "user", "content": c}]) for c in ("Hello", "What"))
    if one == other:
        raise ValueError("the chat template leaves out the user's text, so the user turn cannot be cut out: "
                         "give your own prompts to `train --prompts`")
    text = chat_text(tokenizer, [{"role": "user", "content": MARK}])
    after = CLOSING.match(text[text.index(MARK) + len(MARK):]) if MARK in text else None
    return one, _common_length(one, other), _common_length(one[::-1], other[::-1]), after.group(1) if after else ""


def _common_length(a: List[int], b: List[int]) -> int:
    return sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b)))


def user_turn(tokenizer) -> Tuple[List[int], str]:
    """(prefix, closing): a chat's token ids up to where the user's text starts (system prompt and user
    header), and the text that closes a user turn ("" if only the end-of-sequence token is known to)."""
    one, head, _, closing = _turn_parts(tokenizer)
    return one[:head], closing


def start_tokens(tokenizer, starts: Sequence[str]) -> List[List[int]]:
    """Each start text's token ids as the template writes them at the head of a user turn (what follows the
    prefix of `user_turn`), cut out between the parts every chat shares."""
    one, head, tail, closing = _turn_parts(tokenizer)
    tokens = []
    for text in starts:
        if not text.strip() or (closing and closing in text):
            what = "is empty" if not text.strip() else f"holds the template's closing text {closing!r}"
            raise ValueError(f"the start text {text!r} {what}: give words a user's message could begin with")
        full = encode_messages(tokenizer, [{"role": "user", "content": text.rstrip()}])
        ids = full[head: len(full) - tail]
        if (full[:head] != one[:head] or full[len(full) - tail:] != one[len(one) - tail:] or not ids
                or tokenizer.decode(ids).strip() != text.strip()):
            raise ValueError(f"the chat template rewrites the start text {text!r} or what surrounds it, so it cannot "
                             "begin a sampled user turn: give other words, or leave out --start")
        tokens.append(ids)
    return tokens


def finished_text(tokenizer, row: List[int], eos: set, closing: str = "") -> str:
    """The prompt a sampled row holds, cut at `closing`; "" if the row did not close its turn."""
    closed = bool(row) and row[-1] in eos
    text = tokenizer.decode(row[:-1] if closed else row)
    if closing and closing in text:
        text, closed = text[: text.index(closing)], True
    return text.strip() if closed else ""


def sample_prompts(model, tokenizer, count: int, *, batch_size: int = 512, max_tokens: int = 128,
                   temperature: float = 1.0, seed: int = 0, starts: Sequence[str] = (), progress: bool = True) -> List[str]:
    """`count` distinct prompts sampled from the model's user turn (fewer only if 4x as many rows gave fewer);
    with `starts`, row i's turn begins with starts[order[i % len(starts)]] (counted across batches), `order`
    a permutation drawn with `seed`."""
    if count < 1:
        raise ValueError(f"the prompt count must be at least 1, got {count}")
    if isinstance(starts, str):
        raise TypeError("starts is a list of texts, e.g. starts=['Solve'], not one string")
    (prefix, closing), eos = user_turn(tokenizer), set(tokenizer.eos_token_ids)
    heads = start_tokens(tokenizer, starts) if starts else [[]]
    heads = [heads[i] for i in np.random.default_rng(seed).permutation(len(heads))]  # a short run samples the starts
    sampling = SamplingConfig(temperature=temperature)
    mx.random.seed(seed)
    texts, seen, rows = [], set(), 0
    bar = progress_bar(total=count, desc="prompts", unit="prompt", enabled=progress)
    limit = min(len(heads), TRIES * count) if sampling.greedy else TRIES * count  # greedy rows of one start are one prompt
    while len(texts) < count and rows < limit:
        size = min(batch_size, limit - rows)
        begun = [heads[(rows + i) % len(heads)] for i in range(size)]
        for head, row in zip(begun, batch_generate(model, [prefix + h for h in begun], max_tokens, sampling, eos)):
            wrote = finished_text(tokenizer, row, eos, closing)
            if not wrote:  # unclosed, or a start alone: no prompt
                continue
            text = finished_text(tokenizer, head + row, eos, closing) if head else wrote
            if text not in seen and len(texts) < count:
                seen.add(text)
                texts.append(text)
                bar.update(1)
        rows += size
    bar.close()
    if not texts:
        raise ValueError(f"the model closed no user turn within {max_tokens} tokens in {rows} tries: "
                         "raise --max-tokens or lower --temp")
    return texts


def write_prompts(path, texts: List[str], force: bool = False) -> Path:
    """Write prompts as JSON lines ({"prompt": text}), gzipped if `path` ends in .gz; atomic."""
    path = Path(path)
    check_new_files([path], force)
    data = "".join(json.dumps({"prompt": t}) + "\n" for t in texts).encode()
    return write_file(path, gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
