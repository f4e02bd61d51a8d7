"""`mlx-redrafter chat` through a pseudo-terminal: answers stream, --verbose reports speed, Ctrl-C stops an
answer without quitting, /reset forgets, unknown commands are named, /exit and Ctrl-D quit."""

import os
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parents[1]


def spawn(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
    return pexpect.spawn(sys.executable, ["-m", "mlx_redrafter", "chat", *args], cwd=str(ROOT), env=env,
                         encoding="utf-8", timeout=300)


def test_chat_session():
    chat = spawn("--max-tokens", "3000", "--verbose")
    chat.expect_exact("Ctrl-C stops an answer]")
    chat.expect_exact(">> ")
    chat.sendline("Tell me a very long story about a dragon.")
    chat.expect_exact("dragon.\r\n")  # the terminal's echo
    chat.expect(r"\w+ \w+")  # the answer is streaming
    chat.sendintr()  # Ctrl-C: stops this answer, not the chat
    chat.expect_exact("[stopped]")
    chat.expect(r"tokens/s, [\d.]+ tokens per step; prompt \d+ tokens, 0 from the cache")
    chat.expect_exact(">> ")
    chat.sendline("/nonsense")
    chat.expect_exact("[unknown command /nonsense")
    chat.expect_exact(">> ")
    chat.sendline("Say it again, shorter.")  # the second turn continues from the first turn's cache
    chat.expect_exact("shorter.\r\n")
    chat.expect(r"\w+")
    chat.sendintr()
    chat.expect(r"prompt (\d+) tokens, (\d+) from the cache")
    prompt, cached = map(int, chat.match.groups())
    assert cached > prompt // 2
    chat.expect_exact(">> ")
    chat.sendline("/reset")
    chat.expect_exact("[conversation reset]")
    chat.expect_exact(">> ")
    time.sleep(0.5)  # readline waiting for input (a signal just before its select() waits for a key)
    chat.sendintr()  # Ctrl-C at the prompt: a new prompt
    chat.expect_exact(">> ")
    chat.sendeof()  # Ctrl-D quits
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_exit_command():
    chat = spawn("--max-tokens", "4")
    chat.expect_exact(">> ")
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


@pytest.mark.parametrize("stdin_errors", ["strict", "surrogateescape"])  # en_US.UTF-8 (macOS) / C.UTF-8 locales
def test_a_line_that_is_not_utf8_is_named_and_the_chat_goes_on(stdin_errors):
    """Bytes from a terminal or pipe in another encoding: one note, no traceback, the next line is answered."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": f"utf-8:{stdin_errors}"}
    done = subprocess.run([sys.executable, "-m", "mlx_redrafter", "chat", "-n", "2"], input=b"Hi \xff there\nHi\n/exit\n",
                          capture_output=True, cwd=ROOT, env=env, timeout=300)
    out = done.stdout.decode()
    assert done.returncode == 0 and "Traceback" not in done.stderr.decode(), done.stderr.decode()
    assert "[that line is not UTF-8 text (byte 0xff)" in out
    assert out.count(">> ") == 3 and out.split(">> ")[2].strip()  # the next line got an answer
