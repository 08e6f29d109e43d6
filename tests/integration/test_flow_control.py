"""Flow control and bounds (issue 28), with the real coordinator and worker on loopback and
peers written here in Python (grpcio) that misbehave: a worker that stops reading its
stream, watchers that never read, oversized or malformed input from clients and workers.
Each test asserts the bound: the slow peer's session ended and its lease lapsing, other
clients answered meanwhile, the coordinator's peak memory, SIGTERM still ending it.
Run by ctest (service_flow_control)."""

import json
import os
import queue
import shutil
import signal
import stat
import threading
import time
import unittest

import grpc

import harness
import test_integrity as ti
from harness import Cluster, wait_for, field


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def add_profile_layers(report, layers, P, offset=0):
    """Fills a probe report's layers with P-long per-token ratios and norms (1 + 1e-3·(k +
    offset)): the bulk of a real report of that many layers."""
    for layer in range(layers):
        lp = report.layers.add()
        lp.layer = layer
        for name in ("attn_bloat", "attn_change", "attn_compress", "mlp_bloat", "mlp_change", "mlp_compress",
                     "attn_bloat_p", "mlp_bloat_p"):
            if hasattr(lp, name):
                getattr(lp, name).extend([1.0 + 1e-3 * (k + offset) for k in range(P)])
        for name in ("h_out", "r_mlp", "r_attn", "v"):
            lp.norms[name].values.extend([1.0 + 1e-3 * (k + offset) for k in range(P)])


class SilentWorker:
    """A WorkerService.Session that registers and then never reads its stream: it only
    sends what the test queues (and heartbeats, so it looks alive)."""

    def __init__(self, address, worker_id):
        self.pb = harness.python_stubs()
        from sinkscope.v1 import experiment_pb2
        self.channel = grpc.insecure_channel(address)
        self.outgoing = queue.Queue()
        call = self.channel.stream_stream("/sinkscope.v1.WorkerService/Session",
                                          request_serializer=lambda m: m.SerializeToString(),
                                          response_deserializer=self.pb.CoordinatorMessage.FromString)
        self.responses = call(iter(self.outgoing.get, None))  # never iterated: nothing is read
        reg = self.pb.WorkerMessage()
        reg.register.worker_id = worker_id
        reg.register.capabilities.device = experiment_pb2.CPU
        reg.register.capabilities.device_count = 1
        self.outgoing.put(reg)
        self.stopped = threading.Event()
        self.heartbeat_run = ""
        self.beats = threading.Thread(target=self._beat, daemon=True)
        self.beats.start()

    def _beat(self):
        for _ in range(10_000):  # bounded: 0.25 s apart, far longer than any test
            if self.stopped.wait(0.25):
                return
            m = self.pb.WorkerMessage()
            m.heartbeat.run_id = self.heartbeat_run
            self.outgoing.put(m)

    def send(self, m):
        self.outgoing.put(m)

    def close(self):
        self.stopped.set()
        self.outgoing.put(None)
        self.channel.close()


class FlowControlTest(unittest.TestCase):
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
        return self.cluster.cli_json("submit", path)["experiment_id"]

    def run_of(self, eid):
        return field(self.cluster.status(eid), "runs")[0]

    def list_seconds(self):
        """Seconds another client waits for ListExperiments (a deadline of 20 s)."""
        channel = grpc.insecure_channel(self.cluster.address)
        try:
            call = channel.unary_unary("/sinkscope.v1.ExperimentService/ListExperiments",
                                       request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=self.pb.ListExperimentsResponse.FromString)
            start = time.monotonic()
            call(self.pb.ListExperimentsRequest(), timeout=20)
            return time.monotonic() - start
        finally:
            channel.close()

    def test_1_a_worker_that_stops_reading_loses_its_lease(self):
        """Finding 1: a worker that registers, takes rank 0 of a gang and never reads, while
        its partner sets a 1 MiB rendezvous key again and again (each relayed to every rank).
        The scheduler must not block on it: other clients are answered, the silent worker's
        session is ended for not reading, its lease lapses (the gang restarts), the
        coordinator's memory stays bounded, and SIGTERM still stops it."""
        c = self.cluster
        silent = SilentWorker(c.address, "silent")
        wait_for(lambda: "event=worker_registered worker=silent" in c.coordinator.output(), 30,
                 "the silent worker to register")
        partner = ti.HandWrittenWorker(c.address, "partner")
        beating = threading.Event()
        try:
            spec = harness.tiny_experiment("silent", self.corpus, steps=50, arms=("baseline",))
            spec["resources"] = {"device": "CPU", "devices_per_run": 2}
            path = os.path.join(c.dir, "silent.json")
            with open(path, "w") as f:
                json.dump(spec, f)
            eid = c.cli_json("submit", path)["experiment_id"]
            run_id = f"{eid}-baseline-s0"
            wait_for(lambda: any(m.HasField("assignment") for m in partner.messages()), 30, "the gang's assignment")
            self.assertEqual(field(self.run_of(eid), "worker_id"), "silent")
            silent.heartbeat_run = run_id

            def partner_beats():
                for _ in range(2_000):  # bounded: 0.25 s apart
                    if beating.wait(0.25):
                        return
                    m = self.pb.WorkerMessage()
                    m.heartbeat.run_id = run_id
                    partner.send(m)
            threading.Thread(target=partner_beats, daemon=True).start()
            for _ in range(80):  # 80 MiB relayed to each rank
                m = self.pb.WorkerMessage()
                m.rendezvous_set.run_id, m.rendezvous_set.attempt = run_id, 1
                m.rendezvous_set.key, m.rendezvous_set.value = "gloo/rank_1", b"\x00" * (1 << 20)
                partner.send(m)
            # Meanwhile other clients are answered (20 s deadline each) ...
            for _ in range(5):
                self.assertLess(self.list_seconds(), 20)
                time.sleep(0.5)
            # ... the silent worker's session is ended for not reading, and its lease lapses.
            wait_for(lambda: "event=worker_session_ended" in c.coordinator.output(), 60,
                     "the silent worker's session to be ended")
            out = c.coordinator.output()
            self.assertTrue("event=worker_not_reading" in out or "its outbox is full" in out, out[-3000:])
            wait_for(lambda: "rank 0 (worker silent) was lost" in c.coordinator.output(), 60,
                     "the silent worker's lease to lapse")
            self.assertLess(vm_hwm_kib(c.coordinator.proc.pid), 400 * 1024)
        finally:
            beating.set()
            silent.close()
            partner.close()
        c.cli("cancel", eid)

    def test_2_watchers_that_never_read_get_the_latest_state(self):
        """Finding 4: three watchers that never read while a worker streams ~49 MB of probe
        reports (1,000 reports of 32 layers). Each watcher's queue is bounded: what it did not
        read is dropped for a snapshot of the latest state that says how many events were
        dropped; the coordinator's memory stays bounded and other clients are answered."""
        c = self.cluster
        prober = ti.HandWrittenWorker(c.address, "prober")
        channels, streams = [], []
        try:
            spec = harness.tiny_experiment("watched", self.corpus, steps=1000, probe_every=1, layers=32,
                                           arms=("baseline",))
            path = os.path.join(c.dir, "watched.json")
            with open(path, "w") as f:
                json.dump(spec, f)
            eid = c.cli_json("submit", path)["experiment_id"]
            run_id = f"{eid}-baseline-s0"
            wait_for(lambda: any(m.HasField("assignment") for m in prober.messages()), 30, "the assignment")
            for _ in range(3):
                ch = grpc.insecure_channel(c.address)
                call = ch.unary_stream("/sinkscope.v1.ExperimentService/WatchExperiment",
                                       request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=self.pb.WatchEvent.FromString)
                streams.append(call(self.pb.WatchExperimentRequest(experiment_id=eid, include_probes=True),
                                    timeout=600))
                channels.append(ch)
            wait_for(lambda: c.coordinator.output().count("event=worker_registered") >= 1, 10, "registration")
            P = spec["probe"]["profile_len"]
            for step in range(1, 1001):
                m = self.pb.WorkerMessage()
                m.probe.run_id, m.probe.attempt, m.probe.sequence = run_id, 1, step
                m.probe.report.step = step
                add_profile_layers(m.probe.report, 32, P, step)
                prober.send(m)
            wait_for(lambda: "event=watch_events_dropped" in c.coordinator.output(), 120,
                     "events of a watcher that does not read to be dropped")
            self.assertLess(self.list_seconds(), 20)
            wait_for(lambda: sum(1 for m in prober.messages() if m.HasField("ack") and m.ack.sequence) >= 1000, 300,
                     "every report acked")
            # Three watchers' queues of at most 8 MiB each, and the batch each holds: far
            # below the ~150 MB three unbounded queues of this stream would hold.
            self.assertLess(vm_hwm_kib(c.coordinator.proc.pid), 250 * 1024)
            # The watcher reads now: the events it had been handed, then the snapshot saying
            # how many it lost.
            dropped = 0
            for i, event in enumerate(streams[0]):
                if event.HasField("snapshot") and event.dropped_events > 0:
                    dropped = event.dropped_events
                    break
                self.assertLess(i, 5_000, "no snapshot with dropped_events within 5,000 events")
            self.assertGreater(dropped, 0)
        finally:
            for st in streams:
                st.cancel()
            for ch in channels:
                ch.close()
            prober.close()
        c.cli("cancel", eid)
        # Finding 7: compare reads one report at a time. Six concurrent CompareArms over
        # the ~46 MB just stored raise the peak by far less than one copy of it (each call
        # loaded every report before).
        before = vm_hwm_kib(c.coordinator.proc.pid)
        errors = []

        def compare():
            channel = grpc.insecure_channel(c.address)
            try:
                call = channel.unary_unary("/sinkscope.v1.ExperimentService/CompareArms",
                                           request_serializer=lambda m: m.SerializeToString(),
                                           response_deserializer=self.pb.CompareArmsResponse.FromString)
                r = call(self.pb.CompareArmsRequest(experiment_id=eid), timeout=120)
                if r.arms[0].step != 1000 or len(r.arms[0].layers) != 32:
                    errors.append(str(r)[:300])
            except grpc.RpcError as e:
                errors.append(f"{e.code()}: {e.details()}")
            finally:
                channel.close()
        threads = [threading.Thread(target=compare) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        self.assertEqual(errors, [])
        self.assertLess(vm_hwm_kib(c.coordinator.proc.pid) - before, 20 * 1024)

    def submit_raw(self, spec, timeout=20):
        """SubmitExperiment with a raw client; returns (code, details, seconds)."""
        from google.protobuf import json_format
        from sinkscope.v1 import experiment_pb2
        spec = dict(spec, arms=[a.upper() for a in spec["arms"]])  # the CLI's lower-case names
        experiment = json_format.ParseDict(spec, experiment_pb2.Experiment(), ignore_unknown_fields=False)
        channel = grpc.insecure_channel(self.cluster.address)
        try:
            call = channel.unary_unary("/sinkscope.v1.ExperimentService/SubmitExperiment",
                                       request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=self.pb.SubmitExperimentResponse.FromString)
            start = time.monotonic()
            try:
                call(self.pb.SubmitExperimentRequest(experiment=experiment), timeout=timeout)
                return grpc.StatusCode.OK, "", time.monotonic() - start
            except grpc.RpcError as e:
                return e.code(), e.details(), time.monotonic() - start
        finally:
            channel.close()

    def test_3_a_submission_is_bounded_before_any_work(self):
        """Findings 2, 3, 6 and 9: what a client submits is bounded and checked before any
        work, and refused naming the field and the rule, without echoing the input or a
        file's bytes; a FIFO named as data is refused without being opened."""
        c = self.cluster
        spec = harness.tiny_experiment("bounded", self.corpus)
        spec["data"]["text"]["exclude_suffixes"] = ["x"] * 100_000
        code, details, _ = self.submit_raw(spec)
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(details, "data.text.exclude_suffixes: lists 100000 suffixes, at most 64")
        spec = harness.tiny_experiment("bounded", self.corpus)
        spec["data"]["text"]["separator"] = "%" * 300_000
        code, details, _ = self.submit_raw(spec)
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(details, "data.text.separator: is 300000 bytes long, at most 1024")
        self.assertLess(len(details), 200)
        # Finding 2: a report that could not be sent is refused at submission, naming the setting.
        spec = harness.tiny_experiment("bounded", self.corpus, layers=8)
        spec["model"]["context"] = 4096
        spec["probe"]["profile_len"] = 4096
        code, details, _ = self.submit_raw(spec)
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertTrue(details.startswith("probe.profile_len: a probe report of 8 layers with P = 4096 may reach "),
                        details)
        # Finding 6: a FIFO as shards is refused without opening it (no writer ever comes).
        fifo = os.path.join(c.dir, "shard.fifo")
        os.mkfifo(fifo)
        spec = harness.tiny_experiment("bounded", self.corpus)
        spec["data"] = {"shards": {"train": fifo}}
        for _ in range(5):
            code, details, seconds = self.submit_raw(spec, timeout=20)
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, details)
            self.assertEqual(details, f"data.shards.train: {fifo}: not a regular file")
        # Finding 9: a file that is not a shard: its bytes are not echoed.
        secret = os.path.join(c.dir, "shadow")
        with open(secret, "w") as f:
            f.write("root:*:20000:0:99999:7:::\n")
        spec["data"] = {"shards": {"train": secret}}
        code, details, _ = self.submit_raw(spec)
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("not an llm.c shard", details)
        self.assertNotIn("1953460082", details)  # "root" as an int32
        self.assertNotIn("root", details)
        # A symlink loop as a data path: a clear error, not UNKNOWN.
        loop = os.path.join(c.dir, "loop")
        os.symlink(loop, loop)
        spec = harness.tiny_experiment("bounded", self.corpus)
        spec["data"]["text"]["paths"] = [loop]
        code, details, _ = self.submit_raw(spec)
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, details)
        self.assertTrue(details.startswith("data.text.paths[0]: "), details)
        # Finding 9: an oversized id is refused by its length, never echoed.
        channel = grpc.insecure_channel(c.address)
        try:
            call = channel.unary_unary("/sinkscope.v1.ExperimentService/GetExperiment",
                                       request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=self.pb.ExperimentSummary.FromString)
            with self.assertRaises(grpc.RpcError) as raised:
                call(self.pb.GetExperimentRequest(experiment_id="x" * 8192), timeout=20)
            self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertEqual(raised.exception.details(), "experiment_id: must be at most 256 bytes, got 8192")
        finally:
            channel.close()
        # Finding 9: a string that is not UTF-8 on the wire, and bytes that are no message:
        # INVALID_ARGUMENT naming the method and the field, never an empty INTERNAL, and
        # the peer's bytes never echoed.
        from google.protobuf import json_format
        from sinkscope.v1 import experiment_pb2
        spec = harness.tiny_experiment("utf8-check", self.corpus)
        spec = dict(spec, arms=[a.upper() for a in spec["arms"]])
        request = self.pb.SubmitExperimentRequest(
            experiment=json_format.ParseDict(spec, experiment_pb2.Experiment())).SerializeToString()
        self.assertEqual(request.count(b"utf8-check"), 1)
        bad_name = request.replace(b"utf8-check", b"utf8\xff\xfeheck")
        garbage = b"\xff" * 64
        channel = grpc.insecure_channel(c.address)
        try:
            call = channel.unary_unary("/sinkscope.v1.ExperimentService/SubmitExperiment",
                                       request_serializer=lambda raw: raw,
                                       response_deserializer=self.pb.SubmitExperimentResponse.FromString)
            for raw, reason in ((bad_name, "string field sinkscope.v1.Experiment.name holds bytes that are not UTF-8"),
                                (garbage, "its bytes are not a valid protobuf message")):
                with self.assertRaises(grpc.RpcError) as raised:
                    call(raw, timeout=20)
                self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT, raised.exception.details())
                details = raised.exception.details()
                self.assertTrue(details.startswith(
                    "the request to /sinkscope.v1.ExperimentService/SubmitExperiment was refused: " + reason), details)
                self.assertNotIn("utf8", details.replace("UTF-8", ""))
        finally:
            channel.close()
        # None of it stalled the coordinator.
        self.assertLess(self.list_seconds(), 20)

    def test_4_a_workers_messages_are_bounded(self):
        """Finding 10: Capabilities.version is bounded (the session is refused, naming the
        field, without echoing it); a progress step <= 0 or past train.steps is refused with
        an ack that says why (so a worker forgets it instead of resending it forever)."""
        c = self.cluster
        from sinkscope.v1 import experiment_pb2
        channel = grpc.insecure_channel(c.address)
        try:
            call = channel.stream_stream("/sinkscope.v1.WorkerService/Session",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=self.pb.CoordinatorMessage.FromString)
            reg = self.pb.WorkerMessage()
            reg.register.worker_id = "big-version"
            reg.register.capabilities.device = experiment_pb2.CPU
            reg.register.capabilities.version = "v" * (1 << 20)
            with self.assertRaises(grpc.RpcError) as raised:
                for _ in call(iter([reg]), timeout=20):
                    pass
            self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertEqual(raised.exception.details(),
                             "register.capabilities.version must be at most 128 bytes, got 1048576")
        finally:
            channel.close()
        w = ti.HandWrittenWorker(c.address, "stepper")
        try:
            eid = self.submit("stepper", steps=20, arms=("baseline",))
            run_id = f"{eid}-baseline-s0"
            wait_for(lambda: any(m.HasField("assignment") for m in w.messages()), 30, "the assignment")
            for step in (0, -3, 21):
                m = self.pb.WorkerMessage()
                m.progress.run_id, m.progress.attempt = run_id, 1
                m.progress.metrics.step = step
                w.send(m)
            wait_for(lambda: len(w.refusals()) == 3, 30, "three refusals")
            self.assertEqual(sorted(a.ack.progress_step for a in w.messages() if a.HasField("ack")), [-3, 0, 21])
            self.assertIn("progress.metrics.step 21 is outside [1, train.steps] = [1, 20]", w.refusals())
            # Finding 5's last part: a report at a step the run loop never probes (probe.every 5:
            # steps 1, 5, 10, 15, 20) is refused, so a run holds at most steps / every + 2 reports.
            m = self.pb.WorkerMessage()
            m.probe.run_id, m.probe.attempt, m.probe.sequence = run_id, 1, 7
            m.probe.report.step = 7
            w.send(m)
            wait_for(lambda: any("not a probe step" in r for r in w.refusals()), 30, "the probe refusal")
            self.assertEqual(c.sql("SELECT COUNT(*) FROM probe_reports WHERE run_id = ? AND step = 7", run_id), [(0,)])
            # A worker sending refused messages in a loop: every one acked with the reason, the
            # log keeps to 10 lines a second per kind and counts what it left out.
            for _ in range(300):
                m = self.pb.WorkerMessage()
                m.progress.run_id, m.progress.attempt = run_id, 1
                m.progress.metrics.step = 0
                w.send(m)
            wait_for(lambda: len(w.refusals()) == 304, 60, "304 refusals")
            lines = c.coordinator.output().count("event=progress_refused")
            self.assertLess(lines, 100)
            time.sleep(1.2)  # the next second's first line counts what was left out
            w.send(m)
            wait_for(lambda: len(w.refusals()) == 305, 60, "305 refusals")
            self.assertRegex(c.coordinator.output(), r"event=progress_refused .*unlogged_before=[1-9]")
        finally:
            w.close()
        c.cli("cancel", eid)

    def test_5_idle_connections_do_not_starve_metrics(self):
        """Finding 8: connections that send part of a request and wait (more of them than
        the /metrics server has threads) hold a thread only until the request timeout, so a
        scrape is still answered."""
        import socket
        c = self.cluster
        idle = []
        try:
            for _ in range(12):
                s = socket.create_connection(("127.0.0.1", c.metrics_port), timeout=5)
                s.sendall(b"GET /metr")
                idle.append(s)
            status, _, body = harness.http_get(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=15)
            self.assertEqual(status, 200)
            self.assertIn("sinkscope_probe_reports_stored_total", body)
        finally:
            for s in idle:
                s.close()

    def test_6_a_report_is_bounded_by_its_model_and_a_flood_is_paced(self):
        """Finding 5 with real processes, and read-side flow control. On a coordinator of its
        own (so its peak memory is this test's): reports with more layers or heads than the
        run's model, a NaN r_gs or a junk norm_ratio key are refused for good with the reason,
        and nothing of them is stored or exported. Then the run's worker floods 0.66 MB probe
        reports as fast as its stream takes them (400 of them, 263 MB) while another writer
        holds the store for 3 s: the coordinator reads a session
        only as fast as it stores, so its memory stays bounded, another worker's progress is
        still acked promptly and other clients are answered; every report is stored."""
        c = Cluster(lease_seconds=5.0)
        c.start_coordinator()
        flood_ready, done = threading.Event(), threading.Event()
        flood = {"run_id": None, "count": 400}
        steady = None
        try:
            corpus = harness.write_corpus(c.dir)
            spec = harness.tiny_experiment("flooded", corpus, steps=1000, probe_every=1, layers=32,
                                           arms=("baseline", "vscale"))
            spec["model"]["context"] = 256
            spec["probe"]["profile_len"] = 256
            spec["probe"]["t_eps"] = 256
            path = os.path.join(c.dir, "flooded.json")
            with open(path, "w") as f:
                json.dump(spec, f)
            eid = c.cli_json("submit", path)["experiment_id"]
            P = spec["probe"]["profile_len"]

            # The report's bulk, serialized once; each message is a small head (run, attempt,
            # sequence, step) followed by it: concatenated protobuf messages merge.
            bulk = self.pb.WorkerMessage()
            add_profile_layers(bulk.probe.report, 32, P)
            bulk_bytes = bulk.SerializeToString()
            self.assertGreater(len(bulk_bytes), 600_000)

            from sinkscope.v1 import experiment_pb2
            channel = grpc.insecure_channel(c.address)
            received, lock = [], threading.Lock()

            def requests():
                reg = self.pb.WorkerMessage()
                reg.register.worker_id = "flooder"
                reg.register.capabilities.device = experiment_pb2.CPU
                reg.register.capabilities.device_count = 1
                yield reg.SerializeToString()
                if not flood_ready.wait(120):
                    return
                for step in range(1, flood["count"] + 1):
                    head = self.pb.WorkerMessage()
                    head.probe.run_id, head.probe.attempt, head.probe.sequence = flood["run_id"], 1, step
                    head.probe.report.step = step
                    yield head.SerializeToString() + bulk_bytes
                done.wait(600)  # keeps the session (and its lease) until the test ends

            call = channel.stream_stream("/sinkscope.v1.WorkerService/Session",
                                         request_serializer=lambda raw: raw,
                                         response_deserializer=self.pb.CoordinatorMessage.FromString)
            responses = call(requests())

            def read():
                try:
                    for m in responses:
                        with lock:
                            received.append(m)
                except grpc.RpcError:
                    pass
            threading.Thread(target=read, daemon=True).start()

            def flooder_messages():
                with lock:
                    return list(received)
            wait_for(lambda: any(m.HasField("assignment") for m in flooder_messages()), 30, "the flooder's run")
            run_id = next(m.assignment.run_id for m in flooder_messages() if m.HasField("assignment"))
            flood["run_id"] = run_id
            steady = ti.HandWrittenWorker(c.address, "steady")
            wait_for(lambda: any(m.HasField("assignment") for m in steady.messages()), 30, "the steady run")
            steady_run = next(m.assignment.run_id for m in steady.messages() if m.HasField("assignment"))

            # Finding 5: shapes and values the run's model (32 layers, 2 heads) and METRICS.md
            # rule out, from the run's holder.
            def bad(step, edit):
                m = self.pb.WorkerMessage()
                m.probe.run_id, m.probe.attempt, m.probe.sequence = steady_run, 1, step
                m.probe.report.step = step
                for layer in range(2):
                    lp = m.probe.report.layers.add()
                    lp.layer = layer
                    lp.alpha.extend([0.5, 0.5])
                    lp.norm_ratio["h_out"] = 2.0
                edit(m.probe.report.layers)
                steady.send(m)

            def more_layers(layers):
                for layer in range(2, 40):
                    layers.add().layer = layer

            def more_heads(layers):
                layers[1].alpha.append(0.1)

            def nan_r_gs(layers):
                layers[0].r_gs = float("nan")

            def junk_key(layers):
                layers[1].norm_ratio["x" * 1000] = float("nan")
            for step, edit in enumerate((more_layers, more_heads, nan_r_gs, junk_key), start=1):
                bad(step, edit)
            wait_for(lambda: len(steady.refusals()) == 4, 30, "four refusals")
            self.assertEqual(steady.refusals(), [
                "more layers than model.layers",
                "layers[1]: more heads than model.heads",
                "layers[0]: a non-finite r_gs",
                "layers[1].norm_ratio: a key that is not a norm's name",
            ])
            self.assertEqual(c.sql("SELECT COUNT(*) FROM probe_reports WHERE run_id = ?", steady_run), [(0,)])
            status, _, body = harness.http_get(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=15)
            self.assertEqual(status, 200)
            self.assertNotIn('layer="39"', body)
            self.assertNotIn("xxxx", body)

            # The flood, begun while the store is held by another writer for 3 s (a slow
            # disk): the coordinator cannot store, so it must stop reading the flooder.
            import sqlite3
            before = vm_hwm_kib(c.coordinator.proc.pid)
            blocker = sqlite3.connect(c.db, isolation_level=None, timeout=10)
            try:
                blocker.execute("BEGIN IMMEDIATE")
                flood_ready.set()
                time.sleep(3)
                blocker.execute("ROLLBACK")
            finally:
                blocker.close()
            ack_seconds, list_waits = [], []
            for step in range(1, 21):
                m = self.pb.WorkerMessage()
                m.progress.run_id, m.progress.attempt = steady_run, 1
                m.progress.metrics.step = step
                m.progress.metrics.loss = 5.0
                start = time.monotonic()
                steady.send(m)
                wait_for(lambda: any(a.HasField("ack") and a.ack.progress_step == step for a in steady.messages()),
                         30, f"the ack of steady's step {step}")
                ack_seconds.append(time.monotonic() - start)
                list_waits.append(self.list_seconds())
                time.sleep(0.2)
            wait_for(lambda: sum(1 for m in flooder_messages() if m.HasField("ack") and m.ack.sequence)
                     >= flood["count"], 300, "every flooded report acked")
            grown_mib = (vm_hwm_kib(c.coordinator.proc.pid) - before) / 1024
            print(f"flood of {flood['count']} x {len(bulk_bytes) / 1e6:.2f} MB: coordinator peak +{grown_mib:.0f} MiB, "
                  f"steady's acks max {max(ack_seconds):.2f} s, ListExperiments max {max(list_waits):.2f} s")
            self.assertEqual(c.sql("SELECT COUNT(*) FROM probe_reports WHERE run_id = ?", run_id),
                             [(flood["count"],)])
            self.assertEqual([m.ack.refused for m in flooder_messages() if m.HasField("ack") and m.ack.refused], [])
            # Reading a session no faster than it is stored keeps the peak at the read
            # budgets (8 MiB a session, 64 MiB in all) plus gRPC's buffers: far below the
            # flood, which an eager reader would hold whole.
            self.assertLess(grown_mib, 100)  # without the pause: +283 MiB
            self.assertLess(max(ack_seconds), 5)
            self.assertLess(max(list_waits), 5)
        finally:
            flood_ready.set()
            done.set()
            if steady is not None:
                steady.close()
            c.close()
            shutil.rmtree(c.dir, ignore_errors=True)

    def test_9_sigterm_still_ends_the_coordinator(self):
        """After every attack above, SIGTERM ends the coordinator within its grace period."""
        c = self.cluster
        c.coordinator.proc.send_signal(signal.SIGTERM)
        c.coordinator.proc.wait(timeout=20)
        self.assertIn("event=coordinator_stopped", c.coordinator.output())

if __name__ == "__main__":
    unittest.main(verbosity=2)
