#!/usr/bin/python3
"""Writes the seed corpus of worker_message_fuzzer (fuzz/corpus/worker_message/) in its
input format: operations [op: 1 byte][length: 2 bytes LE][payload] (see
fuzz/worker_message_fuzzer.cc). Messages come from protoc's Python output of proto/.
Run with Debian's python3 (python3-protobuf); re-run when the worker protocol changes."""

import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus", "worker_message")

MESSAGE, TICK, RECONNECT, SUBMIT, CANCEL, QUERY = 0, 3, 4, 5, 6, 7
RUNS = ("fuzz-1-baseline-s0", "fuzz-1-vscale-s0")


def stubs():
    out = tempfile.mkdtemp(prefix="sinkscope-fuzz-py-")
    proto = os.path.join(ROOT, "proto")
    files = [os.path.join(proto, "sinkscope", "v1", f) for f in ("experiment.proto", "metrics.proto", "service.proto")]
    subprocess.run(["protoc", f"--proto_path={proto}", f"--python_out={out}", *files], check=True)
    sys.path.insert(0, out)
    from sinkscope.v1 import service_pb2
    return service_pb2


pb = stubs()


def op(code, payload=b"", session=0):
    return bytes([code + 8 * session]) + struct.pack("<H", len(payload)) + payload


def msg(session=0, **fields):
    m = pb.WorkerMessage(**fields)
    return op(MESSAGE, m.SerializeToString(), session)


def register(session, run_id="", attempt=0):
    caps = pb.Capabilities(device=1, device_count=1, memory_bytes=1 << 30, version="0.1.0", peak_flops=1e11)
    return msg(session, register=pb.Register(worker_id=f"w{session}", capabilities=caps, run_id=run_id,
                                             attempt=attempt))


def progress(session, run, step, attempt=1):
    from sinkscope.v1 import metrics_pb2
    m = metrics_pb2.StepMetrics(step=step, loss=5.0 - 0.1 * step, learning_rate=1e-3, grad_norm=1.0,
                                tokens_per_second=1000, mfu=0.1, step_seconds=0.01)
    if step % 10 == 0:
        m.val_loss = 4.5
    return msg(session, progress=pb.Progress(run_id=run, attempt=attempt, metrics=m))


def probe(session, run, step, attempt=1, layers=2):
    from sinkscope.v1 import metrics_pb2
    r = metrics_pb2.ProbeReport(version=1, step=step, loss=4.0, batch_sequences=4, seq_len=32, r_gs_median=1.5)
    for l in range(layers):
        lp = r.layers.add(layer=l, r_gs=1.0 + l, sink_rate=0.5)
        lp.alpha.extend([0.1, 0.2])
        lp.theta.append(0.3)
        for name in ("h_out", "r_mlp", "r_attn", "v"):
            lp.norm_ratio[name] = 1.0 + l
            lp.norms[name].values.extend([0.5] * 16)
        lp.massive.top3.extend([10, 5, 2])
        lp.massive.top1_over_median = 20
    return msg(session, probe=pb.ProbeUpload(run_id=run, attempt=attempt, sequence=step, report=r))


def finished(session, run, step=20, attempt=1):
    return msg(session, finished=pb.RunFinished(run_id=run, attempt=attempt, step=step))


def failed(session, run, reason=1, attempt=1):
    return msg(session, failed=pb.RunFailed(run_id=run, attempt=attempt, reason=reason, message="loss is NaN",
                                            step=3))


def heartbeat(session, run, step):
    return msg(session, heartbeat=pb.Heartbeat(run_id=run, step=step))


def experiment(name, seeds=(0,)):
    from sinkscope.v1 import experiment_pb2
    e = experiment_pb2.Experiment(name=name)
    e.model.layers, e.model.d_model, e.model.heads, e.model.kv_heads, e.model.context = 2, 32, 2, 1, 32
    e.data.text.paths.append("/nonexistent")
    e.train.steps = 10
    e.probe.every, e.probe.ref_span, e.probe.profile_len, e.probe.t_eps = 5, 15, 16, 16
    e.seeds.extend(seeds)
    return op(SUBMIT, e.SerializeToString())


seeds = {
    # Both workers register, train their runs to the end with probes, finish.
    "full_runs": b"".join([register(0), register(1)]
                          + [progress(s, RUNS[s], step) for step in range(1, 21) for s in (0, 1)]
                          + [probe(s, RUNS[s], step) for step in (1, 5, 10, 15, 20) for s in (0, 1)]
                          + [finished(0, RUNS[0]), finished(1, RUNS[1]), op(QUERY), op(QUERY, session=1)]),
    # A reconnect mid-run with the same attempt, messages written again, out of order.
    "reconnect": b"".join([register(0)] + [progress(0, RUNS[0], s) for s in range(1, 6)] + [probe(0, RUNS[0], 5)]
                          + [op(RECONNECT), register(0, RUNS[0], 1), progress(0, RUNS[0], 7),
                             progress(0, RUNS[0], 6), probe(0, RUNS[0], 5), heartbeat(0, RUNS[0], 7),
                             finished(0, RUNS[0]), finished(0, RUNS[0])]),
    # Leases lapse (a tick), the run is requeued and given to the other worker (attempt 2),
    # the first worker's late messages arrive.
    "lease_lapse": b"".join([register(0), progress(0, RUNS[0], 1), op(TICK), register(1), op(TICK),
                             progress(1, RUNS[0], 2, attempt=2), progress(0, RUNS[0], 3, attempt=1),
                             probe(0, RUNS[0], 5, attempt=1), register(0, RUNS[0], 1), op(TICK), op(TICK),
                             op(TICK), op(QUERY)]),
    # A failure with each reason, a cancel, a bad reason number.
    "failures": b"".join([register(0), register(1), failed(0, RUNS[0], reason=1), failed(1, RUNS[1], reason=99),
                          op(CANCEL), op(QUERY)]),
    "cancel_midrun": b"".join([register(0), progress(0, RUNS[0], 1), op(CANCEL), progress(0, RUNS[0], 2),
                               probe(0, RUNS[0], 5), finished(0, RUNS[0]), op(CANCEL)]),
    # Submissions while workers are busy; runs of a second experiment.
    "submit": b"".join([experiment("more", seeds=(0, 1, 2)), register(0), register(1), op(TICK),
                        experiment("bad", seeds=(1, 1)), progress(0, "more-1-baseline-s0", 1), op(QUERY)]),
    # Out-of-range values the coordinator must refuse.
    "refused": b"".join([register(0), progress(0, RUNS[0], 0), progress(0, RUNS[0], -5), progress(0, RUNS[0], 21),
                         progress(0, "nope", 1), probe(0, RUNS[0], 99), probe(0, RUNS[0], 5, layers=40),
                         finished(0, RUNS[0], step=-1), op(QUERY)]),
    # A session that starts with something other than Register.
    "no_register": b"".join([progress(0, RUNS[0], 1), probe(1, RUNS[1], 5), heartbeat(0, "", 0), op(TICK)]),
}

os.makedirs(OUT, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
print(f"wrote {len(seeds)} seeds to {OUT}")
