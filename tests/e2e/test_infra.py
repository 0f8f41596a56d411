"""docker-compose.yml, the images and infra/k8s, checked offline.

Schemas first: the Kubernetes manifests through `kubernetes-validate` (strict: an unknown
field is an error), KEDA's kinds against our own JSON Schema of KEDA's documented v1alpha1 API
(tests/schemas/keda_v1alpha1.yaml; closed objects, so a typo is an error), the compose file through `check-jsonschema` and the compose-spec schema it ships. Then what no
schema can see: KEDA's list names are the lists kombu really writes (checked in a real Redis),
each compose worker reserves exactly one GPU of its own, the worker image installs a CUDA
torch and the client image none, and every `FARM_*` name is a real setting.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from farm import Farm
from farm.keys import RedisKeys
from farm.queue.app import PRIORITY_STEPS, enqueue
from farm.queue.routing import RENDER_QUEUE
from farm.settings import FarmSettings
from tests.support.raw import raw

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
KUBERNETES_VERSION = "1.37.0"
KEDA_SCHEMA = yaml.safe_load(
    (ROOT / "tests" / "support" / "schemas" / "keda_v1alpha1.yaml").read_text()
)


def manifests() -> list[tuple[str, dict]]:
    """(file name, resource) for every Kubernetes resource under infra/k8s."""
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the `<<` merge keys


def keda_validate(doc: dict) -> None:
    """Validate one KEDA resource against the farm's schema (its `kind` picks the definition)."""
    jsonschema.Draft202012Validator(KEDA_SCHEMA).validate(doc)


# --------------------------------------------------------------------------- schemas


def test_kubernetes_manifests_validate_strictly():
    kinds = []
    for name, doc in manifests():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert doc["metadata"]["namespace" if doc["kind"] != "Namespace" else "name"] == (
            "render-farm"
        ), name
        kinds.append(doc["kind"])
    assert sorted(kinds) == [
        "ConfigMap", "Deployment", "Deployment", "Namespace", "Secret", "Service", "Service",
        "StatefulSet",
    ]  # fmt: skip


def test_the_validators_catch_mistakes():
    deployment = deployment_named("farm-worker")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def _set(path: str, value: object):
    """A mutation setting `value` at the dotted `path` (list indices as numbers)."""

    def mutate(doc: dict) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in parents:
            doc = doc[key]
        doc[last] = value

    return mutate


def _delete(path: str):
    def mutate(doc: dict) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in parents:
            doc = doc[key]
        del doc[last]

    return mutate


@pytest.mark.parametrize(
    ("kind", "mutate", "said"),
    [
        # typo'd or foreign field names, at every level
        ("ScaledObject", _set("spec.maxReplicas", 8), "'maxReplicas' was unexpected"),  # HPA's
        ("ScaledObject", _set("spec.scaleTargetRef.nmae", "x"), "'nmae' was unexpected"),
        ("ScaledObject", _set("spec.advanced.scalingModifier", {}), "'scalingModifier' was"),
        ("ScaledObject", _set("spec.advanced.scalingModifiers.formular", "p0"), "'formular' was"),
        ("ScaledObject", _set("spec.triggers.0.authRef", {"name": "a"}), "'authRef' was"),
        ("ScaledObject", _set("spec.triggers.0.authenticationRef.kind", "Secret"), "'Secret'"),
        (
            "ScaledObject",
            _set("spec.fallback", {"failureThreshold": 3, "replicas": 1, "behaviour": "static"}),
            "'behaviour' was unexpected",
        ),
        ("ScaledObject", _set("status", {}), "'status' was unexpected"),
        # wrong types
        ("ScaledObject", _set("spec.maxReplicaCount", "8"), "'8' is not of type 'integer'"),
        ("ScaledObject", _set("spec.minReplicaCount", -1), "-1 is less than the minimum"),
        ("ScaledObject", _set("spec.triggers.0.metadata.listLength", 2), "2 is not of type"),
        ("ScaledObject", _set("spec.advanced.scalingModifiers.target", 2), "2 is not of type"),
        ("ScaledObject", _set("spec.triggers", {}), "is not of type 'array'"),
        # what KEDA requires
        ("ScaledObject", _delete("spec.triggers.0.type"), "'type' is a required property"),
        ("ScaledObject", _delete("spec.triggers.0.metadata"), "'metadata' is a required"),
        ("ScaledObject", _delete("spec.scaleTargetRef.name"), "'name' is a required property"),
        ("ScaledObject", _delete("spec.triggers"), "'triggers' is a required property"),
        ("ScaledObject", _set("spec.triggers", []), "should be non-empty"),
        ("ScaledObject", _set("apiVersion", "keda.sh/v1beta1"), "'keda.sh/v1alpha1' was expected"),
        ("TriggerAuthentication", _set("spec.secretTargetRef.0.secret", "x"), "'secret' was"),
        ("TriggerAuthentication", _delete("spec.secretTargetRef.0.key"), "'key' is a required"),
        ("TriggerAuthentication", _set("spec.podIdentity", {"provider": "azur"}), "'azur'"),
        ("TriggerAuthentication", _set("spec.hashiCorpVault", {}), "'hashiCorpVault' was"),
        ("TriggerAuthentication", _set("kind", "TriggerAuth"), "'TriggerAuth' is not one of"),
    ],
)
def test_the_keda_schema_refuses_typos_wrong_types_and_missing_fields(kind, mutate, said):
    (doc,) = by_kind(kind)
    keda_validate(doc)
    bad = copy.deepcopy(doc)
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError) as refused:
        keda_validate(bad)
    assert said in refused.value.message, refused.value.message


def test_the_keda_schema_is_a_valid_schema_that_states_every_objects_openness():
    """Our own schema (not KEDA's CRD): a valid 2020-12 schema, and every object that lists
    its properties says whether others are allowed, so none is left open by oversight."""
    jsonschema.Draft202012Validator.check_schema(KEDA_SCHEMA)
    text = (ROOT / "tests" / "support" / "schemas" / "keda_v1alpha1.yaml").read_text()
    assert "NOT KEDA's CRD" in text
    unstated = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            dispatch = where in ("", "/allOf/0/if", "/allOf/1/if")  # picks the kind only
            if "properties" in node and "additionalProperties" not in node and not dispatch:
                unstated.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(KEDA_SCHEMA, "")
    assert unstated == []
    # The fields KEDA documents for ScaledObject are all described.
    spec = KEDA_SCHEMA["$defs"]["ScaledObjectSpec"]["properties"]
    assert set(spec) == {
        "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
        "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
        "triggers",
    }  # fmt: skip
    # A fuller ScaledObject than the farm's own still validates: the schema is not just
    # shaped around infra/k8s/keda.yaml.
    keda_validate(
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": "w", "namespace": "n", "labels": {"a": "b"}},
            "spec": {
                "scaleTargetRef": {
                    "apiVersion": "apps/v1",
                    "kind": "StatefulSet",
                    "name": "w",
                    "envSourceContainerName": "c",
                },
                "pollingInterval": 30,
                "cooldownPeriod": 300,
                "initialCooldownPeriod": 0,
                "idleReplicaCount": 0,
                "minReplicaCount": 1,
                "maxReplicaCount": 100,
                "fallback": {"failureThreshold": 3, "replicas": 6, "behavior": "static"},
                "advanced": {
                    "restoreToOriginalReplicaCount": True,
                    "horizontalPodAutoscalerConfig": {
                        "name": "h",
                        "behavior": {
                            "scaleDown": {
                                "stabilizationWindowSeconds": 300,
                                "selectPolicy": "Max",
                                "policies": [
                                    {"type": "Percent", "value": 100, "periodSeconds": 15}
                                ],
                            }
                        },
                    },
                    "scalingModifiers": {
                        "formula": "a + b",
                        "target": "2",
                        "activationTarget": "0",
                        "metricType": "Value",
                    },
                },
                "triggers": [
                    {
                        "type": "redis",
                        "name": "a",
                        "metadata": {"listName": "q"},
                        "authenticationRef": {"name": "t", "kind": "ClusterTriggerAuthentication"},
                        "metricType": "AverageValue",
                        "useCachedMetrics": False,
                    },
                    {
                        "type": "cpu",
                        "name": "b",
                        "metadata": {"value": "60"},
                        "metricType": "Utilization",
                    },
                ],
            },
        }
    )
    keda_validate(
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "t"},
            "spec": {
                "secretTargetRef": [{"parameter": "password", "name": "s", "key": "k"}],
                "configMapTargetRef": [{"parameter": "host", "name": "c", "key": "k"}],
                "env": [{"parameter": "user", "name": "USER", "containerName": "c"}],
                "podIdentity": {"provider": "aws", "roleArn": "arn:x", "identityOwner": "workload"},
            },
        }
    )


def test_keda_resources_validate_against_the_keda_schema():
    kinds = [doc["kind"] for doc in by_kind("ScaledObject") + by_kind("TriggerAuthentication")]
    assert sorted(kinds) == ["ScaledObject", "TriggerAuthentication"]
    for doc in by_kind("ScaledObject") + by_kind("TriggerAuthentication"):
        keda_validate(doc)


def test_compose_file_validates_against_the_compose_spec(tmp_path):
    check = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    done = subprocess.run([*check, str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("    image: redis:7\n", "    imag: redis:7\n"))
    done = subprocess.run([*check, str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "imag" in done.stdout, done.stdout


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"secret.example.yaml"}
    assert kustomization["namespace"] == "render-farm"


# --------------------------------------------------------------------------- KEDA


def test_keda_triggers_name_the_lists_kombu_writes(redis_url, tmp_path):
    """One message at every priority into a real Redis: the lists kombu created are exactly
    the triggers' list names, and the scaling formula adds every trigger."""
    (scaled,) = by_kind("ScaledObject")
    triggers = scaled["spec"]["triggers"]
    settings = FarmSettings(redis_url=redis_url, storage=(tmp_path / "s").as_uri())
    assert settings.key_prefix == "farm:"  # the manifests assume the default prefix
    with Farm(settings) as farm:
        enqueue(farm.celery, [(f"job{p}", RENDER_QUEUE, p) for p in range(10)])
        written = set(raw(farm).keys(f"{settings.key_prefix}celery:{RENDER_QUEUE}*"))
        assert all(raw(farm).type(k) == "list" for k in written)
    names = {t["metadata"]["listName"] for t in triggers}
    assert names == written
    assert names == {RedisKeys().broker_queue(RENDER_QUEUE, s) for s in PRIORITY_STEPS}
    assert len(triggers) == len(PRIORITY_STEPS) == 10
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
    assert sorted(modifiers["formula"].split(" + ")) == sorted(t["name"] for t in triggers)


def test_keda_scales_the_worker_deployment_with_the_clusters_redis_password():
    (scaled,) = by_kind("ScaledObject")
    deployment = deployment_named("farm-worker")
    (auth,) = by_kind("TriggerAuthentication")
    (secret,) = by_kind("Secret")
    (service,) = [s for s in by_kind("Service") if s["metadata"]["name"] != "farm-api"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    for t in scaled["spec"]["triggers"]:
        assert t["type"] == "redis" and t["authenticationRef"]["name"] == auth["metadata"]["name"]
        host = t["metadata"]["address"].split(":")[0]
        assert host == f"{service['metadata']['name']}.render-farm.svc.cluster.local"
        assert "password" not in t["metadata"]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password" and ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]


# --------------------------------------------------------------------------- Kubernetes


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def deployment_named(name: str) -> dict:
    (found,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == name]
    return found


def test_worker_pods_take_one_gpu_and_their_secrets_from_the_cluster():
    deployment = deployment_named("farm-worker")
    assert {d["metadata"]["name"] for d in by_kind("Deployment")} == {"farm-worker", "farm-api"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "cuda:0" in container["args"]
    env = env_of(container)
    for name in ("FARM_REDIS_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "farm-secrets", name
        assert "value" not in env[name]
    # Long enough for SIGTERM's hand-back (a step, then the record written back).
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert container["readinessProbe"]["exec"]["command"] == ["python", "-m", "farm.local.probe"]


def test_the_api_deployment_serves_on_a_service_and_is_ready_once_redis_answers():
    api = deployment_named("farm-api")
    pod = api["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["farm", "serve"] and "0.0.0.0" in container["args"]
    assert container["image"].startswith("render-farm-client")  # the light image: no torch
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    (port,) = container["ports"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = env_of(container)
    for name in ("FARM_REDIS_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "farm-secrets", name
    (service,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "farm-api"]
    assert service["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
    assert (
        service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    )
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert int(container["args"][container["args"].index("--port") + 1]) == port["containerPort"]


def test_compose_api_serves_on_loopback_with_a_readiness_check():
    api = compose()["services"]["api"]
    assert api["command"][:2] == ["farm", "serve"]
    assert api["ports"] == ["127.0.0.1:8000:8000"]
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["build"]["dockerfile"] == "infra/client.Dockerfile"
    assert api["environment"]["FARM_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")


def test_redis_statefulset_keeps_an_aof_on_a_volume_behind_the_password():
    (sts,) = by_kind("StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args and "--requirepass $(REDIS_PASSWORD)" in args
    assert "--maxmemory-policy noeviction" in args  # workers refuse any other
    secret_ref = env_of(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret_ref == {"name": "farm-secrets", "key": "REDIS_PASSWORD"}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]


def test_probe_answers_whether_redis_does(redis_url):
    probe = [sys.executable, "-m", "farm.local.probe"]
    ok = subprocess.run(probe, env={"FARM_REDIS_URL": redis_url}, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    dead = subprocess.run(
        probe,
        env={"FARM_REDIS_URL": "redis://:secret@127.0.0.1:1/0"},
        capture_output=True,
        text=True,
    )
    assert dead.returncode == 1 and "did not answer" in dead.stderr
    assert "secret" not in dead.stderr


# --------------------------------------------------------------------------- compose


def test_every_compose_worker_reserves_exactly_one_gpu_of_its_own():
    services = compose()["services"]
    workers = {n: s for n, s in services.items() if s.get("command", [None, None])[1] == "worker"}
    assert len(workers) >= 2
    ids = []
    for name, svc in workers.items():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        (gpu,) = device["device_ids"]
        ids.append(gpu)
        assert name == f"worker-gpu{gpu}"
        # Inside the container its one GPU is cuda:0; its name says which one it is.
        assert svc["command"][2:4] == ["--device", "cuda:0"]
        assert svc["command"][5].startswith(f"cuda{gpu}@")
        assert int(svc["stop_grace_period"].rstrip("s")) >= 30
        assert svc["build"]["dockerfile"] == "infra/worker.Dockerfile"
    assert len(set(ids)) == len(ids)


def test_compose_redis_minio_and_flower():
    services = compose()["services"]
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and '--requirepass "$$REDIS_PASSWORD"' in command
    assert "--maxmemory-policy noeviction" in command  # workers refuse any other
    assert "${REDIS_PASSWORD:?" in redis["environment"]["REDIS_PASSWORD"]
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert redis["volumes"] == ["redis-data:/data"]
    env = services["worker-gpu0"]["environment"]
    assert env["FARM_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")
    bucket = re.match(r"s3://([^/]+)/", env["FARM_STORAGE"]).group(1)
    assert bucket == "${FARM_BUCKET:-renders}" == services["minio-bucket"]["environment"]["BUCKET"]
    assert "mc mb" in " ".join(services["minio-bucket"]["entrypoint"])
    flower = services["flower"]
    assert flower["command"][:4] == ["celery", "-A", "farm.queue.flower", "flower"]
    assert flower["environment"]["FARM_REDIS_URL"] == env["FARM_REDIS_URL"]
    for name, svc in services.items():  # nothing listens beyond this machine
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    assert services["client"]["build"]["dockerfile"] == "infra/client.Dockerfile"


def test_flower_app_speaks_the_farms_broker_dialect(monkeypatch, redis_url):
    monkeypatch.setenv("FARM_REDIS_URL", redis_url)
    sys.modules.pop("farm.queue.flower", None)
    from farm.queue.flower import app

    options = app.conf.broker_transport_options
    assert options["global_keyprefix"] == "farm:celery:"
    assert options["priority_steps"] == PRIORITY_STEPS
    assert app.conf.accept_content == ["json"]
    sys.modules.pop("farm.queue.flower", None)


def test_flower_on_the_farm_app_counts_messages_at_every_priority(redis_url, tmp_path):
    """compose's `celery -A farm.queue.flower flower`, started for real: its broker view finds all
    ten messages, spread over kombu's ten priority lists under the `farm:celery:` prefix."""
    pytest.importorskip("flower")
    settings = FarmSettings(redis_url=redis_url, storage=(tmp_path / "s").as_uri())
    with Farm(settings) as farm:
        enqueue(farm.celery, [(f"job{p}", RENDER_QUEUE, p) for p in range(10)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FARM_REDIS_URL": redis_url, "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "farm.queue.flower", "flower", f"--port={port}"]
        + ["--address=127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                url = f"http://127.0.0.1:{port}/api/queues/length"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    answer = json.load(resp)
                break
            except OSError:
                assert flower.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        flower.kill()
        flower.wait()
    assert answer == {"active_queues": [{"name": RENDER_QUEUE, "messages": 10}]}


# --------------------------------------------------------------------------- images


def dockerfile(name: str) -> tuple[str, list[str]]:
    """The Dockerfile's text and its RUN commands (continuation lines joined)."""
    text = (ROOT / "infra" / name).read_text()
    joined = re.sub(r"\\\n", " ", text)
    return text, [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


def test_worker_image_installs_a_cuda_torch_before_the_farm():
    text, runs = dockerfile("worker.Dockerfile")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", args["TORCH_INDEX_URL"])
    assert args["TORCH_VERSION"] == "2.13.0"
    torch_run = next(i for i, r in enumerate(runs) if "torch==" in r)
    farm_run = next(i for i, r in enumerate(runs) if '".[worker]"' in r)
    assert torch_run < farm_run
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_run]
    assert "torch.version.cuda" in runs[torch_run] and "torch.version.cuda" in runs[farm_run]
    assert re.search(r"^USER farm$", text, re.M) and "HF_HUB_OFFLINE=1" in text
    assert text.rstrip().endswith('CMD ["farm", "worker", "--device", "cuda:0"]')


def test_client_image_has_no_torch():
    text, runs = dockerfile("client.Dockerfile")
    installs = [r for r in runs if "pip install" in r]
    assert installs == [r for r in runs if '".[flower]"' in r] and len(installs) == 1
    assert "find_spec('torch')" in installs[0]
    assert "torch" not in re.sub(r"python -c .*", "", installs[0])
    assert re.search(r"^USER farm$", text, re.M)
    # The extras it installs pull no torch either.
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    light = project["dependencies"] + project["optional-dependencies"]["flower"]
    assert not [d for d in light if re.match(r"(torch|diffusers|transformers)\b", d)]


def test_dockerignore_keeps_secrets_and_the_venv_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".venv", ".git"} <= ignored


# --------------------------------------------------------------------------- settings


def farm_names(text: str) -> set[str]:
    return set(re.findall(r"\bFARM_[A-Z0-9_]+\b", text))


def test_every_farm_variable_is_a_real_setting():
    """A misspelt FARM_* name would be ignored silently by pydantic-settings: refuse it here."""
    fields = {f"FARM_{name.upper()}" for name in FarmSettings.model_fields}
    # Not settings, but compose/.env variables of their own (no container reads them).
    own = {"FARM_BUCKET", "FARM_HOST_NAME"}
    files = [COMPOSE, ROOT / ".env.example", *K8S.glob("*.yaml"), *ROOT.glob("infra/*.Dockerfile")]
    used = {}
    for path in files:
        for name in farm_names(path.read_text()):
            used.setdefault(name, path.name)
    unknown = {n: f for n, f in used.items() if n not in fields | own}
    assert not unknown, unknown
    assert {"FARM_REDIS_URL", "FARM_STORAGE", "FARM_S3_ENDPOINT_URL"} <= set(used)
    # The compose/.env variables of their own never reach a container as FARM_ settings.
    for svc in compose()["services"].values():
        env = svc.get("environment", {})
        assert not own & set(env)
