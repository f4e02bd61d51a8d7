"""Distillation data: the base model's own responses to prompts, written in shards.

    out/manifest.json          settings, prompt count and a fingerprint of the prompts
    out/shard-00000.npz        tokens (concatenated; uint16 when the vocabulary fits), offsets (n+1,), prompt_lens (n,)
    out/manifest-rank-00000.json   which shards each rank wrote (with how many prompts and tokens)

Shards are written atomically (compressed); a rerun skips the shards already
on disk, so an interrupted run resumes where it stopped, and refuses a
directory made with other settings or prompts. Files are read with
allow_pickle=False.

Under `mlx.launch -n N` (distributed.py) rank r writes shards r, r + N, r + 2N,
...: each shard's prompts, batches and sampling seed are the same whichever
rank writes it, so the N ranks together write exactly what one process would,
and each resumes its own shards.
"""

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import numpy as np

from .data import Conversation
from .distributed import World, world as current_world
from .generate import encode_messages
from .outputs import write_file
from .progress import progress as progress_bar
from .sampling import SamplingConfig, choose_tokens
from .validate import read_json_object


@dataclass
class DataConfig:
    max_new_tokens: int = 256
    max_prompt_tokens: int = 384
    batch_size: int = 32
    shard_size: int = 512
    temperature: float = 0.0
    seed: int = 0
    responses: str = "model"  # "model": the base model writes them; "dataset": the data's own replies


def batch_generate(model, prompts: List[List[int]], max_new_tokens: int, sampling: SamplingConfig, eos: set) -> List[List[int]]:
    """Generate for several prompts at once (left-padded, per-row positions and masks).

    Rows that reached EOS leave the batch each time a quarter of the rows still in it have
    finished (their cache rows are dropped), so that the rest compute only themselves: about
    half of sampled replies end before the token limit, and a batch runs as long as its longest.
    """
    B, P = len(prompts), max(len(p) for p in prompts)
    pad = np.array([P - len(p) for p in prompts])
    tokens = np.zeros((B, P), dtype=np.int32)
    for b, p in enumerate(prompts):
        tokens[b, pad[b]:] = p
    pad_mx = mx.array(pad)[:, None]
    positions = mx.maximum(mx.arange(P)[None] - pad_mx, 0)
    keys = mx.arange(P)
    # pad queries see themselves so no row is fully masked
    mask = ((keys[None, None] <= keys[None, :, None]) & (keys[None, None] >= pad_mx[:, :, None])) | mx.eye(P, dtype=mx.bool_)
    cache = model.make_cache()
    h = model(mx.array(tokens), cache, positions, mask[:, None])
    y = choose_tokens(model.logits(h[:, -1]), sampling)
    out = [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    rows = np.arange(B)  # the prompt each row of the batch answers
    for step in range(max_new_tokens):
        length = cache.length
        # exact key spans: spans rounded up to 256 slots (fewer shapes) measured slower on the H200
        valid = (mx.arange(length + 1)[None] >= pad_mx)[:, None, None]  # (B, 1, 1, L+1)
        h = model(y[:, None], cache, mx.array(P + step - pad)[:, None], valid)
        next_y = choose_tokens(model.logits(h[:, -1]), sampling)
        mx.async_eval(next_y)
        for b, t in zip(rows, y.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in eos
        if done.all():
            break
        y = next_y
        running = ~done[rows]
        if running.sum() <= 0.75 * len(rows):
            keep = mx.array(np.flatnonzero(running))
            cache.keep_rows(keep)
            y, pad_mx, pad, rows = y[keep], pad_mx[keep], pad[running], rows[running]
    return out


def _write_shard(path: Path, sequences: List[List[int]], prompt_lens: List[int]):
    tmp = path.with_suffix(".tmp.npz")
    offsets = np.cumsum([0] + [len(s) for s in sequences]).astype(np.int64)
    tokens = np.concatenate([np.array(s, dtype=np.int64) for s in sequences]) if sequences else np.zeros(0, np.int64)
    small = tokens.size == 0 or tokens.max() < 2**16
    tokens = tokens.astype(np.uint16 if small else np.int32)
    np.savez_compressed(tmp, tokens=tokens, offsets=offsets, prompt_lens=np.array(prompt_lens, dtype=np.int32))
    os.replace(tmp, path)


def _encode_reply(tokenizer, conv: Conversation, limit: int) -> List[int]:
    messages = conv.messages() + [{"role": "assistant", "content": conv.reference}]
    full = tokenizer.apply_chat_template(messages, return_dict=False)
    return list(full[len(encode_messages(tokenizer, conv.messages())):][:limit])


def _fingerprint(conversations: List[Conversation]) -> str:
    digest = hashlib.sha256()
    for c in conversations:
        digest.update(json.dumps([c.messages(), c.reference]).encode())
    return digest.hexdigest()[:16]


def data_manifest(cfg: DataConfig, conversations: List[Conversation]) -> dict:
    """What manifest.json records: a data folder made with other settings or prompts is not reused."""
    return {"config": asdict(cfg), "prompts": len(conversations), "fingerprint": _fingerprint(conversations)}


def shard_seed(seed: int, shard: int) -> int:
    """The sampling seed of one shard: the same whichever rank writes it, and after a resume."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


def _record_rank(out: Path, world: World, shard: Path, sequences: List[List[int]]):
    """Add a shard to this rank's manifest (manifest-rank-RRRRR.json)."""
    path = out / f"manifest-rank-{world.rank:05d}.json"
    record = {"rank": world.rank, "ranks": world.size, "shards": {}}
    if path.exists():
        record["shards"] = read_json_object(path, "a rank manifest", "use another --data directory").get("shards", {})
    record["shards"][shard.name] = {"prompts": len(sequences), "tokens": int(sum(len(s) for s in sequences))}
    record["ranks"] = world.size
    write_file(path, json.dumps(record, indent=2))


def shard_size(cfg: DataConfig) -> int:
    return max(cfg.shard_size, cfg.batch_size)


def make_distillation_data(model, tokenizer, conversations: List[Conversation], out, cfg: DataConfig, progress=True,
                           world: Optional[World] = None) -> Path:
    """Write shards of prompt + response token sequences under `out` (resumable; split over `world`'s ranks)."""
    world = world or current_world()
    out = Path(out)
    existing = out / "manifest.json"
    if out.is_dir() and any(out.iterdir()) and not existing.exists():
        raise ValueError(f"{out} holds files mlx-redrafter did not write (no manifest.json): use a new --data folder")
    manifest = data_manifest(cfg, conversations)
    if existing.exists():
        old = read_json_object(existing, "a data manifest", "use another --data directory")
        if {k: old.get(k) for k in manifest} != manifest:
            raise ValueError(f"{out} holds data made with other settings or prompts: use another --data directory")
    world.barrier()  # every rank has checked OUT before any writes there (rank 0's half-written manifest is no stranger's file)
    out.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        write_file(existing, json.dumps(manifest, indent=2))
    sampling = SamplingConfig(temperature=cfg.temperature)
    size = shard_size(cfg)
    mine = range(world.rank, -(-len(conversations) // size), world.size)
    bar = progress_bar(total=sum(len(conversations[k * size: (k + 1) * size]) for k in mine), desc="distillation data",
                       unit="prompt", enabled=progress and world.is_main)
    for k in mine:
        shard = out / f"shard-{k:05d}.npz"
        chunk = conversations[k * size: (k + 1) * size]
        if shard.exists():
            bar.update(len(chunk))
            continue
        mx.random.seed(shard_seed(cfg.seed, k))
        prompts = [encode_messages(tokenizer, c.messages())[-cfg.max_prompt_tokens:] for c in chunk]
        if cfg.responses == "dataset":
            replies = [_encode_reply(tokenizer, c, cfg.max_new_tokens) if c.reference else [] for c in chunk]
        else:
            replies = [None] * len(prompts)
            order = np.argsort([len(p) for p in prompts])  # similar lengths batch together
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i: i + cfg.batch_size]
                outs = batch_generate(model, [prompts[j] for j in idx], cfg.max_new_tokens, sampling, set(tokenizer.eos_token_ids))
                for j, o in zip(idx, outs):
                    replies[j] = o
                bar.update(len(idx))
        sequences = [p + r for p, r in zip(prompts, replies)]
        _write_shard(shard, sequences, [len(p) for p in prompts])
        _record_rank(out, world, shard, sequences)
        if cfg.responses == "dataset":
            bar.update(len(chunk))
    bar.close()
    world.barrier()  # every rank's shards are written before any rank reads them
    return out


MAX_SHARDS = 1 << 20  # 500 M prompts at the smallest shard: past it a manifest is not ours
SHARD_NAME = re.compile(r"shard-\d{5,}\.npz")


def missing_shards(data_dir: Path) -> List[str]:
    """The shards the manifest promises that are not in `data_dir` (another machine's rank wrote them)."""
    manifest = read_json_object(data_dir / "manifest.json", "a data manifest", "use another --data directory")
    try:
        size = shard_size(DataConfig(**manifest["config"]))
        n = -(-int(manifest["prompts"]) // size) if size >= 1 else -1
    except (KeyError, TypeError, ValueError):
        n = -1
    if not 0 <= n <= MAX_SHARDS:
        raise ValueError(f"{data_dir / 'manifest.json'} is not a data manifest: use another --data directory")
    return [f"shard-{k:05d}.npz" for k in range(n) if not (data_dir / f"shard-{k:05d}.npz").exists()]


def complete_shards(data_dir) -> List[Path]:
    """The shards of a finished data directory; else one line saying what is missing."""
    data_dir = Path(data_dir)
    shards = sorted(p for p in data_dir.glob("shard-*.npz") if SHARD_NAME.fullmatch(p.name))  # not a .tmp.npz
    if not shards:
        raise FileNotFoundError(f"no distillation data in {data_dir}: run `mlx-redrafter train` with --prompts first")
    missing = missing_shards(data_dir) if (data_dir / "manifest.json").exists() else []
    if missing:
        raise FileNotFoundError(f"{data_dir} lacks {missing[0]} ({len(missing)} of the manifest's shards missing): "
                                "if other machines wrote them, copy their shards here or put --data on a shared disk; "
                                "else rerun the data generation to finish it")
    return shards


def read_sequences(data_dir) -> List[tuple]:
    """(tokens, prompt_len) for every example of a data directory."""
    shards = complete_shards(data_dir)
    examples = []
    for shard in shards:
        tokens, offsets, prompt_lens = _read_shard(shard)
        examples += [(tokens[offsets[i]: offsets[i + 1]], int(prompt_lens[i])) for i in range(len(prompt_lens))]
    return examples


def _read_shard(shard: Path):
    """(tokens, offsets, prompt_lens) of one shard, checked: a file that is not one is named, never unpickled."""
    import zipfile

    fix = "use another --data folder, or delete it to generate it again"
    try:
        with np.load(shard, allow_pickle=False) as z:
            tokens, offsets, prompt_lens = (np.asarray(z[k]) for k in ("tokens", "offsets", "prompt_lens"))
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{shard} is not a distillation shard ({type(e).__name__}): {fix}") from None
    ints = all(a.ndim == 1 and np.issubdtype(a.dtype, np.integer) for a in (tokens, offsets, prompt_lens))
    if not (ints and len(offsets) == len(prompt_lens) + 1 and len(offsets) and offsets[0] == 0
            and np.all(np.diff(offsets) >= 0) and offsets[-1] <= len(tokens) and np.all(prompt_lens >= 0)
            and (len(tokens) == 0 or tokens.min() >= 0)):
        raise ValueError(f"{shard} is not a well-formed distillation shard (its arrays disagree): {fix}")
    return tokens.astype(np.int32), offsets, prompt_lens
