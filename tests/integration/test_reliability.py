"""Reliability of the service under faults and bad input, with real binaries on loopback
and a real SQLite file: the coordinator SIGKILLed mid-run and restarted on the same store,
a diverging run (NaN/Inf loss), data that no longer holds one context window. Run by
ctest (service_reliability)."""

import json
import os
import shutil
import signal
import struct
import subprocess
import time
import unittest

import harness
from harness import Cluster, wait_for, field


def runs_of(status):
    return field(status, "runs") or []


def checkpoint_header(path):
    """The JSON header of a sinkscope checkpoint (worker/checkpoint.h): "SINKCKPT", u32
    version, u32 0, u64 header length, header."""
    with open(path, "rb") as f:
        head = f.read(24)
        assert head[:8] == b"SINKCKPT", head[:8]
        length = struct.unpack("<Q", head[16:24])[0]
        return json.loads(f.read(length))


class ReliabilityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(lease_seconds=3.0)
        harness.start_coordinator_logged(cls.cluster, "coordinator-1")
        cls.corpus = harness.write_corpus(cls.cluster.dir)
        cls.incarnation = 1

    @classmethod
    def tearDownClass(cls):
        if os.environ.get("SINKSCOPE_KEEP_LOGS"):
            print(cls.logs())
        cls.cluster.close()
        shutil.rmtree(cls.cluster.dir, ignore_errors=True)

    @classmethod
    def logs(cls):
        out = [cls.cluster.logs()]
        for i in range(1, cls.incarnation):
            path = os.path.join(cls.cluster.dir, f"coordinator-{i}.log")
            if os.path.exists(path):
                with open(path) as f:
                    out.append(f"--- coordinator-{i} ---\n{f.read()[-4000:]}")
        return "\n".join(out)

    def write_experiment(self, name, **kwargs):
        overrides = kwargs.pop("overrides", {})
        spec = harness.tiny_experiment(name, kwargs.pop("corpus", self.corpus), **kwargs)
        for section, values in overrides.items():
            if isinstance(values, dict):
                spec.setdefault(section, {}).update(values)
            else:
                spec[section] = values
        path = os.path.join(self.cluster.dir, name + ".json")
        with open(path, "w") as f:
            json.dump(spec, f)
        return path, spec

    def submit(self, path):
        return field(self.cluster.cli_json("submit", path), "experiment_id")

    def restart_coordinator(self):
        type(self).incarnation += 1
        return harness.start_coordinator_logged(self.cluster, f"coordinator-{self.incarnation}")

    def stop_workers(self):
        for w in self.cluster.workers.values():
            w.stop()
        self.cluster.workers.clear()

    # --- SIGKILL of the coordinator mid-run, restart on the same store ------------------
    def test_6_sigkill_coordinator_restart_on_same_store(self):
        c = self.cluster
        # 4 ms after every step: the run lasts at least 6 s however fast the machine is, so
        # both kills land mid-run.
        worker = c.start_worker("worker-a", ["--fault-step-delay-ms", "4"])
        # A finished experiment first: it must survive the crash untouched.
        path, _ = self.write_experiment("before", steps=10, probe_every=5, checkpoint_every=5, arms=("baseline",))
        done_id = self.submit(path)
        self.assertEqual(c.wait_state(done_id, {"COMPLETED", "FAILED_RUNS"}, timeout=300)["state"], "COMPLETED",
                         self.logs())

        steps = 1500
        path, _ = self.write_experiment("crash", steps=steps, probe_every=10, checkpoint_every=50,
                                        arms=("vscale",), d_model=64)
        eid = self.submit(path)
        run_id = f"{eid}-vscale-s0"
        # A watch started now must ride out both crashes and end with the experiment.
        watch = subprocess.Popen([harness.binary("sinkscope"), "--coordinator", c.address, "watch", eid],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=c.dir)

        def past(step):
            def check():
                run = runs_of(c.status(eid))[0]
                return run if run.get("state") == "RUNNING" and int(field(run, "step") or 0) >= step else None
            return check

        before_steps, before_probes = {}, {}
        before = {}
        # Twice: the second time from a coordinator that recovered once already, and down for
        # longer than a lease, so the worker comes back from a long back-off after the
        # restart (the recovered run's lease must wait for it: recovery grace).
        for kill_at, down_seconds in ((30, 1.0), (300, 7.0)):
            wait_for(past(kill_at), 300, f"the run to pass step {kill_at}")
            before = {t: harness.table_rows(c, t, o) for t, o in (("experiments", "id"), ("runs", "id"))}
            before_steps = dict(c.sql("SELECT step, metrics FROM step_metrics WHERE run_id = ?", run_id))
            before_probes = dict(c.sql("SELECT step, report FROM probe_reports WHERE run_id = ?", run_id))
            c.coordinator.kill(signal.SIGKILL)
            c.coordinator.log.close()
            self.assertTrue(worker.alive())
            time.sleep(down_seconds)  # the worker trains on, queueing its messages, and retries meanwhile
            self.restart_coordinator()

        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=600)
        self.assertEqual(status["state"], "COMPLETED", self.logs())
        watch_out, watch_err = watch.communicate(timeout=120)
        self.assertEqual(watch.returncode, 0, watch_err)
        self.assertIn("the coordinator is unavailable", watch_err)
        self.assertIn("reconnecting in", watch_err)
        self.assertIn("SUCCEEDED", watch_out)
        run = runs_of(status)[0]
        # The same worker carried on under the same attempt: no requeue, no restart.
        self.assertEqual(int(field(run, "attempt")), 1, self.logs())
        self.assertEqual(field(run, "worker_id"), "worker-a")
        attempts = c.sql("SELECT attempt, worker_id, outcome FROM attempts WHERE run_id = ?", run_id)
        self.assertEqual(attempts, [(1, "worker-a", "succeeded")])
        # Every step and every probe report stored, each once (PRIMARY KEY (run_id, step)).
        stored_steps = [s for (s,) in c.sql("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", run_id)]
        self.assertEqual(stored_steps, list(range(1, steps + 1)), self.logs())
        probes = [s for (s,) in c.sql("SELECT step FROM probe_reports WHERE run_id = ? ORDER BY step", run_id)]
        self.assertEqual(probes, harness.expected_probe_steps(steps, 10))
        # What was stored before the crash is intact, byte for byte.
        after_steps = dict(c.sql("SELECT step, metrics FROM step_metrics WHERE run_id = ?", run_id))
        after_probes = dict(c.sql("SELECT step, report FROM probe_reports WHERE run_id = ?", run_id))
        for step, blob in before_steps.items():
            self.assertEqual(after_steps[step], blob, f"step {step} changed")
        for step, blob in before_probes.items():
            self.assertEqual(after_probes[step], blob, f"probe {step} changed")
        self.assertEqual(harness.table_rows(c, "experiments", "id")[0], before["experiments"][0])
        self.assertEqual(harness.table_rows(c, "runs", "id")[0], before["runs"][0])  # before-1's run
        self.assertEqual(c.status(done_id)["state"], "COMPLETED")
        done_runs = runs_of(c.status(done_id))
        self.assertEqual(int(field(done_runs[0], "probe_reports")), len(harness.expected_probe_steps(10, 5)))
        self.assertEqual(c.sql("PRAGMA integrity_check"), [("ok",)])
        # The restarted coordinator reports what it recovered and saw the worker come back.
        log = c.coordinator.output()
        self.assertIn("coordinator_recovered", log)
        self.assertIn("worker_registered", log)
        self.assertNotIn("lease_lapsed", log)
        self.stop_workers()

    # --- a diverging run: NaN/Inf loss ---------------------------------------------------
    def test_7_nan_loss_fails_numerical_and_keeps_the_last_good_checkpoint(self):
        c = self.cluster
        c.start_worker("worker-n")
        # lr 1e30: step 1 is finite (the weights blow up to ~1e30), step 2 is not.
        path, _ = self.write_experiment("diverge", steps=20, probe_every=5, checkpoint_every=1, arms=("baseline",),
                                        overrides={"train": {"lr": 1e30, "min_lr": 0.0}})
        eid = self.submit(path)
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=300)
        self.assertEqual(status["state"], "FAILED_RUNS", self.logs())
        run = runs_of(status)[0]
        run_id = field(run, "run_id")
        self.assertEqual(run["state"], "FAILED")
        self.assertEqual(field(run, "failure_reason"), "NUMERICAL", run)
        message = field(run, "message")
        self.assertIn("not finite at step", message)
        self.assertIn("the last good checkpoint (step", message)
        good = int(message.split("the last good checkpoint (step ")[1].split(")")[0])
        self.assertGreaterEqual(good, 1)
        # The steps before the failure are stored; none after.
        stored = [s for (s,) in c.sql("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", run_id)]
        self.assertEqual(stored, list(range(1, good + 1)))
        attempts = c.sql("SELECT outcome FROM attempts WHERE run_id = ?", run_id)
        self.assertEqual(attempts, [("failed: NUMERICAL",)])
        # The last good checkpoint is kept, and loads (sinkscope-probe reads and verifies it).
        ckpt = os.path.join(c.dir, "checkpoints", eid, run_id, "checkpoint.bin")
        self.assertTrue(os.path.exists(ckpt), ckpt)
        r = subprocess.run([harness.binary("sinkscope-probe"), ckpt, "--text", self.corpus, "--json"],
                           capture_output=True, text=True, timeout=300)
        self.assertNotIn("checksum", r.stderr)
        self.assertNotIn("corrupt", r.stderr.lower())
        self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr[-2000:])
        self.assertIn("layers", json.loads(r.stdout))
        self.assertEqual(checkpoint_header(ckpt)["step"], good)
        self.assertFalse(os.path.exists(os.path.join(c.dir, "checkpoints", eid, run_id, "hf")),
                         "a failed run exports nothing")
        self.stop_workers()

    # --- data that does not hold one context window ------------------------------------
    def test_8_context_larger_than_the_data_is_refused_with_the_rule(self):
        c = self.cluster
        small = os.path.join(c.dir, "small.txt")
        with open(small, "w") as f:
            f.write("only a few bytes\n")
        # At submission: the coordinator sees the data and refuses, naming the field and the rule.
        path, _ = self.write_experiment("toosmall", corpus=small)
        r = c.cli("submit", path, check=False)
        self.assertNotEqual(r.returncode, 0, r.stdout)
        self.assertIn("INVALID_ARGUMENT", r.stderr)
        self.assertIn("model.context: 32 needs windows of model.context + 1 = 33 tokens, but data.text.paths hold "
                      "at most 18 byte-level tokens", r.stderr)
        # The data shrank after submission: the worker fails the run with DATA_ERROR, and says why.
        shrinking = os.path.join(c.dir, "shrinking.txt")
        shutil.copy(self.corpus, shrinking)
        self.stop_workers()
        path, _ = self.write_experiment("shrunk", corpus=shrinking, arms=("baseline",))
        eid = self.submit(path)
        with open(shrinking, "w") as f:
            f.write("a\n%\nb\n%\nc\n%\nd\n")
        c.start_worker("worker-d")
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=300)
        run = runs_of(status)[0]
        self.assertEqual(field(run, "failure_reason"), "DATA_ERROR", run)
        message = field(run, "message")
        self.assertIn(shrinking, message)
        self.assertIn("the training split has", message)
        self.assertIn("fewer than one window of model.context + 1 = 33", message)
        self.stop_workers()

    # --- a worker stopped gracefully gives its run back --------------------------------------
    def test_10_sigterm_worker_releases_its_run_without_using_a_restart(self):
        c = self.cluster
        # max_restarts 0: a lapse would fail the run; a release must not. Three workers in
        # turn stall at a known step (so the stop lands mid-run on any machine) and are
        # stopped with SIGTERM; the run still completes, every step and probe stored once.
        stops = (20, 50, 80)
        c.start_worker("worker-t1", ["--fault-stall-after-step", str(stops[0])])
        steps = 120
        path, _ = self.write_experiment("drain", steps=steps, probe_every=10, checkpoint_every=10, arms=("vscale",),
                                        overrides={"max_restarts": 0})
        eid = self.submit(path)
        run_id = f"{eid}-vscale-s0"
        for n, stop_at in enumerate(stops, start=1):
            holder = f"worker-t{n}"

            def stalled(step=stop_at, holder=holder):
                run = runs_of(c.status(eid))[0]
                return run.get("state") == "RUNNING" and field(run, "worker_id") == holder and \
                    int(field(run, "step") or 0) == step

            wait_for(stalled, 300, f"the run to stall at step {stop_at} on {holder}")
            w = c.workers[holder]
            w.proc.send_signal(signal.SIGTERM)
            self.assertEqual(w.proc.wait(timeout=60), 0, w.output())
            self.assertIn("event=run_stopped", w.output())
            # Requeued at once (no lease to wait for), released, not lapsed.
            wait_for(lambda: runs_of(c.status(eid))[0].get("state") == "QUEUED", 30, "the run to be requeued")
            c.start_worker(f"worker-t{n + 1}", ["--fault-stall-after-step", str(stops[n])] if n < len(stops) else [])
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=600)
        self.assertEqual(status["state"], "COMPLETED", self.logs())
        run = runs_of(status)[0]
        self.assertEqual(int(field(run, "attempt")), 4)
        attempts = c.sql("SELECT attempt, worker_id, outcome FROM attempts WHERE run_id = ? ORDER BY attempt", run_id)
        self.assertEqual([(a, w, o) for a, w, o in attempts],
                         [(1, "worker-t1", "released"), (2, "worker-t2", "released"), (3, "worker-t3", "released"),
                          (4, "worker-t4", "succeeded")])
        self.assertEqual(c.sql("SELECT restarts FROM runs WHERE id = ?", run_id), [(0,)])
        stored = [s for (s,) in c.sql("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", run_id)]
        self.assertEqual(stored, list(range(1, steps + 1)))
        probes = [s for (s,) in c.sql("SELECT step FROM probe_reports WHERE run_id = ? ORDER BY step", run_id)]
        self.assertEqual(probes, harness.expected_probe_steps(steps, 10))
        self.assertIn("event=run_released", c.coordinator.output())
        self.assertNotIn("lease_lapsed", c.coordinator.output())
        self.stop_workers()

    # --- a cancel keeps what was measured ---------------------------------------------------
    def test_11_cancel_mid_run_stores_every_step_its_checkpoint_holds(self):
        c = self.cluster
        c.start_worker("worker-c", ["--fault-step-delay-ms", "20"])  # ≥ 8 s for 400 steps
        path, _ = self.write_experiment("cancel", steps=400, probe_every=10, checkpoint_every=50, arms=("baseline",))
        eid = self.submit(path)
        run_id = f"{eid}-baseline-s0"

        def past_20():
            run = runs_of(c.status(eid))[0]
            return run.get("state") == "RUNNING" and int(field(run, "step") or 0) >= 20

        wait_for(past_20, 300, "the run to pass step 20")
        c.cli("cancel", eid)
        wait_for(lambda: "event=run_stopped" in c.workers["worker-c"].output(), 60, "the worker to stop the run")
        self.assertEqual(runs_of(c.wait_state(eid, {"EXPERIMENT_CANCELLED"}, timeout=60))[0]["state"], "CANCELLED")
        ckpt = os.path.join(c.dir, "checkpoints", eid, run_id, "checkpoint.bin")
        saved = checkpoint_header(ckpt)["step"]
        self.assertLess(saved, 400)
        # Every step the checkpoint holds is stored, the one in flight at the cancel included.
        wait_for(lambda: c.sql("SELECT MAX(step) FROM step_metrics WHERE run_id = ?", run_id)[0][0] == saved, 30,
                 f"step {saved} to be stored")
        stored = [s for (s,) in c.sql("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", run_id)]
        self.assertEqual(stored, list(range(1, saved + 1)))
        probes = [s for (s,) in c.sql("SELECT step FROM probe_reports WHERE run_id = ? ORDER BY step", run_id)]
        self.assertEqual(probes, [s for s in harness.expected_probe_steps(400, 10) if s <= saved])
        self.stop_workers()

    # --- one coordinator per store and per port ------------------------------------------
    def test_9_a_second_coordinator_on_the_same_store_or_port_is_refused(self):
        c = self.cluster
        coordinator = harness.binary("sinkscope-coordinator")
        # The same store on other ports: refused, naming the store and the holder.
        r = subprocess.run([coordinator, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--db", c.db,
                            "--checkpoint-root", os.path.join(c.dir, "checkpoints")],
                           capture_output=True, text=True, timeout=60, cwd=c.dir)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn(f"store {c.db} is in use by another sinkscope-coordinator (pid {c.coordinator.proc.pid}",
                      r.stderr)
        # The same database file through a hard link (another path, another DB.lock): refused.
        link = os.path.join(c.dir, "hardlink.db")
        if not os.path.exists(link):
            os.link(c.db, link)
        r = subprocess.run([coordinator, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--db", link,
                            "--checkpoint-root", os.path.join(c.dir, "checkpoints")],
                           capture_output=True, text=True, timeout=60, cwd=c.dir)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn(f"store {link} is in use by another sinkscope-coordinator (the same database file", r.stderr)
        # The same gRPC port with another store: refused (no SO_REUSEPORT sharing the port).
        r = subprocess.run([coordinator, "--listen", c.address, "--metrics-listen", "127.0.0.1:0", "--db",
                            os.path.join(c.dir, "other.db"), "--checkpoint-root", os.path.join(c.dir, "checkpoints")],
                           capture_output=True, text=True, timeout=60, cwd=c.dir)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn(f"cannot listen on {c.address}", r.stderr)
        # The first coordinator still serves, alone.
        self.assertTrue(c.coordinator.alive())
        c.cli("list")


if __name__ == "__main__":
    unittest.main(verbosity=2)
