"""The KServe V2 service against a client nobody here wrote: the `tritonclient` package
(issue 9). tritonclient's generated protobuf classes and ours share the `inference`
package and cannot be imported into one process, so the client runs in a subprocess
(tests/triton_driver.py) against the server this process runs, and its results are
compared here with stepwise's own API. One driver run per server keeps this fast."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_kserve import assert_classify_agrees

from serving.client import StepwiseClient

DRIVER = Path(__file__).with_name("triton_driver.py")
PROMPT, N = "KING.\n", 20
STREAM_PROMPTS = ["KING.\n", "QUEEN.\n", "Now "]


def drive(scenario: str, spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, str(DRIVER), scenario],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def vocab_of(repository: Path) -> list[str]:
    return json.loads((repository / "char_lstm" / "1" / "model.json").read_text())["vocab"]


def generate(target: str, prompt: str) -> str:
    with StepwiseClient(target, timeout=60) as client:
        return "".join(r.text for r in client.generate_stream(prompt, max_tokens=N, temperature=0))


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> tuple[np.ndarray, Path]:
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    path = tmp_path_factory.mktemp("triton") / "x.npy"
    np.save(path, x)
    return x, path


@pytest.fixture(scope="module")
def seen(target, repository, batch) -> dict:
    """What tritonclient saw of the session's server, every check in one driver run."""
    spec = {
        "url": target,
        "vocab": vocab_of(repository),
        "prompt": PROMPT,
        "n": N,
        "x": str(batch[1]),
        "stream_prompts": STREAM_PROMPTS,
    }
    return drive("protocol", spec)


def test_health_metadata_config_and_index(seen):
    assert seen["live"] and seen["ready"]
    assert seen["model_ready"] == [True, True, False, False]  # lenet5, v1, v7, unknown
    meta = seen["server_metadata"]
    assert meta["name"] == "stepwise"
    assert meta["extensions"] == [
        "model_configuration", "model_repository", "sequence", "statistics"
    ]  # fmt: skip
    model = seen["model_metadata"]
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in model["inputs"]}
    assert inputs == {"tokens": ("INT64", [-1, 1])}  # the state is implicit, as in Triton
    assert (model["name"], model["versions"], model["platform"]) == (
        "char_lstm",
        ["1"],
        "onnxruntime_onnx",
    )
    config = seen["model_config"]
    states = [(s["input_name"], s["output_name"]) for s in config["sequence_batching"]["state"]]
    assert config["name"] == "char_lstm" and states == [("h", "h_next"), ("c", "c_next")]
    index = {(m["name"], m.get("version"), m.get("state")) for m in seen["index"]}
    assert {("lenet5", "1", "READY"), ("char_lstm", "1", "READY")} <= index


def test_infer_on_a_classifier_batch_equals_classify(seen, batch, client):
    x, _ = batch
    logits = np.asarray(seen["logits"], np.float32)
    assert logits.shape == (3, 10) and seen["infer_id"] == "batch-1"
    assert_classify_agrees(client, x, logits)


def test_statistics_move_after_calls(seen):
    before, after, errors = seen["stats_lenet5"]
    grew = {k: after[k] - before[k] for k in before if k != "batch_sizes"}
    # One request of a batch of 3: one success, one execution, three inferences, and
    # each phase timed once.
    for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert grew[phase] == 1 and grew[phase + "_ns"] > 0, phase
    assert (grew["inference_count"], grew["execution_count"], grew["fail"]) == (3, 1, 0)
    assert 3 in after["batch_sizes"] and after["last_inference"] > 0
    assert after["success_ns"] - before["success_ns"] >= grew["compute_infer_ns"]
    # The datatype, shape and output-name errors on lenet5 fail; unknown models and
    # versions belong to no model's counts.
    assert errors["fail"] - after["fail"] == 3 and errors["success"] == after["success"]
    assert {"lenet5", "char_lstm"} <= set(seen["stats_all"])  # an empty name: every model
    for err in seen["stats_errors"]:  # unknown model, unknown version
        assert err["status"] == "StatusCode.NOT_FOUND"
    # Every server-held sequence step counted on char_lstm: per sequence <eos>, the
    # prompt, each generated character fed back but the last (or all, when <eos> ended
    # it), and the end.
    before, after = seen["stats_char_lstm"]
    length = len(seen["by_sequence"][0])
    steps = 2 * (1 + len(PROMPT) + (length - 1 if length == N else length) + 1)
    assert after["success"] - before["success"] == steps
    assert after["inference_count"] - before["inference_count"] == steps
    assert after["execution_count"] - before["execution_count"] >= 1


@pytest.mark.parametrize(
    "case,status,start",
    [
        ("unknown_model", "NOT_FOUND", "model_name:"),
        ("unknown_version", "NOT_FOUND", "model_version:"),
        ("datatype", "INVALID_ARGUMENT", "inputs[0].datatype: 'input' is FP32, not 'FP64'"),
        ("shape", "INVALID_ARGUMENT", "inputs[0].shape: 'input'"),
        ("missing", "INVALID_ARGUMENT", "inputs: missing ['c']"),
        ("output", "INVALID_ARGUMENT", "outputs[0].name: 'probabilities'"),
        ("sequence_unknown", "INVALID_ARGUMENT", "parameters.sequence_id: sequence 31337"),
        ("text_chars", "INVALID_ARGUMENT", "inputs[0].contents: characters 'é'"),
    ],
)
def test_errors_are_exceptions_with_the_protocol_status(seen, case, status, start):
    err = seen["errors"][case]
    assert err is not None, f"{case} did not raise"
    assert err["status"] == f"StatusCode.{status}"
    assert err["message"].startswith(start), err["message"]


def test_sequence_id_calls_equal_generate(seen, target):
    want = generate(target, PROMPT)
    assert seen["by_sequence"] == [want, want]  # uint64 and string ids


def test_client_runs_the_recurrence_through_the_plain_step_graph(seen, target):
    assert seen["plain"] == generate(target, PROMPT)


def test_bytes_round_trip_text_in_greedy_text_out(seen, target):
    """The prompt sent as a BYTES `text`, each greedy next character received as BYTES
    `greedy_text` and sent back: Generate's text at temperature 0."""
    assert seen["by_text"] == generate(target, PROMPT)


def test_stream_sequences_equal_generate_and_answer_in_order(seen, target):
    stream = seen["stream"]
    assert stream["texts"] == [generate(target, p) for p in STREAM_PROMPTS]
    assert stream["order"] == stream["sent"]  # interleaved sequences, answered in order
    # An error answers its own request and the stream goes on.
    unknown, missing, fine = stream["errors"]
    assert unknown["message"].startswith("model_name: no model named 'nope'")
    assert "sequence 987654 does not exist" in missing["message"]
    assert fine == {"shape": [1, 10]}
    assert stream["ended"] == [True] * len(STREAM_PROMPTS)


def test_idle_sequences_expire_and_many_clients_stay_independent(tmp_path, repository):
    """A server whose sequences expire after 1 s idle (config.pbtxt); then eight
    tritonclient connections decode at once, batched together, each text as alone."""
    from bench.harness import loopback_config
    from serving.app import create_server

    root = tmp_path / "repo"
    shutil.copytree(repository / "char_lstm", root / "char_lstm")
    config = root / "char_lstm" / "config.pbtxt"
    text = config.read_text()
    assert "max_sequence_idle_microseconds: 60000000" in text
    config.write_text(text.replace("idle_microseconds: 60000000", "idle_microseconds: 1000000"))
    server, port = create_server(loopback_config(root))
    server.start()
    try:
        prompts = ["KING.\n", "QUEEN.\n", "Now ", "What "] * 2
        spec = {"url": f"127.0.0.1:{port}", "vocab": vocab_of(root), "prompts": prompts, "n": 15}
        seen = drive("expiry", spec)
        batched = sum(
            n for size, n in server.engines["char_lstm"].stats.batch_sizes.items() if size > 1
        )
    finally:
        server.stop(None)
    assert seen["expired"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "sequence 5 expired after 1 s idle" in seen["expired"]["message"]
    assert seen["together"] == seen["alone"]
    assert batched > 0  # the clients' steps shared decode runs
