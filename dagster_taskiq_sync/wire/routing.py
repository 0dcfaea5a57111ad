"""Sized pools: which queue a step goes to, from the size tags its op already has.

``execution.config.routes`` is a list of worker pools, each a queue with the sizes it takes::

    routes:
      - queue: big
        when: {ecs/memory: ">= 8192", k8s/memory: ">= 8Gi"}   # any of these holds
        max: {ecs/memory: 30720, k8s/memory: 30Gi}             # what one of its workers can hold

The sizes are read from the tags Dagster users already write for other executors: ``ecs/cpu`` and
``ecs/memory`` (dagster-aws's ECS executor: CPU units and MiB, or "1 vCPU" / "2 GB") and
``dagster-k8s/config``'s ``container_config.resources`` (the k8s job executor: Kubernetes
quantities such as ``500m``, ``2``, ``8Gi``, ``16384Mi``). ``cpu`` and ``memory`` compare either
(cores, bytes; the larger when a step has both).

A step's explicit queue tag (``dagster-celery/queue``) always wins. Otherwise the routes are tried in
order: the first whose ``when`` holds and whose ``max`` the step fits takes it; a step that some
route's ``when`` matched but no such route fits can never run anywhere and is refused (its step
fails with a sentence, instead of waiting on a queue no worker could serve). A step no ``when``
matches goes to the default queue.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.wire.messages import QUEUE_TAGS

K8S_TAG = "dagster-k8s/config"
_EXAMPLE = "[{queue: big, when: {ecs/memory: '>= 8192'}, max: {ecs/memory: 30720}}]"

# --- quantities --------------------------------------------------------------------------------

_K8S_SUFFIXES = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}
_K8S_QUANTITY = re.compile(
    r"^\+?(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<exponent>[eE][+-]?[0-9]{1,2})|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?$"
)
_ECS_FORM = re.compile(r"^(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)$")


def k8s_quantity(text: Any) -> Decimal:
    """A Kubernetes resource quantity (``500m``, ``2``, ``1.5``, ``8Gi``, ``16384Mi``, ``1e3``) as a
    number of cores or bytes; ValueError if it is not one."""
    match = _K8S_QUANTITY.match(str(text).strip()) if isinstance(text, (str, int, float)) else None
    if match is None or isinstance(text, bool):
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 8Gi, 16384Mi)")
    number = Decimal(match["number"])
    if match["exponent"]:
        return number * Decimal(10) ** int(match["exponent"][1:])
    return number * _K8S_SUFFIXES[match["suffix"] or ""]


def _ecs(unit_words: tuple[str, ...], per_word: int, what: str) -> Callable[[Any], Decimal]:
    """ECS's forms: a whole number of ``what``, or a number and one of ``unit_words``."""

    def parse(text: Any) -> Decimal:
        match = _ECS_FORM.match(str(text).strip()) if isinstance(text, (str, int)) else None
        if match is None or isinstance(text, bool):
            raise ValueError(f"{text!r} is not {what}")
        number, unit = Decimal(match["number"]), match["unit"].lower()
        if not unit and number == int(number):
            return number
        if unit in unit_words:
            return number * per_word
        raise ValueError(f"{text!r} is not {what}")

    return parse


_ecs_cpu = _ecs(("vcpu",), 1024, "ECS CPU units (e.g. 1024) or vCPUs (e.g. '2 vCPU')")
_ecs_memory = _ecs(("gb",), 1024, "ECS memory in MiB (e.g. 8192) or GB (e.g. '8 GB')")


def _plain(number: Decimal) -> str:
    return format(number.normalize(), "f") if number == number.to_integral_value() else str(number.normalize())


# --- what a step asks for ------------------------------------------------------------------------


class StepSizeError(ValueError):
    """A size tag that cannot be read: its step cannot be routed (the message names tag and fix)."""


@dataclass(frozen=True)
class Size:
    value: Decimal  # in the dimension's unit
    text: str  # as the tag wrote it


def _k8s_resources(tags: Mapping[str, Any]) -> dict[str, Size]:
    """``k8s/requests.cpu`` ... from the op's ``dagster-k8s/config`` tag (a mapping, or its JSON)."""
    raw = tags.get(K8S_TAG)
    if raw is None:
        return {}
    try:
        config = json.loads(raw) if isinstance(raw, str) else raw
        resources = ((config or {}).get("container_config") or {}).get("resources") or {}
        found = {}
        for kind in ("requests", "limits"):
            for name, value in (resources.get(kind) or {}).items():
                if name in ("cpu", "memory"):
                    found[f"k8s/{kind}.{name}"] = Size(k8s_quantity(value), str(value))
        return found
    except (ValueError, AttributeError, TypeError) as exc:
        raise StepSizeError(
            f"its tag {K8S_TAG} has no readable container_config.resources ({exc}); write requests/limits "
            "as Kubernetes quantities, e.g. {container_config: {resources: {limits: {cpu: '2', memory: 8Gi}}}}"
        ) from None


def step_sizes(tags: Mapping[str, Any]) -> dict[str, Size]:
    """Every size dimension a step's tags state, by the key routes use; StepSizeError if a tag is garbage."""
    sizes: dict[str, Size] = {}
    for key, parse in (("ecs/cpu", _ecs_cpu), ("ecs/memory", _ecs_memory)):
        if tags.get(key) is not None:
            try:
                sizes[key] = Size(parse(tags[key]), str(tags[key]))
            except ValueError as exc:
                raise StepSizeError(f"its tag {key} {exc}; fix the op's tag") from None
    sizes.update(_k8s_resources(tags))
    for name in ("cpu", "memory"):  # the container's limit, else its request
        k8s = sizes.get(f"k8s/limits.{name}") or sizes.get(f"k8s/requests.{name}")
        if k8s is not None:
            sizes[f"k8s/{name}"] = k8s
    cores = [sizes["ecs/cpu"].value / 1024] if "ecs/cpu" in sizes else []
    cores += [sizes["k8s/cpu"].value] if "k8s/cpu" in sizes else []
    if cores:
        sizes["cpu"] = Size(max(cores), _plain(max(cores)))
    memory = [sizes["ecs/memory"].value * 2**20] if "ecs/memory" in sizes else []
    memory += [sizes["k8s/memory"].value] if "k8s/memory" in sizes else []
    if memory:
        sizes["memory"] = Size(max(memory), _bytes(max(memory)))
    return sizes


def _bytes(value: Decimal) -> str:
    for unit, factor in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if value >= factor and value % factor == 0:
            return f"{_plain(value / factor)}{unit}"
    return _plain(value)


# --- the routing table -----------------------------------------------------------------------------

# key -> (how a threshold is written, its parser)
DIMENSIONS: dict[str, tuple[str, Callable[[Any], Decimal]]] = {
    "ecs/cpu": ("ECS CPU units, e.g. 4096 or '4 vCPU'", _ecs_cpu),
    "ecs/memory": ("MiB, e.g. 8192 or '8 GB'", _ecs_memory),
    "k8s/cpu": ("a Kubernetes quantity, e.g. 2 or 500m", k8s_quantity),
    "k8s/memory": ("a Kubernetes quantity, e.g. 8Gi", k8s_quantity),
    "k8s/requests.cpu": ("a Kubernetes quantity, e.g. 2 or 500m", k8s_quantity),
    "k8s/requests.memory": ("a Kubernetes quantity, e.g. 8Gi", k8s_quantity),
    "k8s/limits.cpu": ("a Kubernetes quantity, e.g. 2 or 500m", k8s_quantity),
    "k8s/limits.memory": ("a Kubernetes quantity, e.g. 8Gi", k8s_quantity),
    "cpu": ("cores, e.g. 4 or 500m (ecs/cpu counts 1024 units a core)", k8s_quantity),
    "memory": ("a Kubernetes quantity, e.g. 8Gi (ecs/memory counts MiB)", k8s_quantity),
}
_OPERATORS: dict[str, Callable[[Decimal, Decimal], bool]] = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
}
_CONDITION = re.compile(r"^\s*(?P<op>>=|<=|>|<)?\s*(?P<value>\S.*?)\s*$")


@dataclass(frozen=True)
class Condition:
    key: str
    op: str
    threshold: Decimal
    text: str  # the threshold as the config wrote it

    def holds(self, sizes: Mapping[str, Size]) -> str | None:
        """ "ecs/memory 16384 >= 8192" when it holds for the step, else None."""
        size = sizes.get(self.key)
        if size is None or not _OPERATORS[self.op](size.value, self.threshold):
            return None
        return f"{self.key} {size.text} {self.op} {self.text}"


@dataclass(frozen=True)
class Route:
    queue: str
    when: tuple[Condition, ...]
    max: tuple[Condition, ...] = ()  # each op is "<="
    path: str = "execution.config.routes[0]"

    def over_max(self, sizes: Mapping[str, Size]) -> str | None:
        """ "ecs/memory 65536 > 30720" for the first max the step is over, else None."""
        for bound in self.max:
            size = sizes.get(bound.key)
            if size is not None and size.value > bound.threshold:
                return f"{bound.key} {size.text}, over its max {bound.text} ({self.path}.max)"
        return None


@dataclass(frozen=True)
class Decision:
    """Where a step goes: ``queue``, with ``reason`` when a route sent it there; or ``refused``."""

    queue: str
    reason: str | None = None  # "ecs/memory 16384 >= 8192" (None: default queue or explicit tag)
    route: str | None = None  # "execution.config.routes[0]"
    refused: str | None = None  # a sentence: why no pool takes it


@dataclass(frozen=True)
class RouteTable:
    routes: tuple[Route, ...] = field(default_factory=tuple)

    @property
    def queues(self) -> list[str]:
        """The routed queues, in order, each once."""
        return list(dict.fromkeys(route.queue for route in self.routes))

    def decide(self, step_key: str, tags: Mapping[str, Any], default_queue: str) -> Decision:
        for tag in QUEUE_TAGS:  # an explicit queue tag wins over every route
            if tags.get(tag):
                return Decision(tags[tag])
        if not self.routes:
            return Decision(default_queue)
        try:
            sizes = step_sizes(tags)
        except StepSizeError as exc:
            return Decision(
                default_queue, refused=f"step {step_key} cannot be routed: {exc} (execution.config.routes reads it)."
            )
        too_big: list[str] = []
        for route in self.routes:
            hits = [hit for hit in (c.holds(sizes) for c in route.when) if hit]
            if not hits:
                continue
            over = route.over_max(sizes)
            if over is None:
                return Decision(route.queue, reason=hits[0], route=route.path)
            too_big.append(f"queue {route.queue} ({hits[0]}) but {over}")
        if too_big:
            return Decision(
                default_queue,
                refused=f"step {step_key} is larger than any worker pool takes: it matches {'; '.join(too_big)}; "
                "raise that max (or add a route with a larger pool), or lower the op's size tag.",
            )
        return Decision(default_queue)


# --- config ----------------------------------------------------------------------------------------


def _condition(key: Any, value: Any, path: str, *, bound: bool) -> Condition:
    if key not in DIMENSIONS:
        raise ConfigError(
            f"{path} names {key!r}, which is not a size the routing table reads; use one of {', '.join(DIMENSIONS)}."
        )
    how, parse = DIMENSIONS[key]
    where = f"{path}.{key}"
    match = (
        _CONDITION.match(str(value)) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    )
    if match is None or (bound and match["op"]):
        form = f"a plain size, {how}" if bound else f"a comparison such as '>= ...' with {how}"
        raise ConfigError(f"{where} is {value!r}; write {form}.")
    try:
        threshold = parse(match["value"])
    except ValueError:
        raise ConfigError(f"{where} is {value!r}: {match['value']!r} is not {how}; fix the value.") from None
    return Condition(str(key), "<=" if bound else match["op"] or ">=", threshold, match["value"])


def _route(item: Any, path: str) -> Route:
    if not isinstance(item, Mapping):
        raise ConfigError(
            f"{path} must be a mapping with queue, when and (optionally) max, like {_EXAMPLE}; got {item!r}."
        )
    unknown = sorted(str(k) for k in item if k not in ("queue", "when", "max"))
    if unknown:
        raise ConfigError(f"{path} has {', '.join(unknown)}, which a route does not take; keep queue, when and max.")
    queue = item.get("queue")
    if not isinstance(queue, str) or not queue.strip():
        raise ConfigError(f"{path}.queue must name the pool's queue (a non-empty string), got {queue!r}.")
    when, most = item.get("when"), item.get("max") or {}
    if not isinstance(when, Mapping) or not when:
        raise ConfigError(
            f"{path}.when must map size keys to comparisons, e.g. {{ecs/memory: '>= 8192'}}, got {when!r}."
        )
    if not isinstance(most, Mapping):
        raise ConfigError(
            f"{path}.max must map size keys to the most one step may ask for, e.g. {{ecs/memory: 30720}}, got {most!r}."
        )
    return Route(
        queue=queue.strip(),
        when=tuple(_condition(k, v, f"{path}.when", bound=False) for k, v in when.items()),
        max=tuple(_condition(k, v, f"{path}.max", bound=True) for k, v in most.items()),
        path=path,
    )


def parse_routes(value: Any, path: str = "execution.config.routes") -> RouteTable:
    """The routing table from the executor config's ``routes``; ConfigError (one sentence) on garbage."""
    if value is None:
        return RouteTable()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path} must be a list of pools like {_EXAMPLE}, got {value!r}.")
    return RouteTable(tuple(_route(item, f"{path}[{i}]") for i, item in enumerate(value)))
