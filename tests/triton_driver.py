"""Drives a stepwise server with the real `tritonclient` package, in a process of its own
(tritonclient's generated protobuf classes and stepwise's share the `inference` package
name and cannot live in one process), and prints what it saw as JSON on stdout.

    python tests/triton_driver.py SCENARIO < spec.json

`spec.json` holds the server's `url` and what the scenario needs; tests/test_tritonclient
compares the results with the stepwise API in its own process.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as tc
from greedy import EOS, greedy, opening
from tritonclient.utils import InferenceServerException


def error(call) -> dict:
    """The InferenceServerException `call` raises, as data (None: it did not raise)."""
    try:
        call()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return None


def tensor(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    value = tc.InferInput(name, list(array.shape), datatype)
    value.set_data_from_numpy(array)
    return value


def stats(client, model: str = "") -> dict:
    """ModelStatistics as plain ints per model (the JSON form omits zeros)."""
    out = {}
    for m in client.get_inference_statistics(model, as_json=True).get("model_stats", []):
        infer = m.get("inference_stats", {})
        row = {
            k: int(m.get(k, 0)) for k in ("inference_count", "execution_count", "last_inference")
        }
        for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            row[k] = int(infer.get(k, {}).get("count", 0))
            row[k + "_ns"] = int(infer.get(k, {}).get("ns", 0))
        row["batch_sizes"] = sorted(int(b["batch_size"]) for b in m.get("batch_stats", []))
        out[m["name"]] = row
    return out


def step(client, key, token: int, start=False, end=False) -> np.ndarray:
    """One server-held sequence step on char_lstm: a token in, logits [V] out."""
    result = client.infer(
        "char_lstm",
        [tensor("tokens", np.asarray([[token]], np.int64), "INT64")],
        outputs=[tc.InferRequestedOutput("logits")],
        sequence_id=key,
        sequence_start=start,
        sequence_end=end,
    )
    return result.as_numpy("logits")[0]


def greedy_by_sequence(client, key, vocab: list[str], prompt: str, n: int) -> str:
    """Greedy decoding with the state held by the server (tests/greedy.py)."""
    got = greedy(opening(lambda t, start: step(client, key, t, start=start)), vocab, prompt, n)
    step(client, key, EOS, end=True)
    return got


def greedy_plain(client, vocab: list[str], prompt: str, n: int) -> str:
    """The client runs the recurrence itself: the step graph with h and c as tensors."""
    config = client.get_model_config("char_lstm", as_json=True)["config"]
    dims = [int(d) for d in config["sequence_batching"]["state"][0]["dims"]]  # after the batch
    state = {"h": np.zeros([1, *dims], np.float32)}
    state["c"] = state["h"]

    def one(token):
        result = client.infer("char_lstm", [
            tensor("tokens", np.asarray([[token]], np.int64), "INT64"),
            tensor("h", state["h"], "FP32"), tensor("c", state["c"], "FP32")])  # fmt: skip
        state["h"], state["c"] = result.as_numpy("h_next"), result.as_numpy("c_next")
        return result.as_numpy("logits")[0]

    return greedy(one, vocab, prompt, n)


def greedy_by_text(client, key, prompt: str, n: int) -> str:
    """A BYTES round trip: the prompt goes in as `text`, the greedy next character comes
    back as `greedy_text` and goes in again, until it is empty (<eos>) or n characters."""
    got, text, first = "", prompt, True
    while len(got) < n:
        result = client.infer(
            "char_lstm",
            [tensor("text", np.asarray([[text.encode()]], dtype=object), "BYTES")],
            outputs=[tc.InferRequestedOutput("greedy_text")],
            sequence_id=key,
            sequence_start=first,
        )
        first = False
        text = result.as_numpy("greedy_text")[0, 0].decode()
        if not text:
            break
        got += text
    return got


def greedy_by_stream(client, keys: list, vocab: list[str], prompts: list[str], n: int):
    """Several greedy sequences at once over one stream (start_stream and
    async_stream_infer with sequence ids): each round sends every live sequence's next
    token, then reads the answers, which come back in request order."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        feeds = [[0, *(vocab.index(ch) for ch in p)] for p in prompts]
        got, first, live = [""] * len(keys), [True] * len(keys), list(range(len(keys)))
        sent_ids, order = [], []
        while live:
            sent = []
            for i in live:
                for token in feeds[i]:
                    sent_ids.append(f"{keys[i]}-{len(sent_ids)}")
                    client.async_stream_infer(
                        "char_lstm",
                        [tensor("tokens", np.asarray([[token]], np.int64), "INT64")],
                        request_id=sent_ids[-1],
                        sequence_id=keys[i],
                        sequence_start=first[i],
                    )
                    first[i] = False
                    sent.append(i)
            last = {}
            for i in sent:
                result, err = answers.get(timeout=60)
                if err is not None:
                    raise err
                order.append(result.get_response().id)
                last[i] = result.as_numpy("logits")[0]
            for i in list(live):
                token = int(np.argmax(last[i]))
                if token == 0:
                    live.remove(i)
                else:
                    got[i], feeds[i] = got[i] + vocab[token], [token]
            live = [i for i in live if len(got[i]) < n]
        # Errors on the stream: each its own answer, and the stream goes on.
        client.async_stream_infer("nope", [], request_id="e1")
        client.async_stream_infer(
            "char_lstm",
            [tensor("tokens", np.asarray([[1]], np.int64), "INT64")],
            sequence_id=987654,
        )
        client.async_stream_infer(
            "lenet5", [tensor("input", np.zeros((1, 1, 32, 32), np.float32), "FP32")]
        )
        errors = []
        for _ in range(3):
            result, err = answers.get(timeout=60)
            errors.append(
                {"message": err.message(), "status": err.status()}
                if err is not None
                else {"shape": list(result.as_numpy("logits").shape)}
            )
        for key in keys:  # end them
            client.async_stream_infer(
                "char_lstm",
                [tensor("tokens", np.asarray([[0]], np.int64), "INT64")],
                sequence_id=key,
                sequence_end=True,
            )
        ended = [answers.get(timeout=60)[1] is None for _ in keys]
    finally:
        client.stop_stream()
    return {"texts": got, "sent": sent_ids, "order": order, "errors": errors, "ended": ended}


def protocol(spec: dict) -> dict:
    """Everything one server shows a tritonclient user (the session's test server)."""
    out = {}
    vocab, prompt, n = spec["vocab"], spec["prompt"], spec["n"]
    with tc.InferenceServerClient(spec["url"]) as client:
        out["live"] = client.is_server_live()
        out["ready"] = client.is_server_ready()
        out["model_ready"] = [
            client.is_model_ready("lenet5"),
            client.is_model_ready("lenet5", "1"),
            client.is_model_ready("lenet5", "7"),
            client.is_model_ready("nope"),
        ]
        out["server_metadata"] = client.get_server_metadata(as_json=True)
        out["model_metadata"] = client.get_model_metadata("char_lstm", as_json=True)
        out["model_config"] = client.get_model_config("char_lstm", as_json=True)["config"]
        out["index"] = client.get_model_repository_index(as_json=True).get("models", [])

        # infer on a classifier batch, with the statistics around it
        x = np.load(spec["x"])
        before = stats(client, "lenet5")["lenet5"]
        result = client.infer("lenet5", [tensor("input", x, "FP32")], request_id="batch-1")
        out["logits"] = result.as_numpy("logits").tolist()
        out["infer_id"] = result.get_response().id
        out["stats_lenet5"] = [before, stats(client, "lenet5")["lenet5"]]

        # errors as InferenceServerException with the protocol's status
        x64 = x[:1].astype(np.float64)
        out["errors"] = {
            "unknown_model": error(lambda: client.infer("nope", [tensor("input", x, "FP32")])),
            "unknown_version": error(
                lambda: client.infer("lenet5", [tensor("input", x, "FP32")], "9")
            ),
            "datatype": error(lambda: client.infer("lenet5", [tensor("input", x64, "FP64")])),
            "shape": error(lambda: client.infer("lenet5", [tensor("input", x[:, :, :16], "FP32")])),
            "missing": error(
                lambda: client.infer(
                    "char_lstm",
                    [
                        tensor("tokens", np.zeros((1, 1), np.int64), "INT64"),
                        tensor("h", np.zeros((1, 2, 48), np.float32), "FP32"),
                    ],
                )
            ),  # fmt: skip
            "output": error(
                lambda: client.infer(
                    "lenet5",
                    [tensor("input", x, "FP32")],
                    outputs=[tc.InferRequestedOutput("probabilities")],
                )
            ),  # fmt: skip
            "sequence_unknown": error(lambda: step(client, 31337, 1)),
            "text_chars": error(
                lambda: client.infer(
                    "char_lstm",
                    [tensor("text", np.asarray([["KING\u00e9".encode()]], dtype=object), "BYTES")],
                    sequence_id=77,
                    sequence_start=True,
                )
            ),  # fmt: skip
        }
        out["stats_lenet5"].append(stats(client, "lenet5")["lenet5"])
        out["stats_all"] = sorted(stats(client))
        out["stats_errors"] = [
            error(lambda: client.get_inference_statistics("nope")),
            error(lambda: client.get_inference_statistics("lenet5", "9")),
        ]

        # char_lstm: server-held sequences, the plain step graph, BYTES, a stream
        before = stats(client, "char_lstm")["char_lstm"]
        out["by_sequence"] = [
            greedy_by_sequence(client, 4242, vocab, prompt, n),
            greedy_by_sequence(client, "a-string-id", vocab, prompt, n),
        ]
        out["stats_char_lstm"] = [before, stats(client, "char_lstm")["char_lstm"]]
        out["plain"] = greedy_plain(client, vocab, prompt, n)
        out["by_text"] = greedy_by_text(client, "text-1", prompt, n)
        prompts = spec["stream_prompts"]
        out["stream"] = greedy_by_stream(
            client, [500 + i for i in range(len(prompts))], vocab, prompts, n
        )
    return out


def expiry(spec: dict) -> dict:
    """On a server whose sequences expire after 1 s idle: a late step hears so; then
    many clients, each its own connection, decode interleaved sequences at once."""
    vocab, prompts, n = spec["vocab"], spec["prompts"], spec["n"]
    out = {}
    with tc.InferenceServerClient(spec["url"]) as client:
        step(client, 5, 0, start=True)
        time.sleep(1.3)
        out["expired"] = error(lambda: step(client, 5, 1))
        out["alone"] = [
            greedy_by_sequence(client, 100 + i, vocab, p, n) for i, p in enumerate(prompts)
        ]

    def one(item):
        i, p = item
        with tc.InferenceServerClient(spec["url"]) as client:
            return greedy_by_sequence(client, 200 + i, vocab, p, n)

    gate = threading.Barrier(len(prompts))

    def together(item):
        gate.wait(timeout=60)  # every client is connected before any decodes
        return one(item)

    with ThreadPoolExecutor(len(prompts)) as pool:
        out["together"] = list(pool.map(together, enumerate(prompts)))
    return out


if __name__ == "__main__":
    scenario = {"protocol": protocol, "expiry": expiry}[sys.argv[1]]
    json.dump(scenario(json.load(sys.stdin)), sys.stdout)
