"""The shipped deployment: the systemd unit passes ``systemd-analyze verify``; the Kubernetes
manifests pass ``kubernetes-validate --strict`` (the ServiceMonitor, a CRD the tool has no
schema for, is checked against the fields of its CRD here); both grant exactly the capability
set the agent needs (the set ``tests/integration/test_deploy_privileges.py`` starts it with);
and the DaemonSet's invariants hold: the config file uses only the agent's flags, the probes
exec the agent's ``probe``, memory request = limit = what the budget derives from, the grace
period covers the flush, the token comes from a Secret that is never committed.

The helpers that read the capability sets are used by that integration test too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from agent.cli.parser import Parser, build_parser
from agent.mirror import budget
from agent.mirror.config import ForwardConfig
from agent.sources.ebpf.privileges import EBPF_CAPS, MEMLOCK_CAP, Host, check_buffer_mib
from agent.sources.ebpf.source import default_buffer_mib
from agent.sources.ring import native

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "mirror-agent.service"
MANIFEST = DEPLOY / "daemonset.yaml"
SERVICE_MONITOR = DEPLOY / "servicemonitor.yaml"
SECRET_TEMPLATE = DEPLOY / "token-secret.example.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
#: What the agent needs with eBPF and the perf rings, and nothing else (proven live).
NEEDED = {*EBPF_CAPS, MEMLOCK_CAP}
NAMESPACE = "mirror-agent"
CONFIG_PATH = "/etc/mirror-agent/config.toml"
#: The oldest Kubernetes the manifests are checked against (the oldest schemas
#: kubernetes-validate ships; DaemonSet maxSurge is GA since 1.25), and the tool's newest.
KUBERNETES_VERSIONS = ("1.25.0", None)
#: Config keys of the control server's listener, accepted until ``run`` has the flags.
def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (continuations joined), values in order per key."""
    out: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def unit_capabilities(path: Path = UNIT) -> set[str]:
    """The unit's AmbientCapabilities= (``CAP_...`` names)."""
    return {c for v in unit_settings(path)["AmbientCapabilities"] for c in v.split()}


def manifest_documents(path: Path = MANIFEST) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _doc(kind: str, path: Path = MANIFEST) -> dict[str, Any]:
    return next(d for d in manifest_documents(path) if d["kind"] == kind)


def pod_spec(path: Path = MANIFEST) -> dict[str, Any]:
    spec: dict[str, Any] = _doc("DaemonSet", path)["spec"]["template"]["spec"]
    return spec


def agent_container(path: Path = MANIFEST) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(path)["containers"]
    return next(c for c in containers if c["name"] == "agent")


def daemonset_capabilities(path: Path = MANIFEST) -> set[str]:
    """The agent container's added capabilities, as ``CAP_...`` names."""
    caps = agent_container(path)["securityContext"]["capabilities"]
    return {f"CAP_{c}" for c in caps["add"]}


def config_text() -> str:
    text: str = _doc("ConfigMap")["data"]["config.toml"]
    return text


def config() -> dict[str, Any]:
    """The ConfigMap's config.toml, as the agent reads it."""
    return tomllib.loads(config_text())


def config_examples() -> dict[str, Any]:
    """The commented-out settings of config.toml (``# key = value`` lines), each parsed."""
    out: dict[str, Any] = {}
    for line in config_text().splitlines():
        m = re.fullmatch(r"\s*#\s*([a-z][a-z0-9-]*\s*=\s*\S.*)", line)
        if m:
            out.update(tomllib.loads(m[1]))
    return out


def _subparser(parser: Parser, name: str) -> Parser | None:
    return parser.commands.get(name)


def _long_options(parser: Parser) -> dict[str, argparse.Action]:
    """Long flag name without ``--`` -> its action (not --help, not --config itself)."""
    out: dict[str, argparse.Action] = {}
    for action in parser.declared:
        for opt in action.option_strings:
            if opt.startswith("--") and opt not in ("--help", "--config"):
                out[opt[2:]] = action
    return out


def global_keys() -> dict[str, argparse.Action]:
    return _long_options(build_parser())


def run_keys() -> dict[str, argparse.Action]:
    run = _subparser(build_parser(), "run")
    assert run is not None
    return _long_options(run)


def config_argv(settings: dict[str, Any]) -> list[str]:
    """``settings`` as the command line the agent would take them from."""
    before: list[str] = []
    after: list[str] = []
    glob, run = global_keys(), run_keys()
    for key, value in settings.items():
        if key not in glob and key not in run:
            continue
        out = before if key in glob else after
        if isinstance(value, bool):
            if value:
                out.append(f"--{key}")
        elif isinstance(value, list):
            out.append(f"--{key}={','.join(str(v) for v in value)}")
        else:
            out.append(f"--{key}={value}")
    return [*before, "run", *after]


def dockerfile_entrypoint() -> list[str]:
    line = next(ln for ln in DOCKERFILE.read_text().splitlines()
                if ln.startswith("ENTRYPOINT "))
    entry: list[str] = json.loads(line.removeprefix("ENTRYPOINT "))
    return entry


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[:-2]) * factor
    return int(quantity)


def _mounts() -> dict[str, dict[str, Any]]:
    """mountPath -> the volume it mounts, with ``readOnly`` folded in."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    return {m["mountPath"]: {**volumes[m["name"]], "readOnly": m.get("readOnly", False)}
            for m in agent_container()["volumeMounts"]}


def _mount_of(path: str) -> tuple[str, dict[str, Any]]:
    """The (mountPath, volume) a container path lies in: the deepest mount above it."""
    found = [(mp, v) for mp, v in _mounts().items()
             if path == mp or path.startswith(mp.rstrip("/") + "/")]
    assert found, f"{path} is on no volume (the root filesystem is read-only)"
    return max(found, key=lambda mv: len(mv[0]))


def test_unit_grants_exactly_the_needed_capabilities() -> None:
    s = unit_settings()
    assert unit_capabilities() == NEEDED
    assert set(s["CapabilityBoundingSet"][0].split()) == NEEDED
    assert "CAP_SYS_ADMIN" not in s["AmbientCapabilities"][0]


def test_unit_keeps_home_hidden_and_needs_no_cache() -> None:
    """The native decoder is built at install time: the unit writes no cache anywhere."""
    s = unit_settings()
    assert "CacheDirectory" not in s
    assert s["ProtectHome"] == ["yes"]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify checks that ExecStart's program exists, and /opt/mirror-agent is where the
    unit is installed, not here: the copy points at this venv's mirror-agent, all else equal.
    Warnings (unknown keys, bad values) print but still exit 0, so any output fails too."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing under CI: make setup installs systemd")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    agent = Path(sys.executable).parent / "mirror-agent"
    assert agent.exists(), "the venv has no mirror-agent script (pip install -e .)"
    text = UNIT.read_text()
    assert text.count("/opt/mirror-agent/.venv/bin/mirror-agent") == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/opt/mirror-agent/.venv/bin/mirror-agent", str(agent)))
    res = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res


def test_manifest_holds_what_a_node_agent_needs_in_apply_order() -> None:
    """The Namespace first; no Secret, so re-applying never replaces the real token."""
    docs = manifest_documents()
    assert [d["kind"] for d in docs] == [
        "Namespace", "ServiceAccount", "ConfigMap", "Service", "DaemonSet"]
    assert docs[0]["metadata"]["name"] == NAMESPACE
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in docs[1:])
    assert pod_spec()["serviceAccountName"] == _doc("ServiceAccount")["metadata"]["name"]


def _validate(path: Path, version: str | None) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    assert tool.exists(), "kubernetes-validate is missing: pip install -e '.[test]'"
    pin = ["--kubernetes-version", version] if version else []
    return subprocess.run([str(tool), "--strict", *pin, str(path)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", [MANIFEST, SECRET_TEMPLATE], ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes_strictly(path: Path, version: str | None) -> None:
    """kubernetes-validate checks against the API schemas it ships (no cluster, offline);
    --strict rejects unknown fields, e.g. a misspelt securityContext key. A kind it has no
    schema for only warns and passes: so every document must have passed, by name."""
    res = _validate(path, version)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Couldn't find schema" not in out, out
    for d in manifest_documents(path):
        assert f"passed for resource {d['kind'].lower()}/{d['metadata']['name']} " in out, out


def test_kubernetes_validate_has_no_schema_for_the_servicemonitor() -> None:
    """Why the ServiceMonitor is in a file of its own, checked below: the tool passes a CRD
    it does not know, unknown fields and all. If a version learns it, validate it there."""
    res = _validate(SERVICE_MONITOR, None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Couldn't find schema for kind ServiceMonitor" in res.stdout + res.stderr


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


_STR: dict[str, Any] = {"type": "string"}
_DURATION: dict[str, Any] = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
               r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_SECRET_KEY = _object({"name": _STR, "key": _STR, "optional": {"type": "boolean"}}, ("key",))
#: The part of monitoring.coreos.com/v1 ServiceMonitor's schema (prometheus-operator's
#: CRD, example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml) the
#: file uses, with its types, patterns and required fields; anything else is refused.
SERVICE_MONITOR_SCHEMA = _object({
    "apiVersion": {"const": "monitoring.coreos.com/v1"},
    "kind": {"const": "ServiceMonitor"},
    "metadata": _object({"name": _STR, "namespace": _STR,
                         "labels": {"type": "object", "additionalProperties": _STR}},
                        ("name", "namespace")),
    "spec": _object({
        "selector": _object({"matchLabels": {"type": "object",
                                             "additionalProperties": _STR}}),
        "endpoints": {"type": "array", "minItems": 1, "items": _object({
            "port": _STR, "path": _STR, "scheme": {"enum": ["http", "https"]},
            "interval": _DURATION, "scrapeTimeout": _DURATION,
            "authorization": _object({"type": _STR, "credentials": _SECRET_KEY}),
            "relabelings": {"type": "array", "items": _object({
                "sourceLabels": {"type": "array", "items": {
                    "type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
                "targetLabel": _STR, "regex": _STR, "replacement": _STR,
                "action": {"enum": ["replace", "keep", "drop", "labelmap"]}})}})},
    }, ("endpoints", "selector")),
}, ("apiVersion", "kind", "metadata", "spec"))


def test_servicemonitor_fits_its_crd_schema() -> None:
    docs = manifest_documents(SERVICE_MONITOR)
    assert len(docs) == 1
    jsonschema.validate(docs[0], SERVICE_MONITOR_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):  # the schema does refuse unknown fields
        jsonschema.validate({**docs[0], "spec": {**docs[0]["spec"], "endpoint": []}},
                            SERVICE_MONITOR_SCHEMA)


def test_servicemonitor_scrapes_the_agents_with_the_token() -> None:
    """Selects the headless Service by its labels, its port by name, in the same namespace,
    with the Secret and key the agents read their token from."""
    sm = manifest_documents(SERVICE_MONITOR)[0]
    svc = _doc("Service")
    assert sm["metadata"]["namespace"] == svc["metadata"]["namespace"] == NAMESPACE
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == _doc("DaemonSet")["spec"]["selector"]["matchLabels"]
    (endpoint,) = sm["spec"]["endpoints"]
    (port,) = svc["spec"]["ports"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    (secret,) = [s["secret"] for s in pod_spec()["volumes"][0]["projected"]["sources"]
                 if "secret" in s]
    creds = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert (creds["name"], creds["key"]) == (secret["name"], secret["items"][0]["key"])


def test_token_secret_template_commits_no_token() -> None:
    (secret,) = manifest_documents(SECRET_TEMPLATE)
    assert secret["kind"] == "Secret" and secret["metadata"]["namespace"] == NAMESPACE
    assert secret["stringData"] == {"token": ""} and "data" not in secret
    assert "openssl rand" in SECRET_TEMPLATE.read_text()
    volume = pod_spec()["volumes"][0]["projected"]["sources"]
    assert {"name": secret["metadata"]["name"],
            "items": [{"key": "token", "path": "token/token", "mode": 0o400}]} in [
        s.get("secret") for s in volume]


def test_manifest_grants_exactly_the_needed_capabilities_and_nothing_else() -> None:
    sc = agent_container()["securityContext"]
    assert daemonset_capabilities() == NEEDED == unit_capabilities()
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert not sc.get("privileged", False)
    spec = pod_spec()
    assert not any(spec.get(k) for k in ("hostPID", "hostIPC"))
    assert spec["automountServiceAccountToken"] is False


def test_pod_runs_on_every_node_in_its_network_namespace() -> None:
    ds = _doc("DaemonSet")
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"  # the shadow's cluster name
    assert {"operator": "Exists"} in spec["tolerations"]  # every taint, every effect
    assert spec["enableServiceLinks"] is False  # MIRROR_AGENT_PORT=tcp://... otherwise
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"]
    assert strategy["rollingUpdate"]["maxSurge"] == 0  # the listener is a host port


def test_mounts_are_read_only_but_the_state_directory() -> None:
    mounts = _mounts()
    writable = {mp for mp, v in mounts.items() if not v["readOnly"]}
    assert writable == {"/var/lib/mirror-agent"}
    assert mounts["/var/lib/mirror-agent"]["hostPath"]["path"] == "/var/lib/mirror-agent"
    for path in ("/lib/modules", "/usr/src"):  # bcc compiles against the node's headers
        assert mounts[path]["hostPath"] == {"path": path, "type": "Directory"}
    # Nothing of the host's /sys: the container's own cgroup mount holds its memory limit.
    assert not [mp for mp in mounts if mp == "/sys" or mp.startswith("/sys/")]


def test_config_uses_only_the_agents_flags() -> None:
    """Keys are long flag names without --: ``run``'s or the global ones (an unknown key
    makes the agent exit 2). The commented-out examples too."""
    known = set(run_keys()) | set(global_keys())
    for settings in (config(), config_examples()):
        assert set(settings) <= known, set(settings) - known
    assert {"iface", "port", "listen", "listen-token-file"} <= set(config())
    assert "record" in config_examples()


def test_config_values_pass_the_flags_own_checks() -> None:
    """Each value, given as its flag, parses: what the file, the environment or the command
    line says goes through the same check."""
    for settings in (config(), {**config(), **config_examples()}):
        args = build_parser().parse_args(config_argv(settings))
        assert args.command == "run" and args.port == [8080]


def test_agent_reads_the_config_file(tmp_path: Path) -> None:
    """The agent itself reads config.toml (``mirror-agent config``: the effective settings,
    nothing started), with the token at a path that exists here."""
    token = tmp_path / "token"
    token.write_text("0" * 64 + "\n")
    conf = tmp_path / "config.toml"
    conf.write_text(config_text().replace(config()["listen-token-file"], str(token)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_AGENT_")}
    res = subprocess.run([sys.executable, "-m", "agent.cli", "config", "--config", str(conf)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    shown = tomllib.loads(res.stdout)
    assert shown["iface"] == config()["iface"] and shown["listen"] == config()["listen"]


def test_config_memory_limit_is_left_to_the_cgroup() -> None:
    assert "memory-limit" not in config()


def test_config_files_are_where_the_volumes_put_them() -> None:
    """config.toml and the token from the projected volume, the recording on the one
    writable mount."""
    mp, volume = _mount_of(CONFIG_PATH)
    rel = {item["path"]: src for src in volume["projected"]["sources"]
           for kind in ("configMap", "secret") if kind in src
           for item in src[kind]["items"]}
    assert rel[str(Path(CONFIG_PATH).relative_to(mp))]["configMap"]["name"] == \
        _doc("ConfigMap")["metadata"]["name"]
    token = config()["listen-token-file"]
    assert _mount_of(token)[0] == mp and "secret" in rel[str(Path(token).relative_to(mp))]
    assert not _mount_of(config_examples()["record"])[1]["readOnly"]


def test_listen_port_is_the_container_and_service_port() -> None:
    host, _, port = config()["listen"].rpartition(":")
    assert host == "0.0.0.0"  # the probes GET 127.0.0.1; the token guards the rest
    (cport,) = agent_container()["ports"]
    (sport,) = _doc("Service")["spec"]["ports"]
    assert int(port) == cport["containerPort"] == sport["port"]
    assert sport["targetPort"] == cport["name"]


def test_container_runs_the_config_file() -> None:
    assert agent_container()["args"] == ["run", "--config", CONFIG_PATH]


def test_container_args_parse_as_the_agents_command_line() -> None:
    args = build_parser().parse_args(agent_container()["args"])
    assert args.command == "run" and str(args.config) == CONFIG_PATH


def _probes() -> dict[str, list[str]]:
    c = agent_container()
    return {k: c[k]["exec"]["command"] for k in ("startupProbe", "livenessProbe",
                                                 "readinessProbe")}


def test_probes_exec_the_agents_probe_subcommand() -> None:
    """Exec, not httpGet: with hostNetwork the kubelet would GET the node's address, which
    needs the token, and an httpGet probe cannot read a Secret. The agent is the image's
    entrypoint (exec does not go through it, so the same absolute path)."""
    entry = dockerfile_entrypoint()
    paths = {k: cmd[-1] for k, cmd in _probes().items()}
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                     "readinessProbe": "/readyz"}
    for cmd in _probes().values():
        assert cmd[:-1] == [*entry, "probe", "--config", CONFIG_PATH]
    c = agent_container()
    for k in _probes():
        assert 1 <= c[k]["timeoutSeconds"] <= c[k]["periodSeconds"]
    # bcc's compile at start may take long on a busy node: the startup probe allows minutes.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120


def test_probe_commands_parse_as_the_agents_command_line() -> None:
    for cmd in _probes().values():
        args = build_parser().parse_args(cmd[1:])
        assert args.command == "probe"


def test_memory_request_equals_the_limit_the_budget_derives_from() -> None:
    """The scheduler reserves what the agent may use; the agent budgets the limit less 1/8
    (no memory-limit in the config): 896 MiB of 1 GiB."""
    res = agent_container()["resources"]
    assert res["requests"]["memory"] == res["limits"]["memory"]
    limit = _bytes(res["limits"]["memory"])
    assert budget.host_limit(limit, 1 << 40) == (limit - limit // 8, "cgroup")
    assert budget.host_limit(limit, 1 << 40)[0] == 896 << 20


@pytest.mark.parametrize("cpus", [1, 2, 8, 16, 64, 128])
def test_manifest_memory_limit_fits_the_default_rings(cpus: int) -> None:
    """The agent refuses rings over half the cgroup's limit: the default must pass."""
    limit = _bytes(agent_container()["resources"]["limits"]["memory"])
    host = Host(caps=0, cap_last=40, uid=0, cpus=cpus, possible_cpus=cpus, perf_mlock_kb=516,
                perf_paranoid=2, memlock_rlimit=8 << 20, mem_available=1 << 40,
                cgroup_limit=limit)
    check_buffer_mib(host, default_buffer_mib(cpus), True, "perf", default=True)
    budget.derive(budget.host_limit(limit, 1 << 40)[0], cpus=cpus, origin="cgroup")


#: ForwardSink.close: waits close_timeout for the shadow, then up to 2 s more for the
#: result and 5 s for its thread (agent/sinks/forward.py).
FORWARD_CLOSE_EXTRA = 2 + 5
#: A slow disk the record queue drains to at shutdown, bytes/s.
SLOW_DISK = 10 << 20
#: Draining the rings and flushing reassembly through the hooks; detaching and exiting.
FLUSH_SECONDS, DETACH_SECONDS = 5, 1


def test_termination_grace_covers_the_flush_twice() -> None:
    """The arithmetic in the manifest's comment, from the agent's own figures."""
    limit = _bytes(agent_container()["resources"]["limits"]["memory"])
    queue = max(budget.derive(budget.host_limit(limit, 1 << 40)[0], cpus=cpus,
                              origin="cgroup").record_queue for cpus in (1, 2, 8, 64))
    worst = (FLUSH_SECONDS + ForwardConfig().close_timeout + FORWARD_CLOSE_EXTRA
             + queue / SLOW_DISK + DETACH_SECONDS)
    assert 25 < worst < 31  # the comment says ~30 s
    assert pod_spec()["terminationGracePeriodSeconds"] >= 2 * worst


def _dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*\s*", " ", DOCKERFILE.read_text())
    return [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def test_image_checks_the_native_decoder_its_wheel_built() -> None:
    """The wheel's build compiles the decoder; the image build fails if it is missing or stale
    (``python -m agent.sources.ring.native`` after the install), and nothing points at a cache."""
    lines = _dockerfile_instructions()
    install = next(i for i, ln in enumerate(lines) if "pip install -q --no-deps /dist/" in ln)
    assert "-m agent.sources.ring.native" in lines[install]
    assert not any("MIRROR_AGENT_CACHE_DIR" in ln for ln in lines)


def test_native_library_is_the_installed_one_and_matches_its_sources() -> None:
    """``make setup`` installs the package, which builds the library beside native.py; its
    embedded digest is that of the sources next to it."""
    path = native.library_path()
    assert path.parent == Path(native.__file__).parent
    assert native.load().md_source_digest().decode() == native.source_digest()


def test_a_library_built_from_other_sources_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "source_digest", lambda: "0" * 16)
    with pytest.raises(native.NativeUnavailable, match="built from other sources"):
        native.load()
