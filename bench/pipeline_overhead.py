"""Pipeline overhead benchmark (issue 4): the same tiny sequence in-process vs through the whole pipeline.

    .venv/bin/python bench/pipeline_overhead.py                      # 3 concepts x 200 steps (~10-12 min)
    .venv/bin/python bench/pipeline_overhead.py --concepts 2 --steps 20 --inproc-runs 1   # quick check (~4 min)
    .venv/bin/python bench/pipeline_overhead.py --reanalyze bench/results/pipeline_overhead.json   # redo the report

One run measures, on the same concepts (the built-in benchmark's first classes, written as PNG
folders), the same method config, steps and evaluation settings, on a random-init tiny base
(``base: {kind: tiny, pretrained: false}``, default ``TinyModelConfig``: 16 px):

(a) in-process, in a fresh Python child (``OMP_NUM_THREADS=1``), run before and again after the pipeline
    (mean of the two; ``--inproc-runs 1`` for once): ``components.ingest`` of every concept, then the core loop
    ``stamina_core.continual.run_continual`` with, after each fold, the pipeline's own evaluation
    (``components.evaluate.evaluate_step``: ``denoise_mse`` + DDIM samples + grid, eval mode
    "full"). One torch thread (the pipeline's Ray Train worker has ``cpus_per_worker: 1``; the
    job gets ``OMP_NUM_THREADS=1`` so its evaluation uses one thread too).
(b) pipeline: a fresh local stack (SeaweedFS S3, MLflow, Ray head) on free ports in a temp state
    dir, then ``ray job submit -- python -m pipelines.sequence --config X --summary-json Y``
    (ingest -> Ray Train -> fold -> evaluate -> S3 publish -> MLflow lineage per concept).

Reported: the wall-time ratio pipeline / in-process (stack start excluded; target <= 1.5) and
where the rest goes (job submission and driver start, Ray Train run vs. its training loop, the
driver's evaluation, MLflow lineage, the remainder = S3 publish / model reconstruction), from the
job's summary JSON, Ray Train's state API, MLflow timestamps and each step's eval.json in S3.
Peak resident memory of the stack's process trees (services, Ray workers, job driver), sampled
every ``--interval`` seconds by a background thread (target <= 6 GiB total). The stack is stopped
by PID at the end, always.

Results: ``bench/results/pipeline_overhead.json`` and the ``pipeline_overhead`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

from bench.common import (  # noqa: E402
    BENCHMARKS_MD,
    REPO,
    RESULTS_DIR,
    BenchError,
    machine_info,
    run_child_json,
    update_markdown_section,
    write_json,
)

TARGETS = {"ratio_max": 1.5, "peak_rss_gib_max": 6.0}
SECTION = "pipeline_overhead"
GIB = 1024 ** 3


# -- the workload -------------------------------------------------------------------------------

def make_concepts(root: str, n: int) -> list[dict]:
    """Write the first ``n`` classes of the built-in benchmark as PNG folders; return concept specs."""
    from stamina_core.data.benchmark import ContinualBenchmark

    bench = ContinualBenchmark()
    chosen = bench.order(0)[:n]
    if len(chosen) < n:
        raise BenchError(f"--concepts: the built-in benchmark has only {len(chosen)} classes, asked for {n}")
    out = []
    for c in chosen:
        d = os.path.join(root, c.slug)
        bench.write_concept_folder(c, d)
        meta = os.path.join(d, "concept.json")  # the benchmark's own label file; ingest accepts images only
        if os.path.exists(meta):
            os.remove(meta)
        out.append({"name": c.slug, "token": c.token, "prompt": "a photo of {token}", "images": d})
    return out


def sequence_dict(args, concepts: list[dict], sequence_id: str) -> dict:
    return {
        "sequence_id": sequence_id,
        "base": {"kind": "tiny", "pretrained": False},
        "method": {"name": "stamina", "train": {"max_train_steps": args.steps, "train_batch_size": args.batch,
                                                "checkpointing_steps": args.checkpointing_steps, "hflip": False}},
        "concepts": concepts,
        "storage": {"uri": "s3://stamina/runs", "materialize": "head"},
        "eval": {"mode": "full", "samples_per_concept": args.samples, "num_inference_steps": args.inference_steps},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }


# -- (a) in-process -----------------------------------------------------------------------------

def run_inprocess(cfg, base_dir: str, work: str) -> dict:
    """Ingest + run_continual + evaluate_step after every fold, all in this process."""
    import torch

    from components.evaluate import EvalConcept, EvaluateInput, evaluate_step
    from components.ingest import IngestInput, ingest, load_concept_data
    from stamina_core.continual import ConceptItem, run_continual
    from stamina_core.models.bundle import load_model

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    bundle = load_model(base_dir)
    t_load = time.perf_counter() - t0
    datasets, items = [], []
    for i, c in enumerate(cfg.concepts, start=1):
        ds = ingest(IngestInput(concept=c, output_dir=os.path.join(work, f"{i:03d}-{c.name}", "dataset"),
                                image_size=bundle.image_size, channels=bundle.image_channels))
        datasets.append(ds)
        items.append(ConceptItem(c.name, c.token, load_concept_data(ds.parquet_path)))
    t_ingest = time.perf_counter() - t0 - t_load
    eval_walls: list[float] = []

    def evaluate(b, idx: int, seen: list) -> dict:
        concepts = [EvalConcept(name=it.name, token=it.token, prompt=cfg.concepts[k].training_prompt(),
                                dataset=datasets[k].parquet_path) for k, it in enumerate(seen)]
        t = time.perf_counter()
        ev = evaluate_step(b, EvaluateInput(
            step_index=idx + 1, concepts=concepts, output_dir=os.path.join(work, f"{idx + 1:03d}-{seen[-1].name}", "step"),
            samples_per_concept=cfg.eval.samples_per_concept, num_inference_steps=cfg.eval.num_inference_steps,
            guidance_scale=cfg.eval.guidance_scale, seed=cfg.eval.seed))
        eval_walls.append(time.perf_counter() - t)
        return ev.row

    outcomes = run_continual(bundle, cfg.method, items, evaluate=evaluate)
    total = time.perf_counter() - t0
    steps = []
    for o, ev_s in zip(outcomes, eval_walls):
        steps.append({"index": o.index + 1, "name": o.name, "steps": o.train.steps, "train_loop_s": o.train.wall_s,
                      "train_fold_s": o.wall_s, "eval_s": ev_s,
                      "denoise_mse": o.eval.get(o.name, {}).get("denoise_mse")})
    return {"wall_s": total, "load_base_s": t_load, "ingest_s": t_ingest, "steps": steps,
            "threads": torch.get_num_threads()}


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def aggregate_inproc(runs: list[dict]) -> dict:
    """Mean over the in-process runs (wall, setup and every per-step figure)."""
    out = {k: _mean([r[k] for r in runs]) for k in ("wall_s", "load_base_s", "ingest_s")}
    out["steps"] = []
    for k, st in enumerate(runs[0]["steps"]):
        row = {"index": st["index"], "name": st["name"], "steps": st["steps"]}
        for f in ("train_loop_s", "train_fold_s", "eval_s", "denoise_mse"):
            row[f] = _mean([r["steps"][k].get(f) for r in runs])
        out["steps"].append(row)
    out["runs"] = len(runs)
    return out


def inprocess_child(args, seq: dict, base_dir: str, work: str, cache: str) -> dict:
    """One in-process run in a fresh Python (OMP_NUM_THREADS=1, like the Ray Train worker's environment)."""
    spec = os.path.join(work + "-spec.json")
    os.makedirs(os.path.dirname(spec), exist_ok=True)
    with open(spec, "w") as f:
        json.dump({"seq": seq, "base_dir": base_dir, "work": work}, f)
    return run_child_json([sys.executable, os.path.abspath(__file__), "--inproc-child", spec],
                          timeout_s=args.job_timeout,
                          env={"OMP_NUM_THREADS": "1", "STAMINA_CACHE": cache, "HF_HUB_OFFLINE": "1"})


# -- memory sampling ----------------------------------------------------------------------------

class RssSampler(threading.Thread):
    """Every ``interval`` s: RSS of each stack service's process tree (``infra.local.stack.rss_bytes``)."""

    def __init__(self, stack_cfg, interval: float):
        super().__init__(daemon=True)
        self.cfg, self.interval = stack_cfg, interval
        self.samples: list[dict] = []
        self.phase = "start"
        self.errors = 0
        self._stop_evt = threading.Event()
        self.job_started_unix = float("inf")
        self.cpu: dict[int, dict] = {}  # pid -> service, role, CPU seconds when first and last seen (job phase)

    # The process scan (every command line, for Ray's temp dir) costs far more than reading RSS; it runs every
    # REDISCOVER_S, so a process is counted from at most that long after it starts (Ray workers grow for seconds).
    REDISCOVER_S = 2.0

    def run(self) -> None:
        from infra.local.stack import rss_bytes, service_processes

        t0 = time.perf_counter()
        self.cpu_s = 0.0
        procs, found_at = None, -1e9
        while not self._stop_evt.is_set():
            c0 = time.thread_time()
            try:
                if procs is None or time.perf_counter() - found_at >= self.REDISCOVER_S:
                    procs, found_at = service_processes(self.cfg), time.perf_counter()
                    if self.phase == "job":
                        self._cpu_times(procs)
                per = rss_bytes(self.cfg, procs)
                self.samples.append({"t": round(time.perf_counter() - t0, 2), "phase": self.phase,
                                     "total": sum(per.values()), **per})
            except Exception:  # noqa: BLE001 - a process vanishing mid-read, a record being rewritten
                self.errors += 1
            self.cpu_s += time.thread_time() - c0  # the sampler's own CPU cost (it shares the cores it measures)
            self._stop_evt.wait(self.interval)

    def _cpu_times(self, procs: dict) -> None:
        import psutil

        for svc, ps in procs.items():
            for pid, proc in ps.items():
                try:
                    t = proc.cpu_times()
                    used = t.user + t.system
                    rec = self.cpu.get(pid)
                    if rec is None:  # a process first seen mid-job started then: count all its CPU
                        first = 0.0 if proc.create_time() > self.job_started_unix else used
                        rec = self.cpu[pid] = {"service": svc, "first": first}
                    rec["last"] = used
                    rec["role"] = process_role(proc)  # the latest: a pre-started idle Ray worker becomes an actor
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue

    def job_cpu(self) -> dict:
        """CPU seconds each kind of process used while the job ran (processes are seen every REDISCOVER_S, so
        the last ~2 s of a process that exits are missed)."""
        by_role: dict[str, float] = {}
        for rec in self.cpu.values():
            key = f"{rec['service']}: {rec['role']}"
            by_role[key] = by_role.get(key, 0.0) + max(rec.get("last", rec["first"]) - rec["first"], 0.0)
        return dict(sorted(((k, round(v, 2)) for k, v in by_role.items()), key=lambda kv: -kv[1]))

    def start_job(self) -> None:
        self.job_started_unix = time.time()
        self.phase = "job"

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=30)

    def summary(self, phases: tuple[str, ...]) -> dict:
        sel = [s for s in self.samples if s["phase"] in phases]
        if not sel:
            return {"n": 0}
        keys = [k for k in sel[0] if k not in ("t", "phase")]
        return {"n": len(sel), **{f"peak_{k}_gib": max(s.get(k, 0) for s in sel) / GIB for k in keys}}


def process_role(proc) -> str:
    """A short name for a stack process (Ray Train worker, job driver, raylet, ...) from its command line."""
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone or not readable
        return "?"
    for key, role in (("RayTrainWorker", "Ray Train worker"), ("TrainController", "Ray Train controller"),
                      ("pipelines.sequence", "job driver"), ("JobSupervisor", "job supervisor"),
                      ("raylet", "raylet"), ("gcs_server", "GCS"), ("DashboardAgent", "dashboard agent"),
                      ("dashboard", "dashboard"), ("log_monitor", "log monitor"), ("runtime_env", "runtime env agent"),
                      ("AutoscalingCoordinator", "autoscaling coordinator"), ("ray::IDLE", "idle Ray worker"),
                      ("ray::", "other Ray worker"),
                      ("mlflow", "MLflow server"), ("weed", "SeaweedFS")):
        if key in cmd:
            return role
    return cmd.split(" ")[0].rsplit("/", 1)[-1][:40] or "?"


# -- (b) the pipeline ---------------------------------------------------------------------------

def _http_json(url: str, timeout: float = 10.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except Exception as e:  # noqa: BLE001 - optional detail; the error is recorded instead
        return {"error": f"{type(e).__name__}: {e}"}


def _train_runs(dashboard_url: str) -> dict[str, dict]:
    """Ray Train V2 runs by name: run and attempt start/end (from the dashboard's train state API)."""
    got = _http_json(f"{dashboard_url}/api/train/v2/runs/v1")
    runs = got.get("train_runs") if isinstance(got, dict) else None
    if not isinstance(runs, list):
        return {"_error": str(got)[:300]}
    out = {}
    for r in runs:
        att = r.get("attempts") or []
        out[r["name"]] = {
            "status": r.get("status"),
            "start_ns": r.get("start_time_ns"), "end_ns": r.get("end_time_ns"),
            "attempts": [{"start_ns": a.get("start_time_ns"), "end_ns": a.get("end_time_ns"), "status": a.get("status")}
                         for a in att],
        }
    return out


def _mlflow_times(mlflow_uri: str, model_name: str) -> dict:
    """Concept runs' start/end and registered versions' creation time (unix ms), by step index."""
    from mlflow import MlflowClient

    from components.lineage import Lineage

    c = MlflowClient(mlflow_uri)
    out: dict = {"runs": {}, "versions": {}}
    exp = c.get_experiment_by_name("stamina")
    if exp is not None:
        for r in c.search_runs([exp.experiment_id], max_results=200):
            name = r.info.run_name or ""
            if name[:3].isdigit() and name[3:4] == "-":
                out["runs"][int(name[:3])] = {"start_ms": r.info.start_time, "end_ms": r.info.end_time}
    for v in Lineage(mlflow_uri).chain(model_name):
        mv = c.get_model_version(model_name, v["version"])
        out["versions"][int(v["step"])] = {"version": v["version"], "created_ms": mv.creation_timestamp}
    return out


def _eval_walls(store_uri: str, sequence_id: str, endpoint: str, work: str) -> dict[int, float]:
    from components.store import ChainStore, s3_client

    store = ChainStore(store_uri, sequence_id, client=s3_client(endpoint))
    out = {}
    for ref in store.steps():
        if ref.index == 0:
            continue
        files = store.download_step(ref, os.path.join(work, f"{ref.index:03d}"))
        with open(files["eval.json"]) as f:
            out[ref.index] = float(json.load(f)["wall_s"])
    return out


def run_pipeline(args, seq: dict, work: str, cache: str) -> dict:
    from infra.local.killtree import processes_with_arg
    from infra.local.stack import StackConfig, down, up

    state = os.path.join(work, "stack")
    scfg = StackConfig.free_ports(state, stop_grace_s=5.0, start_timeout_s=180.0)
    sampler = RssSampler(scfg, args.interval)
    res: dict = {}
    sub_id = f"{seq['sequence_id']}-{int(time.time())}"
    try:
        sampler.start()
        t = time.perf_counter()
        info = up(scfg)
        res["stack_start_s"] = time.perf_counter() - t
        os.environ.update(info.env())  # this process's S3/MLflow clients (reading results back) reach the stack
        sampler.phase = "idle"
        time.sleep(max(3 * args.interval, 2.0))  # a few idle samples of the started stack
        cfg_path = os.path.join(work, "sequence.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(seq, f, sort_keys=False)
        summary_path = os.path.join(work, "summary.json")
        env = {**info.env(), "STAMINA_CACHE": cache, "OMP_NUM_THREADS": "1", "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}
        runtime_env = {"env_vars": env, "excludes": [".venv", ".stamina", ".git", "bench/results", "*.egg-info",
                                                     "__pycache__"]}
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray, "job", "submit", "--address", info.dashboard_url, "--working-dir", REPO,
               "--submission-id", sub_id, "--runtime-env-json", json.dumps(runtime_env), "--",
               sys.executable, "-m", "pipelines.sequence", "--config", cfg_path, "--summary-json", summary_path,
               "--work-dir", os.path.join(work, "driver")]  # inside our temp dir (removed at the end)
        sampler.start_job()
        wall0, t = time.time(), time.perf_counter()
        try:
            cp = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=REPO,
                                timeout=args.job_timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"ray job {sub_id} ran past --job-timeout {args.job_timeout:.0f} s; lower --steps") from None
        res["submit_wall_s"] = time.perf_counter() - t
        res["submit_unix_s"] = wall0
        sampler.phase = "after"
        with open(os.path.join(work, "job.log"), "w") as f:
            f.write(cp.stdout + "\n--- stderr ---\n" + cp.stderr)
        res["job_log"] = os.path.join(work, "job.log")
        res["stamina_log_lines"] = [ln for ln in cp.stdout.splitlines() if ln.startswith("[stamina]")]
        if cp.returncode != 0 or not os.path.isfile(summary_path):
            tail = (cp.stdout + cp.stderr).strip().splitlines()[-5:]
            raise BenchError(f"ray job {sub_id} failed (rc {cp.returncode}); log {res['job_log']}: {' | '.join(tail)}")
        with open(summary_path) as f:
            res["summary"] = json.load(f)
        from ray.job_submission import JobSubmissionClient

        try:
            ji = JobSubmissionClient(info.dashboard_url).get_job_info(sub_id)
            res["job_info"] = {"status": str(ji.status), "start_ms": ji.start_time, "end_ms": ji.end_time,
                               "driver_exit_code": getattr(ji, "driver_exit_code", None)}
        except Exception as e:  # noqa: BLE001 - optional detail
            res["job_info"] = {"error": f"{type(e).__name__}: {e}"}
        res["train_runs"] = _train_runs(info.dashboard_url)
        try:
            res["mlflow"] = _mlflow_times(info.mlflow_uri, res["summary"]["registered_model"])
        except Exception as e:  # noqa: BLE001 - optional detail
            res["mlflow"] = {"error": f"{type(e).__name__}: {e}"}
        try:
            res["eval_s"] = _eval_walls(seq["storage"]["uri"], seq["sequence_id"], info.s3_endpoint, os.path.join(work, "dl"))
        except Exception as e:  # noqa: BLE001 - optional detail
            res["eval_s"] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        sampler.stop()
        t = time.perf_counter()
        down(scfg)
        res["stack_stop_s"] = time.perf_counter() - t
        left = processes_with_arg(scfg.ray_temp_dir) + processes_with_arg(scfg.root.as_posix())
        res["processes_left_after_down"] = [p.pid for p in left]
    res["memory"] = {
        "interval_s": args.interval,
        "method": "sum of psutil RSS over each service's process tree (infra.local.stack.rss_bytes: recorded PIDs + "
                  "descendants, Ray processes found by their temp dir, which includes Ray Train workers and the job "
                  "driver; the process list is refreshed every 2 s, RSS read every sample); shared pages (Ray's object store, libraries) are counted once per process",
        "sampler_errors": sampler.errors,
        "sampler_cpu_s": getattr(sampler, "cpu_s", None),
        "job_cpu_s": sampler.job_cpu(),
        "sampler_wall_s": sampler.samples[-1]["t"] if sampler.samples else None,
        "idle": sampler.summary(("idle",)),
        "job": sampler.summary(("job",)),
        "samples": sampler.samples,
    }
    return res


# -- analysis -----------------------------------------------------------------------------------

def _by_index(d, i: int):
    """d[i] for a dict keyed by step index (int keys, or str keys after a JSON round trip)."""
    if not isinstance(d, dict):
        return None
    return d.get(i, d.get(str(i)))


def breakdown(inproc: dict, pipe: dict) -> dict:
    """Where the pipeline's extra wall time goes (seconds), per step and in total.

    One warm Ray Train worker group (``TrainSession``) trains every concept: the driver's wait for a
    concept's task (``train_run_s``) = worker group start (first concept only) + model (re)build +
    training loop + fold + evaluation inside the worker + reports and checkpoint uploads + hand-over.
    """
    s = pipe["summary"]
    steps = [st for st in s["steps"] if not st["skipped"]]
    ml = pipe.get("mlflow", {})
    per = []
    for st, ip in zip(steps, inproc["steps"]):
        i = st["index"]
        wt = st.get("worker_timings") or {}
        r = _by_index(ml.get("runs"), i)
        v = _by_index(ml.get("versions"), i)
        lineage_s = (v["created_ms"] - r["start_ms"]) / 1e3 if r and v else None
        ev = st.get("eval_s")
        run_s = st.get("train_run_s")
        row = {"index": i, "name": st["name"], "step_wall_s": st["wall_s"], "train_loop_s": st["train_wall_s"],
               "ray_task_s": run_s, "model_s": wt.get("model_s"), "fold_s": wt.get("fold_s"),
               "model_reused": bool(wt.get("reused_model")), "eval_s": ev, "lineage_s": lineage_s,
               "inproc_train_fold_s": ip["train_fold_s"], "inproc_train_loop_s": ip["train_loop_s"],
               "inproc_eval_s": ip["eval_s"]}
        if run_s is not None:
            # worker group start (first concept), reports, checkpoint uploads, hand-over: the task minus the work in it
            row["ray_train_overhead_s"] = run_s - st["train_wall_s"] - (ev or 0.0) - (wt.get("model_s") or 0.0) \
                - (wt.get("fold_s") or 0.0)
        known = (run_s if run_s is not None else st["train_wall_s"] + (ev or 0.0)) + (lineage_s or 0.0)
        row["rest_s"] = st["wall_s"] - known  # S3 publish, local copies, materialise, MLflow logging before the run
        row["extra_vs_inproc_s"] = st["wall_s"] - ip["train_fold_s"] - ip["eval_s"]
        per.append(row)
    steps_sum = sum(st["wall_s"] for st in steps)
    return {
        "per_step": per,
        "job_submission_and_driver_s": pipe["submit_wall_s"] - s["wall_s"],
        "sequence_setup_s": s["wall_s"] - steps_sum,
        "steps_total_s": steps_sum,
        "ray_train_overhead_total_s": sum(r.get("ray_train_overhead_s") or 0.0 for r in per),
        "model_total_s": sum(r.get("model_s") or 0.0 for r in per),
        "lineage_total_s": sum(r.get("lineage_s") or 0.0 for r in per),
        "rest_total_s": sum(r["rest_s"] for r in per),
        "inproc_setup_s": inproc["load_base_s"] + inproc["ingest_s"],
        "session_close_s": s.get("session_close_s"),
        **_driver_parts(pipe),
    }


def _driver_parts(pipe: dict) -> dict:
    """Split the time outside run_sequence: submit -> driver process, imports, after run_sequence -> submit returns."""
    tl = pipe["summary"].get("driver_timeline") or {}
    t0 = pipe.get("submit_unix_s")
    if not t0 or "process_start" not in tl or "main" not in tl or "run_end" not in tl:
        return {}
    return {"submit_to_driver_process_s": tl["process_start"] - t0,
            "driver_imports_s": tl["main"] - tl["process_start"],
            "driver_exit_and_cli_s": t0 + pipe["submit_wall_s"] - tl["run_end"]}


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(res: dict) -> str:
    a, p, b, m = res["config"], res["pipeline"], res["breakdown"], res["machine"]
    ratio = res["ratio"]
    tl, rs = res["training_loop_s"], res["ratio_same_train_speed"]
    walls = ", ".join(f"{r['wall_s']:.1f}" for r in res.get("inproc_runs", [res["inproc"]]))
    mem = p["memory"]["job"]
    peak = mem.get("peak_total_gib")
    ok_r = ratio <= TARGETS["ratio_max"]
    ok_m = peak is not None and peak <= TARGETS["peak_rss_gib_max"]
    lines = [
        "## Pipeline overhead (issue 4)",
        "",
        "Command: `.venv/bin/python bench/pipeline_overhead.py` "
        f"(this run: `--concepts {a['concepts']} --steps {a['steps']}`). Raw data: `bench/results/pipeline_overhead.json`.",
        "",
        f"Workload: {a['concepts']} concepts of the built-in benchmark (PNG folders), STAMINA, {a['steps']} steps per concept "
        f"at batch {a['batch']} (checkpoint every {a['checkpointing_steps']}), random-init tiny base (default "
        f"`TinyModelConfig`, 16 px, `pretrained: false`), eval mode `full` ({a['samples']} samples x "
        f"{a['inference_steps']} DDIM steps per concept + `denoise_mse`). In-process = `components.ingest` + "
        "`stamina_core.continual.run_continual` + `components.evaluate.evaluate_step` after every fold (1 torch thread, "
        "no checkpoints). Pipeline = fresh stack on free ports + `ray job submit -- python -m pipelines.sequence` "
        "(1 Ray Train worker with 1 CPU; `OMP_NUM_THREADS=1` in the job).",
        "",
        f"Machine: {m['usable_cores']} cores ({m['cpu_model']}), shared; load average {m['loadavg'][0]:.1f} at start, "
        f"{res['loadavg_end'][0]:.1f} at end, torch {m['torch_version']}.",
        "",
        "| | wall s |",
        "|---|---:|",
        f"| in-process (ingest + train + fold + eval; mean of {res['inproc'].get('runs', 1)} run(s): "
        f"{walls}) | {res['inproc']['wall_s']:.1f} |",
        f"| pipeline: `ray job submit` until it returns | {p['submit_wall_s']:.1f} |",
        f"| **ratio pipeline / in-process** (target <= {TARGETS['ratio_max']}) | **{ratio:.2f}** "
        f"({'met' if ok_r else 'NOT met'}) |",
        f"| training loops alone: pipeline (Ray worker) / in-process | {tl['pipeline']:.1f} / {tl['inproc']:.1f} |",
        f"| ratio had both training loops run at the in-process speed / at the Ray worker's speed | "
        f"{rs['at_inproc_speed']:.2f} / {rs['at_pipeline_speed']:.2f} |",
        f"| pipeline time outside the training loops minus the in-process time outside them | {res['extra_s_outside_training']:.1f} |",
        f"| stack start (excluded from the ratio) | {p['stack_start_s']:.1f} |",
        f"| stack stop (excluded) | {p['stack_stop_s']:.1f} |",
        "",
        "Where the pipeline's time goes:",
        "",
        "| part | s |",
        "|---|---:|",
        f"| job submission, runtime env, driver start/exit (`submit` wall - `run_sequence` wall) | {b['job_submission_and_driver_s']:.1f} |",
        f"| of which `ray job submit` until the driver process starts (CLI, working-dir upload, job supervisor, runtime env) | {_f(b.get('submit_to_driver_process_s'))} |",
        f"| of which driver imports (torch, diffusers, Ray, MLflow clients) | {_f(b.get('driver_imports_s'))} |",
        f"| of which driver exit and the CLI noticing the job ended | {_f(b.get('driver_exit_and_cli_s'))} |",
        f"| sequence setup and teardown in the driver (base, ingest, S3 sequence/base commit, MLflow parent run; worker group shutdown {_f(b.get('session_close_s'))} s) | {b['sequence_setup_s']:.1f} |",
        f"| (in-process counterpart: load base + ingest) | {b['inproc_setup_s']:.1f} |",
        f"| concept steps, total | {b['steps_total_s']:.1f} |",
        f"| of which Ray Train overhead (task wait - model - training loop - fold - eval: worker group start on the first concept, reports, checkpoint uploads, hand-over) | {b['ray_train_overhead_total_s']:.1f} |",
        f"| of which model build in the worker (rebuild from base + deltas, or reuse of the warm folded model) | {b['model_total_s']:.1f} |",
        f"| of which MLflow lineage (concept run start -> model version registered) | {b['lineage_total_s']:.1f} |",
        f"| of which rest (S3 publish, local copies, materialise) | {b['rest_total_s']:.1f} |",
        "",
        "| step | concept | step wall | training loop | Ray Train task | worker model (reused?) | eval (in worker) | Ray overhead | lineage | rest | in-process train+fold | in-process eval |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in b["per_step"]:
        lines.append(f"| {r['index']} | {r['name']} | {r['step_wall_s']:.1f} | {r['train_loop_s']:.1f} | "
                     f"{_f(r['ray_task_s'])} | {_f(r['model_s'], '{:.2f}')} ({'yes' if r['model_reused'] else 'no'}) | "
                     f"{_f(r['eval_s'])} | {_f(r.get('ray_train_overhead_s'))} | {_f(r['lineage_s'])} | {r['rest_s']:.1f} | "
                     f"{r['inproc_train_fold_s']:.1f} | {r['inproc_eval_s']:.1f} |")
    idle = p["memory"]["idle"]
    lines += [
        "",
        f"Peak resident memory of the stack during the job (sampled every {p['memory']['interval_s']} s, "
        f"{mem.get('n', 0)} samples; process trees incl. Ray workers and the job driver; shared pages counted per process): "
        f"**{_f(peak, '{:.2f}')} GiB** total (target <= {TARGETS['peak_rss_gib_max']:.0f} GiB: "
        f"{'met' if ok_m else 'NOT met'}); per service peak: "
        + ", ".join(f"{k} {_f(mem.get(f'peak_{k}_gib'), '{:.2f}')} GiB" for k in ("s3", "mlflow", "ray"))
        + f". Idle after start: {_f(idle.get('peak_total_gib'), '{:.2f}')} GiB.",
        "",
    ]
    jc = p["memory"].get("job_cpu_s")
    if jc:
        wall = p["submit_wall_s"]
        lines += [
            f"CPU seconds the stack's processes used while the job ran ({wall:.0f} s wall on 2 cores = {2 * wall:.0f} "
            "CPU-s available; processes read every 2 s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in jc.items() if v >= 0.5)
            + f"; this benchmark's sampler {_f(p['memory'].get('sampler_cpu_s'))} s over its whole run.",
            "",
        ]
    mem_cpu, mem_wall = p["memory"].get("sampler_cpu_s"), p["memory"].get("sampler_wall_s")
    reps = [(st.get("worker_timings") or {}).get("report_s") for st in p["summary"]["steps"]]
    rep_s = sum(reps) if reps and all(r is not None for r in reps) else None
    if abs(tl["inproc_over_pipeline"] - 1.0) > 0.1:
        lines += [
            f"The same {a['steps']}-step training loops (same code, one thread each) took {1 / tl['inproc_over_pipeline']:.2f}x "
            "as long in the Ray Train worker as in-process. Inside the worker the loop also calls `ray.train.report` "
            "every 50 steps and hands a checkpoint to Ray's background upload every checkpointing step"
            + (f" ({rep_s:.2f} s in `ray.train.report` over all concepts)" if rep_s is not None else "")
            + ", saves that checkpoint locally and prints a progress line every 10 steps, and it shares the 2 cores with "
            "the stack's services, the job driver and this benchmark's memory sampler"
            + (f" ({mem_cpu:.1f} s CPU over {mem_wall:.0f} s)" if mem_cpu is not None and mem_wall else "")
            + "; other jobs on the shared machine add noise. The ratio counts that slowdown as pipeline overhead; the "
            "two ratios with equal training speed above show what remains without it.",
            "",
        ]
    worst = max(ratio, rs["at_inproc_speed"], rs["at_pipeline_speed"])
    per_concept = [r["step_wall_s"] - r["train_loop_s"] - (r["eval_s"] or 0.0) for r in b["per_step"]]
    if not ok_r or worst > TARGETS["ratio_max"]:
        lines += [
            ("The ratio target is not met. " if not ok_r else "The ratio target is not met once training speed is "
             "equalised. ") + "Besides the slower training loop, the extra time is fixed cost per job and per concept "
            f"(per concept, step wall minus training loop minus evaluation: {', '.join(f'{x:.0f}' for x in per_concept)} s, "
            f"against {_mean([r['inproc_train_fold_s'] - r['inproc_train_loop_s'] for r in b['per_step']]):.2f} s of "
            "begin + fold in-process), not per training step: "
            "job submission + driver start, starting the one Ray Train worker group, checkpoint uploads to S3, "
            "S3 publishing and MLflow logging/registration (see the tables above for which dominates in this run). "
            "The cost is per job and per concept, not per step, so its share shrinks as the steps per concept grow.",
            "",
        ]
    return "\n".join(lines)


def _finish(res: dict, args) -> int:
    """Breakdown, targets, JSON and the BENCHMARKS.md section from the raw measurements in ``res``."""
    pipe, inproc = res["pipeline"], res["inproc"]
    res["ratio"] = pipe["submit_wall_s"] / inproc["wall_s"]
    res["breakdown"] = b = breakdown(inproc, pipe)
    pipe_train = sum(r["train_loop_s"] for r in b["per_step"])
    ip_train = sum(r["inproc_train_loop_s"] for r in b["per_step"])
    res["training_loop_s"] = {"pipeline": pipe_train, "inproc": ip_train, "inproc_over_pipeline": ip_train / pipe_train}
    # the ratio if both training loops had run at the same speed (the machine is shared: they rarely do)
    res["ratio_same_train_speed"] = {
        "at_inproc_speed": (pipe["submit_wall_s"] - pipe_train + ip_train) / inproc["wall_s"],
        "at_pipeline_speed": pipe["submit_wall_s"] / (inproc["wall_s"] - ip_train + pipe_train),
    }
    res["extra_s_outside_training"] = (pipe["submit_wall_s"] - pipe_train) - (inproc["wall_s"] - ip_train)
    peak = pipe["memory"]["job"].get("peak_total_gib")
    res["targets_met"] = {"ratio": res["ratio"] <= TARGETS["ratio_max"],
                          "peak_rss": peak is not None and peak <= TARGETS["peak_rss_gib_max"]}
    write_json(args.out, res)
    if args.markdown:
        update_markdown_section(args.markdown, SECTION, markdown(res))
    print(f"[bench] ratio {res['ratio']:.2f} (pipeline {pipe['submit_wall_s']:.1f}s / in-process {inproc['wall_s']:.1f}s), "
          f"stack start {pipe['stack_start_s']:.1f}s, peak RSS {peak if peak is None else round(peak, 2)} GiB; "
          f"wrote {args.out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=3, help="concepts in the sequence (default 3)")
    ap.add_argument("--steps", type=int, default=200, help="training steps per concept (default 200)")
    ap.add_argument("--batch", type=int, default=8, help="train batch size (default 8)")
    ap.add_argument("--checkpointing-steps", type=int, default=50, help="checkpoint every N steps (default 50)")
    ap.add_argument("--samples", type=int, default=8, help="eval samples per concept (default 8)")
    ap.add_argument("--inference-steps", type=int, default=20, help="eval DDIM steps (default 20)")
    ap.add_argument("--interval", type=float, default=0.5, help="RSS sampling interval in seconds (default 0.5)")
    ap.add_argument("--job-timeout", type=float, default=1500.0, help="seconds before the job is given up")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "pipeline_overhead.json"), help="results JSON")
    ap.add_argument("--markdown", default=BENCHMARKS_MD, help="BENCHMARKS.md to update ('' to skip)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp folder (logs, stack state)")
    ap.add_argument("--inproc-runs", type=int, choices=(1, 2), default=2,
                    help="in-process runs: 1 = before the pipeline, 2 = before and after it (default; brackets drift)")
    ap.add_argument("--reanalyze", default=None, help="recompute the breakdown and markdown from a results JSON (no run)")
    ap.add_argument("--inproc-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inproc_child:
        import torch

        from components.schemas import SequenceConfig
        from stamina_core.config import parse

        torch.set_num_threads(1)
        with open(args.inproc_child) as f:
            spec = json.load(f)
        cfg = parse(SequenceConfig, spec["seq"], source=args.inproc_child)
        print(json.dumps(run_inprocess(cfg, spec["base_dir"], spec["work"])), flush=True)
        return 0
    if args.reanalyze:
        with open(args.reanalyze) as f:
            res = json.load(f)
        return _finish(res, args)
    for name in ("concepts", "steps", "batch", "checkpointing_steps", "samples", "inference_steps"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.interval <= 0:
        raise BenchError(f"--interval: must be > 0, got {args.interval}")

    import torch

    torch.set_num_threads(1)
    from components.model_io import resolve_base
    from components.schemas import SequenceConfig
    from stamina_core.config import parse

    machine = machine_info()
    tmp = tempfile.mkdtemp(prefix="stamina-pobench-")
    cache = os.path.join(tmp, "cache")
    os.environ["STAMINA_CACHE"] = cache
    try:
        concepts = make_concepts(os.path.join(tmp, "concepts"), args.concepts)
        seq = sequence_dict(args, concepts, "pobench")
        cfg = parse(SequenceConfig, seq, source="bench sequence")
        t = time.perf_counter()
        base_dir = resolve_base(cfg.base, cache)  # built once, shared (both variants load it from the cache)
        build_base_s = time.perf_counter() - t
        print(f"[bench] in-process 1/{args.inproc_runs}: {args.concepts} concepts x {args.steps} steps ...", flush=True)
        runs = [inprocess_child(args, seq, base_dir, os.path.join(tmp, "inproc1"), cache)]
        print(f"[bench] in-process: {runs[0]['wall_s']:.1f}s; starting the stack + ray job submit ...", flush=True)
        pipe = run_pipeline(args, seq, os.path.join(tmp, "pipeline"), cache)
        print(f"[bench] pipeline: {pipe['submit_wall_s']:.1f}s", flush=True)
        if args.inproc_runs == 2:
            print("[bench] in-process 2/2 ...", flush=True)
            runs.append(inprocess_child(args, seq, base_dir, os.path.join(tmp, "inproc2"), cache))
            print(f"[bench] in-process: {runs[1]['wall_s']:.1f}s", flush=True)
        inproc = aggregate_inproc(runs)
        ratio = pipe["submit_wall_s"] / inproc["wall_s"]
        res = {
            "benchmark": "pipeline_overhead",
            "command": ".venv/bin/python bench/pipeline_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "config": {"concepts": args.concepts, "steps": args.steps, "batch": args.batch,
                       "checkpointing_steps": args.checkpointing_steps, "samples": args.samples,
                       "inference_steps": args.inference_steps, "sequence": seq},
            "targets": TARGETS,
            "machine": machine,
            "build_base_s": build_base_s,
            "inproc": inproc,
            "inproc_runs": runs,
            "pipeline": pipe,
            "ratio": ratio,
            "breakdown": None,
            "loadavg_end": list(os.getloadavg()),
        }
        res.pop("breakdown")
        write_json(args.out, res)  # the raw measurements first: the analysis can be redone with --reanalyze
        return _finish(res, args)
    except BaseException:
        args.keep_tmp = True  # keep the job log and stack logs that the error message points to
        raise
    finally:
        if args.keep_tmp:
            print(f"[bench] kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
