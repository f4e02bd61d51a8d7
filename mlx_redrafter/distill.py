"""Distillation data: the base model's own responses to prompts, written in shards.

    out/manifest.json          settings, prompt count and a fingerprint of the prompts
    out/shard-00000.npz        tokens (concatenated; uint16 when the vocabulary fits), offsets (n+1,), prompt_lens (n,)

Shards are written atomically (compressed); a rerun skips the shards already
on disk, so an interrupted run resumes where it stopped, and refuses a
directory made with other settings or prompts. Files are read with
allow_pickle=False.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List

import mlx.core as mx
import numpy as np

from .data import Conversation
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
    """Generate for several prompts at once (left-padded, per-row positions and masks)."""
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
    for step in range(max_new_tokens):
        length = cache.length
        valid = (mx.arange(length + 1)[None] >= pad_mx)[:, None, None]  # (B, 1, 1, L+1)
        h = model(y[:, None], cache, mx.array(P + step - pad)[:, None], valid)
        next_y = choose_tokens(model.logits(h[:, -1]), sampling)
        mx.async_eval(next_y)
        for b, t in enumerate(y.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in eos
        if done.all():
            break
        y = next_y
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


def make_distillation_data(model, tokenizer, conversations: List[Conversation], out, cfg: DataConfig, progress=True) -> Path:
    """Write shards of prompt + response token sequences under `out` (resumable)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"config": asdict(cfg), "prompts": len(conversations), "fingerprint": _fingerprint(conversations)}
    existing = out / "manifest.json"
    if existing.exists():
        old = read_json_object(existing, "a data manifest", "use another --data directory")
        if {k: old.get(k) for k in manifest} != manifest:
            raise ValueError(f"{out} holds data made with other settings or prompts: use another --data directory")
    write_file(existing, json.dumps(manifest, indent=2))
    sampling = SamplingConfig(temperature=cfg.temperature)
    mx.random.seed(cfg.seed)
    size = max(cfg.shard_size, cfg.batch_size)
    n_shards = -(-len(conversations) // size)
    bar = progress_bar(total=len(conversations), enabled=progress, desc="distillation data", unit="prompt")
    for k in range(n_shards):
        shard = out / f"shard-{k:05d}.npz"
        chunk = conversations[k * size: (k + 1) * size]
        if shard.exists():
            bar.update(len(chunk))
            continue
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
        _write_shard(shard, [p + r for p, r in zip(prompts, replies)], [len(p) for p in prompts])
        if cfg.responses == "dataset":
            bar.update(len(chunk))
    bar.close()
    return out


def read_sequences(data_dir) -> List[tuple]:
    """(tokens, prompt_len) for every example of a data directory."""
    data_dir = Path(data_dir)
    shards = sorted(data_dir.glob("shard-*.npz"))
    if not shards:
        raise FileNotFoundError(f"no distillation data in {data_dir}: run `mlx-redrafter train` with --prompts first")
    examples = []
    for shard in shards:
        with np.load(shard, allow_pickle=False) as z:
            tokens, offsets, prompt_lens = z["tokens"], z["offsets"], z["prompt_lens"]
        tokens = tokens.astype(np.int32)
        examples += [(tokens[offsets[i]: offsets[i + 1]], int(prompt_lens[i])) for i in range(len(prompt_lens))]
    return examples
