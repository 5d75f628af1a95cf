"""Classification-track pipeline steps other than training: backbone, task data, evaluation.

- ``resolve_backbone``: the chain's base ViT as a local folder + digest (the project's Glyph ViT,
  pretrained once into the cache, or a saved classifier / Hugging Face ViT from a local path or s3://);
- ``prepare_tasks``: every task's data generated (Glyph-R) or read and verified (image folder), written
  as one ``task_data.safetensors`` per task with its digest, checked against the backbone, before any work;
- ``evaluate_step``: the R row after a task: accuracy on each seen task's test images among all seen classes.
"""

from __future__ import annotations

import json
import os

from pydantic import Field

from components.schemas import ClassificationSpec
from stamina_core.config import StrictModel, config_hash
from stamina_core.errors import StaminaError
from stamina_core.hashing import sha256_file


class ClassifyError(StaminaError, RuntimeError):
    """A classification input (backbone, task data) does not fit (names it)."""


class BackboneRef(StrictModel):
    dir: str = Field(description="Local folder of the backbone.")
    digest: str = Field(description="model_digest of the folder.")
    uri: str = Field(description="Where it came from: 'pretrain:<config hash>' or the configured path.")
    meta: dict = Field(default_factory=dict, description="Pretraining metadata (val accuracy, ...), when known.")


def resolve_backbone(spec: ClassificationSpec, cache_dir: str, log=print) -> BackboneRef:
    """The backbone folder (pretrained into ``cache_dir/classification`` once, or fetched) and its digest."""
    from components.model_io import fetch, model_digest
    from stamina_core.classification.model import read_classifier_meta
    from stamina_core.classification.pretrain import cache_path, pretrained_classifier

    b = spec.backbone
    if b.kind == "pretrain":
        root = os.path.join(cache_dir, "classification")
        _, meta = pretrained_classifier(b.pretrain, root, log=log)
        path = cache_path(b.pretrain, root)
        uri = f"pretrain:{config_hash(b.pretrain)}"
    else:
        path = fetch(b.path, cache_dir, directory=True)
        uri = b.path
        meta = read_classifier_meta(path).get("meta", {}) if os.path.exists(os.path.join(path, "classifier.json")) else {}
    keep = {k: meta[k] for k in ("val_accuracy", "num_classes", "backbone_params", "config_hash") if k in meta}
    return BackboneRef(dir=path, digest=model_digest(path), uri=uri, meta=keep)


class TaskFile(StrictModel):
    index: int = Field(description="Step index (1-based).")
    path: str = Field(description="Local task_data.safetensors.")
    digest: str = Field(description="sha256 of the file.")
    classes: list[int] = Field(description="Global class ids.")
    names: list[str] = Field(description="Class names.")
    n_train: int
    n_test: int


def planned_class_names(spec: ClassificationSpec) -> list[list[str]]:
    """Class names of every task of ``spec`` (cheap: no image is rendered or read)."""
    k = spec.data.classes_per_task()
    if spec.data.kind == "glyph_r":
        import numpy as np

        from stamina_core.data.glyphs import glyph_classes

        pool = glyph_classes("heldout")
        need = spec.tasks * k
        if need > len(pool):
            raise ClassifyError(f"classification.tasks x classes_per_task = {need} > the {len(pool)} held-out glyph classes")
        order = np.random.default_rng(np.random.SeedSequence([spec.data.glyph_r.seed, 7919])).permutation(len(pool))[:need]
        chars = [pool[int(i)] for i in order]
        return [chars[t * k:(t + 1) * k] for t in range(spec.tasks)]
    f = spec.data.folder
    if not os.path.isdir(f.root):
        raise ClassifyError(f"classification.data.folder.root: {f.root} is not a directory")
    from stamina_core.classification.steps import folder_task_classes

    names = sorted(d for d in os.listdir(f.root) if not d.startswith(".") and os.path.isdir(os.path.join(f.root, d)))
    return [[names[c] for c in cls] for cls in folder_task_classes(names, k, spec.tasks, f.seed)]


def prepare_tasks(spec: ClassificationSpec, indices: list[int], out_dir: str) -> dict[int, TaskFile]:
    """Build the data of tasks ``indices`` (1-based) into ``out_dir/NNN/task_data.safetensors``; validate all first."""
    from stamina_core.classification.data import GlyphRConfig, glyph_r_benchmark, load_image_folder
    from stamina_core.classification.steps import folder_task, folder_task_classes, save_task_data

    if not indices:
        return {}
    d = spec.data
    tasks = {}
    if d.kind == "glyph_r":
        g = d.glyph_r
        bench = glyph_r_benchmark(GlyphRConfig(tasks=max(indices), classes_per_task=g.classes_per_task,
                                               train_per_class=g.train_per_class, test_per_class=g.test_per_class,
                                               image_size=g.image_size, style=g.style, seed=g.seed))
        tasks = {i: bench.tasks[i - 1] for i in indices}
        source = {"kind": "glyph_r", **g.model_dump(mode="json")}
    else:
        f = d.folder
        x, y, names = load_image_folder(f.root, f.image_size, f.channels, f.min_per_class)
        order = folder_task_classes(names, f.classes_per_task, max(indices), f.seed)
        tasks = {i: folder_task(x, y, names, order[i - 1], i - 1, f.test_fraction, f.seed) for i in indices}
        source = {"kind": "folder", **f.model_dump(mode="json")}
    out = {}
    for i, t in tasks.items():
        folder = os.path.join(out_dir, f"{i:03d}")
        os.makedirs(folder, exist_ok=True)
        p = os.path.join(folder, "task_data.safetensors")
        save_task_data(p, t, {"index": i, "source": source})
        out[i] = TaskFile(index=i, path=p, digest=sha256_file(p), classes=list(t.classes), names=list(t.names),
                          n_train=len(t.y_train), n_test=len(t.y_test))
    return out


def check_fits(backbone_dir: str, task: TaskFile) -> None:
    """One forward pass of a task image through the backbone: a shape mismatch fails here, before any training."""
    import torch

    from stamina_core.classification.steps import classifier_from_base, load_task_data

    model = classifier_from_base(backbone_dir)
    x = load_task_data(task.path).x_train[:1]
    try:
        with torch.no_grad():
            feats = model.features(x)
    except Exception as e:  # noqa: BLE001 - any shape error of the forward pass
        raise ClassifyError(f"classification.data: images of shape {tuple(x.shape[1:])} do not fit the backbone in "
                            f"{backbone_dir} ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if feats.ndim != 2:
        raise ClassifyError(f"classification.backbone: features of shape {tuple(feats.shape)}, expected (N, D)")


class EvalOutput(StrictModel):
    row: dict[str, dict[str, float]] = Field(description="{task name: {accuracy: ...}} for every seen task.")
    accuracy_seen: float = Field(description="Accuracy over all test images of all seen classes.")
    eval_json: str = Field(description="Local eval.json.")


def evaluate_step(model, index: int, task_names: list[str], task_paths: list[str], out_dir: str,
                  batch_size: int = 512) -> EvalOutput:
    """R[index][i] for every seen task i (classified among all classes of the head); writes ``eval.json``."""
    from stamina_core.classification.continual import evaluate
    from stamina_core.classification.steps import load_task_data

    tasks = [load_task_data(p) for p in task_paths]
    accs, pooled = evaluate(model, tasks, batch_size)
    row = {n: {"accuracy": float(a)} for n, a in zip(task_names, accs)}
    p = os.path.join(out_dir, "eval.json")
    with open(p, "w") as f:
        json.dump({"step": index, "row": row, "accuracy_seen": pooled, "num_classes": model.head.num_classes},
                  f, indent=2, sort_keys=True)
    return EvalOutput(row=row, accuracy_seen=float(pooled), eval_json=p)
