"""dagster-celery's own test jobs (dagster_celery_tests/repo.py), ported to ops and jobs and run
through taskiq_executor: same shapes, same names, same expected event counts."""

import time

from dagster import Definitions, In, Out, Output, RetryRequested, graph, job, op

from dagster_taskiq_sync import taskiq_executor


@op
def simple() -> int:
    return 1


@op
def add_one(num: int) -> int:
    return num + 1


@job(executor_def=taskiq_executor)
def test_job():
    simple()


@job(executor_def=taskiq_executor)
def test_serial_job():
    add_one(simple())


@op(out={"value_one": Out(int), "value_two": Out(int)})
def emit_values():
    yield Output(1, "value_one")
    yield Output(2, "value_two")


@op(ins={"num_one": In(int), "num_two": In(int)})
def subtract(num_one: int, num_two: int) -> int:
    return num_one - num_two


@job(executor_def=taskiq_executor)
def test_diamond_job():
    value_one, value_two = emit_values()
    subtract(num_one=add_one(num=value_one), num_two=add_one.alias("renamed")(num=value_two))


@job(executor_def=taskiq_executor)
def test_parallel_job():
    value = simple()
    for i in range(10):
        add_one.alias("add_one_" + str(i))(value)


@op
def leaf() -> int:
    return 1


def _wrap(child, name: str, level: int):
    @graph(name=f"{name}_layer_{level}")
    def wrap():
        for i in range(2):
            child.alias(f"layer_{level}_node_{i}")()

    return wrap


def _nest(depth: int, name: str):
    """Graphs nested `depth` deep, two children each: 2 ** depth leaf ops."""
    inner = leaf
    for level in range(depth, 0, -1):
        inner = _wrap(inner, name, level)
    return inner


@job(executor_def=taskiq_executor)
def composite_job():
    _nest(4, "composite")()  # 16 steps, as dagster-celery's composite test


@op(
    out={
        "out_1": Out(int, is_required=False),
        "out_2": Out(int, is_required=False),
        "out_3": Out(int, is_required=False),
    }
)
def foo():
    yield Output(1, "out_1")


@op
def bar(input_arg: int) -> int:
    return input_arg


@job(executor_def=taskiq_executor)
def test_optional_outputs():
    out_1, out_2, out_3 = foo()
    bar.alias("first_consumer")(input_arg=out_1)
    bar.alias("second_consumer")(input_arg=out_2)
    bar.alias("third_consumer")(input_arg=out_3)


@op
def fails() -> int:
    raise Exception("argjhgjh")


@op
def should_never_execute(_x: int) -> None:
    raise AssertionError("should never execute")


@job(executor_def=taskiq_executor)
def test_fails():
    should_never_execute(fails())


@op
def retry_request() -> None:
    raise RetryRequested()


@job(executor_def=taskiq_executor)
def test_retries():
    retry_request()


@op(
    tags={
        "dagster-k8s/resource_requirements": {
            "requests": {"cpu": "250m", "memory": "64Mi"},
            "limits": {"cpu": "500m", "memory": "2560Mi"},
        }
    }
)
def resource_req_op(context) -> None:
    context.log.info("running")


@job(executor_def=taskiq_executor)
def test_resources_limit():
    resource_req_op()


@op(tags={"dagster-celery/queue": "fooqueue"})
def fooqueue(context) -> bool:
    assert context.op.tags["dagster-celery/queue"] == "fooqueue"
    return True


@job(executor_def=taskiq_executor)
def multiqueue_job():
    fooqueue()


def _prioritized(priority: int):
    @op(name=f"priority_{priority}", tags={"dagster-celery/priority": str(priority), "dagster-celery/queue": "prio"})
    def prioritized() -> int:
        time.sleep(0.05)
        return priority

    return prioritized


@job(executor_def=taskiq_executor)
def simple_priority_job():
    for priority in range(11):
        _prioritized(priority)()


defs = Definitions(
    jobs=[
        test_job,
        test_serial_job,
        test_diamond_job,
        test_parallel_job,
        composite_job,
        test_optional_outputs,
        test_fails,
        test_retries,
        test_resources_limit,
        multiqueue_job,
        simple_priority_job,
    ]
)
