"""The command lines as an operator runs them: `python -m serving` and its client."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import harness
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
from serving.client import StepwiseClient
from training.data.digits import digit_to_image, load_digits_split


def start_server(repository, *flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m serving` on a free loopback port, returned once health says SERVING;
    its output is piped (read proc.stdout once it has exited)."""
    try:
        server = harness.start(
            ["--model-repository", str(repository), "--device", "cpu", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    except harness.NotReady as exc:
        pytest.fail(f"server did not become healthy: {exc}")
    return server.proc, server.target


@pytest.fixture(scope="module")
def served(repository):
    proc, target = start_server(repository)
    yield proc, target
    proc.kill()
    proc.wait()


def client(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.client", "--target", target, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_client_cli_classifies_a_file(served, tmp_path):
    _, _, _, labels, pixels = load_digits_split()
    path = tmp_path / "digit.png"
    digit_to_image(pixels[3]).resize((40, 40)).save(path)
    proc = client(served[1], "classify", "--image", str(path), "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] == str(labels[3])


def test_client_cli_streams_generation(served):
    args = (
        "generate",
        "--prompt",
        "KING.\n",
        "--max-tokens",
        "50",
        "--seed",
        "3",
        "--temperature",
        "0.7",
    )
    first, second = client(served[1], *args), client(served[1], *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("KING.\n")
    assert len(first.stdout) == len("KING.\n") + 50  # the prompt, then 50 characters
    assert "finish_reason=length" in first.stderr and "completion_tokens=50" in first.stderr


def test_client_cli_reports_errors(served):
    proc = client(served[1], "generate", "--prompt", "KING", "--top-p", "2")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: INVALID_ARGUMENT: top_p:")


def _health(target: str) -> int:
    """The overall health status, asked on a new connection each time."""
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest()
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status


def test_sigterm_turns_health_not_serving_while_the_port_still_answers(repository):
    """Load balancers must see NOT_SERVING: the old shutdown refused every new
    connection within 0.5 s, so the state was never observable."""
    proc, target = start_server(repository, "--drain-delay", "10", "--grace-period", "5")
    with grpc.insecure_channel(target) as old_channel:
        stub = pb_grpc.InferenceStub(old_channel)
        assert stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        seen = None
        while time.monotonic() - start < 2 and seen != health_pb2.HealthCheckResponse.NOT_SERVING:
            seen = _health(target)
        assert seen == health_pb2.HealthCheckResponse.NOT_SERVING
        # Still answering, on old and new connections, well inside the drain delay.
        assert stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        with StepwiseClient(target, timeout=5) as fresh:
            assert "".join(fresh.generate("KING.\n", max_tokens=3, seed=1))
        assert time.monotonic() - start < 10  # all of it inside the drain delay
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - start >= 10  # it waited out the drain delay
    log = proc.stdout.read()
    assert "loaded lenet5 version 1 (classifier) on CPUExecutionProvider" in log
    assert "shutting down: NOT_SERVING" in log and "stopped" in log


def test_a_second_sigterm_exits_at_once(repository):
    proc, _ = start_server(repository, "--drain-delay", "60")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert time.monotonic() - start < 10
    assert "second SIGTERM: exiting at once" in proc.stdout.read()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_device_cuda_fails_loudly_without_a_gpu(repository):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving",
            "--model-repository",
            str(repository),
            "--port",
            str(harness.free_port()),
            "--host",
            "127.0.0.1",
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "--device cuda" in proc.stderr and "CUDAExecutionProvider" in proc.stderr


def test_serving_never_imports_torch_or_training():
    code = (
        "import sys, serving.__main__, serving.client, serving.app\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        "bad = sorted(roots & {'torch', 'training', 'export'})\n"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("budget", ["default", "full"])
def test_model_card_reports_figures_commands_and_targets(repository, tmp_path, budget):
    import json

    out = tmp_path / "card.md"
    proc = subprocess.run(
        [sys.executable, "tools/model_card.py", "--model-repository", str(repository),
         "--budget", budget, "--out", str(out), "--command", "make quality"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    card = out.read_text()
    lenet = json.loads((repository / "lenet5" / "1" / "metrics.json").read_text())
    lstm = json.loads((repository / "char_lstm" / "1" / "metrics.json").read_text())
    main_table = card.split("## Notes")[0].splitlines()
    (lenet_row,) = [line for line in main_table if line.startswith("| `lenet5`")]
    (lstm_row,) = [line for line in main_table if line.startswith("| `char_lstm`")]
    assert f"test_accuracy {lenet['test_accuracy']}" in lenet_row
    assert f"val_loss_nats_per_char {lstm['val_loss_nats_per_char']}" in lstm_row
    # The verdict follows the figure: lenet5 has a target only at the full budget.
    if budget == "full":
        met = lenet["test_accuracy"] >= 0.98
        assert ("test_accuracy >= 0.98: met" if met else "**missed**") in lenet_row
    else:
        assert lenet_row.endswith("| reported |")
    met = lstm["val_loss_nats_per_char"] <= (1.45 if budget == "full" else 1.7)
    assert ("met" if met else "**missed**") in lstm_row.rsplit("|", 2)[1]
    assert lenet["command"] in card and lstm["command"] in card
    gradients = card.split("## Gradient through time")[1].split("##")[0]
    lag_100 = lstm["gradient_through_time"]["100"]
    assert gradients.count("| `") == 1 and f"| {lag_100:.2g} |" in gradients
    assert "Budget: **" + budget in card and "`make quality`" in card


def test_a_negative_queue_delay_is_refused_not_clamped(capsys):
    """`--max-queue-delay-us -5` was clamped to 0 before BatchingConfig could refuse it:
    a typo served with another setting than the one asked for."""
    from serving.__main__ import main

    with pytest.raises(SystemExit) as exit_:  # no repository: clamped, it fails to start
        main(["--max-queue-delay-us", "-5", "--model-repository", "/nonexistent"])
    assert exit_.value.code == 2
    assert "--max-queue-delay-us: must be 0 or more, not -5" in capsys.readouterr().err


def test_the_command_line_takes_every_default_from_the_configuration():
    """One place for each default: what `python -m serving` parses with no flags is
    what ServerConfig() holds (the host included: every interface)."""
    from serving.__main__ import parser
    from serving.batching.dynamic import BatchingConfig
    from serving.config import ServerConfig
    from serving.core.preprocess import ImageLimits
    from serving.engine import EngineConfig

    args, config = parser().parse_args([]), ServerConfig()
    assert config.host == args.host == "0.0.0.0"
    same = {
        "model_repository": "model_repository", "port": "port", "device": "device",
        "model_control_mode": "model_control_mode", "metrics_port": "metrics_port",
        "repository_poll_secs": "repository_poll_secs", "max_workers": "max_workers",
        "max_streams": "max_streams", "max_streams_per_client": "max_streams_per_client",
        "max_waiting_streams": "max_waiting_streams", "client_id_header": "client_id_header",
        "max_sequences_per_client": "max_sequences_per_client",
        "stream_stall_timeout_s": "stream_stall_timeout", "drain_delay_s": "drain_delay",
        "stream_interval_ms": "stream_interval_ms", "intra_op_spinning": "intra_op_spinning",
        "grace_period_s": "grace_period", "intra_op_threads": "intra_op_threads",
        "request_log": "request_log", "max_message_bytes": "max_message_bytes",
    }  # fmt: skip
    for field, flag in same.items():
        assert getattr(args, flag) == getattr(config, field), field
    assert args.max_connection_age * 1000 == config.max_connection_age_ms
    engine, batching, limits = EngineConfig(), BatchingConfig(), ImageLimits()
    assert args.stream_batch_size == engine.max_batch_size
    assert args.prefill_tokens_per_iteration == engine.prefill_tokens_per_iteration
    assert (args.max_batch_size, args.max_queue_delay_us) == (
        batching.max_batch_size,
        batching.max_queue_delay_us,
    )
    assert (args.max_image_pixels, args.max_concurrent_decodes) == (
        limits.max_pixels,
        limits.max_concurrent_decodes,
    )


def test_the_configuration_refuses_what_cannot_run():
    from serving.config import ServerConfig

    for bad in (
        dict(max_streams=0), dict(device="tpu"), dict(model_control_mode="sometimes"),
        dict(model_control_mode="poll", repository_poll_secs=0), dict(intra_op_threads=-1),
        dict(grace_period_s=-1), dict(max_sequences_per_client=0),
        dict(stream_interval_ms=1001), dict(max_connection_age_ms=0),
    ):  # fmt: skip
        with pytest.raises(ValueError):
            ServerConfig(**bad)
    with pytest.raises(AttributeError):  # frozen: what was checked stays so
        ServerConfig().max_streams = 0


def test_max_connection_age_makes_clients_reconnect(repository, caplog):
    """`--max-connection-age 1`: a client's connection is closed once a second old, and
    its next call goes over a new one (another client port in the request log), without
    an error; this is how clients balancing by DNS find new replicas (docs/SCALING.md)."""
    import logging
    import time

    import grpc

    from bench.harness import loopback_config
    from serving.__main__ import parser
    from serving._proto.stepwise.v1 import inference_pb2 as pb
    from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
    from serving.app import create_server

    age = parser().parse_args(["--max-connection-age", "1"]).max_connection_age
    server, port = create_server(
        loopback_config(repository, max_connection_age_ms=round(age * 1000))
    )
    server.start()
    caplog.set_level(logging.INFO, logger="serving.requests")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            stub.ListModels(pb.ListModelsRequest(), timeout=10)
            time.sleep(2.5)  # past the age (and gRPC's jitter of it)
            stub.ListModels(pb.ListModelsRequest(), timeout=10)
    finally:
        server.stop(None)
    peers = [r.fields["peer"] for r in caplog.records if getattr(r, "fields", None)]
    assert len(peers) == 2 and peers[0] != peers[1], peers
