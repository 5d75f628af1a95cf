"""bench/pipeline_overhead.py's sampler: CPU seconds per process role while the job runs (no stack needed)."""

import os
import runpy
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def _mod():
    sys.path.insert(0, str(REPO))
    return runpy.run_path(str(REPO / "bench" / "pipeline_overhead.py"), run_name="bench_po_test")


def test_job_cpu_counts_only_what_a_process_used_after_the_job_started():
    mod = _mod()
    s = mod["RssSampler"](None, 0.5)
    me = psutil.Process(os.getpid())
    s.start_job()
    s._cpu_times({"ray": {me.pid: me}})  # first sight: an older process counts from here
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # burn 0.3 s of CPU
        sum(i * i for i in range(10_000))
    s._cpu_times({"ray": {me.pid: me}})
    (key, used), = s.job_cpu().items()
    assert key.startswith("ray: ")
    assert 0.25 <= used <= 5.0


def test_process_roles_come_from_the_command_line():
    mod = _mod()

    class P:
        def __init__(self, cmd):
            self._cmd = cmd

        def cmdline(self):
            return self._cmd

    role = mod["process_role"]
    assert role(P(["ray::RayTrainWorker.run_train_fn"])) == "Ray Train worker"
    assert role(P(["/venv/bin/python", "-m", "pipelines.sequence", "--config", "x"])) == "job driver"
    assert role(P(["/venv/bin/weed", "mini"])) == "SeaweedFS"
    assert role(P(["/usr/bin/something-else", "--flag"])) == "something-else"
