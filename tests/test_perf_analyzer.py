"""NVIDIA's C++ perf_analyzer against the KServe port (issue 17): a client nobody here
wrote drives a classifier, with every answer checked byte for byte, and every kind of
step model in sequence mode, the way Triton users benchmark a stateful model.
perf_analyzer comes from tools/perf_analyzer.sh; these tests skip only when it cannot be
had on this machine."""

from __future__ import annotations

import base64
import collections
import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.harness import loopback_config
from export.__main__ import export_checkpoint
from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving.app import create_server
from training.__main__ import main as train_main

TOOL = Path(__file__).resolve().parents[1] / "tools" / "perf_analyzer.sh"
UNAVAILABLE = 3  # the tool's exit status when perf_analyzer cannot be had here
# Three 200 ms windows that always count as stable: well under a second per run.
MEASURE = ["-p", "200", "-s", "1000", "--max-trials", "3"]
SEQUENCE_LENGTH = 8
PROMPTS = ["KING.\nNow", "QUEEN.\nGo", "FOOL.\nThe"]  # each cut to SEQUENCE_LENGTH characters


@pytest.fixture(scope="module")
def perf_analyzer() -> None:
    """Fetches perf_analyzer once (a no-op when cached), or skips saying why not."""
    fetched = subprocess.run(
        ["bash", str(TOOL), "--fetch"], capture_output=True, text=True, timeout=300
    )
    if fetched.returncode == UNAVAILABLE:
        pytest.skip(f"perf_analyzer unavailable: {fetched.stderr.strip()[-500:]}")
    assert fetched.returncode == 0, fetched.stderr[-2000:]


@pytest.fixture(scope="module")
def step_repository(repository, tmp_path_factory) -> Path:
    """The session's lenet5 and char_lstm, and a dry-run char_gru and captioner: every
    kind of step model (LSTM, GRU, and the captioner's decoder)."""
    root = tmp_path_factory.mktemp("perf") / "repo"
    shutil.copytree(repository, root)
    for arch in ("char_gru", "captioner"):
        checkpoint = root.parent / f"{arch}.pt"
        assert train_main([arch, "--dry-run", "--quiet", "--out", str(checkpoint)]) == 0
        export_checkpoint(checkpoint, root)
    return root


@pytest.fixture(scope="module")
def kserve_target(step_repository):
    """A server of this module's own: perf_analyzer numbers its sequences from 1, which
    must not meet sequences other tests left open on the session's server."""
    server, port = create_server(loopback_config(step_repository))
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def run(target: str, tmp_path: Path, *args: str) -> tuple[str, dict, dict]:
    """perf_analyzer over gRPC with `args` (one concurrency level): its printout, the CSV
    report's row and the profile export's experiment, per-request sequence ids included."""
    report, profile = tmp_path / "report.csv", tmp_path / "profile.json"
    done = subprocess.run(
        ["bash", str(TOOL), "-u", target, "-i", "grpc", *MEASURE, *args]
        + ["-f", str(report), "--profile-export-file", str(profile)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    printed = done.stdout + done.stderr
    # An error after the measurement (closing the last sequences) still exits 0.
    assert done.returncode == 0 and "error" not in printed.lower(), printed[-4000:]
    with report.open() as f:
        (row,) = list(csv.DictReader(f))
    (experiment,) = json.loads(profile.read_text())["experiments"]
    return printed, row, experiment


def count(printed: str, label: str) -> int:
    """A figure from perf_analyzer's printout, e.g. `Request count: 834`."""
    found = re.search(rf"\b{label}: (\d+)", printed)
    assert found, f"no {label!r} in perf_analyzer's output:\n{printed[-4000:]}"
    return int(found[1])


def b64(array: np.ndarray) -> dict:
    """A tensor in perf_analyzer's JSON as raw bytes: exact, no decimal round trip."""
    return {"b64": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()}


def logits_of(target: str, x: np.ndarray) -> np.ndarray:
    """lenet5's logits for one image [1, 1, 32, 32], by a plain ModelInfer."""
    request = kpb.ModelInferRequest(model_name="lenet5")
    request.outputs.add(name="logits")
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    with grpc.insecure_channel(target) as channel:
        response = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    return np.frombuffer(response.raw_output_contents[0], "<f4")


def successes(target: str, model: str) -> int:
    """The server's own count of `model`'s successful requests (ModelStatistics)."""
    with grpc.insecure_channel(target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        request = kpb.ModelStatisticsRequest(name=model)
        (stats,) = stub.ModelStatistics(request, timeout=30).model_stats
    return stats.inference_stats.success.count


def test_a_classifier_answers_perf_analyzer_byte_for_byte(perf_analyzer, kserve_target, tmp_path):
    images = np.random.default_rng(0).random((3, 1, 1, 32, 32), dtype=np.float32)
    data = {
        "data": [{"input": b64(x[0])} for x in images],
        "validation_data": [{"logits": b64(logits_of(kserve_target, x))} for x in images],
    }
    (tmp_path / "lenet5.json").write_text(json.dumps(data))
    before = successes(kserve_target, "lenet5")
    printed, row, experiment = run(
        kserve_target, tmp_path, "-m", "lenet5", "--concurrency-range", "1",
        "--input-data", str(tmp_path / "lenet5.json"),
    )  # fmt: skip
    assert experiment["experiment"] == {"mode": "concurrency", "value": 1}
    assert row["Concurrency"] == "1" and float(row["Inferences/Second"]) > 0
    requests = experiment["requests"]
    assert len(requests) >= 10 and all(r["response_timestamps"] for r in requests)
    assert not any("sequence_id" in r for r in requests)  # not a sequence model
    # The server's statistics saw every request the client measured, and more (warm-up):
    # counted over the whole run (perf_analyzer's per-window figures race at the edges).
    assert successes(kserve_target, "lenet5") - before >= len(requests) > 0
    assert count(printed, "Request count") > 0


@pytest.mark.parametrize("model", ["char_lstm", "char_gru", "captioner"])
def test_every_step_model_runs_in_perf_analyzers_sequence_mode(
    perf_analyzer, kserve_target, step_repository, tmp_path, model
):
    """perf_analyzer reads the model's config (sequence_batching) and metadata (what a
    step takes and gives), then sends `tokens` with sequence_id/start/end and asks for
    what the metadata lists; the server holds the state."""
    vocab = json.loads((step_repository / model / "1" / "model.json").read_text())["vocab"]
    # characters of a prompt where the vocabulary has them (the dry-run models' is small)
    ids = [[vocab.index(c) if c in vocab else 1 for c in p[:SEQUENCE_LENGTH]] for p in PROMPTS]
    streams = [[{"tokens": [token]} for token in stream] for stream in ids]
    (tmp_path / "data.json").write_text(json.dumps({"data": streams}))
    concurrency = 2
    before = successes(kserve_target, model)
    printed, row, experiment = run(
        kserve_target, tmp_path, "-m", model, "--concurrency-range", str(concurrency),
        "--sequence-length", str(SEQUENCE_LENGTH), "--sequence-length-variation", "0",
        "--input-data", str(tmp_path / "data.json"),
    )  # fmt: skip
    assert row["Concurrency"] == str(concurrency) and float(row["Inferences/Second"]) > 0
    measured = len(experiment["requests"])
    assert successes(kserve_target, model) - before >= measured > 0  # the whole run
    assert count(printed, "Request count") > 0
    sequences = count(printed, "Sequence count")  # printed in sequence mode only
    steps = collections.Counter(r["sequence_id"] for r in experiment["requests"])
    assert sequences >= 4 and 0 not in steps and len(steps) >= sequences
    # Every sequence runs its full length, but those perf_analyzer closes early at the end.
    assert max(steps.values()) == SEQUENCE_LENGTH
    assert sum(n != SEQUENCE_LENGTH for n in steps.values()) <= concurrency
