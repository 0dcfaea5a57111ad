"""The bridge: one event loop thread, many synchronous callers, deadlines, clean shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dagster_taskiq_sync.errors import BridgeStoppedError
from dagster_taskiq_sync.wire.bridge import Bridge, shared_bridge

pytestmark = pytest.mark.compat  # the tier bin/matrix runs on every env


async def echo_after(value, delay):
    await asyncio.sleep(delay)
    return value, threading.get_ident()


def test_many_threads_share_one_loop_and_get_their_own_results():
    with Bridge() as bridge:

        def caller(i):
            return [bridge.call(echo_after, (i, n), 0.001, timeout=10) for n in range(20)]

        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(caller, range(64)))

    for i, calls in enumerate(results):
        assert [value for value, _ in calls] == [(i, n) for n in range(20)]
    loop_threads = {tid for calls in results for _, tid in calls}
    assert len(loop_threads) == 1  # every call ran on the one event-loop thread
    assert loop_threads != {threading.get_ident()}


def test_calls_overlap_on_the_loop_rather_than_queueing():
    with Bridge() as bridge:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=20) as pool:
            list(pool.map(lambda i: bridge.call(echo_after, i, 0.3, timeout=10), range(20)))
        elapsed = time.monotonic() - started
    assert elapsed < 20 * 0.3 / 2  # twenty 0.3 s sleeps ran concurrently, not one after another


def test_a_call_past_its_deadline_raises_and_is_cancelled_on_the_loop():
    cancelled = threading.Event()

    async def slow():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with Bridge() as bridge:
        with pytest.raises(TimeoutError, match="did not finish within 0.2 s"):
            bridge.call(slow, timeout=0.2)
        assert cancelled.wait(5)


def test_stop_with_calls_in_flight_releases_every_caller():
    bridge = Bridge().start()
    errors: list[BaseException] = []

    def caller():
        try:
            bridge.call(asyncio.sleep, 60, timeout=120)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(10)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # let every call reach the loop
    started = time.monotonic()
    bridge.stop()
    for thread in threads:
        thread.join(5)
    assert time.monotonic() - started < 5
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 10 and all(isinstance(e, BridgeStoppedError) for e in errors)


def test_a_stopped_bridge_refuses_calls_with_a_clear_error():
    bridge = Bridge().start()
    bridge.stop()
    with pytest.raises(BridgeStoppedError, match="stopped"):
        bridge.call(echo_after, 1, 0, timeout=1)
    bridge.stop()  # idempotent


def test_shared_bridge_is_one_per_process_and_stops_with_its_last_user():
    with shared_bridge() as first:
        with shared_bridge() as second:
            assert first is second
        assert first.running  # the outer user still holds it
    assert not first.running
    with shared_bridge() as third:
        assert third is not first and third.running


def test_every_brokers_session_reads_the_aws_service_models_once_per_process():
    # A fresh botocore session parses the SQS and S3 models and endpoint rules again (most of a
    # run's start-up, paid by every run of a long-lived process); only the loader is shared.
    from aiobotocore.session import get_session

    from dagster_taskiq_sync.wire.aws import share_service_models

    first, second = share_service_models(get_session()), share_service_models(get_session())
    assert first.get_component("data_loader") is second.get_component("data_loader")
    assert first.get_component("credential_provider") is not second.get_component("credential_provider")


def test_a_lazy_client_is_opened_by_its_first_call_and_only_once():
    # A run's S3 client (only a payload larger than its queue needs it) is not opened at start-up.
    import asyncio

    from dagster_taskiq_sync.wire.aws import LazyClient

    class Creator:
        entered = 0

        async def __aenter__(self):
            Creator.entered += 1
            await asyncio.sleep(0)

            class Client:
                async def put_object(self, **kwargs):
                    return kwargs["Key"]

            return Client()

    creator, made = Creator(), []
    lazy = LazyClient(lambda: made.append(1) or creator)
    # Not even made until used: a client creator made and never entered warns "never awaited".
    assert not made and Creator.entered == 0 and lazy.opened is None

    async def calls():
        return await asyncio.gather(*(lazy.put_object(Bucket="b", Key=str(i)) for i in range(3)))

    assert asyncio.run(calls()) == ["0", "1", "2"]
    assert made == [1] and Creator.entered == 1 and lazy.opened is creator
