"""Sized pools: the routing table's parsing rules, quantity arithmetic and decisions (wire/routing.py)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from dagster_taskiq_sync.config.celery_compat import settings_from_executor_config
from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.wire.routing import k8s_quantity, parse_routes, step_sizes

GI = 2**30


@pytest.mark.parametrize(
    "text, value",
    [
        ("500m", Decimal("0.5")),
        ("2", Decimal(2)),
        (2, Decimal(2)),
        ("1.5", Decimal("1.5")),
        (".5", Decimal("0.5")),
        ("8Gi", Decimal(8 * GI)),
        ("16384Mi", Decimal(16 * GI)),
        ("128974848", Decimal(128974848)),
        ("129e6", Decimal(129_000_000)),
        ("129M", Decimal(129_000_000)),
        ("1k", Decimal(1000)),
        ("1Ki", Decimal(1024)),
        ("250u", Decimal("0.00025")),
        ("1E", Decimal(10) ** 18),  # exa, not an exponent
    ],
)
def test_kubernetes_quantities(text, value):
    assert k8s_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Gi", "8 Gi", "-1", "1.2.3", "8GB", "8gi", "1e999", True, None, [1]])
def test_what_is_not_a_kubernetes_quantity(text):
    with pytest.raises(ValueError, match="is not a Kubernetes quantity"):
        k8s_quantity(text)


def k8s(limits=None, requests=None, as_json=False):
    resources = {k: v for k, v in (("limits", limits), ("requests", requests)) if v}
    config = {"container_config": {"resources": resources}}
    return {"dagster-k8s/config": json.dumps(config) if as_json else config}


def test_step_sizes_from_ecs_tags_in_both_of_ecs_forms():
    assert {k: v.value for k, v in step_sizes({"ecs/cpu": "2048", "ecs/memory": "16384"}).items()} == {
        "ecs/cpu": 2048,
        "ecs/memory": 16384,
        "cpu": 2,  # cores: 1024 units each
        "memory": 16 * GI,
    }
    sizes = step_sizes({"ecs/cpu": "4 vCPU", "ecs/memory": "8 GB"})
    assert (sizes["ecs/cpu"].value, sizes["ecs/memory"].value) == (4096, 8192)
    assert step_sizes({"ecs/memory": "0.5GB"})["ecs/memory"].value == 512


@pytest.mark.parametrize("as_json", [False, True], ids=["mapping", "json"])
def test_step_sizes_from_the_k8s_config_tag_limits_before_requests(as_json):
    sizes = step_sizes(k8s(limits={"memory": "16384Mi"}, requests={"cpu": "500m", "memory": "4Gi"}, as_json=as_json))
    assert sizes["k8s/limits.memory"].value == 16 * GI and sizes["k8s/requests.memory"].value == 4 * GI
    assert sizes["k8s/memory"].text == "16384Mi"  # the limit, else the request
    assert sizes["k8s/cpu"].value == Decimal("0.5") and sizes["cpu"].value == Decimal("0.5")
    assert sizes["memory"].text == "16Gi"


def test_a_step_with_both_families_of_tags_is_as_large_as_the_larger():
    sizes = step_sizes({"ecs/memory": "4096", **k8s(limits={"memory": "6Gi", "cpu": "3"}), "ecs/cpu": "1024"})
    assert (sizes["memory"].value, sizes["cpu"].value) == (6 * GI, 3)


def table(*routes):
    return settings_from_executor_config({"routes": list(routes)}).routes


BIG = {"queue": "big", "when": {"ecs/memory": ">= 8192", "k8s/memory": ">= 8Gi"}, "max": {"memory": "30Gi"}}
HUGE = {"queue": "huge", "when": {"memory": "> 30Gi"}, "max": {"memory": "120Gi"}}


def test_a_step_goes_to_the_first_route_whose_when_holds_and_says_why():
    routes = table(BIG, HUGE)
    decision = routes.decide("train", {"ecs/memory": "16384"}, "dagster")
    assert (decision.queue, decision.reason, decision.refused) == ("big", "ecs/memory 16384 >= 8192", None)
    assert decision.route == "execution.config.routes[0]"
    k8s_step = routes.decide("train", k8s(limits={"memory": "16384Mi"}), "dagster")
    assert (k8s_step.queue, k8s_step.reason) == ("big", "k8s/memory 16384Mi >= 8Gi")  # when: any of its conditions
    # larger than big's max: the next route that takes it
    assert routes.decide("huge_op", {"ecs/memory": "65536"}, "dagster").queue == "huge"
    assert routes.queues == ["big", "huge"]


def test_small_untagged_and_explicitly_queued_steps_are_not_routed():
    routes = table(BIG)
    assert routes.decide("small", {"ecs/memory": "2048"}, "dagster").queue == "dagster"
    assert routes.decide("plain", {}, "dagster").reason is None
    # dagster-celery/queue wins, whatever its size
    explicit = routes.decide("pinned", {"dagster-celery/queue": "gpu", "ecs/memory": "999999"}, "dagster")
    assert (explicit.queue, explicit.reason, explicit.refused) == ("gpu", None, None)


def test_a_step_larger_than_every_pool_it_matches_is_refused_with_a_sentence():
    decision = table(BIG).decide("giant", {"ecs/memory": "65536"}, "dagster")
    assert decision.refused == (
        "step giant is larger than any worker pool takes: it matches queue big (ecs/memory 65536 >= 8192) but "
        "memory 64Gi, over its max 30Gi (execution.config.routes[0].max); raise that max (or add a route with a "
        "larger pool), or lower the op's size tag."
    )


def test_a_size_tag_routes_cannot_read_refuses_its_step_naming_the_tag():
    decision = table(BIG).decide("odd", {"ecs/memory": "lots"}, "dagster")
    assert "step odd cannot be routed: its tag ecs/memory 'lots' is not ECS memory in MiB" in decision.refused
    broken = table(BIG).decide("odd", {"dagster-k8s/config": "{not json"}, "dagster")
    assert "its tag dagster-k8s/config has no readable container_config.resources" in broken.refused
    # without routes nobody reads size tags: nothing changes for existing jobs
    assert table().decide("odd", {"ecs/memory": "lots"}, "dagster").refused is None


def test_a_default_pool_with_a_max_refuses_what_it_cannot_hold():
    routes = table(BIG, {"queue": "dagster", "when": {"memory": ">= 0"}, "max": {"memory": "4Gi"}})
    assert routes.decide("mid", {"ecs/memory": "6144"}, "dagster").refused.startswith("step mid is larger")
    assert routes.decide("ok", {"ecs/memory": "1024"}, "dagster").queue == "dagster"


@pytest.mark.parametrize(
    "routes, expected",
    [
        ({"queue": "big"}, "execution.config.routes must be a list of pools like"),
        (["big"], "execution.config.routes[0] must be a mapping with queue, when and (optionally) max"),
        ([{"queue": "big", "when": {"ecs/memory": 1}, "pool": 2}], "routes[0] has pool, which a route does not take"),
        ([{"when": {"ecs/memory": 1}}], "execution.config.routes[0].queue must name the pool's queue"),
        ([{"queue": "big"}], "execution.config.routes[0].when must map size keys to comparisons"),
        ([{"queue": "big", "when": {"ecs/mem": ">= 1"}}], "names 'ecs/mem', which is not a size the routing table"),
        ([{"queue": "big", "when": {"ecs/memory": "=> 8192"}}], "routes[0].when.ecs/memory is '=> 8192': '=> 8192'"),
        ([{"queue": "big", "when": {"ecs/memory": ">= 8Gi"}}], "'8Gi' is not MiB, e.g. 8192 or '8 GB'; fix the value."),
        ([{"queue": "big", "when": {"k8s/memory": ">= 8 GiB"}}], "'8 GiB' is not a Kubernetes quantity, e.g. 8Gi"),
        ([{"queue": "big", "when": {"cpu": True}}], "routes[0].when.cpu is True; write a comparison such as"),
        (
            [{"queue": "big", "when": {"cpu": "> 2"}, "max": {"cpu": "<= 8"}}],
            "execution.config.routes[0].max.cpu is '<= 8'; write a plain size, cores",
        ),
        ([{"queue": "big", "when": {"cpu": "> 2"}, "max": [8]}], "execution.config.routes[0].max must map size keys"),
    ],
)
def test_routing_config_garbage_gets_one_sentence_naming_the_key(routes, expected):
    with pytest.raises(ConfigError) as info:
        parse_routes(routes)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_comparisons_and_bare_values():
    (route,) = parse_routes([{"queue": "big", "when": {"cpu": 2, "k8s/limits.cpu": "< 500m"}}]).routes
    assert [(c.key, c.op, c.threshold) for c in route.when] == [
        ("cpu", ">=", 2),  # a bare value means "at least"
        ("k8s/limits.cpu", "<", Decimal("0.5")),
    ]
