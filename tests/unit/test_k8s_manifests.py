"""infra/k8s: every manifest is valid YAML (safe_load), well-formed, consistent with the pinned stack."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
FILES = sorted(K8S.glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _all() -> dict[tuple[str, str], dict]:
    out = {}
    for p in FILES:
        for d in _docs(p):
            if d["kind"] == "Kustomization":
                continue
            out[(d["kind"], d["metadata"].get("name", p.stem))] = d
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_manifest_is_valid_yaml_with_kind_and_name(path):
    docs = _docs(path)
    assert docs, f"{path.name} is empty"
    for d in docs:
        assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), path.name
        if d["kind"] != "Kustomization":
            assert d["metadata"]["name"]
            assert d["kind"] == "Namespace" or d["metadata"].get("namespace") == "stamina", (path.name, d["kind"])


def test_expected_resources_and_kustomization_lists_existing_files():
    kinds = {k for k, _ in _all()}
    assert {"RayCluster", "RayJob", "CronJob", "Deployment", "Service", "Secret", "ConfigMap"} <= kinds
    kust = _docs(K8S / "kustomization.yaml")[0]
    for r in kust["resources"]:
        assert (K8S / r).is_file(), r


def test_versions_match_the_pinned_python_stack():
    ray = pytest.importorskip("ray")
    mlflow = pytest.importorskip("mlflow")
    res = _all()
    assert res[("RayCluster", "stamina")]["spec"]["rayVersion"] == ray.__version__
    image = res[("Deployment", "stamina-mlflow")]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(":v" + mlflow.__version__)


def test_services_stay_inside_the_cluster_and_secrets_are_referenced_not_inlined():
    res = _all()
    for (kind, name), d in res.items():
        if kind == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", name
        if kind == "RayCluster":
            assert d["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    text = "\n".join(p.read_text() for p in FILES if p.name != "namespace.yaml")
    assert "AWS_SECRET_ACCESS_KEY:" not in text  # only the Secret in namespace.yaml holds keys


def test_nightly_schedule_and_sequence_config():
    from components.schemas import SequenceConfig
    from stamina_core.config import parse

    res = _all()
    cron = res[("CronJob", "stamina-nightly")]["spec"]
    assert cron["schedule"] == "0 2 * * *" and cron["concurrencyPolicy"] == "Forbid"
    seq = yaml.safe_load(res[("ConfigMap", "stamina-sequence")]["data"]["sequence.yaml"])
    cfg = parse(SequenceConfig, seq, source="infra/k8s/sequence-config.yaml")
    assert cfg.storage.uri.startswith("s3://stamina/")
    job = res[("RayJob", "stamina-sequence-manual")]["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] == "stamina" and "/config/sequence.yaml" in job["entrypoint"]
