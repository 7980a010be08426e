"""Fixtures: tiny models trained in seconds, exported into a temporary repository,
and a real server on a loopback port."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from bench.harness import loopback_config
from export.__main__ import export_checkpoint
from serving.app import create_server
from serving.client import StepwiseClient
from training import train_classifier, train_lm
from training.__main__ import parse_args

TINY_PLAY = "".join(
    f"{who}.\n{line}\n\n"
    for who, line in [
        ("KING", "Now is the winter of our discontent."),
        ("QUEEN", "Good night, sweet prince, good night."),
        ("FOOL", "The rain it raineth every day."),
        ("KING", "What light through yonder window breaks?"),
    ]
    * 60
)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    text = root / "tiny_play.txt"
    text.write_text(TINY_PLAY)
    lenet_args = parse_args(
        ["lenet5", "--out", str(root / "lenet5.pt"), "--epochs", "4", "--quiet"]
    )
    train_classifier.train(lenet_args)
    lm_args = parse_args(
        [
            "char_lstm",
            "--out",
            str(root / "char_lstm.pt"),
            "--text-file",
            str(text),
            "--steps",
            "120",
            "--batch-size",
            "8",
            "--bptt",
            "32",
            "--hidden-size",
            "48",
            "--embed-dim",
            "16",
            "--lr",
            "1e-2",
            "--eval-every",
            "60",
            "--quiet",
        ]
    )
    train_lm.train(lm_args)
    return {"lenet5": lenet_args.out, "char_lstm": lm_args.out}


@pytest.fixture(scope="session")
def repository(tmp_path_factory, checkpoints) -> Path:
    root = tmp_path_factory.mktemp("model_repository")
    for path in checkpoints.values():
        export_checkpoint(path, root)
    return root


@pytest.fixture(scope="session")
def server(repository):
    server, port = create_server(loopback_config(repository))
    server.start()
    yield server, port
    server.stop(grace=None)


@pytest.fixture(scope="session")
def target(server) -> str:
    return f"127.0.0.1:{server[1]}"


@pytest.fixture()
def client(target):
    with StepwiseClient(target, timeout=30) as c:
        yield c


@pytest.fixture()
def channel(target):
    with grpc.insecure_channel(target) as ch:
        yield ch
