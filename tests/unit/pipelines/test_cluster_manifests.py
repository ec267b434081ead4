"""Checks for the KubeRay manifests under cluster/.

Schema: every manifest is validated against the published KubeRay v1 CRDs
(found in <repo>/../shared/kuberay-crds), made strict the way the API server
is: unknown fields are errors except under x-kubernetes-preserve-unknown-fields.
The pod templates in those CRDs embed the full core/v1 PodSpec, so typos in
container fields are caught too.

Policy: resources, non-root security contexts, secrets only by reference,
memory-backed /dev/shm, GPU requests, autoscaling bounds and `clap`
entrypoints, plus "committed YAML == cluster/render.py output".
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CLUSTER = REPO / "cluster"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MANIFEST_PATHS = sorted(CLUSTER.rglob("*.yaml"))
# The libyaml loader parses the 2 MB of CRDs ~10x faster than the pure-Python one.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Subcommands of the `clap` console script and the flags each one requires.
REQUIRED_FLAGS = {
    "preprocess": {"--input", "--output"},
    "pretrain": {"--data", "--output", "--model"},
    "embed": {"--checkpoint", "--input", "--output"},
    "tune-probe": {"--meld", "--checkpoint", "--output"},
}
GPU_SUBCOMMANDS = {"pretrain", "embed"}
# Env names that look like credentials (AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID,
# *TOKEN*, *PASSWORD*, ...); TOKENIZERS_PARALLELISM is a tokenizer switch, not a token.
SECRET_NAME = re.compile(r"SECRET|TOKEN(?!IZER)|PASSWORD|PASSWD|ACCESS_KEY|API_KEY|CREDENTIAL", re.IGNORECASE)

# ---------------------------------------------------------------- loading


def load_docs(path: Path) -> list[dict]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def all_docs() -> list[tuple[str, dict]]:
    """The KubeRay documents (RayCluster, RayJob); networkpolicy.yaml is checked on its own."""
    return [(path.name, doc) for path in MANIFEST_PATHS for doc in load_docs(path) if doc["kind"] in CRD_FILES]


def doc_params(docs: list[tuple[str, dict]]) -> list:
    return [pytest.param(name, doc, id=f"{name}:{doc['metadata']['name']}") for name, doc in docs]


def doc_of(name: str) -> dict:
    (doc,) = load_docs(CLUSTER / name)
    return doc


def rayjobs() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in all_docs() if doc["kind"] == "RayJob"]


# ---------------------------------------------------------------- strict CRD schemas


def strict(schema: dict) -> dict:
    """Translate a structural CRD schema into plain JSON Schema that rejects
    unknown fields, as the API server does with strict field validation."""
    out = {key: value for key, value in schema.items() if not key.startswith("x-kubernetes-")}
    if "properties" in schema:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        out["items"] = strict(schema["items"])
    for keyword in ("allOf", "anyOf", "oneOf"):
        if keyword in schema:
            out[keyword] = [strict(sub) for sub in schema[keyword]]
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    return out


@functools.cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=LOADER)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def schema_errors(doc: dict) -> list[str]:
    errors = validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR} (expected shared/ beside the repo)"
)

# ---------------------------------------------------------------- walking pods


def pod_specs(doc: dict) -> list[tuple[str, dict, bool]]:
    """(where, pod spec, runs Ray) for every pod template in a manifest."""
    cluster = cluster_spec(doc)
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"], True)]
    pods += [(g["groupName"], g["template"]["spec"], True) for g in cluster.get("workerGroupSpecs", [])]
    submitter = doc["spec"].get("submitterPodTemplate")
    if submitter:
        pods.append(("submitter", submitter["spec"], False))
    return pods


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, container, pod spec) for every container, init containers included."""
    found = []
    for where, pod, _ in pod_specs(doc):
        for c in pod.get("initContainers", []) + pod["containers"]:
            found.append((f"{where}/{c['name']}", c, pod))
    return found


def worker_groups(doc: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster_spec(doc).get("workerGroupSpecs", [])}


def subcommand(doc: dict) -> str:
    return shlex.split(doc["spec"]["entrypoint"])[1]


# ---------------------------------------------------------------- schema tests


def test_manifests_exist_and_parse():
    names = {p.name for p in MANIFEST_PATHS}
    assert {"raycluster.yaml", "rayjob-preprocess.yaml", "rayjob-pretrain.yaml"} <= names
    assert {"rayjob-embed.yaml", "rayjob-tune-probe.yaml"} <= names
    for name, doc in all_docs():
        assert doc.get("apiVersion") == "ray.io/v1", name
        assert doc.get("kind") in CRD_FILES, name
        assert doc.get("metadata", {}).get("name"), f"{name}: metadata.name missing"


@needs_crds
@pytest.mark.parametrize("path", MANIFEST_PATHS, ids=lambda p: p.name)
def test_manifest_matches_kuberay_crd(path):
    for doc in load_docs(path):
        if doc["kind"] in CRD_FILES:  # the NetworkPolicy is core Kubernetes: test_network_policy_* check it
            assert schema_errors(doc) == []


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


TYPOS = {
    "rayStartParam": lambda spec: _rename(spec["headGroupSpec"], "rayStartParams", "rayStartParam"),
    "imagePullPolicyy": lambda spec: _rename(
        spec["headGroupSpec"]["template"]["spec"]["containers"][0], "imagePullPolicy", "imagePullPolicyy"
    ),
    "minReplica": lambda spec: _rename(spec["workerGroupSpecs"][0], "minReplicas", "minReplica"),
    "mediumm": lambda spec: _rename(
        spec["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0]["emptyDir"], "medium", "mediumm"
    ),
}


@needs_crds
@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayjob-pretrain.yaml"])
@pytest.mark.parametrize("typo", sorted(TYPOS))
def test_misspelled_field_is_rejected(manifest, typo):
    doc = copy.deepcopy(doc_of(manifest))
    TYPOS[typo](cluster_spec(doc))
    errors = schema_errors(doc)
    assert any(typo in e and "Additional properties" in e for e in errors), errors


@needs_crds
def test_misspelled_rayjob_field_is_rejected():
    doc = copy.deepcopy(doc_of("rayjob-pretrain.yaml"))
    _rename(doc["spec"], "submissionMode", "submissionMod")
    assert any("submissionMod'" in e for e in schema_errors(doc))


@needs_crds
def test_int_or_string_quantities_and_types():
    """Quantities accept ints or strings (x-kubernetes-int-or-string); other
    types are still enforced."""
    doc = copy.deepcopy(doc_of("raycluster.yaml"))
    limits = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"] = 4
    assert schema_errors(doc) == []
    limits["cpu"] = [4]
    assert schema_errors(doc)
    doc = copy.deepcopy(doc_of("raycluster.yaml"))
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "16"
    assert schema_errors(doc)


# ---------------------------------------------------------------- policy tests


@pytest.mark.parametrize("name,doc", doc_params(all_docs()))
def test_every_container_is_bounded_and_non_root(name, doc):
    for where, c, pod in containers(doc):
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(part, {})), f"{name} {where}: {part} cpu/memory"
        sec = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        assert sec.get("runAsNonRoot") is True, f"{name} {where}"
        assert sec.get("runAsUser", 0) != 0, f"{name} {where}"
        assert c["securityContext"].get("allowPrivilegeEscalation") is False, f"{name} {where}"
        assert "ALL" in c["securityContext"].get("capabilities", {}).get("drop", []), f"{name} {where}"


@pytest.mark.parametrize("name,doc", doc_params(all_docs()))
def test_secrets_only_by_reference(name, doc):
    for where, c, _ in containers(doc):
        for env in c.get("env", []):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env, f"{name} {where}: inline {env['name']}"
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{name} {where}: {env['name']}"
    autoscaler_env = cluster_spec(doc).get("autoscalerOptions", {}).get("env", [])
    assert not [e for e in autoscaler_env if SECRET_NAME.search(e["name"]) and "value" in e]
    if doc["kind"] == "RayJob":
        runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML", "")) or {}
        leaked = [k for k in runtime_env.get("env_vars", {}) if SECRET_NAME.search(k)]
        assert not leaked, f"{name}: secrets in runtimeEnvYAML: {leaked}"


def _gets_s3_secret(c: dict) -> bool:
    from_secret = any("secretRef" in src for src in c.get("envFrom", []))
    by_key = any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", []))
    return from_secret or by_key


@pytest.mark.parametrize("name,doc", doc_params(all_docs()))
def test_ray_pods_have_shm_and_s3_credentials(name, doc):
    for where, pod, runs_ray in pod_specs(doc):
        if not runs_ray:
            continue
        shm = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        sized = all(v["emptyDir"].get("sizeLimit") for v in pod.get("volumes", []) if v["name"] in shm)
        assert shm and sized, f"{name} {where}: memory-backed emptyDir with sizeLimit"
        for c in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/dev/shm") in shm, f"{name} {where}/{c['name']}: /dev/shm"
            assert _gets_s3_secret(c), f"{name} {where}/{c['name']}: no S3 secret"


@pytest.mark.parametrize("name,doc", doc_params(all_docs()))
def test_cluster_shape(name, doc):
    spec = cluster_spec(doc)
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{name}: head must not run tasks"
    assert spec.get("enableInTreeAutoscaling") is True, name
    assert {"upscalingMode", "idleTimeoutSeconds", "resources"} <= set(spec.get("autoscalerOptions", {})), name
    assert spec["autoscalerOptions"].get("version") == "v2", f"{name}: autoscaler v2"
    images = {c["image"] for _, c, _ in containers(doc)}
    assert len(images) == 1, f"{name}: one image for head, workers and submitter, got {images}"
    for group_name, group in worker_groups(doc).items():
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        gpus = [c["resources"][part].get("nvidia.com/gpu") for c in group["template"]["spec"]["containers"]
                for part in ("requests", "limits")]
        if group_name.startswith("gpu"):
            assert all(gpus) and len(set(gpus)) == 1, f"{name} {group_name}: nvidia.com/gpu requests == limits"
        else:
            assert not any(gpus), f"{name} {group_name}: GPUs on a CPU group"


def test_preprocessing_group_autoscales_from_zero():
    for name in ("raycluster.yaml", "rayjob-preprocess.yaml"):
        group = worker_groups(doc_of(name)).get("cpu-workers")
        assert group, f"{name}: no cpu-workers group"
        assert group["minReplicas"] == 0 and group["maxReplicas"] > group["minReplicas"], name


def overrides(doc: dict) -> dict[str, str]:
    return dict(a.split("=", 1) for a in shlex.split(doc["spec"]["entrypoint"]) if "=" in a and not a.startswith("-"))


def test_preprocessing_pool_is_a_worker_range_beyond_one_node():
    doc = doc_of("rayjob-preprocess.yaml")
    low, high = int(overrides(doc)["ray.min_workers"]), int(overrides(doc)["ray.max_workers"])
    group = worker_groups(doc)["cpu-workers"]
    node_cpus = int(group["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    assert 1 <= low < node_cpus < high <= node_cpus * group["maxReplicas"]  # needs the autoscaler to add nodes


def test_embed_asks_for_gpu_actors_before_a_gpu_node_exists():
    argv = shlex.split(doc_of("rayjob-embed.yaml")["spec"]["entrypoint"])
    assert float(argv[argv.index("--gpus") + 1]) > 0
    gpu_group = worker_groups(doc_of("rayjob-embed.yaml"))["gpu-workers"]
    assert gpu_group["minReplicas"] == 0 and int(argv[argv.index("--max-workers") + 1]) <= gpu_group["maxReplicas"]


def test_gpu_group_where_needed():
    assert "gpu-workers" in worker_groups(doc_of("raycluster.yaml"))
    for name, doc in rayjobs():
        if subcommand(doc) in GPU_SUBCOMMANDS:
            assert "gpu-workers" in worker_groups(doc), f"{name}: needs a GPU group"


@pytest.mark.parametrize("name,doc", doc_params(rayjobs()))
def test_rayjob_lifecycle_and_entrypoint(name, doc):
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("clap "), name
    argv = shlex.split(spec["entrypoint"])
    assert argv[1] in REQUIRED_FLAGS, f"{name}: unknown subcommand {argv[1]}"
    assert REQUIRED_FLAGS[argv[1]] <= set(argv), f"{name}: missing {REQUIRED_FLAGS[argv[1]] - set(argv)}"
    if "--config" in argv:
        assert re.fullmatch(r"pipelines/configs/[\w-]+\.yaml", argv[argv.index("--config") + 1]), name
    deprecated = {"shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "deletionPolicy"} & set(spec)
    assert not deprecated, f"{name}: deprecated clean-up fields {deprecated}; use deletionStrategy.deletionRules"
    rules = spec["deletionStrategy"]["deletionRules"]
    assert {r["condition"]["jobStatus"] for r in rules} == {"SUCCEEDED", "FAILED"}, name
    for status in ("SUCCEEDED", "FAILED"):  # every finished job ends with its cluster deleted
        assert any(r["condition"]["jobStatus"] == status and r["policy"] == "DeleteCluster" for r in rules), name
    assert spec["submissionMode"] == "K8sJobMode", name
    for field in ("activeDeadlineSeconds", "backoffLimit"):
        assert isinstance(spec.get(field), int), f"{name}: {field}"
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict), name
    assert doc["metadata"]["name"] == f"clap-{argv[1]}" and name == f"rayjob-{argv[1]}.yaml"


def test_rayjobs_cover_every_subcommand():
    assert sorted(subcommand(doc) for _, doc in rayjobs()) == sorted(REQUIRED_FLAGS)


def test_image_matches_ray_version():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py311", dockerfile, re.MULTILINE)
    assert base, "Dockerfile must build on an official rayproject/ray py311 image"
    assert re.search(r"^USER\s+1000\b", dockerfile, re.MULTILINE), "image must run as uid 1000"
    for name, doc in all_docs():
        assert cluster_spec(doc)["rayVersion"] == base.group(1), name


def test_committed_yaml_matches_render():
    spec = importlib.util.spec_from_file_location("cluster_render", CLUSTER / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    rendered = render.render_all()
    assert set(rendered) == {p.name for p in CLUSTER.glob("*.yaml")}, "unrendered YAML in cluster/"
    stale = [name for name, text in rendered.items() if (CLUSTER / name).read_text() != text]
    assert not stale, f"run `python cluster/render.py`; stale: {stale}"


# ---------------------------------------------------------------- authentication, network, image (issue 13)

TOKEN_SECRET = "clap-ray-token"


@pytest.mark.parametrize("name,doc", doc_params(all_docs()))
def test_ray_token_authentication_on(name, doc):
    assert cluster_spec(doc)["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    submitter = doc["spec"].get("submitterPodTemplate")
    if submitter:  # `ray job submit` in the submitter pod needs the token too, from the Secret
        env = {e["name"]: e for e in submitter["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": TOKEN_SECRET, "key": "auth_token"}
        assert "value" not in env["RAY_AUTH_TOKEN"]


def test_network_policy_admits_only_the_projects_pods():
    (policy,) = load_docs(CLUSTER / "networkpolicy.yaml")
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    spec = policy["spec"]
    selector = spec["podSelector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": selector}}]  # no namespaceSelector / ipBlock
    for name, doc in all_docs():  # the policy covers every Ray pod (head included), and admits the submitter
        for where, pod_template in [("head", cluster_spec(doc)["headGroupSpec"]["template"])] + [
                (g["groupName"], g["template"]) for g in cluster_spec(doc).get("workerGroupSpecs", [])] + (
                [("submitter", doc["spec"]["submitterPodTemplate"])] if doc["kind"] == "RayJob" else []):
            labels = pod_template.get("metadata", {}).get("labels", {})
            assert selector.items() <= labels.items(), f"{name}:{where} is outside the NetworkPolicy"


def test_image_installs_exactly_the_lock_file():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.MULTILINE), "base image is a build argument"
    assert "sha256:" not in dockerfile.replace("sha256:<digest>", ""), "never a digest that was not read"
    installs = re.findall(r"^RUN pip install .*$", dockerfile, re.MULTILINE)
    assert installs and all("--no-deps" in line for line in installs), installs
    assert "-r requirements.lock" in installs[0]
    lock = {}
    for line in (CLUSTER / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and " " not in version, line
            lock[name] = version
    import tomllib
    from packaging.requirements import Requirement

    spec = importlib.util.spec_from_file_location("cluster_lock", CLUSTER / "lock.py")
    locker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(locker)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    image = locker.image_requirements(project)
    assert "onnxruntime==1.32.0" in image and set(project["dependencies"]) <= set(image)  # clap embed of exports
    for dep in image:
        req = Requirement(dep)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in lock and req.specifier.contains(lock[name]), f"{dep}: lock has {lock.get(name)}"
    assert locker.render() == (CLUSTER / "requirements.lock").read_text(), "run `python cluster/lock.py`"


# ---------------------------------------------------------------- entrypoints through the real CLI


def parsed_entrypoint(doc: dict):
    """The RayJob's entrypoint through the real `clap` parser: (argparse namespace, loaded job config or None)."""
    from pipelines import cli

    argv = shlex.split(doc["spec"]["entrypoint"])[1:]
    parser, module = cli.build_parser(argv)
    args = parser.parse_args(argv)
    config = None
    if getattr(args, "config", None):
        from clap_core.config import load_config
        from pipelines.job_configs import JOB_CONFIGS

        stem = Path(args.config).stem
        config = load_config(JOB_CONFIGS[stem], REPO / args.config, getattr(args, "overrides", []))
    return args, config


def test_rayjob_entrypoints_parse_use_their_gpus_and_chain():
    jobs = {subcommand(doc): (doc, *parsed_entrypoint(doc)) for _, doc in rayjobs()}
    doc, pre, _ = jobs["preprocess"]
    doc, train, cfg = jobs["pretrain"]
    gpu_group = worker_groups(doc)["gpu-workers"]
    gpus_per_pod = int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpu_group["minReplicas"] == gpu_group["maxReplicas"]
    assert cfg.scaling.use_gpu, "the pretraining RayJob must train on its GPU group"
    assert cfg.scaling.num_workers == gpu_group["maxReplicas"] * gpus_per_pod  # one rank per GPU
    assert train.data == pre.output  # trains on what preprocessing writes
    final = train.output.rstrip("/") + "/final"  # what pretraining exports (pipelines/pretrain.py)
    _, embed, _ = jobs["embed"]
    assert embed.checkpoint == final and embed.input == pre.output
    _, probe, probe_cfg = jobs["tune-probe"]
    assert probe.checkpoint == final and probe_cfg is not None
