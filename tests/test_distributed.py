"""Distillation data and training over 2 local processes on MLX's ring backend equal one process.

Each rank is started as `mlx.launch --backend ring` starts it (MLX_RANK, MLX_HOSTFILE listing
127.0.0.1 ports); the work is tests/ring_worker.py. Skipped when the ring backend cannot start here.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import ring_worker as W
from mlx_redrafter import training
from mlx_redrafter.distill import make_distillation_data, read_sequences
from mlx_redrafter.distributed import SINGLE
from mlx_redrafter.drafter import load_drafter
from conftest import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import mlx.core as mx; g = mx.distributed.init(backend='ring'); print(mx.distributed.all_sum(mx.array(1.0), group=g).item())"


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch(tmp_path, args, ranks=2, timeout=120):
    """Run `python args...` as `ranks` ring processes on localhost; the outputs of every rank."""
    hostfile = tmp_path / f"hosts-{os.urandom(3).hex()}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(ranks)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    procs = [subprocess.Popen([sys.executable, *args], env={**env, "MLX_RANK": str(r)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(ranks)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, o) for p, o in zip(procs, outputs)]


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ring")
    try:
        results = launch(tmp, ["-c", PROBE], timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("MLX's ring backend did not connect two local processes within 30 s")
    if any(code != 0 or o.strip().splitlines()[-1:] != ["2.0"] for code, o in results):
        pytest.skip(f"MLX's ring backend cannot start here: {results[0][1].strip()[-200:]}")
    return lambda *args: launch(tmp, [str(ROOT / "tests" / "ring_worker.py"), *map(str, args)])


def check(results):
    for code, output in results:
        assert code == 0, output
    return [o.strip().splitlines()[-1] for _, o in results]


def weights(path):
    return {k: np.array(v) for k, v in tree_flatten(load_drafter(path).parameters())}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same data and training in this one process."""
    tmp = tmp_path_factory.mktemp("single")
    base = W.base_model()
    make_distillation_data(base, word_tokenizer(W.VOCAB, eos=1), W.conversations(), tmp / "data", W.DATA,
                           progress=False, world=SINGLE)
    training.fit(base, read_sequences(tmp / "data"), tmp / "out", W.TRAIN, progress=False, save_dtype=mx.float32,
                   world=SINGLE)
    return tmp


@pytest.fixture(scope="module")
def two(ring, tmp_path_factory):
    """Data and training by 2 ring processes."""
    tmp = tmp_path_factory.mktemp("two")
    assert check(ring(tmp / "data", tmp / "out")) == ["rank 0 of 2 done", "rank 1 of 2 done"]
    return tmp


def same_examples(a, b):
    return len(a) == len(b) == 40 and all(np.array_equal(x, y) and p == q for (x, p), (y, q) in zip(a, b))


def test_two_ranks_write_what_one_process_writes_and_train_to_the_same_weights(single, two):
    assert same_examples(read_sequences(single / "data"), read_sequences(two / "data"))
    ranks = [json.loads((two / "data" / f"manifest-rank-0000{r}.json").read_text()) for r in (0, 1)]
    assert [sorted(m["shards"]) for m in ranks] == [[f"shard-0000{k}.npz" for k in (0, 2, 4)],
                                                     [f"shard-0000{k}.npz" for k in (1, 3)]]
    assert sum(s["prompts"] for m in ranks for s in m["shards"].values()) == 40
    assert [m["rank"] for m in ranks] == [0, 1] and {m["ranks"] for m in ranks} == {2}
    a, b = weights(single / "out" / "drafter"), weights(two / "out" / "drafter")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    assert json.loads((two / "out" / "checkpoint" / "state.json").read_text())["step"] == 10


def test_interrupted_ranks_resume_each_their_own_part(ring, two, tmp_path):
    """Data: a rank regenerates only its missing shard. Training: Ctrl-C, then resume, equals one straight run."""
    shutil.copytree(two / "data", tmp_path / "data")
    (tmp_path / "data" / "shard-00003.npz").unlink()  # rank 1's, as if it had been stopped before writing it
    stamp = (tmp_path / "data" / "shard-00002.npz").stat().st_mtime_ns
    results = ring(tmp_path / "data", tmp_path / "cut", "--interrupt-at", 7)
    assert check(results) == ["rank 0 of 2 done", "rank 1 of 2 done"]
    assert all(f"rank {r} interrupted" in out for r, (_, out) in enumerate(results))
    assert same_examples(read_sequences(two / "data"), read_sequences(tmp_path / "data"))
    assert (tmp_path / "data" / "shard-00002.npz").stat().st_mtime_ns == stamp  # kept, not rewritten
    a, b = weights(two / "out" / "drafter"), weights(tmp_path / "cut" / "drafter")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
