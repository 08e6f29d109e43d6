"""Real processes on loopback for the service tests: the coordinator, workers, the CLI,
Prometheus, and a gRPC client that is not ours (Python grpcio with messages generated
from proto/ by Debian's protoc)."""

import importlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_dir():
    return os.environ.get("SINKSCOPE_BUILD_DIR", os.path.join(ROOT, "build"))


def binary(name):
    for sub in ("server", "worker", "client"):
        path = os.path.join(build_dir(), sub, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{name} is not built under {build_dir()}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what, interval=0.2):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Process:
    """A child process whose output goes to a log file in the test's folder."""

    def __init__(self, name, args, workdir, env=None):
        self.name = name
        self.log_path = os.path.join(workdir, name + ".log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir,
                                     env=env, start_new_session=True)

    def output(self):
        with open(self.log_path) as f:
            return f.read()

    def alive(self):
        return self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL):
        if self.alive():
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stop(self):
        self.kill(signal.SIGTERM)
        self.log.close()


class Cluster:
    """A coordinator and workers in a temporary folder."""

    def __init__(self, lease_seconds=3.0):
        self.dir = tempfile.mkdtemp(prefix="sinkscope-it-")
        self.db = os.path.join(self.dir, "store.db")
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.lease_seconds = lease_seconds
        self.workers = {}
        self.coordinator = None

    @property
    def address(self):
        return f"127.0.0.1:{self.grpc_port}"

    def start_coordinator(self):
        self.coordinator = Process("coordinator", [
            binary("sinkscope-coordinator"), "--listen", self.address,
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--db", self.db,
            "--checkpoint-root", os.path.join(self.dir, "checkpoints"),
            "--lease-seconds", str(self.lease_seconds), "--heartbeat-seconds", "0.5", "--verbose"], self.dir)
        wait_for(lambda: "listening" in self.coordinator.output() or not self.coordinator.alive(), 30,
                 "the coordinator to listen")
        assert self.coordinator.alive(), self.coordinator.output()

    def start_worker(self, worker_id):
        self.workers[worker_id] = Process(worker_id, [
            binary("sinkscope-worker"), "--coordinator", self.address, "--worker-id", worker_id, "--verbose"],
            self.dir)
        return self.workers[worker_id]

    def cli(self, *args, check=True, timeout=60):
        r = subprocess.run([binary("sinkscope"), "--coordinator", self.address, *args], capture_output=True,
                           text=True, timeout=timeout, cwd=self.dir)
        if check and r.returncode != 0:
            raise AssertionError(f"sinkscope {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def cli_json(self, *args):
        return json.loads(self.cli("--json", *args).stdout)

    def status(self, experiment_id):
        return self.cli_json("status", experiment_id)

    def wait_state(self, experiment_id, states, timeout):
        def done():
            s = self.status(experiment_id)
            return s if s.get("state") in states else None
        return wait_for(done, timeout, f"experiment {experiment_id} to reach {states}", interval=0.5)

    def sql(self, query, *params):
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(query, params).fetchall()
        finally:
            con.close()

    def close(self):
        for w in self.workers.values():
            w.stop()
        if self.coordinator:
            self.coordinator.stop()

    def logs(self):
        out = []
        for p in [self.coordinator, *self.workers.values()]:
            if p:
                out.append(f"--- {p.name} ---\n{p.output()[-4000:]}")
        return "\n".join(out)


def write_corpus(folder):
    """A small deterministic English-like corpus, documents separated by % lines."""
    words = ("the model learns to attend to the first token because the softmax must put its mass "
             "somewhere and the causal mask lets every query see the start of the sequence").split()
    docs = []
    for i in range(400):
        n = 20 + (i * 7) % 30
        docs.append(" ".join(words[(i * 3 + j * 5) % len(words)] for j in range(n)) + ".")
    path = os.path.join(folder, "corpus.txt")
    with open(path, "w") as f:
        f.write("\n%\n".join(docs) + "\n")
    return path


def tiny_experiment(name, corpus, steps=30, probe_every=5, checkpoint_every=5, arms=("baseline", "vscale"),
                    seeds=(0,), d_model=32, layers=2):
    return {
        "name": name,
        "model": {"layers": layers, "d_model": d_model, "heads": 2, "kv_heads": 1, "head_dim": d_model // 2,
                  "ffn": 2 * d_model, "vocab": 257, "context": 32},
        "data": {"text": {"paths": [corpus]}, "val_fraction": 0.1},
        "train": {"steps": steps, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 10,
                  "eval_batches": 2},
        "probe": {"every": probe_every, "ref_span": 15, "profile_len": 16, "t_eps": 16},
        "arms": list(arms),
        "seeds": list(seeds),
        "max_restarts": 2,
        "checkpoint": {"every": checkpoint_every, "export_hf": True},
    }


def expected_probe_steps(steps, every):
    """Training probes happen at step 1, every `every` steps, and at the last step."""
    return sorted({1, steps} | set(range(every, steps + 1, every)))


_stubs = None


def python_stubs():
    """Messages generated from proto/ by Debian's protoc, imported from a temp folder."""
    global _stubs
    if _stubs:
        return _stubs
    out = tempfile.mkdtemp(prefix="sinkscope-py-")
    proto_root = os.path.join(ROOT, "proto")
    files = [os.path.join(proto_root, "sinkscope", "v1", f) for f in ("experiment.proto", "metrics.proto",
                                                                      "service.proto")]
    subprocess.run(["protoc", f"--proto_path={proto_root}", f"--python_out={out}", *files], check=True)
    sys.path.insert(0, out)
    _stubs = importlib.import_module("sinkscope.v1.service_pb2")
    return _stubs


def prometheus_query(port, query):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())
