"""Load on `mlx-redrafter serve`: requests/s, time to first token (p50, p95) and tokens/s under C concurrent clients.

Starts the server itself on a free localhost port (or uses --url, which must be a local address),
warms it with two requests, sends --requests streamed chat requests (MT-Bench questions, greedy,
--max-tokens each) from --concurrency client threads, stops launching new ones after --time-limit
seconds, then stops the server. Nothing leaves this machine.

    python benchmarks/serve_load.py [--model M] [--drafter D] [--requests 32] [--concurrency 4] [--max-tokens 64] [--out results/serve-load-cpu.json]
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ("127.0.0.1", "localhost", "::1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlx_redrafter", "serve", "--port", str(port), "--log-level", "warning",
           "--queue-size", str(max(args.concurrency, 1)), "--max-batch", str(args.max_batch)]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--drafter", args.drafter] if args.drafter else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the server exited ({proc.returncode})")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("error: the server did not start within 600 s")


def one_request(host, port, question: str, max_tokens: int) -> dict:
    """Stream one chat answer: seconds to the first token and to the end, completion tokens."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        return {"status": response.status}
    first, tokens, stats = None, 0, {}
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        stats = chunk.get("speculative", stats)
    conn.close()
    return {"status": 200, "ttft": first, "total": time.perf_counter() - start, "tokens": tokens,
            "tokens_per_step": stats.get("tokens_per_step")}


def run_load(host, port, questions, args):
    results, lock, next_index = [], threading.Lock(), [0]
    stop_at = time.perf_counter() + args.time_limit

    def client():
        while time.perf_counter() < stop_at:
            with lock:
                i = next_index[0]
                if i >= args.requests:
                    return
                next_index[0] += 1
            r = one_request(host, port, questions[i % len(questions)], args.max_tokens)
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model")
    p.add_argument("--drafter")
    p.add_argument("--url", help="a server already running on this machine (default: start one)")
    p.add_argument("--prompts", help="questions to send (default: MT-Bench)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=4, help="the server's --max-batch (1: one request at a time)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=480, help="seconds after which no new request starts")
    p.add_argument("--out", help="JSON file (default results/serve-load-<cpu|gpu>.json)")
    p.add_argument("--force", action="store_true", help="replace --out")
    args = p.parse_args()

    import mlx_redrafter  # noqa: F401  (fast BLAS before mlx)
    from mlx_redrafter import backend
    from mlx_redrafter.data import prompt_texts
    from mlx_redrafter.outputs import check_new_files, write_file

    out = args.out or f"results/serve-load-{'gpu' if backend.on_gpu() else 'cpu'}.json"
    check_new_files([out], args.force)
    questions = prompt_texts(args.prompts)
    proc = None
    if args.url:
        url = urlparse(args.url)
        if url.hostname not in LOCAL:
            sys.exit(f"error: --url must be on this machine ({', '.join(LOCAL)}), got {url.hostname}")
        host, port = url.hostname, url.port or 80
    else:
        host, port = "127.0.0.1", free_port()
        proc = start_server(args, port)
    try:
        for q in questions[-2:]:  # warm-up: compiles, first prompt-cache entries
            one_request(host, port, q, args.max_tokens)
        results, wall = run_load(host, port, questions, args)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    ok = [r for r in results if r["status"] == 200 and r["ttft"] is not None]
    if not ok:
        sys.exit(f"error: no request succeeded (statuses {sorted({r['status'] for r in results})})")
    ttfts = [r["ttft"] for r in ok]
    summary = {
        "machine": backend.machine(), "model": args.model or "default", "requests": len(results), "ok": len(ok),
        "concurrency": args.concurrency, "max_batch": args.max_batch, "max_tokens": args.max_tokens, "wall_s": wall,
        "requests_per_s": len(ok) / wall, "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95),
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "tokens_per_step": statistics.mean(r["tokens_per_step"] for r in ok if r["tokens_per_step"]) if ok else None,
        "statuses": sorted({r["status"] for r in results}),
    }
    print(f"{summary['ok']}/{summary['requests']} requests in {wall:.1f} s at concurrency {args.concurrency}: "
          f"{summary['requests_per_s']:.2f} requests/s, {summary['tokens_per_s']:.1f} tokens/s, time to first token "
          f"p50 {summary['ttft_p50_s'] * 1e3:.0f} ms, p95 {summary['ttft_p95_s'] * 1e3:.0f} ms "
          f"({summary['machine']})")
    write_file(out, json.dumps({**summary, "results": results}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
