"""MLflow lineage of a concept sequence (DESIGN.md section 4), through ``MlflowClient`` only (no global run state).

- one parent run per submission (``start_or_resume_parent_run``), found again by its tags on resubmission;
- one nested run per concept (``concept_run``): params, config hash, loss curve, the R[t, i] row,
  samples.png / fold_report.json artifacts, the dataset digest as a run input;
- Tune trials as nested runs under their concept (``log_trials``);
- each folded model as a LoggedModel + registered model version (``register_folded``) tagged with its
  parent version, S3 manifest URI + digest, sequence id and step; alias ``head`` on the newest;
- ``lineage_chain`` walks head -> parent_version -> ... and ``verify_lineage`` checks it against the S3 chain.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import Field

from stamina_core.config import StrictModel
from stamina_core.errors import StaminaError

TAG_SEQ = "stamina.sequence_id"
TAG_SUB = "stamina.submission_id"
TAG_HASH = "stamina.config_hash"
TAG_KIND = "stamina.kind"
TAG_INDEX = "stamina.concept_index"
TAG_PARENT = "mlflow.parentRunId"
HEAD_ALIAS = "head"


class LineageError(StaminaError, RuntimeError):
    """MLflow lineage could not be written or read (names the run, model or version)."""


class LineageMismatch(LineageError):
    """The registry's version chain and the S3 chain disagree (names the first differing step)."""


class TrialRecord(StrictModel):
    """One Ray Tune trial's outcome, logged as a nested run under its concept run."""

    trial_id: str = Field(description="Tune trial id.")
    config: dict[str, Any] = Field(default_factory=dict, description="The trial's sampled hyper-parameters.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Final metrics of the trial.")
    history: dict[str, list[float]] = Field(default_factory=dict, description="Per-iteration metric values (step = position).")
    status: str = Field("FINISHED", description="Final status: FINISHED, or KILLED for trials ASHA stopped early.")


class LineageEntry(StrictModel):
    """One registered folded-model version."""

    version: str = Field(description="Registered model version.")
    step: int = Field(description="Chain step index of the folded model.")
    manifest_uri: str = Field(description="s3:// URI of the step manifest.")
    manifest_digest: str = Field(description="sha256 of the step manifest bytes.")
    sequence_id: str = Field(description="Sequence id.")
    run_id: str | None = Field(None, description="Run that produced the version.")
    parent_version: str | None = Field(None, description="Version of the previous folded model (None for the first).")


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _client(client=None):
    if client is not None:
        return client
    from mlflow import MlflowClient

    return MlflowClient()


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - created concurrently
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _params(params: dict[str, Any]) -> list:
    from mlflow.entities import Param

    flat: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            flat[prefix] = s[:6000]

    walk("", params)
    return [Param(k, v) for k, v in sorted(flat.items())]


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Log (nested keys flattened with '.'); params already logged with the same value are skipped."""
    have = client.get_run(run_id).data.params
    todo = [p for p in _params(params) if p.key not in have]
    changed = [p.key for p in _params(params) if p.key in have and have[p.key] != p.value]
    if changed:
        raise LineageError(f"run {run_id}: params {', '.join(changed[:5])} were logged with other values; "
                           "a resubmission with a new config gets a new submission_id")
    for i in range(0, len(todo), 100):
        client.log_batch(run_id, params=todo[i:i + 100])


def _find_run(client, experiment_id: str, tags: dict[str, str]) -> Any | None:
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=flt, max_results=2, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def start_or_resume_parent_run(sequence_id: str, submission_id: str, config_hash: str, params: dict[str, Any],
                               experiment: str = "stamina", client=None) -> str:
    """The parent run of this submission (created once; a re-run of the same submission resumes it). Returns its id."""
    c = _client(client)
    exp = _experiment_id(c, experiment)
    tags = {TAG_SEQ: sequence_id, TAG_SUB: submission_id, TAG_KIND: "sequence"}
    run = _find_run(c, exp, tags)
    if run is None:
        run = c.create_run(exp, tags={**tags, TAG_HASH: config_hash}, run_name=f"{sequence_id}-{config_hash}")
    else:
        if run.data.tags.get(TAG_HASH) != config_hash:
            raise LineageError(f"run {run.info.run_id}: submission {submission_id!r} was started with config hash "
                               f"{run.data.tags.get(TAG_HASH)}, not {config_hash}; use a new submission_id")
        c.update_run(run.info.run_id, status="RUNNING")
    _log_params(c, run.info.run_id, params)
    return run.info.run_id


def finish_run(run_id: str, status: str = "FINISHED", client=None) -> None:
    _client(client).set_terminated(run_id, status=status)


class ConceptRun:
    """Handle of one concept's nested run (see ``concept_run``)."""

    def __init__(self, client, run_id: str, experiment_id: str):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        _log_params(self.client, self.run_id, params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step or 0) for k, v in sorted(metrics.items()) if _numeric(v)]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 500])

    def log_loss_curve(self, losses: Sequence[float] | Sequence[tuple[int, float]], key: str = "train/loss") -> None:
        """A loss curve: a list of values (step = position) or of (step, value) pairs."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        pts = [(i, v) if not isinstance(v, (tuple, list)) else (int(v[0]), v[1]) for i, v in enumerate(losses)]
        ms = [Metric(key, float(v), ts, s) for s, v in pts]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 500])

    def log_eval_row(self, row: dict[str, dict[str, float]] | dict[str, float], step: int) -> None:
        """The R[t, i] row: ``{concept_i: {metric: value}}`` (or flat ``{name: value}``); also stored as eval_row.json."""
        flat: dict[str, float] = {}
        for k, v in row.items():
            if isinstance(v, dict):
                flat.update({f"eval/{k}/{m}": float(x) for m, x in v.items() if _numeric(x)})
            elif _numeric(v):
                flat[f"eval/{k}"] = float(v)
        self.log_metrics(flat, step=step)
        self.client.log_dict(self.run_id, row, f"eval/eval_row_{step:03d}.json")

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if not os.path.isfile(path):
            raise LineageError(f"{path}: artifact file not found")
        self.client.log_artifact(self.run_id, path, artifact_path)

    def log_dataset(self, records, source_uri: str, name: str, digest: str, context: str = "training") -> None:
        """The concept's dataset as a run input: ``records`` (pandas DataFrame or pyarrow Table), S3 source, digest."""
        import mlflow.data
        from mlflow.entities import Dataset, DatasetInput, InputTag

        if hasattr(records, "to_pandas"):
            records = records.to_pandas()
        ds = mlflow.data.from_pandas(records, source=source_uri, name=name, digest=digest[:36])
        entity = Dataset(**ds.to_dict())
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])
        self.client.set_tag(self.run_id, "stamina.dataset_sha256", digest)


@contextlib.contextmanager
def concept_run(parent_run_id: str, index: int, concept: str, params: dict[str, Any], config_hash: str,
                client=None) -> Iterator[ConceptRun]:
    """Nested run of concept ``index`` under the parent (resumed if it already exists); FAILED on exception."""
    c = _client(client)
    parent = c.get_run(parent_run_id)
    exp = parent.info.experiment_id
    tags = {TAG_PARENT: parent_run_id, TAG_INDEX: str(index), TAG_KIND: "concept"}
    run = _find_run(c, exp, tags)
    if run is None:
        run = c.create_run(exp, run_name=f"{index:03d}-{concept}-{config_hash}",
                           tags={**tags, TAG_HASH: config_hash, "stamina.concept": concept,
                                 TAG_SEQ: parent.data.tags.get(TAG_SEQ, "")})
    else:
        c.update_run(run.info.run_id, status="RUNNING")
    handle = ConceptRun(c, run.info.run_id, exp)
    handle.log_params(params)
    try:
        yield handle
    except BaseException:
        c.set_terminated(handle.run_id, status="FAILED")
        raise
    c.set_terminated(handle.run_id, status="FINISHED")


def log_trials(concept_run_id: str, trials: Sequence[TrialRecord | dict], client=None) -> list[str]:
    """Log Tune trials as nested runs of the concept run (idempotent per trial_id). Returns their run ids."""
    from mlflow.entities import Metric

    c = _client(client)
    parent = c.get_run(concept_run_id)
    exp = parent.info.experiment_id
    ids = []
    for t in trials:
        t = t if isinstance(t, TrialRecord) else TrialRecord.model_validate(t)
        tags = {TAG_PARENT: concept_run_id, "stamina.trial_id": t.trial_id, TAG_KIND: "trial"}
        run = _find_run(c, exp, tags)
        if run is None:
            run = c.create_run(exp, run_name=f"trial-{t.trial_id}", tags=tags)
            ts = int(time.time() * 1000)
            ms = [Metric(k, float(v), ts, 0) for k, v in t.metrics.items() if k not in t.history]
            ms += [Metric(k, float(v), ts, s) for k, vals in t.history.items() for s, v in enumerate(vals)]
            c.log_batch(run.info.run_id, metrics=ms[:1000], params=_params(t.config))
            c.set_terminated(run.info.run_id, status=t.status if t.status in ("FINISHED", "KILLED", "FAILED") else "FINISHED")
        ids.append(run.info.run_id)
    return ids


# -- model registry ------------------------------------------------------------------------

def _entry(mv) -> LineageEntry:
    t = mv.tags or {}
    try:
        return LineageEntry(version=str(mv.version), step=int(t["step"]), manifest_uri=t["manifest_uri"],
                            manifest_digest=t["manifest_digest"], sequence_id=t["sequence_id"], run_id=mv.run_id or None,
                            parent_version=t.get("parent_version") or None)
    except (KeyError, ValueError) as e:
        raise LineageError(f"model version {mv.name} v{mv.version}: missing or bad lineage tag {e}") from None


_MANIFEST_URI_RE = re.compile(r"/sequences/([a-z0-9][a-z0-9_\-]{0,62})/chain/(\d{3,})-[a-z0-9][a-z0-9_\-]*/manifest\.json$")


def register_folded(model_name: str, manifest_uri: str, manifest_digest: str, run_id: str | None,
                    parent_version: str | None, sequence_id: str | None = None, step: int | None = None,
                    client=None, experiment: str = "stamina") -> str:
    """Register a folded model as a new version (LoggedModel pointing at the S3 manifest); move alias ``head``.

    ``sequence_id`` and ``step`` default to what the manifest URI (``.../sequences/SEQ/chain/NNN-name/manifest.json``)
    says. Idempotent: the same manifest digest returns the version already registered for it.
    """
    if sequence_id is None or step is None:
        m = _MANIFEST_URI_RE.search(manifest_uri)
        if not m:
            raise LineageError(f"manifest_uri: {manifest_uri!r} is not .../sequences/SEQ/chain/NNN-name/manifest.json; "
                               "pass sequence_id and step explicitly")
        sequence_id = sequence_id if sequence_id is not None else m.group(1)
        step = step if step is not None else int(m.group(2))
    c = _client(client)
    try:
        c.get_registered_model(model_name)
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST
        try:
            c.create_registered_model(model_name, tags={"stamina.sequence_id": sequence_id})
        except Exception:  # noqa: BLE001 - created concurrently
            c.get_registered_model(model_name)
    for mv in c.search_model_versions(f"name = '{model_name}'"):
        if (mv.tags or {}).get("manifest_digest") == manifest_digest:
            if _is_newest(c, model_name, mv):
                c.set_registered_model_alias(model_name, HEAD_ALIAS, str(mv.version))
            return str(mv.version)
    if parent_version is not None:
        c.get_model_version(model_name, parent_version)  # must exist
    tags = {"manifest_uri": manifest_uri, "manifest_digest": manifest_digest, "sequence_id": sequence_id,
            "step": str(step), "parent_version": parent_version or ""}
    exp_id = c.get_run(run_id).info.experiment_id if run_id else _experiment_id(c, experiment)
    lm = c.create_logged_model(exp_id, name=f"{sequence_id}-{step:03d}", source_run_id=run_id, tags=tags,
                               model_type="stamina-folded")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "stamina_pointer.json")
        with open(p, "w") as f:
            json.dump({"manifest_uri": manifest_uri, "manifest_digest": manifest_digest, "sequence_id": sequence_id,
                       "step": step}, f, sort_keys=True)
        c.log_model_artifact(lm.model_id, p)
    c.finalize_logged_model(lm.model_id, "READY")
    mv = c.create_model_version(model_name, source=f"models:/{lm.model_id}", run_id=run_id, tags=tags,
                                model_id=lm.model_id, description=f"{sequence_id} step {step}: {manifest_uri}")
    c.set_registered_model_alias(model_name, HEAD_ALIAS, str(mv.version))
    return str(mv.version)


def _is_newest(c, model_name: str, mv) -> bool:
    try:
        head = c.get_model_version_by_alias(model_name, HEAD_ALIAS)
    except Exception:  # noqa: BLE001 - no alias yet
        return True
    return int(_entry(head).step) <= int(_entry(mv).step)


def lineage_chain(model_name: str, client=None) -> list[LineageEntry]:
    """Versions from the first to the one aliased ``head``, following the parent_version tags."""
    c = _client(client)
    try:
        mv = c.get_model_version_by_alias(model_name, HEAD_ALIAS)
    except Exception as e:  # noqa: BLE001
        raise LineageError(f"{model_name}: no version has alias '{HEAD_ALIAS}' ({str(e).splitlines()[0][:120]})") from None
    chain = [_entry(mv)]
    seen = {chain[0].version}
    while chain[-1].parent_version:
        pv = chain[-1].parent_version
        if pv in seen:
            raise LineageError(f"{model_name} v{pv}: parent_version tags form a cycle")
        chain.append(_entry(c.get_model_version(model_name, pv)))
        seen.add(pv)
    return chain[::-1]


def verify_lineage(store, model_name: str, client=None) -> list[LineageEntry]:
    """Check the registry chain against the S3 chain (digests, order, HEAD); raise LineageMismatch on the first difference."""
    chain = lineage_chain(model_name, client)
    steps = {s.index: s for s in store.steps()}
    hp = store.head()
    head_index = hp.index if hp else -1
    first = chain[0].step
    expected = [i for i in sorted(steps) if first <= i <= head_index]
    for pos, e in enumerate(chain):
        want = expected[pos] if pos < len(expected) else None
        if want is None or e.step != want:
            raise LineageMismatch(f"{model_name} v{e.version}: registry step {e.step} where the S3 chain of "
                                  f"{store.sequence_id} has {'nothing' if want is None else f'step {want}'} (HEAD {head_index})")
        s = steps[want]
        if e.manifest_digest != s.digest:
            raise LineageMismatch(f"{model_name} v{e.version}: step {e.step} digest {e.manifest_digest[:12]} != S3 "
                                  f"manifest {s.digest[:12]} ({s.uri})")
        if e.manifest_uri != s.uri:
            raise LineageMismatch(f"{model_name} v{e.version}: step {e.step} manifest URI {e.manifest_uri} != S3 {s.uri}")
    if len(chain) < len(expected):
        missing = expected[len(chain)]
        raise LineageMismatch(f"{model_name}: S3 step {missing} ({steps[missing].uri}) has no registered version "
                              f"(registry head is step {chain[-1].step})")
    if hp is not None and chain[-1].manifest_digest != hp.manifest_digest:
        raise LineageMismatch(f"{model_name}: alias head (step {chain[-1].step}) != S3 HEAD (step {hp.index})")
    return chain


class Lineage:
    """Object form of this module bound to one tracking server (what the pipeline and e2e tests call)."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "stamina"):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment = experiment

    def parent_run(self, sequence_id: str, submission_id: str, config_hash: str, params: dict[str, Any]) -> str:
        return start_or_resume_parent_run(sequence_id, submission_id, config_hash, params, self.experiment, self.client)

    def concept_run(self, parent_run_id: str, index: int, concept: str, params: dict[str, Any], config_hash: str):
        return concept_run(parent_run_id, index, concept, params, config_hash, self.client)

    def log_trials(self, concept_run_id: str, trials: Sequence[TrialRecord | dict]) -> list[str]:
        return log_trials(concept_run_id, trials, self.client)

    def register_folded(self, model_name: str, manifest_uri: str, manifest_digest: str, run_id: str | None,
                        parent_version: str | None, sequence_id: str | None = None, step: int | None = None) -> str:
        return register_folded(model_name, manifest_uri, manifest_digest, run_id, parent_version, sequence_id, step,
                               self.client, self.experiment)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        finish_run(run_id, status, self.client)

    def chain(self, model_name: str) -> list[dict[str, Any]]:
        """Versions newest (alias head) first, as dicts with version, step, manifest_uri/digest, parent_version, aliases."""
        out = []
        for e in reversed(lineage_chain(model_name, self.client)):
            mv = self.client.get_model_version(model_name, e.version)
            out.append({**e.model_dump(), "aliases": sorted(mv.aliases or [])})
        return out

    def verify(self, store, model_name: str) -> list[LineageEntry]:
        return verify_lineage(store, model_name, self.client)

    def runs_finished(self, sequence_id: str) -> bool:
        """True when every parent/concept run of the sequence exists and is FINISHED."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return False
        runs = self.client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_SEQ}` = '{sequence_id}'",
                                       max_results=1000)
        return bool(runs) and all(r.info.status == "FINISHED" for r in runs)
