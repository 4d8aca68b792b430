"""The deploy/ files agree with the code: they parse, validate, and run commands that exist.

No network and no container engine: Kubernetes manifests are checked against the schemas
that ship inside the ``kubernetes-validate`` package.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from cli.main import cli
from ingest.settings import Settings
from webhook.app import create_app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
PROCFILE = ROOT / "Procfile"
IMAGE = "whatsapp-media-ingest"
PORT = 8000
QUEUES = ("media.small", "media.large", "maintenance")
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for

YAML_FILES = sorted([COMPOSE, *K8S.glob("*.yaml")])
UNITS = sorted(SYSTEMD.glob("*.service"))


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in _documents(K8S / name)]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _k8s_resources() if doc["kind"] == kind]


def _containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = resource["spec"]["template"]["spec"]["containers"]
    return containers


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return compose


def _compose_ingest_services() -> dict[str, dict[str, Any]]:
    """The compose services that run the project's image (its entrypoint is ``ingest``)."""
    return {
        name: service
        for name, service in _compose()["services"].items()
        if str(service.get("image", "")).startswith(IMAGE)
    }


def _dockerfile_json(instruction: str) -> list[str]:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith(instruction + " "):
            value: list[str] = json.loads(line.removeprefix(instruction + " "))
            return value
    raise AssertionError(f"no {instruction} in {DOCKERFILE}")


def _unit(path: Path) -> dict[str, list[str]]:
    """``Key=value`` settings of a unit file, every value of a key in order."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _procfile() -> dict[str, str]:
    entries = {}
    for line in PROCFILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def _expand_defaults(command: str) -> str:
    """``${PORT:-8000}`` as a shell expands it when PORT is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", command)


def ingest_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv after ``ingest``) for every ``ingest`` command any deploy file runs."""
    for name, command in _procfile().items():
        argv = shlex.split(_expand_defaults(command))
        assert argv[0] == "ingest", f"Procfile {name}: {command}"
        yield f"Procfile {name}", argv[1:]
    yield "Dockerfile CMD", _dockerfile_json("CMD")
    for name, service in _compose_ingest_services().items():
        yield f"compose {name}", list(service["command"])
        test = service.get("healthcheck", {}).get("test")
        if test and test[1] == "ingest":
            yield f"compose {name} healthcheck", test[2:]
    for resource in _k8s_resources():
        if resource["kind"] not in ("Deployment", "Job"):
            continue
        for container in _containers(resource):
            where = f"k8s {resource['metadata']['name']}"
            assert container["image"] == IMAGE, where
            yield where, list(container["args"])
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                command = container.get(probe, {}).get("exec", {}).get("command")
                if command:
                    assert command[0] == "ingest", where
                    yield f"{where} {probe}", command[1:]
    for unit in UNITS:
        for exec_start in _unit(unit)["ExecStart"]:
            argv = shlex.split(exec_start.replace("%i", QUEUES[0]))
            assert argv[0] == "/opt/ingest/.venv/bin/ingest", unit.name
            yield f"systemd {unit.name}", argv[1:]


COMMANDS = list(ingest_commands())


def _resolve(argv: list[str]) -> click.Command:
    """The click command ``ingest argv`` runs; click's own parser rejects unknown options."""
    command: click.Command = cli
    args = list(argv)
    while isinstance(command, click.Group):
        assert args, f"ingest {' '.join(argv)}: a group, no subcommand"
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"ingest {' '.join(argv)}: no command {args[0]!r}"
        command, args = sub, args[1:]
    # Parses and converts every option (unknown names, bad ints and ranges raise).
    command.make_context(command.name or "ingest", args)
    return command


def test_every_yaml_file_parses() -> None:
    assert COMPOSE in YAML_FILES
    assert len(YAML_FILES) >= 5
    for path in YAML_FILES:
        assert _documents(path), path


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
def test_kubernetes_manifests_validate_against_the_schemas(version: str) -> None:
    checked = 0
    for resource in _k8s_resources():
        if resource["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: test_keda_scaled_objects
        kubernetes_validate.validate(resource, version, strict=True)
        checked += 1
    assert checked >= 9


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    (beat,) = [d for d in _of_kind("Deployment") if _containers(d)[0]["args"] == ["beat"]]
    broken = json.loads(json.dumps(beat))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_keda_scaled_objects_scale_each_worker_on_its_queue() -> None:
    workers = {
        doc["metadata"]["name"]: doc
        for doc in _of_kind("Deployment")
        if doc["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    }
    scaled = _of_kind("ScaledObject")
    assert len(scaled) == len(workers) == len(QUEUES)
    targets = set()
    for obj in scaled:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert obj["metadata"]["name"]
        spec = obj["spec"]
        target = spec["scaleTargetRef"]["name"]
        assert target in workers
        targets.add(target)
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "redis"
        metadata = trigger["metadata"]
        assert metadata["address"]
        assert int(metadata["listLength"]) > 0
        (container,) = _containers(workers[target])
        args = container["args"]
        assert metadata["listName"] == args[args.index("--queues") + 1]
    assert targets == set(workers)


def test_one_worker_deployment_per_queue_with_a_grace_period_above_the_shutdown_bound() -> None:
    config = _of_kind("ConfigMap")[0]["data"]
    shutdown = float(config["INGEST_WORKER_SHUTDOWN_SECONDS"])
    assert shutdown == Settings.model_fields["worker_shutdown_seconds"].default == 25
    queues = []
    for deployment in _of_kind("Deployment"):
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] != "worker":
            continue
        spec = deployment["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] == 40 > shutdown
        (container,) = spec["containers"]
        args = container["args"]
        queues.append(args[args.index("--queues") + 1])
        probe = container["livenessProbe"]["exec"]["command"]
        assert probe == ["ingest", "worker-alive", "--max-age", "60"]
        assert "cpu" in container["resources"]["requests"]
    assert sorted(queues) == sorted(QUEUES)


def test_exactly_one_beat_and_a_migration_job() -> None:
    beats = [d for d in _of_kind("Deployment") if _containers(d)[0]["args"] == ["beat"]]
    assert len(beats) == 1
    assert beats[0]["spec"]["replicas"] == 1
    assert beats[0]["spec"]["strategy"] == {"type": "Recreate"}
    (job,) = _of_kind("Job")
    assert _containers(job)[0]["args"] == ["db", "upgrade"]


def test_the_secret_holds_placeholders_only() -> None:
    (secret,) = _of_kind("Secret")
    data = secret["stringData"]
    for name in (
        "INGEST_DATABASE_URL",
        "INGEST_SECRET_KEY",
        "INGEST_METRICS_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):
        assert "CHANGE-ME" in data[name], name
    secret_names = set(data)
    (config,) = _of_kind("ConfigMap")
    assert not secret_names & set(config["data"])


def test_compose_never_holds_a_literal_secret() -> None:
    environment = _compose()["x-ingest"]["environment"]
    assert environment["INGEST_SECRET_KEY"].startswith("${INGEST_SECRET_KEY:?")
    assert environment["AWS_SECRET_ACCESS_KEY"].startswith("${")


def test_compose_services_depend_on_the_migration() -> None:
    services = _compose()["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["db", "upgrade"]
    assert migrate["restart"] == "no"
    for name in ("web", "worker", "beat"):
        service = services[name]
        condition = service["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name
        assert service["restart"] in ("always", "unless-stopped"), name
    assert "container_name" not in services["worker"]
    assert "ports" not in services["worker"]
    for name in ("postgres", "redis", "minio"):
        assert services[name]["healthcheck"]["test"], name
    bucket = services["create-bucket"]
    assert bucket["image"].startswith("minio/mc")
    assert "mc mb" in " ".join(bucket["entrypoint"])
    declared = set(_compose()["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in declared, volume


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_ingest_command_exists_with_its_options(where: str, argv: list[str]) -> None:
    _resolve(argv)


def test_the_command_resolver_rejects_what_the_cli_lacks() -> None:
    with pytest.raises(click.NoSuchOption):
        _resolve(["worker", "--queue", "media.small"])
    with pytest.raises(AssertionError):
        _resolve(["wokrer"])
    with pytest.raises(click.BadParameter):
        _resolve(["web", "--port", "eighty"])


def _set_ingest_names() -> dict[str, set[str]]:
    """Every ``INGEST_*`` name any deploy file mentions, by file."""
    files = [DOCKERFILE, PROCFILE, *YAML_FILES, *UNITS]
    return {
        str(path.relative_to(ROOT)): set(
            re.findall(r"\bINGEST_[A-Z0-9_]*[A-Z0-9]", path.read_text())
        )
        for path in files
    }


def test_every_ingest_name_is_a_setting() -> None:
    mentioned = _set_ingest_names()
    assert "INGEST_SECRET_KEY" in mentioned["deploy/compose.yaml"]
    for where, names in mentioned.items():
        for name in names:
            assert name.removeprefix("INGEST_").lower() in Settings.model_fields, (where, name)


def test_ports_and_probe_paths_are_the_apps(make_settings: Any) -> None:
    app = create_app(make_settings())
    routes = {rule.rule for rule in app.url_map.iter_rules()}
    assert {"/healthz", "/readyz"} <= routes

    assert _dockerfile_json("CMD") == ["web", "--host", "0.0.0.0", "--port", str(PORT)]
    assert _dockerfile_json("ENTRYPOINT") == ["ingest"]
    dockerfile = DOCKERFILE.read_text()
    assert f"EXPOSE {PORT}" in dockerfile
    assert f"http://127.0.0.1:{PORT}/healthz" in dockerfile

    web = _compose()["services"]["web"]
    assert f"http://127.0.0.1:{PORT}/readyz" in " ".join(web["healthcheck"]["test"])
    assert web["ports"] == [f"127.0.0.1:{PORT}:{PORT}"]

    (deployment,) = [d for d in _of_kind("Deployment") if _containers(d)[0]["args"][0] == "web"]
    (container,) = _containers(deployment)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    args = container["args"]
    assert int(args[args.index("--port") + 1]) == PORT == ports["http"]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
        assert path in routes
    (service,) = _of_kind("Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    (pdb,) = _of_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]

    web_unit = _unit(SYSTEMD / "ingest-web.service")["ExecStart"][0]
    assert f"--port {PORT}" in web_unit
    assert "--host 0.0.0.0 --port ${PORT:-8000}" in _procfile()["web"]


def test_compose_and_procfile_name_the_same_process_types() -> None:
    procfile = set(_procfile())
    compose = set(_compose_ingest_services())
    rename = {"release": "migrate"}
    assert (
        {rename.get(name, name) for name in procfile}
        == compose
        == {
            "migrate",
            "web",
            "worker",
            "beat",
        }
    )


def test_systemd_units_run_as_ingest_hardened() -> None:
    names = {unit.name for unit in UNITS}
    assert names == {
        "ingest-web.service",
        "ingest-worker@.service",
        "ingest-beat.service",
        "ingest-migrate.service",
    }
    for unit in UNITS:
        settings = _unit(unit)
        assert settings["User"] == ["ingest"], unit.name
        assert settings["EnvironmentFile"] == ["/etc/ingest/ingest.env"], unit.name
        for key, value in (
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ReadWritePaths", "/var/lib/ingest"),
            ("PrivateTmp", "yes"),
            ("ProtectHome", "yes"),
            ("ProtectKernelTunables", "yes"),
        ):
            assert settings[key] == [value], (unit.name, key)
        if unit.name == "ingest-migrate.service":
            assert settings["Type"] == ["oneshot"]
            assert "Restart" not in settings
        else:
            assert settings["Restart"] == ["always"], unit.name
            assert "ingest-migrate.service" in settings["Requires"][0], unit.name
            assert "ingest-migrate.service" in settings["After"][0], unit.name
    worker = _unit(SYSTEMD / "ingest-worker@.service")
    assert worker["TimeoutStopSec"] == ["40"]
    assert worker["ExecStart"] == ["/opt/ingest/.venv/bin/ingest worker --queues %i"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point the units at a stand-in for
    # /opt/ingest/.venv/bin/ingest, and instantiate the template for one queue.
    program = tmp_path / "ingest"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    paths = []
    for unit in UNITS:
        name = unit.name.replace("@.", f"@{QUEUES[0]}.")
        copy = tmp_path / name
        copy.write_text(unit.read_text().replace("/opt/ingest/.venv/bin/ingest", str(program)))
        if name != unit.name:  # verify loads an instance's template from the same directory
            (tmp_path / unit.name).write_text(copy.read_text())
        paths.append(str(copy))
    result = subprocess.run(
        ["systemd-analyze", "verify", *paths],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        # The host, not the units: no "ingest" user, no PostgreSQL unit, no systemd as PID 1.
        if line.strip() and not re.search(r"postgresql\.service|Failed to .*bus|not booted", line)
    ]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
