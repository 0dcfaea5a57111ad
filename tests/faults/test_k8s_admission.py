"""The deploy kit's admission policy (deploy/kubernetes/rbac.yaml): RBAC lets the workers'
ServiceAccount patch every pod of the namespace, and the ValidatingAdmissionPolicy narrows that to
the pod-deletion-cost annotation of the pod its token was issued to.

No API server runs here, so the policy's own CEL (read from the manifest, never restated) is
evaluated with cel-python the way the API server does: match conditions, then variables, then every
validation on the request's object and old object. The allowed requests are the ones the worker's
real scale-in protector sends (recorded on a loopback server and applied as JSON merge patches).
"""

from __future__ import annotations

import copy
from pathlib import Path

import celpy
import pytest
import yaml

from dagster_taskiq_sync.ops.scale_in import (
    DELETION_COST_ANNOTATION,
    K8S_API_URL_ENV,
    K8S_SERVICEACCOUNT_DIR_ENV,
    protector_from_flag,
)

from ..helpers import Recorder

ROOT = Path(__file__).resolve().parents[2]
RBAC = ROOT / "deploy" / "kubernetes" / "rbac.yaml"
WORKER_SA = "system:serviceaccount:dagster:dagster-taskiq-worker"
POD = "dagster-taskiq-worker-7d9f-abcde"


def manifest() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(RBAC.read_text())}


def admit(request: dict) -> list[str]:
    """The messages of the policy's failed validations for ``request`` ([] = admitted)."""
    spec = manifest()["ValidatingAdmissionPolicy"]["spec"]
    env = celpy.Environment()

    def evaluate(expression: str, activation: dict):
        return env.program(env.compile(expression)).evaluate(activation)

    activation = celpy.json_to_cel(
        {"object": request["object"], "oldObject": request["oldObject"], "request": request["request"]}
    )
    if not all(evaluate(c["expression"], activation) for c in spec["matchConditions"]):
        return []  # the policy does not apply to this requester
    variables: dict = {}
    for variable in spec["variables"]:
        variables[variable["name"]] = evaluate(variable["expression"], {**activation, "variables": variables})
    activation = {**activation, "variables": celpy.celtypes.MapType(variables)}
    return [v["message"] for v in spec["validations"] if not evaluate(v["expression"], activation)]


def worker_pod(name: str = POD, **annotations: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "dagster",
            "labels": {"app.kubernetes.io/name": "dagster-taskiq-worker", "pod-template-hash": "7d9f"},
            "annotations": {"kubectl.kubernetes.io/default-container": "worker", **annotations},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "w-7d9f", "uid": "u1"}],
        },
        "spec": {"serviceAccountName": "dagster-taskiq-worker", "containers": [{"name": "worker", "image": "w:1"}]},
    }


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def request(old: dict, new: dict, username: str = WORKER_SA, pod_name: str | None = POD) -> dict:
    extra = {"authentication.kubernetes.io/pod-name": [pod_name]} if pod_name else {}
    return {"object": new, "oldObject": old, "request": {"userInfo": {"username": username, "extra": extra}}}


@pytest.fixture(scope="module")
def protector_patches(tmp_path_factory) -> list[dict]:
    """The merge patches the real k8s scale-in protector sends when busy, then idle."""
    sa = tmp_path_factory.mktemp("sa")
    (sa / "token").write_text("t\n")
    (sa / "namespace").write_text("dagster\n")
    recorder = Recorder()
    try:
        env = {K8S_SERVICEACCOUNT_DIR_ENV: str(sa), "POD_NAME": POD, K8S_API_URL_ENV: recorder.url}
        protector = protector_from_flag("k8s", env=env, idle_delay=0).start()
        try:
            protector.set_busy(True)
            assert protector.flush(10)
            protector.set_busy(False)
            assert protector.flush(10)
        finally:
            protector.stop()
    finally:
        recorder.close()
    patches = [call["body"] for call in recorder.calls if call["method"] == "PATCH"]
    assert patches and all(DELETION_COST_ANNOTATION in p["metadata"]["annotations"] for p in patches), patches
    return patches


def test_the_protectors_own_patches_of_its_own_pod_are_admitted(protector_patches):
    pod = worker_pod()
    for patch in protector_patches:  # busy (cost set), then idle (annotation removed)
        patched = merge_patch(pod, patch)
        assert admit(request(pod, patched)) == [], patch
        pod = patched


BAD_CHANGES = {
    "another pod": (
        lambda pod: merge_patch(pod, {"metadata": {"annotations": {DELETION_COST_ANNOTATION: "1"}}}),
        "dagster-webserver-5c6b-xyz12",
        "only patch the pod its service-account token was issued to",
    ),
    "a token bound to no pod": (
        lambda pod: merge_patch(pod, {"metadata": {"annotations": {DELETION_COST_ANNOTATION: "1"}}}),
        None,
        "only patch the pod its service-account token was issued to",
    ),
    "the image": (
        lambda pod: merge_patch(pod, {"spec": {"containers": [{"name": "worker", "image": "evil:1"}]}}),
        POD,
        "may not change a pod's spec",
    ),
    "a label": (
        lambda pod: merge_patch(pod, {"metadata": {"labels": {"app.kubernetes.io/name": "dagster-webserver"}}}),
        POD,
        "may not change a pod's labels",
    ),
    "another annotation": (
        lambda pod: merge_patch(pod, {"metadata": {"annotations": {"sidecar.istio.io/inject": "false"}}}),
        POD,
        "only change its pod's controller.kubernetes.io/pod-deletion-cost annotation",
    ),
    "an annotation removed": (
        lambda pod: merge_patch(pod, {"metadata": {"annotations": {"kubectl.kubernetes.io/default-container": None}}}),
        POD,
        "only change its pod's controller.kubernetes.io/pod-deletion-cost annotation",
    ),
    "the owners": (
        lambda pod: merge_patch(pod, {"metadata": {"ownerReferences": None}}),
        POD,
        "may not change a pod's owners or finalizers",
    ),
}


@pytest.mark.parametrize("change", list(BAD_CHANGES))
def test_every_other_pod_change_by_the_worker_is_denied_naming_what_it_may_do(change):
    edit, token_pod, message = BAD_CHANGES[change]
    target = worker_pod(name=token_pod if change != "another pod" else "dagster-webserver-5c6b-xyz12")
    denied = admit(request(target, edit(target), pod_name=token_pod if change != "another pod" else POD))
    assert any(message in m for m in denied), denied


def test_requests_of_other_users_are_left_to_their_own_rbac():
    pod = worker_pod()
    changed = merge_patch(pod, {"spec": {"containers": [{"name": "worker", "image": "w:2"}]}})
    assert admit(request(pod, changed, username="system:serviceaccount:dagster:dagster-daemon", pod_name=None)) == []
    assert admit(request(pod, changed)) != []  # the same change by the worker is denied


def test_the_binding_applies_the_policy_in_the_workers_namespace_and_denies():
    objects = manifest()
    binding = objects["ValidatingAdmissionPolicyBinding"]["spec"]
    assert binding["policyName"] == objects["ValidatingAdmissionPolicy"]["metadata"]["name"]
    assert binding["validationActions"] == ["Deny"]
    namespace = objects["ServiceAccount"]["metadata"]["namespace"]
    assert binding["matchResources"]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}
    account = objects["ServiceAccount"]["metadata"]["name"]
    [condition] = objects["ValidatingAdmissionPolicy"]["spec"]["matchConditions"]
    assert f"system:serviceaccount:{namespace}:{account}" in condition["expression"]
    assert objects["ValidatingAdmissionPolicy"]["spec"]["failurePolicy"] == "Fail"
