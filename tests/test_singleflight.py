"""Unit tests for assetd.singleflight: one call per key, shared by concurrent callers."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from assetd import errors
from assetd.singleflight import SingleFlight

WAIT = 5.0  # generous bound for anything that should happen at once


class WatchedFuture(Future[Any]):
    """A Future that counts the callers blocked in result(), so tests can wait for them."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0
        self._cond = threading.Condition()

    def result(self, timeout: float | None = None) -> Any:
        with self._cond:
            self.waiting += 1
            self._cond.notify_all()
        return super().result(timeout)

    def wait_for_waiters(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.waiting >= n, timeout=WAIT)


class Runner:
    """A submit function backed by a thread pool that hands out WatchedFutures."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(4)
        self.futures: list[WatchedFuture] = []

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        fut = WatchedFuture()
        self.futures.append(fut)

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.pool.submit(run)
        return fut


@pytest.fixture
def runner() -> Iterator[Runner]:
    """A Runner, shut down after the test."""
    r = Runner()
    yield r
    r.pool.shutdown(wait=True)


class Held:
    """A call that blocks until released and counts how often it ran."""

    def __init__(self, value: object = "value", exc: BaseException | None = None) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = 0
        self.value = value
        self.exc = exc

    def __call__(self) -> object:
        self.calls += 1
        self.started.set()
        assert self.release.wait(WAIT)
        if self.exc is not None:
            raise self.exc
        return self.value


def _spawn(n: int, target: Callable[[], None]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()


def test_concurrent_same_key_runs_once(runner: Runner) -> None:
    """N concurrent callers of one key run fn once; all but one see shared=True."""
    sf: SingleFlight[object] = SingleFlight(runner.submit)
    fn = Held("payload")
    results: list[tuple[object, bool]] = []
    lock = threading.Lock()

    def call() -> None:
        r = sf.do("key", fn, timeout=WAIT)
        with lock:
            results.append(r)

    threads = _spawn(8, call)
    assert fn.started.wait(WAIT)
    runner.futures[0].wait_for_waiters(8)
    assert 1 == sf.in_flight()
    fn.release.set()
    _join(threads)
    assert 1 == fn.calls
    assert 1 == len(runner.futures)
    assert ["payload"] * 8 == [value for value, _ in results]
    assert [False] + [True] * 7 == sorted(shared for _, shared in results)


def test_different_keys_run_separately(runner: Runner) -> None:
    """A call for another key is not shared with one already in flight."""
    sf: SingleFlight[object] = SingleFlight(runner.submit)
    held = Held("a-value")
    out: dict[str, tuple[object, bool]] = {}
    t = threading.Thread(target=lambda: out.__setitem__("a", sf.do("a", held, timeout=WAIT)))
    t.start()
    assert held.started.wait(WAIT)
    b_calls: list[int] = []

    def fn_b() -> object:
        b_calls.append(1)
        return "b-value"

    assert ("b-value", False) == sf.do("b", fn_b, timeout=WAIT)
    assert [1] == b_calls
    held.release.set()
    _join([t])
    assert ("a-value", False) == out["a"]
    assert 1 == held.calls


def test_exception_propagates_to_all_waiters(runner: Runner) -> None:
    """An exception raised by fn reaches every caller that shared the call."""
    sf: SingleFlight[object] = SingleFlight(runner.submit)
    boom = errors.Unavailable("S3 is down")
    fn = Held(exc=boom)
    caught: list[BaseException] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            sf.do("key", fn, timeout=WAIT)
        except BaseException as exc:
            with lock:
                caught.append(exc)

    threads = _spawn(5, call)
    assert fn.started.wait(WAIT)
    runner.futures[0].wait_for_waiters(5)
    fn.release.set()
    _join(threads)
    assert 1 == fn.calls
    assert 5 == len(caught)
    assert all(exc is boom for exc in caught)


def test_short_timeout_waiter_gets_timeout(runner: Runner) -> None:
    """A caller whose timeout passes gets Timeout; the call still completes for others."""
    sf: SingleFlight[object] = SingleFlight(runner.submit)
    fn = Held("done")
    out: list[tuple[object, bool]] = []
    patient = threading.Thread(target=lambda: out.append(sf.do("key", fn, timeout=WAIT)))
    patient.start()
    assert fn.started.wait(WAIT)
    start = time.monotonic()
    with pytest.raises(errors.Timeout) as info:
        sf.do("key", fn, timeout=0.05)
    assert time.monotonic() - start < WAIT
    assert "timeout" == info.value.code
    assert 1 == sf.in_flight()  # the call goes on
    fn.release.set()
    _join([patient])
    assert [("done", False)] == out
    assert 1 == fn.calls


def test_leader_timeout_does_not_cancel_call(runner: Runner) -> None:
    """Even the caller that started the call may time out; the result still lands."""
    sf: SingleFlight[object] = SingleFlight(runner.submit)
    fn = Held("late")
    with pytest.raises(errors.Timeout):
        sf.do("key", fn, timeout=0.05)
    fn.release.set()
    assert "late" == runner.futures[0].result(WAIT)
    assert 1 == fn.calls


def test_zero_timeout_on_running_call(runner: Runner) -> None:
    """timeout=0 on a call still running raises Timeout at once."""
    sf: SingleFlight[object] = SingleFlight(runner.submit)
    fn = Held()
    with pytest.raises(errors.Timeout):
        sf.do("key", fn, timeout=0)
    fn.release.set()


def _wait_idle(sf: SingleFlight[object]) -> None:
    end = time.monotonic() + WAIT
    while sf.in_flight() and time.monotonic() < end:
        time.sleep(0.001)


def test_key_forgotten_after_completion(runner: Runner) -> None:
    """Once a call is done its key is dropped, and the next call runs fn again."""
    sf: SingleFlight[object] = SingleFlight(runner.submit)
    counter = iter(range(100))
    assert (0, False) == sf.do("key", lambda: next(counter), timeout=WAIT)
    _wait_idle(sf)
    assert 0 == sf.in_flight()
    assert (1, False) == sf.do("key", lambda: next(counter), timeout=WAIT)
    _wait_idle(sf)
    assert 0 == sf.in_flight()


def test_key_forgotten_after_failure(runner: Runner) -> None:
    """A failed call is not cached: the next call for the key runs fn again."""
    sf: SingleFlight[object] = SingleFlight(runner.submit)

    def fail() -> object:
        raise errors.Unavailable("down")

    with pytest.raises(errors.Unavailable):
        sf.do("key", fail, timeout=WAIT)
    _wait_idle(sf)
    assert ("ok", False) == sf.do("key", lambda: "ok", timeout=WAIT)


def test_synchronous_submit() -> None:
    """A submit that finishes the future before returning still forgets the key."""

    def submit_now(fn: Callable[[], object]) -> Future[object]:
        fut: Future[object] = Future()
        fut.set_result(fn())
        return fut

    sf: SingleFlight[object] = SingleFlight(submit_now)
    assert ("x", False) == sf.do("key", lambda: "x", timeout=0)
    assert 0 == sf.in_flight()
    assert ("y", False) == sf.do("key", lambda: "y", timeout=0)


def test_call_after_completion_is_not_shared() -> None:
    """A call that starts after the previous call returned runs fn afresh."""
    pool = ThreadPoolExecutor(2)
    gate = threading.Event()

    class Registered(Future[object]):
        """Completes only once SingleFlight has registered its own callback."""

        def __init__(self) -> None:
            super().__init__()
            self.callbacks = 0
            self.ready = threading.Event()

        def add_done_callback(self, fn: Callable[[Future[object]], object]) -> None:
            super().add_done_callback(fn)
            self.callbacks += 1
            if self.callbacks == 2:
                self.ready.set()

    def submit(fn: Callable[[], object]) -> Future[object]:
        fut = Registered()
        # runs in the worker just before SingleFlight's own callback: a slow
        # scheduler between "result delivered" and "key forgotten"
        fut.add_done_callback(lambda _f: gate.wait(WAIT))

        def run() -> None:
            assert fut.ready.wait(WAIT)
            fut.set_result(fn())

        pool.submit(run)
        return fut

    sf: SingleFlight[object] = SingleFlight(submit)
    try:
        assert ("first", False) == sf.do("key", lambda: "first", timeout=WAIT)
        second = sf.do("key", lambda: "second", timeout=WAIT)
    finally:
        gate.set()
        pool.shutdown(wait=True)
    assert ("second", False) == second
