"""Scale-in protection: a worker holding steps asks its platform not to pick it for scale-in.

``worker start --scale-in-protection ecs|k8s``. The worker calls :meth:`ScaleInProtector.set_busy`
when it goes from idle to holding steps and back; a background thread turns that into calls to
the platform, so the worker's threads never wait on HTTP:

* ``ecs``: ECS task scale-in protection through the agent,
  ``PUT $ECS_AGENT_URI/task-protection/v1/state`` with ``{"ProtectionEnabled": true,
  "ExpiresInMinutes": N}`` while busy (renewed at half of N while it stays busy, so a step longer
  than N stays protected) and ``{"ProtectionEnabled": false}`` when idle. The task role needs
  ``ecs:UpdateTaskProtection``; the task must belong to an ECS service (agent 1.65+ or Fargate).
* ``k8s``: the pod's ``controller.kubernetes.io/pod-deletion-cost`` annotation, set high while
  busy and removed when idle, by a JSON merge patch on ``/api/v1/namespaces/NS/pods/NAME`` with the
  pod's service-account token. When a ReplicaSet shrinks (KEDA/HPA scale-in), the controller
  deletes pods with the lowest cost first, so idle pods go before busy ones. RBAC: the pod's
  ServiceAccount needs ``patch`` on ``pods`` in its namespace (``deploy/kubernetes/rbac.yaml``).

The policy (debounce, renewal, retries, clearing on start and stop) is ``protection.py``'s.

:func:`protector_from_flag` builds one from the flag and the environment, once, at worker start,
and raises :class:`~dagster_taskiq_sync.errors.ConfigError` when the platform's variables are
missing. For tests and ``kubectl proxy``, ``DAGSTER_TASKIQ_SYNC_K8S_API_URL`` replaces the
in-cluster API server URL and ``DAGSTER_TASKIQ_SYNC_K8S_SERVICEACCOUNT_DIR`` the service-account
directory.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.ops.protection import BackgroundProtector, ProtectionCallFailed, ScaleInProtector

FLAG = "--scale-in-protection"
KINDS = ("ecs", "k8s")
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
K8S_API_URL_ENV = "DAGSTER_TASKIQ_SYNC_K8S_API_URL"
K8S_SERVICEACCOUNT_DIR_ENV = "DAGSTER_TASKIQ_SYNC_K8S_SERVICEACCOUNT_DIR"

DEFAULT_ECS_EXPIRES_MINUTES = 60  # ECS accepts 1..2880; the agent's default is 120
DEFAULT_BUSY_COST = 10000  # any positive int32 ranks a busy pod after idle ones (default cost 0)
HTTP_TIMEOUT = 5.0


def _http(
    method: str,
    url: str,
    body: dict,
    content_type: str,
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> bytes:
    """One HTTP call without proxies (the agent and the API server are reached directly, whatever
    HTTP(S)_PROXY says); a failure becomes :class:`ProtectionCallFailed`."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": content_type, "Accept": "application/json", **(headers or {})},
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:2000].decode("utf8", "replace").strip()
        try:  # the API server's Status object says why in "message"; the agent's error in "Message"
            answer = json.loads(detail)
            detail = answer.get("message") or answer.get("error", {}).get("Message") or detail
        except (ValueError, AttributeError):
            pass
        detail = detail[:300]
        raise ProtectionCallFailed(f"HTTP {exc.code}", f"{method} {url} answered HTTP {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise ProtectionCallFailed("unreachable", f"{method} {url} failed: {exc.reason}") from None
    except TimeoutError:
        raise ProtectionCallFailed("timeout", f"{method} {url} timed out after {timeout:g} s") from None
    except OSError as exc:
        raise ProtectionCallFailed(type(exc).__name__, f"{method} {url} failed: {exc}") from None


class ECSTaskProtection(BackgroundProtector):
    """ECS task scale-in protection through the container agent (``$ECS_AGENT_URI``)."""

    name = "ecs"

    def __init__(
        self,
        agent_uri: str,
        *,
        expires_minutes: int = DEFAULT_ECS_EXPIRES_MINUTES,
        timeout: float = HTTP_TIMEOUT,
        **options,
    ) -> None:
        if not 1 <= expires_minutes <= 2880:
            raise ConfigError(f"ECS task protection lasts 1 to 2880 minutes; {expires_minutes} is outside that.")
        # Renew at half the expiry: a step that outlives the expiry stays protected.
        options.setdefault("renew_interval", expires_minutes * 60 / 2)
        super().__init__(**options)
        self.url = agent_uri.rstrip("/") + "/task-protection/v1/state"
        self.expires_minutes = expires_minutes
        self.timeout = timeout

    def _apply(self, busy: bool) -> None:
        body: dict = {"ProtectionEnabled": busy}
        if busy:
            body["ExpiresInMinutes"] = self.expires_minutes
        raw = _http("PUT", self.url, body, "application/json", timeout=self.timeout)
        try:
            answer = json.loads(raw or b"{}")
        except ValueError:
            answer = {}
        # The agent answers 200 with {"protection": {...}}, or with a "failure" (e.g. TASK_NOT_VALID
        # for a task outside a service) or an "error" (e.g. AccessDeniedException) object.
        for key, code_field in (("failure", "Reason"), ("error", "Code")):
            problem = answer.get(key) if isinstance(answer, dict) else None
            if problem:
                code = problem.get(code_field, "unknown") if isinstance(problem, dict) else str(problem)
                raise ProtectionCallFailed(f"{key} {code}", f"the ECS agent answered {key}: {json.dumps(problem)}")


class KubernetesDeletionCost(BackgroundProtector):
    """The pod's ``controller.kubernetes.io/pod-deletion-cost`` annotation, through the API server."""

    name = "k8s"

    def __init__(
        self,
        api_url: str,
        namespace: str,
        pod_name: str,
        *,
        token_path: str | None = None,
        ca_path: str | None = None,
        busy_cost: int = DEFAULT_BUSY_COST,
        timeout: float = HTTP_TIMEOUT,
        **options,
    ) -> None:
        super().__init__(**options)
        namespace, pod_name = (urllib.parse.quote(part, safe="") for part in (namespace, pod_name))
        self.url = f"{api_url.rstrip('/')}/api/v1/namespaces/{namespace}/pods/{pod_name}"
        # The bearer token goes over TLS only: an http:// override is a local authenticating proxy
        # (`kubectl proxy`), and a token sent there would cross the network in cleartext.
        self.token_path = token_path if api_url.startswith("https:") else None
        self.busy_cost = busy_cost
        self.timeout = timeout
        self._context = ssl.create_default_context(cafile=ca_path) if api_url.startswith("https:") else None

    def _apply(self, busy: bool) -> None:
        # null removes the annotation: an idle pod is as cheap to delete as any other.
        patch = {"metadata": {"annotations": {DELETION_COST_ANNOTATION: str(self.busy_cost) if busy else None}}}
        headers = {}
        if self.token_path:
            # Re-read per call: projected service-account tokens are rotated by the kubelet.
            try:
                with open(self.token_path, encoding="utf8") as fh:
                    headers["Authorization"] = "Bearer " + fh.read().strip()
            except OSError as exc:
                raise ProtectionCallFailed(
                    "token", f"cannot read the service-account token {self.token_path}: {exc.strerror}"
                ) from None
        _http(
            "PATCH",
            self.url,
            patch,
            "application/merge-patch+json",
            timeout=self.timeout,
            headers=headers,
            context=self._context,
        )


_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # DNS-1123 subdomain


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def protector_from_flag(kind: str | None, env: Mapping[str, str] | None = None, **options) -> ScaleInProtector:
    """The protector ``--scale-in-protection KIND`` asks for (not started), from the environment.

    ``options`` go to the protector (``idle_delay``, ``expires_minutes``, ``busy_cost``, ``timeout``).
    Raises :class:`ConfigError` naming the flag and what is missing.
    """
    if not kind:
        return ScaleInProtector()
    env = os.environ if env is None else env
    if kind == "ecs":
        agent_uri = env.get("ECS_AGENT_URI")
        if not agent_uri:
            raise ConfigError(
                f"{FLAG} ecs needs ECS_AGENT_URI, which the ECS agent sets in task containers, and it is not set; "
                "run the worker as a task of an ECS service (agent 1.65+ or Fargate) or drop the flag."
            )
        return ECSTaskProtection(agent_uri, **options)
    if kind == "k8s":
        return _kubernetes_protector(env, **options)
    raise ConfigError(f"{FLAG} {kind!r} is not a platform this worker knows; use one of: {', '.join(KINDS)}.")


def _kubernetes_protector(env: Mapping[str, str], **options) -> KubernetesDeletionCost:
    sa_dir = env.get(K8S_SERVICEACCOUNT_DIR_ENV) or SERVICEACCOUNT_DIR
    api_url = env.get(K8S_API_URL_ENV)
    if not api_url:
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not (host and port):
            raise ConfigError(
                f"{FLAG} k8s needs KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT, which Kubernetes sets "
                "in every pod, and they are not set; run the worker in a pod or drop the flag."
            )
        api_url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    token_file = os.path.join(sa_dir, "token")
    # Without the in-cluster URL (e.g. through `kubectl proxy`, which authenticates for us)
    # a missing token is fine.
    token_path = token_file if os.path.exists(token_file) else None
    if token_path is None and not env.get(K8S_API_URL_ENV):
        raise ConfigError(
            f"{FLAG} k8s needs the pod's service-account token at {token_file}, which is missing; "
            "mount it (automountServiceAccountToken: true on the pod or its ServiceAccount)."
        )
    ca_path = os.path.join(sa_dir, "ca.crt")
    namespace = env.get("POD_NAMESPACE") or _read(os.path.join(sa_dir, "namespace"))
    if not namespace:
        raise ConfigError(
            f"{FLAG} k8s cannot tell the pod's namespace: POD_NAMESPACE is not set and "
            f"{os.path.join(sa_dir, 'namespace')} is missing; set POD_NAMESPACE from the downward API "
            "(fieldRef metadata.namespace)."
        )
    pod_name = env.get("POD_NAME") or env.get("HOSTNAME") or socket.gethostname()
    for what, value in (("POD_NAMESPACE", namespace), ("POD_NAME", pod_name)):
        if not _K8S_NAME.fullmatch(value):
            raise ConfigError(
                f"{FLAG} k8s: {what} {value[:64]!r} is not a Kubernetes object name (lowercase letters, digits, "
                "'-' and '.', at most 253); set it from the downward API (fieldRef metadata.name / namespace)."
            )
    return KubernetesDeletionCost(
        api_url,
        namespace,
        pod_name,
        token_path=token_path,
        ca_path=ca_path if os.path.exists(ca_path) else None,
        **options,
    )
