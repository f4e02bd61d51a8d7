"""`mlx-redrafter serve` as a client sees it: the real server in a subprocess on a free localhost port,
the official `openai` client for answers, raw HTTP for errors, disconnects and a full queue."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from mlx_redrafter import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 12  # max_tokens of the compared answers
QUEUE = 8
BATCH = 3  # --max-batch
RIVERS = [{"role": "user", "content": "Name three rivers."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def post(port, path, body, raw=False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, body if raw else json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_redrafter", "serve", "--port", str(port), "--max-tokens", "16",
                             "--queue-size", str(QUEUE), "--max-batch", str(BATCH), "--log-level", "warning"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if get(port, "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"the server did not start: {proc.stdout.read()}")
    yield port, proc
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def served_id(server):
    return get(server[0], "/v1/models")[1]["data"][0]["id"]


def test_says_where_it_listens(server):
    port, proc = server
    assert get(port, "/health")[1]["status"] == "ok"
    # the first line, printed before the socket opens
    line = proc.stdout.readline()
    assert f"http://127.0.0.1:{port}/v1" in line and "this machine only" in line


def test_chat_greedy_equals_generate_streamed_or_not(client, served_id, default_model):
    model, tok, _ = default_model
    reference = generate(model, tok, RIVERS, max_tokens=N)
    whole = client.chat.completions.create(model=served_id, messages=RIVERS, max_tokens=N, temperature=0)
    assert whole.choices[0].message.content == reference
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == N
    assert whole.model_extra["speculative"]["decoder"] == "redrafter"
    assert whole.model_extra["speculative"]["tokens_per_step"] > 1
    chunks = list(client.chat.completions.create(model=served_id, messages=RIVERS, max_completion_tokens=N,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1  # same prompt again
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_greedy_equals_generate(client, served_id, default_model):
    model, tok, _ = default_model
    prompt = "The three largest rivers in Europe are"
    reference = generate(model, tok, prompt, max_tokens=N, chat_template=False)
    whole = client.completions.create(model=served_id, prompt=prompt, max_tokens=N)
    assert whole.choices[0].text == reference and whole.object == "text_completion"
    streamed = client.completions.create(model=served_id, prompt=prompt, max_tokens=N, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reference


def test_a_second_turn_reuses_the_first_and_answers_the_same(client, served_id, default_model):
    model, tok, _ = default_model
    first = client.chat.completions.create(model=served_id, messages=RIVERS, max_tokens=N).choices[0].message.content
    chat = RIVERS + [{"role": "assistant", "content": first}, {"role": "user", "content": "And three lakes?"}]
    second = client.chat.completions.create(model=served_id, messages=chat, max_tokens=N)
    assert second.choices[0].message.content == generate(model, tok, chat, max_tokens=N)
    assert second.usage.prompt_tokens_details.cached_tokens > second.usage.prompt_tokens // 2


def test_stop_strings_end_the_answer_without_any_part_of_them(client, served_id, default_model):
    model, tok, _ = default_model
    reference = generate(model, tok, RIVERS, max_tokens=N)
    cut = len(reference) // 2
    stop = reference[cut : cut + 4]  # likely spans a token boundary; never sent, not even in part
    expected = reference[: reference.index(stop)]
    whole = client.chat.completions.create(model=served_id, messages=RIVERS, max_tokens=N, stop=[stop, "@@@"])
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=served_id, messages=RIVERS, max_tokens=N, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_unknown_model_is_404_model_not_found(client, served_id, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=RIVERS, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    file_name = served_id + ".gguf" if not served_id.endswith(".gguf") else served_id
    assert post(server[0], "/v1/completions", {"model": file_name, "prompt": "Hi", "max_tokens": 1})[0] == 200


BAD = [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
     "messages[0].content"),
    ({"messages": RIVERS, "max_tokens": -1}, "max_tokens"),
    ({"messages": RIVERS, "max_tokens": 10**12}, "max_tokens"),
    ({"messages": RIVERS, "max_tokens": "5"}, "max_tokens"),
    ({"messages": RIVERS, "temperature": -0.5}, "temperature"),
    ({"messages": RIVERS, "temperature": "hot"}, "temperature"),
    ({"messages": RIVERS, "top_p": 0}, "top_p"),
    ({"messages": RIVERS, "top_p": 1.5}, "top_p"),
    ({"messages": RIVERS, "top_k": -1}, "top_k"),
    ({"messages": RIVERS, "seed": -3}, "seed"),
    ({"messages": RIVERS, "stop": ""}, "stop"),
    ({"messages": RIVERS, "stop": [1]}, "stop"),
    ({"messages": RIVERS, "stream": "yes"}, "stream"),
    ({"messages": RIVERS, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": RIVERS, "n": 2}, "n"),
    ({"messages": RIVERS, "logprobs": True}, "logprobs"),
    ({"messages": RIVERS, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": RIVERS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": RIVERS, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a lone \ud800 half"}]}, "messages[0].content"),
    ({"messages": RIVERS, "max_completion_tokens": 3, "max_tokens": -1}, "max_tokens"),
    (b"[" * 100_000 + b"]" * 100_000, None),  # nests past Python's recursion limit
]


@pytest.mark.parametrize("body, param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_openai_errors(server, body, param):
    status, reply = post(server[0], "/v1/chat/completions", body, raw=isinstance(body, bytes))
    assert status == 400, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["param"] == param
    assert reply["error"]["type"] == "invalid_request_error" and "\n" not in reply["error"]["message"]


def test_bad_completions_paths_and_methods(server):
    port = server[0]
    for body in ({"prompt": ""}, {"prompt": ["a", "b"]}, {"prompt": [10**9]}, {"prompt": "/etc/passwd", "echo": True}):
        assert post(port, "/v1/completions", body)[0] == 400
    status, reply = post(port, "/v1/nothing", {})
    assert status == 404 and "no such endpoint" in reply["error"]["message"]
    status, reply = get(port, "/v1/chat/completions")
    assert status == 405 and reply["error"]["type"] == "invalid_request_error"
    assert get(port, "/health")[1]["status"] == "ok"  # still serving


def send(port, method, path, body: bytes, content_type):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, body, {"Content-Type": content_type} if content_type else {})
    r = conn.getresponse()
    return r.status, r.getheader("Allow"), json.loads(r.read())


def test_bad_bytes_headers_and_text_get_json_errors(server):
    port = server[0]
    ok = json.dumps({"messages": RIVERS, "max_tokens": 1}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):  # what a web page may send unasked
        status, _, reply = send(port, "POST", "/v1/chat/completions", ok, kind)
        assert status == 415 and "application/json" in reply["error"]["message"]
    assert send(port, "POST", "/v1/chat/completions", ok, "application/json; charset=utf-8")[0] == 200
    status, allow, reply = send(port, "GET", "/v1/completions", b"", None)
    assert (status, allow) == (405, "POST") and reply["error"]["type"] == "invalid_request_error"
    status, _, reply = send(port, "POST", "/v1/completions", b'{"prompt": "\\udfff", "max_tokens": 2}',
                            "application/json")
    assert status == 400 and reply["error"]["param"] == "prompt" and "surrogate" in reply["error"]["message"]
    # an error quoting the request's lone surrogate is still sent (escaped)
    status, _, reply = send(port, "POST", "/v1/completions", b'{"prompt": "Hi", "model": "\\ud800"}',
                            "application/json")
    assert status == 404 and reply["error"]["code"] == "model_not_found" and "\ud800" in reply["error"]["message"]
    assert get(port, "/health")[1]["status"] == "ok"


def test_a_huge_prompt_is_refused_from_a_prefix(server, default_model):
    """A 15 MB prompt (2.5 M tokens) is refused without tokenizing it all (~50 s on this CPU)."""
    from mlx_redrafter.generate import surely_over

    tokenizer = default_model[1]
    assert surely_over(tokenizer, "hello " * 20_000, 8192)  # 20 001 tokens
    assert not surely_over(tokenizer, "hello " * 3_000, 8192)  # 3 001 tokens
    assert not surely_over(tokenizer, " " * 200_000, 8192)  # 3 125 tokens: 64 characters each
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 2_500_000}]}),
                       ("/v1/completions", {"prompt": ["hello " * 2_500_000]})):
        status, reply = post(server[0], path, {**body, "max_tokens": 2})
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
        assert "over 8192 tokens" in reply["error"]["message"]


def test_eight_concurrent_clients_get_their_own_answers(client, served_id, server):
    """Answered one at a time or together (rows of speculative batches), each gets its own answer."""
    questions = [f"What is {a} plus {b}?" for a, b in zip(range(1, 9), range(11, 19))]
    ask = lambda q, stream: _answer(client, served_id, q, stream)  # noqa: E731
    alone = [ask(q, False) for q in questions]
    batched = get(server[0], "/health")[1]["batched"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions, [i % 2 == 0 for i in range(8)]))
    assert together == alone and len(set(alone)) > 1
    assert get(server[0], "/health")[1]["batched"] >= batched + 2  # some of them shared a batch


def _answer(client, served_id, question, stream):
    messages = [{"role": "user", "content": question}]
    if not stream:
        return client.chat.completions.create(model=served_id, messages=messages, max_tokens=6).choices[0].message.content
    chunks = client.chat.completions.create(model=served_id, messages=messages, max_tokens=6, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks)


def open_stream(port, max_tokens=4000):
    """A streaming request left open: (connection, response) once its first event has arrived."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": max_tokens,
            "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    return conn, response


def hang_up(conn, response):
    response.close()
    conn.sock and conn.sock.close()
    conn.close()


def wait_idle(port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = get(port, "/health")[1]
        if status["active"] == 0 and status["queued"] == 0:
            return status
        time.sleep(0.2)
    pytest.fail(f"still busy after {timeout} s: {status}")


def test_a_full_queue_answers_503_and_disconnects_free_every_slot(server):
    port = server[0]
    wait_idle(port)
    held = [open_stream(port) for _ in range(QUEUE + BATCH)]  # up to BATCH decoding, the rest waiting
    status, reply = post(port, "/v1/chat/completions", {"messages": RIVERS, "max_tokens": 1})
    assert status == 503 and reply["error"]["code"] == "server_busy"
    started = time.time()
    for conn, response in held:
        hang_up(conn, response)
    wait_idle(port)
    assert time.time() - started < 30  # 11 x 4000 tokens would take far longer: they were stopped
    assert post(port, "/v1/chat/completions", {"messages": RIVERS, "max_tokens": 2})[0] == 200


def test_a_client_leaving_mid_answer_frees_the_slot(server):
    port = server[0]
    wait_idle(port)
    conn, response = open_stream(port)
    for _ in range(3):  # a few tokens in
        response.readline()
    before = get(port, "/health")[1]
    hang_up(conn, response)
    status = wait_idle(port)
    assert status["served"] == before["served"] + 1 and status["cancelled"] == before["cancelled"] + 1
    # a non-streamed request whose client leaves is stopped too
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"messages": RIVERS, "max_tokens": 4000}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(1)
    sock.close()
    status = wait_idle(port)
    assert status["served"] == before["served"] + 2 and status["cancelled"] == before["cancelled"] + 2


def test_a_short_answer_in_a_batch_ends_without_waiting_for_the_long_one(server):
    port = server[0]
    wait_idle(port)
    blocker = open_stream(port, max_tokens=40)  # decoded alone: the next two queue behind it, then share a batch
    long = open_stream(port)
    before = get(port, "/health")[1]
    status, reply = post(port, "/v1/chat/completions", {"messages": RIVERS, "max_tokens": 3})
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
    now = get(port, "/health")[1]
    assert now["active"] >= 1 and now["batched"] >= before["batched"] + 2  # the long row is still decoding
    hang_up(*long)
    hang_up(*blocker)
    wait_idle(port)


def test_a_port_in_use_is_one_error_line_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "mlx_redrafter", "serve", "--port", str(port)], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in r.stderr


def test_a_request_cancelled_while_queued_still_gets_its_done():
    """The worker answers a job its client left while it waited (a non-streamed handler waits for it)."""
    from types import SimpleNamespace

    from mlx_redrafter.serving import Job, Worker, _done

    class Slow(Worker):
        def _generate(self, job):
            time.sleep(0.3)
            return _done(job.request, "length", None, 0)

    from mlx_redrafter.sampling import SamplingConfig

    worker = Slow(None, None)
    request = SimpleNamespace(ids=[1, 2, 3], sampling=SamplingConfig(seed=1))
    first, second = [], []
    assert worker.submit(Job(request, first.append))
    queued = Job(request, second.append)
    assert worker.submit(queued)
    queued.cancel()
    deadline = time.time() + 10
    while worker.status()["served"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert [e.finish_reason for e in first] == ["length"] and [e.finish_reason for e in second] == ["cancelled"]
    assert worker.status()["cancelled"] == 1
