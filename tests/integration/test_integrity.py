"""Integrity under hostile and faulty workers, with the real binaries on loopback and a
worker written here in Python (grpcio) that says whatever it likes on its session: only the
session holding a run's lease reports for it, a frozen worker's lapsed run goes to a healthy
worker, and work no worker can hold is refused at submission. Run by ctest
(service_integrity)."""

import json
import os
import queue
import shutil
import signal
import threading
import time
import unittest

import grpc

import harness
from harness import Cluster, wait_for, field


class HandWrittenWorker:
    """One WorkerService.Session stream driven by the test: send() any WorkerMessage, and
    collect the CoordinatorMessages that come back."""

    def __init__(self, address, worker_id, memory_bytes=0, device="CPU", device_name=""):
        self.pb = harness.python_stubs()
        self.channel = grpc.insecure_channel(address)
        self.outgoing = queue.Queue()
        self.received = []
        self.lock = threading.Lock()
        call = self.channel.stream_stream("/sinkscope.v1.WorkerService/Session",
                                          request_serializer=lambda m: m.SerializeToString(),
                                          response_deserializer=self.pb.CoordinatorMessage.FromString)
        self.responses = call(iter(self.outgoing.get, None))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        reg = self.pb.WorkerMessage()
        reg.register.worker_id = worker_id
        from sinkscope.v1 import experiment_pb2
        reg.register.capabilities.device = experiment_pb2.DeviceKind.Value(device)
        reg.register.capabilities.device_name = device_name
        reg.register.capabilities.device_count = 1
        reg.register.capabilities.memory_bytes = memory_bytes
        self.send(reg)
        wait_for(lambda: any(m.HasField("registered") for m in self.messages()), 30, f"{worker_id} to register")

    def _read(self):
        try:
            for m in self.responses:
                with self.lock:
                    self.received.append(m)
        except grpc.RpcError:
            pass

    def send(self, message):
        self.outgoing.put(message)

    def messages(self):
        with self.lock:
            return list(self.received)

    def refusals(self):
        return [m.ack.refused for m in self.messages() if m.HasField("ack") and m.ack.refused]

    def close(self):
        self.outgoing.put(None)
        self.channel.close()


class IntegrityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(lease_seconds=2.0)
        cls.cluster.start_coordinator()
        cls.corpus = harness.write_corpus(cls.cluster.dir)
        cls.pb = harness.python_stubs()

    @classmethod
    def tearDownClass(cls):
        if os.environ.get("SINKSCOPE_KEEP_LOGS"):
            print(cls.cluster.logs())
        cls.cluster.close()
        shutil.rmtree(cls.cluster.dir, ignore_errors=True)

    def tearDown(self):
        for w in self.cluster.workers.values():
            w.stop()
        self.cluster.workers.clear()

    def submit(self, name, **kwargs):
        spec = harness.tiny_experiment(name, self.corpus, **kwargs)
        path = os.path.join(self.cluster.dir, name + ".json")
        with open(path, "w") as f:
            json.dump(spec, f)
        return self.cluster.cli_json("submit", path)["experiment_id"], spec

    def run_of(self, eid):
        return field(self.cluster.status(eid), "runs")[0]

    def test_1_only_the_lease_holder_reports(self):
        c = self.cluster
        victim = c.start_worker("worker-a", ["--fault-stall-after-step", "10"])
        eid, _ = self.submit("intrude", steps=40, probe_every=5, arms=("baseline",))
        run_id = f"{eid}-baseline-s0"
        wait_for(lambda: int(field(self.run_of(eid), "step") or 0) == 10, 120, "the run to stall at step 10")
        steps_before = c.sql("SELECT step, metrics FROM step_metrics WHERE run_id = ? ORDER BY step", run_id)
        probes_before = c.sql("SELECT step FROM probe_reports WHERE run_id = ? ORDER BY step", run_id)
        intruder = HandWrittenWorker(c.address, "intruder")
        pb = self.pb
        try:
            # Everything another session can say about worker-a's run, with its attempt number.
            m = pb.WorkerMessage()
            m.progress.run_id, m.progress.attempt = run_id, 1
            m.progress.metrics.step, m.progress.metrics.loss = 3, 99.0
            intruder.send(m)
            m = pb.WorkerMessage()
            m.probe.run_id, m.probe.attempt, m.probe.sequence = run_id, 1, 15
            m.probe.report.step = 15
            intruder.send(m)
            for kind in ("finished", "failed", "released"):
                m = pb.WorkerMessage()
                getattr(m, kind).run_id = run_id
                getattr(m, kind).attempt = 1
                if kind == "failed":
                    m.failed.reason, m.failed.message = pb.NUMERICAL, "made up"
                intruder.send(m)
            # And a Register that names the run, to take its lease.
            m = pb.WorkerMessage()
            m.register.worker_id, m.register.run_id, m.register.attempt = "intruder", run_id, 1
            from sinkscope.v1 import experiment_pb2
            m.register.capabilities.device, m.register.capabilities.device_count = experiment_pb2.CPU, 1
            intruder.send(m)
            wait_for(lambda: len(intruder.refusals()) == 5, 30, "five refusals")
            for why in intruder.refusals():
                self.assertEqual(why, "this session does not hold the run's lease (held by worker worker-a)")
            wait_for(lambda: any(x.HasField("cancel") for x in intruder.messages()), 30, "the Register refused")
            cancel = [x.cancel for x in intruder.messages() if x.HasField("cancel")][0]
            self.assertEqual(cancel.reason, "the run's lease belongs to worker worker-a")
            # Nothing of it is stored or shown; worker-a still holds the run.
            self.assertEqual(c.sql("SELECT step, metrics FROM step_metrics WHERE run_id = ? ORDER BY step", run_id),
                             steps_before)
            self.assertEqual(c.sql("SELECT step FROM probe_reports WHERE run_id = ? ORDER BY step", run_id),
                             probes_before)
            run = self.run_of(eid)
            self.assertEqual(run["state"], "RUNNING")
            self.assertEqual(field(run, "worker_id"), "worker-a")
            self.assertIn("event=progress_refused", c.coordinator.output())
            self.assertIn("event=register_refused", c.coordinator.output())
            # A rendezvous key for a run it holds no rank of, and a Register as a rank the
            # run does not have: refused, nothing relayed to anyone.
            m = pb.WorkerMessage()
            m.rendezvous_set.run_id, m.rendezvous_set.attempt = run_id, 1
            m.rendezvous_set.key, m.rendezvous_set.value = "gloo/rank_0", b"\x00" * 64
            intruder.send(m)
            m = pb.WorkerMessage()
            m.register.worker_id, m.register.run_id, m.register.attempt, m.register.rank = "intruder", run_id, 1, 1
            m.register.capabilities.device, m.register.capabilities.device_count = experiment_pb2.CPU, 1
            intruder.send(m)
            wait_for(lambda: len([x for x in intruder.messages() if x.HasField("cancel")]) == 2, 30,
                     "the rank's Register refused")
            cancel = [x.cancel for x in intruder.messages() if x.HasField("cancel")][1]
            self.assertEqual(cancel.reason, "the run has no rank 1")
            wait_for(lambda: "event=rendezvous_refused" in c.coordinator.output(), 30, "the rendezvous key refused")
            self.assertIn('reason="this session holds no rank of the run\'s current attempt"', c.coordinator.output())
            self.assertFalse(any(x.HasField("rendezvous") for x in intruder.messages()))
            self.assertEqual(field(self.run_of(eid), "worker_id"), "worker-a")
        finally:
            intruder.close()
        # The holder finishes its run (a second worker picks it up after the stalled victim
        # is killed, from its checkpoint): every step stored once, none of the intruder's.
        c.start_worker("worker-b")
        victim.kill(signal.SIGKILL)
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=300)
        self.assertEqual(status["state"], "COMPLETED", c.logs())
        steps = c.sql("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", run_id)
        self.assertEqual([s for (s,) in steps], list(range(1, 41)))
        from sinkscope.v1 import metrics_pb2
        (blob,) = c.sql("SELECT metrics FROM step_metrics WHERE run_id = ? AND step = 3", run_id)[0]
        self.assertNotEqual(metrics_pb2.StepMetrics.FromString(blob).loss, 99.0)

    def test_2_a_frozen_workers_lapsed_run_goes_to_a_healthy_worker(self):
        c = self.cluster
        frozen = c.start_worker("worker-frozen", ["--fault-step-delay-ms", "20"])
        eid, _ = self.submit("frozen", steps=200, probe_every=50, checkpoint_every=10, arms=("baseline",))
        wait_for(lambda: int(field(self.run_of(eid), "step") or 0) >= 5, 120, "the run to start")
        c.start_worker("worker-healthy")
        wait_for(lambda: "event=worker_registered worker=worker-healthy" in c.coordinator.output(), 30,
                 "the healthy worker to register")
        frozen.kill(signal.SIGSTOP)
        try:
            # Longer than the lease: it lapses, and the run must not bounce back to the frozen one.
            wait_for(lambda: field(self.run_of(eid), "worker_id") == "worker-healthy", 60,
                     "the run to move to the healthy worker")
        finally:
            frozen.kill(signal.SIGCONT)
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=300)
        self.assertEqual(status["state"], "COMPLETED", c.logs())
        run = field(status, "runs")[0]
        self.assertEqual(field(run, "worker_id"), "worker-healthy")
        self.assertEqual(int(field(run, "attempt")), 2)
        attempts = c.sql("SELECT attempt, worker_id, outcome FROM attempts WHERE run_id = ? ORDER BY attempt",
                         f"{eid}-baseline-s0")
        self.assertEqual([(a, w) for a, w, _ in attempts], [(1, "worker-frozen"), (2, "worker-healthy")])
        self.assertEqual(attempts[0][2], "lease lapsed")
        steps = c.sql("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", f"{eid}-baseline-s0")
        self.assertEqual([s for (s,) in steps], list(range(1, 201)))

    def test_3_work_no_worker_can_hold_is_refused_and_waiting_is_explained(self):
        c = self.cluster
        small = HandWrittenWorker(c.address, "small-worker", memory_bytes=1 << 30)  # 1 GiB
        try:
            spec = harness.tiny_experiment("huge", self.corpus)
            spec["model"].update({"layers": 200, "d_model": 65536, "ffn": 262144, "heads": 512, "kv_heads": 512,
                                  "head_dim": 128})
            path = os.path.join(c.dir, "huge.json")
            with open(path, "w") as f:
                json.dump(spec, f)
            r = c.cli("submit", path, check=False)
            self.assertEqual(r.returncode, 1, r.stdout)
            self.assertIn("INVALID_ARGUMENT: model: 13.7T parameters need about", r.stderr)
            self.assertIn("the largest connected CPU worker has", r.stderr)
            # Absurd sizes and unbounded submissions are refused naming the field.
            for key, value, message in (
                    (("model", "vocab"), 10 ** 9, "model.vocab: must be at most 16777216"),
                    (("train", "micro_batch"), 10 ** 9, "train.micro_batch: must be at most 65536"),
                    (("seeds",), list(range(20000)), "make 40000 runs, at most 256 per experiment"),
                    (("data", "text", "paths"), [self.corpus] * 2, "data.text.paths[1]: repeats data.text.paths[0]")):
                spec = harness.tiny_experiment("bounded", self.corpus)
                node = spec
                for k in key[:-1]:
                    node = node[k]
                node[key[-1]] = value
                with open(path, "w") as f:
                    json.dump(spec, f)
                r = c.cli("submit", path, check=False)
                self.assertNotEqual(r.returncode, 0, key)
                self.assertIn(message, r.stderr, key)
        finally:
            small.close()
        # A large experiment's status is summarised; --json lists every run.
        eid, _ = self.submit("many", arms=("baseline", "vscale"), seeds=tuple(range(20)))
        human = c.cli("status", eid).stdout
        self.assertIn("40 runs: ", human)
        self.assertIn("... 8 more runs not shown (running and failed runs come first; --json lists every run)", human)
        self.assertEqual(len(field(c.status(eid), "runs")), 40)
        c.cli("cancel", eid)
        # A run that asks for a kind of worker nobody has says so in status.
        spec = harness.tiny_experiment("gpu", self.corpus, arms=("baseline",))
        spec["resources"] = {"device": "CUDA"}
        path = os.path.join(c.dir, "gpu.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        eid = c.cli_json("submit", path)["experiment_id"]
        wait_for(lambda: field(self.run_of(eid), "message") == "waiting: no CUDA worker is connected", 30,
                 "the waiting reason")
        self.assertIn("waiting: no CUDA worker is connected", c.cli("status", eid).stdout)
        # A CPU worker does not take it; a worker that registers as CUDA does, at once.
        from sinkscope.v1 import experiment_pb2
        cpu = c.start_worker("worker-cpu-only")
        time.sleep(2)
        self.assertEqual(field(self.run_of(eid), "message"), "waiting: no CUDA worker is connected")
        gpu = HandWrittenWorker(c.address, "gpu-worker", device="CUDA", device_name="NVIDIA H200 (cuda:0)")
        try:
            wait_for(lambda: any(m.HasField("assignment") for m in gpu.messages()), 30, "the CUDA run's assignment")
            a = next(m.assignment for m in gpu.messages() if m.HasField("assignment"))
            self.assertEqual(a.run_id, f"{eid}-baseline-s0")
            self.assertEqual(a.experiment.resources.device, experiment_pb2.CUDA)
        finally:
            gpu.close()
        cpu.stop()
        c.cli("cancel", eid)
        # --device: a GPU that is not there, or a device that does not exist, ends the worker
        # at start (status 2) naming it; nothing registers.
        import subprocess
        if os.environ.get("CUDA_VISIBLE_DEVICES") is None and not os.path.exists("/dev/nvidia0"):
            r = subprocess.run([harness.binary("sinkscope-worker"), "--coordinator", c.address, "--device", "cuda:0"],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn("cuda:0", r.stderr)
        r = subprocess.run([harness.binary("sinkscope-worker"), "--coordinator", c.address, "--device", "tpu"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn('device "tpu": expected cpu, cuda or cuda:N', r.stderr)

    def test_4_a_store_that_fails_and_recovers_loses_nothing_and_shows_only_what_it_holds(self):
        # A cluster of its own: its coordinator's store takes no writes while a flag file exists.
        flag = os.path.join(self.cluster.dir, "store-read-only")
        c = Cluster(lease_seconds=3.0)
        try:
            c.start_coordinator(["--fault-store-read-only-when", flag])
            worker = c.start_worker("worker-s", ["--fault-step-delay-ms", "30", "--resend-seconds", "1"])
            spec = harness.tiny_experiment("flaky", self.corpus, steps=120, probe_every=10, arms=("baseline",))
            path = os.path.join(c.dir, "flaky.json")
            with open(path, "w") as f:
                json.dump(spec, f)
            eid = c.cli_json("submit", path)["experiment_id"]
            run_id = f"{eid}-baseline-s0"

            def stored_max():
                return c.sql("SELECT COALESCE(MAX(step), 0) FROM step_metrics WHERE run_id = ?", run_id)[0][0]

            wait_for(lambda: stored_max() >= 20, 120, "20 steps stored")
            open(flag, "w").close()
            wait_for(lambda: "event=fault_store_read_only on=true" in c.coordinator.output(), 30, "the store to fail")
            frozen = stored_max()
            time.sleep(3)  # the worker trains on; nothing it sends can be stored
            self.assertLessEqual(stored_max(), frozen + 1)
            run = field(c.status(eid), "runs")[0]
            self.assertEqual(run["state"], "RUNNING")
            self.assertLessEqual(int(field(run, "step") or 0), stored_max(), "status shows a step that is not stored")
            os.remove(flag)
            status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=300)
            self.assertEqual(status["state"], "COMPLETED", c.logs())
            steps = [s for (s,) in c.sql("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", run_id)]
            self.assertEqual(steps, list(range(1, 121)))
            probes = [s for (s,) in c.sql("SELECT step FROM probe_reports WHERE run_id = ? ORDER BY step", run_id)]
            self.assertEqual(probes, harness.expected_probe_steps(120, 10))
            # Written again on the same connection, not after a reconnect or restart.
            out = worker.output()
            self.assertIn("event=resending_unacked", out)
            self.assertEqual(out.count("event=registered"), 1, out[-3000:])
            self.assertEqual(c.sql("SELECT COUNT(*) FROM attempts WHERE run_id = ?", run_id), [(1,)])
        finally:
            c.close()
            shutil.rmtree(c.dir, ignore_errors=True)

    def test_5_checkpoint_writes_that_fail_are_retried_then_the_run_is_given_back(self):
        c = self.cluster

        def remove_under_the_writer(folder):
            # The worker writes checkpoint.bin.tmp.* and renames it while we delete: a file
            # may vanish between listing and unlinking. Try again until the folder is gone.
            for _ in range(50):
                try:
                    shutil.rmtree(folder)
                    return
                except FileNotFoundError:
                    continue
            self.fail(f"could not remove {folder} under the running worker")

        worker = c.start_worker("worker-k", ["--fault-step-delay-ms", "30"])
        eid, _ = self.submit("ckpt", steps=150, probe_every=50, checkpoint_every=5, arms=("baseline",))
        run_id = f"{eid}-baseline-s0"
        folder = os.path.join(c.dir, "checkpoints", eid, run_id)
        wait_for(lambda: os.path.exists(os.path.join(folder, "checkpoint.bin")), 120, "the first checkpoint")
        # The run folder removed under the running run: made again, the run carries on.
        remove_under_the_writer(folder)
        wait_for(lambda: os.path.exists(os.path.join(folder, "checkpoint.bin")), 60, "the folder to be made again")
        run = self.run_of(eid)
        self.assertEqual(run["state"], "RUNNING")
        self.assertEqual(int(field(run, "attempt")), 1)
        # Its path taken by a file: every try fails, and the run is given back (requeued, no
        # restart used) with the reason, not failed.
        wait_for(lambda: int(field(self.run_of(eid), "step") or 0) >= 40, 120, "step 40")
        remove_under_the_writer(folder)
        with open(folder, "w") as f:
            f.write("not a folder")
        wait_for(lambda: "event=run_given_back" in worker.output(), 60, "the run to be given back")
        self.assertIn("event=checkpoint_failed", worker.output())
        run = wait_for(lambda: (lambda r: r if r["state"] == "QUEUED" else None)(self.run_of(eid)), 30,
                       "the run to be queued again")
        self.assertIn("cannot be written (4 tries)", run.get("message", ""))
        self.assertEqual(c.sql("SELECT restarts FROM runs WHERE id = ?", run_id), [(0,)])
        # The file removed, a worker picks it up and it completes with every step once.
        os.remove(folder)
        c.start_worker("worker-k2")
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=300)
        self.assertEqual(status["state"], "COMPLETED", c.logs())
        steps = [s for (s,) in c.sql("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", run_id)]
        self.assertEqual(steps, list(range(1, 151)))


if __name__ == "__main__":
    unittest.main(verbosity=2)
