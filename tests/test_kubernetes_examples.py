"""examples/kubernetes/: every manifest valid against the Kubernetes schemas (strict:
no unknown fields), the ConfigMap's l4proxy.toml a configuration the proxy loads with
a cert-manager-style Secret in place, and the manifests agreeing with one another and
with that configuration (ports, mount paths, the drain and the grace period)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import trustme
import yaml

import l4proxy
from l4proxy.addresses import TCPAddress

EXAMPLES = Path(__file__).parent.parent / "examples" / "kubernetes"
#: The oldest release the manifests promise (the preStop sleep action is on by default
#: from 1.30) and the newest schemas kubernetes-validate bundles.
VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]

Manifest = dict[str, Any]


def _manifests() -> list[tuple[str, Manifest]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            assert isinstance(document, dict), f"{path.name} document {index}"
            found.append(
                (f"{path.name}:{document['kind']}/{document['metadata']['name']}", document)
            )
    return found


MANIFESTS = _manifests()


def _one(kind: str, name: str | None = None) -> Manifest:
    matches = [
        m for _, m in MANIFESTS if m["kind"] == kind and name in (None, m["metadata"]["name"])
    ]
    assert len(matches) == 1, (kind, name)
    return matches[0]


def test_the_examples_are_all_there() -> None:
    kinds = sorted(m["kind"] for _, m in MANIFESTS)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "Service"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("where", "manifest"), MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_manifest_is_valid_kubernetes(where: str, manifest: Manifest, version: str) -> None:
    kubernetes_validate.validate(manifest, version, strict=True)


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The check above can fail: a field Kubernetes does not know is an error."""
    deployment = _one("Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def _container() -> Manifest:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Manifest = containers[0]
    return container


def _toml_text() -> str:
    text: str = _one("ConfigMap", "l4proxy-config")["data"]["l4proxy.toml"]
    return text


def test_the_configmap_is_a_configuration_the_proxy_loads(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "l4proxy"
    (etc / "tls").mkdir(parents=True)
    # What cert-manager writes into a kubernetes.io/tls Secret: the chain, the key.
    ca = trustme.CA()
    issued = ca.issue_cert("api.example.com", "www.example.com")
    issued.cert_chain_pems[0].write_to_path(str(etc / "tls" / "tls.crt"))
    for blob in issued.cert_chain_pems[1:]:
        blob.write_to_path(str(etc / "tls" / "tls.crt"), append=True)
    issued.private_key_pem.write_to_path(str(etc / "tls" / "tls.key"))
    text = _toml_text()
    assert text.count("/etc/l4proxy/") == 2
    (etc / "l4proxy.toml").write_text(text.replace("/etc/l4proxy/", f"{etc}/"))

    config = l4proxy.Config.load(etc / "l4proxy.toml")
    assert [listener.name for listener in config.listeners] == ["https", "postgres"]
    l4proxy.Proxy(config)  # reads the certificate and key, as the pod would at start


def test_the_manifests_agree_with_the_configuration() -> None:
    config = l4proxy.Config.from_mapping(tomllib.loads(_toml_text()), source="configmap")
    container = _container()
    # The pod's ports are the ones the configuration listens on, plus metrics.
    listening = {
        address.port
        for listener in config.listeners
        for address in listener.listen
        if isinstance(address, TCPAddress)
    }
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert set(ports.values()) == listening | {9100}
    assert min(ports.values()) >= 1024  # so no capability at all is needed
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "add" not in container["securityContext"]["capabilities"]

    args = container["args"]
    assert args[args.index("--config") + 1] == "/etc/l4proxy/l4proxy.toml"
    assert args[args.index("--metrics") + 1] == "0.0.0.0:9100"
    assert "--watch-config" in args
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}

    # The config file is in a mount that the kubelet updates (not a subPath one).
    pod = _one("Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "subPath" not in mounts["/etc/l4proxy"]
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["/etc/l4proxy"]["name"])
    sources = volume["projected"]["sources"]
    assert sources[0]["configMap"]["name"] == "l4proxy-config"
    assert {item["path"] for item in sources[1]["secret"]["items"]} == {
        "tls/tls.crt",
        "tls/tls.key",
    }

    # SIGKILL only after the preStop pause and the longest drain.
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = max(listener.drain_timeout for listener in config.listeners)
    assert pod["terminationGracePeriodSeconds"] > pause + drain

    # Every Service port targets a named container port; metrics stay off the public one.
    for name in ("l4proxy", "l4proxy-metrics"):
        service = _one("Service", name)
        assert service["spec"]["selector"] == _one("Deployment")["spec"]["selector"]["matchLabels"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    public = {p["targetPort"] for p in _one("Service", "l4proxy")["spec"]["ports"]}
    assert "metrics" not in public
