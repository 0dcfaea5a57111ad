"""Jobs the tests run through taskiq_executor (loaded by workers from this file)."""

import hashlib
import os
import pickle
import subprocess
import time
from pathlib import Path

from dagster import (
    Config,
    ConfigurableIOManager,
    DagsterExecutionInterruptedError,
    Definitions,
    DynamicOut,
    DynamicOutput,
    RetryPolicy,
    in_process_executor,
    job,
    mem_io_manager,
    op,
    resource,
)

from dagster_taskiq_sync import taskiq_executor


@op
def exit_code_of_a_subprocess() -> int:
    """What a step sees of a subprocess exiting 3 (0 if a host's ignored SIGCHLD reached the step)."""
    return subprocess.run(["sh", "-c", "exit 3"], check=False).returncode


@job(executor_def=taskiq_executor)
def runs_a_subprocess():
    exit_code_of_a_subprocess()


@op
def emit_one() -> int:
    return 1


@op
def add_one(x: int) -> int:
    return x + 1


@op
def times_ten(x: int) -> int:
    return x * 10


@op
def combine(a: int, b: int) -> dict:
    return {"a": a, "b": b, "pid": os.getpid()}


@job(executor_def=taskiq_executor)
def diamond():
    one = emit_one()
    combine(add_one(one), times_ten(one))


def _slow_square(i: int):
    @op(name=f"square_{i}")
    def square(n: int) -> int:
        time.sleep(0.4)  # long enough that one worker (2 threads) cannot take all six
        return (n + i) ** 2

    return square


SQUARES = [_slow_square(i) for i in range(6)]


@op
def total(a: int, b: int, c: int, d: int, e: int, f: int) -> int:
    return a + b + c + d + e + f


@job(executor_def=taskiq_executor)
def fan_out_fan_in():
    n = emit_one()
    total(*[square(n) for square in SQUARES])


class ExplodeConfig(Config):
    message: str = "boom"


@op
def explode(config: ExplodeConfig, x: int) -> int:
    raise ValueError(config.message)


@op
def after_explode(x: int) -> int:
    return x


@job(executor_def=taskiq_executor)
def failing():
    after_explode(explode(emit_one()))


class CounterConfig(Config):
    counter_file: str


@op(retry_policy=RetryPolicy(max_retries=2))
def flaky(config: CounterConfig) -> int:
    path = Path(config.counter_file)
    runs = int(path.read_text()) if path.exists() else 0
    path.write_text(str(runs + 1))
    if runs == 0:
        raise RuntimeError("first attempt fails on purpose")
    return runs + 1


@op
def after_flaky(x: int) -> int:
    return x * 100


@job(executor_def=taskiq_executor)
def retries():
    after_flaky(flaky())


@op(retry_policy=RetryPolicy(max_retries=2, delay=1.5))
def fails_every_attempt(x: int) -> int:
    raise RuntimeError(f"fails on purpose, every attempt ({x})")


@job(executor_def=taskiq_executor)
def failing_retried():
    """Two steps that succeed, then one that fails three times, 1.5 s apart (tests/e2e/test_monitoring.py)."""
    fails_every_attempt(add_one(emit_one()))


@job(executor_def=taskiq_executor, resource_defs={"io_manager": mem_io_manager})
def in_memory_outputs():
    add_one(emit_one())


@op(tags={"dagster-celery/queue": "legacy"})
def on_legacy_queue() -> int:
    return os.getpid()


@job(executor_def=taskiq_executor)
def routed():
    on_legacy_queue()


# Sized pools (execution.config.routes): the size tags of dagster-aws's ECS executor and dagster-k8s.
@op(tags={"ecs/memory": "16384"})
def big_by_ecs_tag() -> int:
    return os.getpid()


@op(tags={"dagster-k8s/config": {"container_config": {"resources": {"limits": {"cpu": "4", "memory": "16Gi"}}}}})
def big_by_k8s_tag() -> int:
    return os.getpid()


@op(tags={"ecs/memory": "16384", "dagster-celery/queue": "dagster"})
def big_but_pinned() -> int:
    return os.getpid()


@op(tags={"ecs/memory": "512"})
def small_by_ecs_tag() -> int:
    return os.getpid()


@op(tags={"ecs/memory": "262144"})
def larger_than_every_pool() -> int:
    return os.getpid()


@job(executor_def=taskiq_executor)
def sized():
    big_by_ecs_tag()
    big_by_k8s_tag()
    big_but_pinned()
    small_by_ecs_tag()
    add_one(emit_one())
    larger_than_every_pool()


def _slow_on_drain(i: int):
    @op(name=f"slow_{i}", tags={"dagster-celery/queue": "drain"})
    def slow() -> int:
        time.sleep(2)
        return i

    return slow


@job(executor_def=taskiq_executor)
def two_slow_steps():
    for make in (_slow_on_drain(0), _slow_on_drain(1)):
        make()


# --- jobs for fault injection: every start and end of user code is appended to a file ---


class FaultConfig(Config):
    marker_dir: str
    sleep: float = 30.0


def _counted(name: str, retry_policy=None, queue: str | None = "faults"):
    @op(name=name, tags={"dagster-celery/queue": queue} if queue else {}, retry_policy=retry_policy)
    def counted(config: FaultConfig) -> int:
        marker = Path(config.marker_dir) / f"{name}.log"
        with marker.open("a") as fh:
            fh.write(f"start {os.getpid()}\n")
        runs = marker.read_text().count("start")
        if retry_policy is None or runs == 1:  # a retried op is slow only on its first attempt
            time.sleep(config.sleep)
        with marker.open("a") as fh:
            fh.write("end\n")
        return runs

    return counted


@op(tags={"dagster-celery/queue": "faults"})
def after_long(x: int) -> int:
    return x


@job(executor_def=taskiq_executor)
def one_long():
    after_long(_counted("long_step")())


@job(executor_def=taskiq_executor)
def one_long_retried():
    _counted("retried_step", RetryPolicy(max_retries=1))()


@job(executor_def=taskiq_executor)
def two_long():
    _counted("long_a")()
    _counted("long_b")()


@job(executor_def=taskiq_executor)
def two_sleepers():
    """Two parallel counted steps on the run's default queue."""
    _counted("sleeper_a", queue=None)()
    _counted("sleeper_b", queue=None)()


COUNTED_LEAVES = [_counted(f"counted_{i}", queue=None) for i in range(10)]


@job(executor_def=taskiq_executor)
def counted_fanout():
    """Ten parallel counted steps on the run's default queue (database outage tests)."""
    for leaf in COUNTED_LEAVES:
        leaf()


@op(tags={"dagster-celery/queue": "lonely"})
def nobody_serves_this() -> int:
    return 1


@job(executor_def=taskiq_executor)
def unserved():
    nobody_serves_this()


def _chatty(name: str):
    @op(name=name, tags={"dagster-celery/queue": "faults"})
    def chatty(context) -> None:
        import sys
        import tempfile

        # both steps wait (at most 30 s) until both have started, so they overlap on the worker
        # whatever the machine's load; a lone step gives up and the test's overlap check fails
        barrier = Path(tempfile.gettempdir()) / f"chatty-{context.run_id}"
        barrier.mkdir(exist_ok=True)
        (barrier / name).touch()
        deadline = time.monotonic() + 30
        while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        for i in range(40):
            print(f"{name} stdout {i}", flush=True)
            print(f"{name} stderr {i}", file=sys.stderr, flush=True)
            time.sleep(0.01)  # the two steps interleave their writes

    return chatty


@job(executor_def=taskiq_executor)
def two_chatty():
    _chatty("chatty_a")()
    _chatty("chatty_b")()


# --- jobs launched whole by TaskiqRunLauncher (in-process unless they say otherwise) ---


@op
def say_hello() -> str:
    return f"hello from pid {os.getpid()}"


@job(executor_def=in_process_executor)
def launched_ok():
    say_hello()


@op
def raise_in_run() -> None:
    raise ValueError("run went wrong 7")


@job(executor_def=in_process_executor)
def launched_raises():
    raise_in_run()


@op
def exit_hard() -> None:
    os._exit(3)


@job(executor_def=in_process_executor)
def launched_exits_hard():
    exit_hard()


@op
def run_long(config: FaultConfig) -> int:
    marker = Path(config.marker_dir) / "run_long.log"
    with marker.open("a") as fh:
        fh.write(f"start {os.getpid()}\n")
    time.sleep(config.sleep)
    with marker.open("a") as fh:
        fh.write("end\n")
    return 1


@job(executor_def=in_process_executor)
def launched_long():
    run_long()


@op
def run_cleans_up(config: FaultConfig) -> None:
    """Sleeps until interrupted (a launched run's soft time limit), then cleans up."""
    marker = Path(config.marker_dir) / "run_cleans_up.log"
    marker.write_text(f"start {os.getpid()}\n")
    try:
        time.sleep(config.sleep)
    except DagsterExecutionInterruptedError:
        with marker.open("a") as fh:
            fh.write("cleaned up\n")
        raise


@job(executor_def=in_process_executor)
def launched_cleans_up():
    run_cleans_up()


@op
def run_ignores_interrupts(config: FaultConfig) -> None:
    """Swallows every interrupt and sleeps on: only a kill ends it."""
    marker = Path(config.marker_dir) / "run_ignores_interrupts.log"
    marker.write_text(f"start {os.getpid()}\n")
    deadline = time.monotonic() + config.sleep
    while time.monotonic() < deadline:
        try:
            time.sleep(max(0.0, deadline - time.monotonic()))
        except DagsterExecutionInterruptedError:
            with marker.open("a") as fh:
                fh.write("ignored\n")


@job(executor_def=in_process_executor)
def launched_ignores_interrupts():
    run_ignores_interrupts()


def _marked(name: str):
    @op(name=name)
    def marked(config: FaultConfig, x: int = 0) -> int:
        marker = Path(config.marker_dir) / f"{name}.log"
        with marker.open("a") as fh:
            fh.write(f"start {os.getpid()}\n")
        time.sleep(config.sleep)
        with marker.open("a") as fh:
            fh.write("end\n")
        return x + 1

    return marked


@job(executor_def=taskiq_executor)
def resumable():
    _marked("second_part")(_marked("first_part")())


# --- a job whose step messages outgrow a queue: the collecting step's known state carries every
# mapping key of the wide dynamic output ---


class WideConfig(Config):
    count: int
    key_length: int = 10_000


class HashedFilesIOManager(ConfigurableIOManager):
    """Pickles outputs to files named by a hash of their identifier, so mapping keys can be
    longer than a file name may be (fs_io_manager names files after them)."""

    base_dir: str

    def _path(self, context) -> Path:
        ident = "/".join(context.get_identifier())
        return Path(self.base_dir) / hashlib.sha1(ident.encode()).hexdigest()

    def handle_output(self, context, obj) -> None:
        self._path(context).write_bytes(pickle.dumps(obj))

    def load_input(self, context):
        return pickle.loads(self._path(context.upstream_output).read_bytes())


@op(out=DynamicOut(int))  # routed by the run's task_default_queue
def emit_wide(config: WideConfig):
    for i in range(config.count):
        yield DynamicOutput(i, mapping_key=f"k{i:06d}_".ljust(config.key_length, "x"))


@op
def sum_wide(values: list[int]) -> int:
    return sum(values)


@job(executor_def=taskiq_executor, resource_defs={"io_manager": HashedFilesIOManager.configure_at_launch()})
def wide():
    sum_wide(emit_wide().collect())


# --- fairness between queues: steps routed to named queues ---


def _on_queue(name: str, queue: str | None):
    @op(name=name, tags={"dagster-celery/queue": queue} if queue else {})
    def step(x: int = 0) -> int:
        return x + 1

    return step


@job(executor_def=taskiq_executor)
def across_two_queues():
    """The starvation repro: the middle op goes to fair_b, the others to the run's default queue."""
    _on_queue("last_on_a", None)(_on_queue("middle_on_b", "fair_b")(_on_queue("first_on_a", None)()))


BACKLOG_OPS = {
    queue: [_on_queue(f"{queue}_step_{i}", queue) for i in range(4)] for queue in ("fair_q1", "fair_q2", "fair_q3")
}


@job(executor_def=taskiq_executor)
def backlog_q1():
    for step in BACKLOG_OPS["fair_q1"]:
        step()


@job(executor_def=taskiq_executor)
def backlog_q2():
    for step in BACKLOG_OPS["fair_q2"]:
        step()


@job(executor_def=taskiq_executor)
def backlog_q3():
    for step in BACKLOG_OPS["fair_q3"]:
        step()


@job(executor_def=taskiq_executor)
def fan_100():
    """100 independent trivial steps (bounded-state test: liveness rows per step attempt)."""
    for i in range(100):
        _on_queue(f"leaf_{i}", None)()


# --- a step the test holds open: the dashboard shows it running until the test releases it ---


class GateConfig(Config):
    gate_dir: str


@op
def waits_for_release(config: GateConfig) -> None:
    gate = Path(config.gate_dir)
    (gate / "started").touch()
    deadline = time.monotonic() + 120  # a test that dies before releasing it does not leave it forever
    while not (gate / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@job(executor_def=taskiq_executor)
def gated():
    waits_for_release()


# --- a step whose process still works after its outcome: it ends after its run ---


@resource(config_schema={"marker": str, "after_run_seconds": float})
def waits_for_its_run_at_teardown(init_context):
    """Torn down after its step's outcome is in the event log, as the end of a step's compute-log
    capture is (where a remote compute log manager uploads): it waits for the run to end (at most
    30 s), goes on for ``after_run_seconds`` (an upload that takes that long), then writes the
    run's status to ``marker``."""
    yield None
    instance, run_id = init_context.instance, init_context.run_id
    deadline = time.monotonic() + 30
    run = instance.get_run_by_id(run_id)
    while not run.is_finished and time.monotonic() < deadline:
        time.sleep(0.05)
        run = instance.get_run_by_id(run_id)
    time.sleep(init_context.resource_config["after_run_seconds"])
    Path(init_context.resource_config["marker"]).write_text(run.status.value)


@op(required_resource_keys={"settles"})
def settles_after_its_run() -> int:
    return 1


@job(executor_def=taskiq_executor, resource_defs={"settles": waits_for_its_run_at_teardown})
def settles_late():
    settles_after_its_run()


defs = Definitions(
    jobs=[
        diamond,
        fan_out_fan_in,
        failing,
        failing_retried,
        retries,
        in_memory_outputs,
        routed,
        two_slow_steps,
        one_long,
        one_long_retried,
        two_long,
        wide,
        two_chatty,
        unserved,
        launched_ok,
        launched_raises,
        launched_exits_hard,
        launched_long,
        launched_cleans_up,
        launched_ignores_interrupts,
        resumable,
        across_two_queues,
        backlog_q1,
        backlog_q2,
        backlog_q3,
        fan_100,
        two_sleepers,
        counted_fanout,
        gated,
        settles_late,
    ]
)
