"""Data-parallel runs through the service: a run of resources.devices_per_run = N ranks is
placed on N workers at once, its ranks meet through the coordinator (the rendezvous) and
train over Gloo on loopback, and the gang is one attempt: a rank SIGKILLed, one stuck
outside its collectives and one that never reaches the rendezvous are each detected, and
the whole gang restarts from the checkpoint with no step or probe lost or stored twice and
the weights of an undisturbed run. Run by ctest (service_gang)."""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import unittest

import harness
from harness import Cluster, wait_for, field


def the_run(status):
    runs = field(status, "runs") or []
    assert len(runs) == 1, status
    return runs[0]


# Every worker gives up on a silent peer after this long (the rendezvous and each collective).
COLLECTIVE_TIMEOUT = "4"


class GangTest(unittest.TestCase):
    def setUp(self):
        self.cluster = Cluster(lease_seconds=3.0)
        self.cluster.start_coordinator()
        self.corpus = harness.write_corpus(self.cluster.dir)

    def tearDown(self):
        if os.environ.get("SINKSCOPE_KEEP_LOGS"):
            print(self.cluster.logs())
        self.cluster.close()
        shutil.rmtree(self.cluster.dir, ignore_errors=True)

    def worker(self, name, *extra):
        return self.cluster.start_worker(name, extra_args=("--collective-timeout", COLLECTIVE_TIMEOUT, *extra))

    def experiment(self, name, steps=24, ranks=2, **overrides):
        spec = harness.tiny_experiment(name, self.corpus, steps=steps, probe_every=4, checkpoint_every=6,
                                       arms=("vscale",))
        spec["resources"] = {"device": "CPU", "devices_per_run": ranks}
        spec["train"].update(overrides)
        path = os.path.join(self.cluster.dir, name + ".json")
        with open(path, "w") as f:
            json.dump(spec, f)
        return path

    def submit(self, path):
        return field(self.cluster.cli_json("submit", path), "experiment_id")

    def wait_run(self, eid, predicate, what, timeout=300):
        return wait_for(lambda: predicate(the_run(self.cluster.status(eid))), timeout, what)

    def check_complete_once(self, eid, steps, attempts):
        """The run succeeded after `attempts` attempts, with every step and probe stored once."""
        c = self.cluster
        status = c.wait_state(eid, {"COMPLETED", "FAILED_RUNS"}, timeout=600)
        self.assertEqual(status["state"], "COMPLETED", c.logs())
        run = the_run(status)
        run_id = field(run, "run_id")
        self.assertEqual(int(field(run, "attempt")), attempts, run)
        self.assertEqual(len(field(run, "rank_workers")), 2, run)
        self.assertEqual(field(run, "rank_workers")[0], field(run, "worker_id"))
        stored = [s for (s,) in c.sql("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", run_id)]
        self.assertEqual(stored, list(range(1, steps + 1)))
        probes = [s for (s,) in c.sql("SELECT step FROM probe_reports WHERE run_id = ? ORDER BY step", run_id)]
        self.assertEqual(probes, harness.expected_probe_steps(steps, 4))
        return run, run_id

    def same_weights_as_local(self, eid, run_id, path):
        """The final weights are those of `sinkscope-train --ranks 2` on the same file."""
        local = os.path.join(self.cluster.dir, "local")
        subprocess.run([harness.binary("sinkscope-train"), path, "--out", local, "--ranks", "2"], check=True,
                       capture_output=True, timeout=600)
        self.assertTrue(filecmp.cmp(os.path.join(local, "vscale-s0", "hf", "model.safetensors"),
                                    os.path.join(self.cluster.dir, "checkpoints", eid, run_id, "hf",
                                                 "model.safetensors"), shallow=False),
                        "final weights differ from the undisturbed run")

    def test_1_sigkill_of_rank_zero_restarts_the_gang_from_its_checkpoint(self):
        c = self.cluster
        # The victim alone stalls after step 12 (its checkpoint written), heartbeating, so
        # the kill lands at a known step; the other rank waits in its next collective.
        self.worker("w-victim", "--fault-stall-after-step", "12")
        wait_for(lambda: "event=worker_registered worker=w-victim" in c.coordinator.output(), 60, "w-victim")
        self.worker("w-peer")
        steps = 24
        path = self.experiment("gang-kill", steps=steps)
        eid = self.submit(path)
        run = self.wait_run(eid, lambda r: int(field(r, "step") or 0) == 12 and r, "the gang to reach step 12")
        self.assertEqual(field(run, "rank_workers"), ["w-victim", "w-peer"], run)
        self.worker("w-rescuer")
        c.workers["w-victim"].kill(signal.SIGKILL)
        run, run_id = self.check_complete_once(eid, steps, attempts=2)
        self.assertNotIn("w-victim", field(run, "rank_workers"))
        attempts = c.sql("SELECT attempt, outcome, start_step FROM attempts WHERE run_id = ? ORDER BY attempt", run_id)
        self.assertEqual([a[1] for a in attempts], ["rank lost", "succeeded"], attempts)
        self.assertEqual(attempts[1][2], 12, "the second attempt resumed from the step-12 checkpoint")
        restarts = c.sql("SELECT restarts FROM runs WHERE id = ?", run_id)[0][0]
        self.assertEqual(restarts, 1)
        self.same_weights_as_local(eid, run_id, path)

    def test_2_a_rank_stuck_outside_its_collectives_is_detected(self):
        c = self.cluster
        # Rank 1 stalls after step 6 (not dead: it heartbeats); rank 0's next collective
        # gives up after the timeout and reports the gang broken.
        self.worker("w-a")
        wait_for(lambda: "event=worker_registered worker=w-a" in c.coordinator.output(), 60, "w-a")
        self.worker("w-stuck", "--fault-stall-after-step", "6")
        steps = 12
        eid = self.submit(self.experiment("gang-hang", steps=steps))
        run, run_id = self.check_complete_once(eid, steps, attempts=2)
        first = c.sql("SELECT outcome, end_step FROM attempts WHERE run_id = ? AND attempt = 1", run_id)[0]
        self.assertEqual(first[0], "rank lost")
        log = c.coordinator.output()
        self.assertIn("event=gang_restarted", log)
        self.assertRegex(log, r"rank 0 \(worker w-a\): rank 0 of 2: .*timed out after 4 s")

    def test_3_a_rank_that_never_reaches_the_rendezvous_is_detected(self):
        c = self.cluster
        self.worker("w-a")
        frozen = self.worker("w-frozen")
        wait_for(lambda: "event=worker_registered worker=w-frozen" in c.coordinator.output(), 60, "w-frozen")
        os.kill(frozen.proc.pid, signal.SIGSTOP)  # registered, then silent: it never reads its assignment
        steps = 8
        eid = self.submit(self.experiment("gang-absent", steps=steps))
        wait_for(lambda: "event=gang_restarted" in c.coordinator.output(), 60, "the gang to be restarted")
        log = c.coordinator.output()
        self.assertTrue("did not arrive" in log or "(worker w-frozen) was lost" in log, log[-3000:])
        self.worker("w-b")
        run, run_id = self.check_complete_once(eid, steps, attempts=2)
        self.assertNotIn("w-frozen", field(run, "rank_workers"))
        os.kill(frozen.proc.pid, signal.SIGCONT)

    def test_5_a_drained_rank_gives_the_gang_back_without_a_restart(self):
        c = self.cluster
        # Rank 0 paces the gang (a pause before every step); rank 1's worker gets SIGTERM
        # mid-run: every rank stops after the same step, rank 0 checkpoints, rank 1 gives
        # the run back, and the gang resumes on other workers with no restart counted.
        self.worker("w-a", "--fault-step-delay-ms", "150")
        wait_for(lambda: "event=worker_registered worker=w-a" in c.coordinator.output(), 60, "w-a")
        self.worker("w-drained")
        steps = 24
        eid = self.submit(self.experiment("gang-drain", steps=steps))
        self.wait_run(eid, lambda r: int(field(r, "step") or 0) >= 5 and r, "the gang to pass step 5")
        self.worker("w-c")
        c.workers["w-drained"].kill(signal.SIGTERM)
        run, run_id = self.check_complete_once(eid, steps, attempts=2)
        self.assertNotIn("w-drained", field(run, "rank_workers"))
        attempts = c.sql("SELECT outcome FROM attempts WHERE run_id = ? ORDER BY attempt", run_id)
        self.assertEqual([a[0] for a in attempts], ["released", "succeeded"])
        self.assertEqual(c.sql("SELECT restarts FROM runs WHERE id = ?", run_id)[0][0], 0)

    def test_4_a_gang_no_fleet_can_form_waits_with_the_reason_and_bad_sizes_are_refused(self):
        c = self.cluster
        self.worker("w-a")
        self.worker("w-b")
        wait_for(lambda: c.coordinator.output().count("event=worker_registered") >= 2, 60, "two workers")
        eid = self.submit(self.experiment("gang-big", ranks=3, micro_batch=6))
        run = self.wait_run(eid, lambda r: "waiting" in (field(r, "message") or "") and r, "a waiting reason")
        self.assertIn("a run needs 3 CPU workers at once (resources.devices_per_run, one rank each) and 2 are "
                      "connected", field(run, "message"))
        self.assertEqual(field(run, "state"), "QUEUED")
        c.cli("cancel", eid)
        r = c.cli("submit", self.experiment("gang-odd", ranks=3), check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("train.micro_batch: (4) must be a multiple of resources.devices_per_run (3)", r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
