"""Ctrl-C is never lost: the flag stays set when the KeyboardInterrupt it raised was swallowed, and a
SIGINT the caller ignores (a background job) stays ignored."""

import os
import signal

import pytest

from mlx_redrafter.interrupts import sigint_flag


@pytest.fixture(autouse=True)
def python_sigint():
    """Python's own handler, as in a terminal (a test runner started in the background ignores SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c_now():
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):  # the handler runs between bytecodes
        pass


def test_a_swallowed_interrupt_is_raised_again_between_tokens():
    with sigint_flag(raise_now=True) as ctrl_c:
        try:
            ctrl_c_now()
        except KeyboardInterrupt:  # swallowed, as a C extension may do
            pass
        assert ctrl_c.is_set()
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_flag_only_does_not_raise():
    with sigint_flag() as stop:
        ctrl_c_now()
        assert stop.is_set()


def test_an_ignored_sigint_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with sigint_flag(raise_now=True) as ctrl_c:
        ctrl_c_now()
        ctrl_c.check()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_chat_takes_an_ignored_sigint_anyway():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with sigint_flag(keep_ignored=False) as stop:
        ctrl_c_now()
        assert stop.is_set()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
