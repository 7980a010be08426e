"""The load generator against a real test server: outputs, counts, errors, bounds."""

from __future__ import annotations

import csv
import json
import random
import time

import pytest

from bench.harness import loopback_config
from loadtest.__main__ import main
from loadtest.rpcs import Outcome
from loadtest.stats import Window, stable
from serving.app import create_server

QUICK = ["--warmup", "0.2", "--duration", "0.8", "--quiet"]


def _run(tmp_path, *argv) -> tuple[int, dict]:
    status = main([*argv, *QUICK, "--output-dir", str(tmp_path)])
    return status, json.loads((tmp_path / "results.json").read_text())


def _counts_add_up(level: dict) -> None:
    assert level["requests"] == level["successes"] + sum(level["errors"].values())


def test_classify_sweep_writes_json_csv_and_plots(target, tmp_path):
    status, results = _run(tmp_path, "--target", target, "--rpc", "classify",
                           "--concurrency", "1,2", "--workers", "2")  # fmt: skip
    assert status == 0 and "error" not in results
    assert [lv["concurrency"] for lv in results["levels"]] == [1, 2]
    for level in results["levels"]:
        _counts_add_up(level)
        assert level["successes"] > 0 and level["errors"] == {}
        lat = level["latency_us"]
        assert lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert lat["count"] == level["successes"]
        assert level["throughput_rps"] == pytest.approx(level["successes"] / level["seconds"])
        # Little's law for a closed loop: throughput = outstanding / latency. Both
        # workers' windows must be in the figures for it to hold.
        little = level["concurrency"] / (lat["avg"] / 1e6)
        assert 0.75 * little <= level["throughput_rps"] <= 1.25 * little, (little, level)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["concurrency"] for r in rows] == ["1", "2"]
    assert (tmp_path / "latency.png").stat().st_size > 1000


def test_generate_reports_token_figures(target, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("KING.\\n\nQUEEN.\\nGood night\n")
    status, results = _run(tmp_path, "--target", target, "--rpc", "generate",
                           "--prompts-file", str(prompts), "--max-tokens", "12",
                           "--temperature", "0", "--concurrency", "10")  # fmt: skip
    (level,) = results["levels"]
    # 10 streams, more than one connection may hold (8): each has a connection of its own.
    assert status == 0 and level["errors"] == {} and level["successes"] > 0
    # Tokens count as their messages arrive: those of the requests completed in the
    # window, give or take what the 10 streams in flight at its two ends delivered.
    tokens = level["tokens_per_s"] * level["seconds"]
    assert 12 * (level["successes"] - 10) <= tokens <= 12 * (level["successes"] + 10)
    (window,) = level["window_figures"]
    assert window["tokens_per_s"] == level["tokens_per_s"] and window["errors"] == {}
    assert level["ttft_us"]["p50"] <= level["latency_us"]["p50"]
    assert level["itl_us"]["count"] == level["successes"]
    assert level["tokens_per_message"] >= 1
    assert (tmp_path / "tokens.png").is_file()


@pytest.mark.parametrize("model", ["lenet5", "char_lstm"])
def test_model_infer_drives_kserve_with_what_the_metadata_lists(target, tmp_path, model):
    """KServe's ModelInfer, as perf_analyzer drives it (bench.perf compares the two):
    a classifier's image, a step model's tokens alone (its state starts at zero)."""
    status, results = _run(tmp_path, "--target", target, "--rpc", "model_infer",
                           "--model", model, "--concurrency", "2")  # fmt: skip
    (level,) = results["levels"]
    assert status == 0 and level["errors"] == {} and level["successes"] > 0
    _counts_add_up(level)


def test_unknown_model_is_counted_as_not_found(target, tmp_path):
    status, results = _run(tmp_path, "--target", target, "--rpc", "classify",
                           "--model", "nope")  # fmt: skip
    (level,) = results["levels"]
    assert status == 0 and level["successes"] == 0
    assert set(level["errors"]) == {"NOT_FOUND"} and level["errors"]["NOT_FOUND"] > 0
    _counts_add_up(level)


def test_unreachable_server_is_one_line_and_results_are_still_written(tmp_path, capsys):
    status, results = _run(tmp_path, "--target", "127.0.0.1:1", "--connect-timeout", "0.5")
    assert status == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: cannot reach 127.0.0.1:1 within 0.5 s"
    assert results["levels"] == [] and results["error"] == err.removeprefix("error: ")
    assert (tmp_path / "results.csv").is_file()


def test_a_server_stopped_mid_run_is_counted_and_the_run_ends_in_bounds(repository, tmp_path):
    import threading

    server, port = create_server(loopback_config(repository))
    server.start()
    stopper = threading.Timer(4.0, lambda: server.stop(None))  # workers start in ~1 s
    stopper.start()
    start = time.monotonic()
    status = main(["--target", f"127.0.0.1:{port}", "--rpc", "classify", "--concurrency", "2",
                   "--warmup", "0.2", "--duration", "6", "--quiet",
                   "--output-dir", str(tmp_path)])  # fmt: skip
    elapsed = time.monotonic() - start
    stopper.join()
    (level,) = json.loads((tmp_path / "results.json").read_text())["levels"]
    assert status == 0 and level["successes"] > 0
    assert level["errors"].get("UNAVAILABLE", 0) > 0
    _counts_add_up(level)
    assert elapsed < 3 + 0.2 + 6 + 10  # start-up, warm-up, the window, and the join bound


def test_open_loop_sends_at_the_requested_rate(target, tmp_path):
    status, results = _run(tmp_path, "--target", target, "--rpc", "classify",
                           "--request-rate", "40", "--arrivals", "poisson")  # fmt: skip
    (level,) = results["levels"]
    assert status == 0 and level["request_rate"] == 40
    assert 0.4 * 40 <= level["sent_rps"] <= 2 * 40  # Poisson: 32 expected sends in 0.8 s
    # Sustained is judged against the sends the schedule made due, not the mean rate.
    assert level["scheduled_rps"] > 0 and isinstance(level["sustained"], bool)
    assert level["sustained"] == (level["sent_rps"] >= 0.95 * level["scheduled_rps"]
                                  and level["delayed_fraction"] < 0.1)  # fmt: skip
    _counts_add_up(level)


def test_merged_worker_histograms_give_the_percentiles_of_all_samples():
    rng = random.Random(0)
    samples = [int(rng.lognormvariate(8, 1.2)) + 1 for _ in range(5000)]
    one, a, b = Window(), Window(), Window()
    for i, value in enumerate(samples):
        one.record(Outcome("OK", value))
        (a if i % 3 else b).record(Outcome("OK", value))
    merged = Window.decode(a.encode()).merge(Window.decode(b.encode()))  # across processes
    assert merged.distribution("latency") == one.distribution("latency")
    assert merged.successes == 5000
    exact = sorted(samples)[int(0.99 * len(samples)) - 1]
    assert abs(merged.percentile_us("latency", 99) - exact) <= exact * 0.002


def test_stability_rule_needs_three_windows_within_tolerance():
    def window(rps: float, p95_us: int) -> Window:
        w = Window(seconds=1.0)
        for i in range(int(rps)):
            w.record(Outcome("OK", p95_us if i >= rps * 0.9 else p95_us // 2))
        return w

    steady = [window(100, 1000), window(104, 1020), window(97, 990)]
    assert stable(steady, 0.1) and not stable(steady[:2], 0.1)
    assert not stable([window(100, 1000), window(140, 1000), window(100, 1000)], 0.1)
    assert not stable([window(100, 1000), window(100, 2000), window(100, 1000)], 0.1)


def test_the_load_generator_uses_only_the_wire_contract():
    import subprocess
    import sys

    code = (
        "import sys, loadtest.__main__\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('serving', 'torch', "
        "'training')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert eval(out.stdout) == [  # noqa: S307 - our own subprocess's repr of a list
        "serving", "serving._proto", "serving._proto.inference",
        "serving._proto.inference.grpc_service_pb2",
        "serving._proto.inference.grpc_service_pb2_grpc",
        "serving._proto.inference.model_config_pb2", "serving._proto.stepwise",
        "serving._proto.stepwise.v1", "serving._proto.stepwise.v1.inference_pb2",
        "serving._proto.stepwise.v1.inference_pb2_grpc",
    ]  # fmt: skip


def test_help_reads_like_perf_analyzer():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "loadtest", "--help"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    for flag in ("--concurrency N[,N...]", "--request-rate R[,R...]", "--measurement-interval MS",
                 "--stability-percentage", "--max-windows", "--warmup S", "--workers",
                 "--server-pid", "--arrivals {constant,poisson}"):  # fmt: skip
        assert flag in out, flag


def test_windows_with_stability_and_server_cpu(target, tmp_path):
    """Several windows of --measurement-interval, each with the server's CPU time (the
    test server runs in this process, so its pid is ours)."""
    import os

    status = main(["--target", target, "--rpc", "classify", "--concurrency", "2",
                   "--workers", "2", "--warmup", "0.2", "--measurement-interval", "400",
                   "--max-windows", "3", "--stability-percentage", "1", "--quiet",
                   "--server-pid", str(os.getpid()), "--output-dir", str(tmp_path)])  # fmt: skip
    (level,) = json.loads((tmp_path / "results.json").read_text())["levels"]
    assert status == 0 and level["windows"] == 3 and len(level["window_figures"]) == 3
    assert level["seconds"] == pytest.approx(1.2)
    assert all(w["server_cpu_s_per_request"] > 0 for w in level["window_figures"])
    assert level["server_cpu_s_per_request"] > 0 and level["server_cpu_cores"] > 0


def test_a_workers_done_never_stands_in_for_another_workers_window():
    """Worker 0's last window and its "done" can arrive before worker 1's window."""
    import queue

    from loadtest.__main__ import Inbox

    def window(n: int) -> dict:
        w = Window(seconds=1.0)
        for _ in range(n):
            w.record(Outcome("OK", 1000))
        return w.encode()

    messages = [("ready", 0, None, None), ("ready", 1, None, None),
                ("window", 0, 0, window(3)), ("done", 0, None, None),
                ("window", 1, 0, window(5)), ("done", 1, None, None)]  # fmt: skip
    feed = iter(messages)

    def get(timeout):
        try:
            return next(feed)
        except StopIteration:
            raise queue.Empty from None

    inbox = Inbox(get, [0, 1])
    inbox.wait_ready(time.time() + 1)
    assert inbox.window(0, time.time() + 1).successes == 8  # both workers' requests
    # Window 1: worker 1's "done" arrives; both are done, so there is nothing to wait for.
    assert inbox.window(1, time.time() + 1).successes == 0
    assert inbox.done == {0, 1}


def _wait_forever(flag) -> None:
    flag.wait()


def test_stopping_a_level_never_waits_for_a_worker_that_died_waiting():
    """A worker killed inside `stop.wait()` once hung a whole bench run: a
    multiprocessing Event's set() waits for every sleeper to wake, forever for a dead
    one. The workers' flags take no lock: set() returns, and the waiters that live see it."""
    import multiprocessing
    import threading

    from loadtest.worker import Flag

    ctx = multiprocessing.get_context("spawn")
    flag = Flag(ctx)
    dead, alive = (ctx.Process(target=_wait_forever, args=(flag,)) for _ in range(2))
    dead.start()
    alive.start()
    time.sleep(1.0)  # both asleep in wait()
    dead.kill()
    dead.join(10)
    setter = threading.Thread(target=flag.set, daemon=True)
    setter.start()
    setter.join(5)
    assert not setter.is_alive(), "set() blocked on a dead waiter"
    alive.join(10)
    assert alive.exitcode == 0 and flag.is_set() and flag.wait(0)
