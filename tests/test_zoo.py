"""Every registered architecture: builds at both input kinds, trains a few steps,
exports to a verified graph, and is served."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from bench import harness
from export.__main__ import export_checkpoint
from serving.core.card import ModelCard
from serving.core.models import load_model
from serving.core.preprocess import ImageDecoder
from serving.engine import caption_request, run_alone, text_request
from serving.engine.sampler import SamplingParams
from training.__main__ import main as train_main
from training.checkpoint import load_checkpoint, save_checkpoint
from training.cnn_config import ClassifierConfig, initialize
from training.data.scenes import make_scenes
from training.registry import build_model, get_arch, names
from training.train_classifier import make_optimizer, make_schedule

CLASSIFIERS = [n for n in names() if get_arch(n).task == "classifier"]
SCENE_CLASSIFIERS = [n for n in CLASSIFIERS if n != "lenet5"]  # LeNet-5 is 32x32 only


def test_the_zoo_is_registered():
    assert set(CLASSIFIERS) >= {
        "lenet5", "alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "googlenet",
        "resnet18", "resnet34", "resnet50", "densenet",
    }  # fmt: skip


@pytest.mark.parametrize("name", SCENE_CLASSIFIERS)
def test_builds_for_digits_and_scenes(name):
    for channels, size in ((1, 32), (3, 64)):
        model = build_model(name, in_channels=channels, image_size=size, width=0.125).eval()
        with torch.no_grad():
            assert model(torch.randn(3, channels, size, size)).shape == (3, 10)


def test_vgg_depths_follow_the_table():
    convs = {
        n: sum(isinstance(m, torch.nn.Conv2d) for m in build_model(n, width=0.125).modules())
        for n in ("vgg11", "vgg13", "vgg16", "vgg19")
    }
    assert convs == {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}  # + 3 FC = 11..19


def test_resnet_blocks():
    from training.resnet import BasicBlock, Bottleneck

    def blocks(name, kind):
        return sum(isinstance(m, kind) for m in build_model(name, width=0.125).modules())

    assert blocks("resnet18", BasicBlock) == 8 and blocks("resnet34", BasicBlock) == 16
    assert blocks("resnet50", Bottleneck) == 16 and blocks("resnet50", BasicBlock) == 0


def test_googlenet_auxiliary_heads_train_but_are_not_exported(tmp_path):
    model = build_model("googlenet", width=0.125)
    outputs = model.forward_train(torch.randn(2, 1, 32, 32))
    assert model.loss_weights == (1.0, 0.3, 0.3)
    assert len(outputs) == 3 and all(o.shape == (2, 10) for o in outputs)
    save_checkpoint(tmp_path / "g.pt", "googlenet", model, None, 1, {})
    version = export_checkpoint(tmp_path / "g.pt", tmp_path / "repo")
    graph = onnx.load(str(version / "model.onnx")).graph
    assert graph.initializer and not [t.name for t in graph.initializer if "aux" in t.name]
    assert [o.name for o in graph.output] == ["logits"]


@pytest.mark.parametrize("scheme,gain", [("kaiming", 2.0), ("xavier", None)])
def test_initialization_schemes(scheme, gain):
    layer = torch.nn.Linear(400, 100)
    initialize(layer, scheme)
    want = np.sqrt(gain / 400) if gain else np.sqrt(2 / 500)  # He: 2/fan_in; Glorot: 2/(in+out)
    assert abs(layer.weight.std().item() - want) / want < 0.05
    with pytest.raises(ValueError, match="kaiming, xavier"):
        initialize(layer, "orthogonal")


@pytest.mark.parametrize(
    "name,cls",
    [
        ("sgd", torch.optim.SGD),
        ("adagrad", torch.optim.Adagrad),
        ("rmsprop", torch.optim.RMSprop),
        ("adam", torch.optim.Adam),
    ],
)
def test_optimizers(name, cls):
    class Args:
        lr, momentum, weight_decay = 0.1, 0.9, 1e-4

    opt = make_optimizer(name, torch.nn.Linear(2, 2).parameters(), Args)
    assert isinstance(opt, cls) and opt.param_groups[0]["weight_decay"] == 1e-4


def test_step_and_plateau_schedules_decay():
    class Args:
        lr, epochs, step_size, gamma, patience = 1.0, 10, 2, 0.1, 1

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    step, per_batch = make_schedule("step", opt, Args, 5)
    assert not per_batch
    lrs = []
    for _ in range(4):
        opt.step()
        step.step()
        lrs.append(opt.param_groups[0]["lr"])
    np.testing.assert_allclose(lrs, [1.0, 0.1, 0.1, 0.01])
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    plateau, _ = make_schedule("plateau", opt, Args, 5)
    for loss in (1.0, 0.5, 0.5, 0.5):  # no progress for two epochs > patience 1
        plateau.step(loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict:
    """`python -m training <name> --dry-run` for every registered name, in one process."""
    root = tmp_path_factory.mktemp("dry")
    out = {}
    for name in names():
        path = root / f"{name}.pt"
        assert train_main([name, "--dry-run", "--quiet", "--out", str(path)]) == 0
        out[name] = path
    return out


@pytest.mark.parametrize("name", names())
def test_dry_run_then_export_and_serve(name, dry_runs, tmp_path):
    arch, _, ckpt = load_checkpoint(dry_runs[name])
    assert arch == name and ckpt["step"] > 0
    assert dry_runs[name].with_suffix(".metrics.json").is_file()
    task = get_arch(name).task
    reports = {"classifier": ["curves", "confusion"], "language_model": ["curves", "samples"],
               "captioner": ["curves", "samples"]}[task]  # fmt: skip
    for report in reports:
        with Image.open(dry_runs[name].with_suffix(f".{report}.png")) as image:
            assert image.format == "PNG" and min(image.size) > 100
    if task == "language_model":
        samples = dry_runs[name].with_suffix(".samples.txt").read_text()
        assert samples.strip() and samples.count("----") == 2
        assert len(ckpt["metrics"]["samples"]) == 3
    version = export_checkpoint(dry_runs[name], tmp_path)  # verification included
    card = ModelCard.read(version)
    assert card.arch == name
    served = load_model(version, "cpu")
    if served.kind == "classifier":
        probs = served.probabilities(np.zeros((2, *card.inputs[0].shape[1:]), np.float32))
        assert probs.shape == (2, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    else:
        assert [s.input for s in served.state] == list(get_arch(name).model_cls(
            get_arch(name).config_cls(**ckpt["config"])).state_names)  # fmt: skip
        if served.kind == "captioner":
            image = io.BytesIO()
            make_scenes(1, seed=0)[0][0].save(image, "PNG")
            x = ImageDecoder().tensor(image.getvalue(), served.preprocess)
            seq = caption_request(served, x, 5, SamplingParams(temperature=0))
        else:
            seq = text_request(served, "The", 12, SamplingParams(temperature=0))
        events = list(run_alone(served, seq))
        assert events[-1].completion_tokens >= 1 and events[-1].finish_reason


@pytest.mark.parametrize("name", SCENE_CLASSIFIERS)
def test_scene_sized_export_is_verified(name, tmp_path):
    config = ClassifierConfig(in_channels=3, image_size=64, width=0.125)
    model = get_arch(name).model_cls(config)
    with torch.no_grad():  # BatchNorm statistics as training leaves them, not the 0/1 defaults
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64))
    save_checkpoint(tmp_path / "m.pt", name, model, None, 1, {})
    card = ModelCard.read(export_checkpoint(tmp_path / "m.pt", tmp_path))
    assert card.inputs[0].shape == (-1, 3, 64, 64)
    assert card.preprocess.color_mode == "RGB"


def test_vanilla_rnn_is_the_notes_equation():
    from training.rnn_cells import ElmanRNN

    torch.manual_seed(0)
    rnn = ElmanRNN(3, 5, num_layers=1)
    x, h = torch.randn(2, 4, 3), torch.randn(1, 2, 5)
    w_xh, b, w_hh = rnn.w_xh[0].weight, rnn.w_xh[0].bias, rnn.w_hh[0].weight
    expected, state = [], h[0]
    for t in range(4):  # h_t = tanh(W_hh h_{t-1} + W_xh x_t + b)
        state = torch.tanh(state @ w_hh.T + x[:, t] @ w_xh.T + b)
        expected.append(state)
    y, h_last = rnn(x, h)
    torch.testing.assert_close(y, torch.stack(expected, 1))
    torch.testing.assert_close(h_last[0], state)
    assert not any(isinstance(m, torch.nn.RNNBase) for m in rnn.modules())  # not nn.RNN
    y2, _ = rnn.to_nn_rnn()(x, h)
    torch.testing.assert_close(y2, y)


@pytest.mark.parametrize("cell,states", [("lstm", ("h", "c")), ("gru", ("h",)), ("rnn", ("h",))])
def test_language_model_cells_carry_their_state(cell, states):
    from training.char_lm import CharLM, CharLMConfig, build_vocab

    model = CharLM(CharLMConfig(vocab=build_vocab(["abc"]), cell=cell, hidden_size=8,
                                embed_dim=4, num_layers=2)).eval()  # fmt: skip
    assert model.state_names == states and len(model.init_state(3)) == len(states)
    tokens = torch.tensor([[1, 2, 3, 1]])
    with torch.no_grad():
        whole, _ = model(tokens, model.init_state(1))
        state, parts = model.init_state(1), []
        for t in range(4):
            logits, state = model(tokens[:, t : t + 1], state)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), whole)


def test_seq_digits_reads_one_row_per_step():
    model = build_model("seq_digits", width=0.125).eval()
    assert model.rnn.input_size == 32  # one 32-pixel row per time step
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 31] = 1.0  # only the last row differs: a many-to-one model must see it
    with torch.no_grad():
        assert not torch.allclose(model(x), model(torch.zeros(1, 1, 32, 32)))


@pytest.mark.parametrize("name", ["lenet5", "googlenet"])
def test_data_parallel_training_with_torchrun_keeps_replicas_identical(name, tmp_path):
    out = tmp_path / f"{name}.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "-m", "training", name, "--dry-run", "--quiet", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and "Signal 6 (SIGABRT)" in proc.stderr:
        # Seen once in ~40 runs on a loaded 2-core CI machine: a rank aborted inside gloo
        # before any of our code failed. One retry; a real failure fails twice.
        print("torchrun: a rank aborted (SIGABRT); retrying once:", proc.stderr[:2000])
        proc = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[:2000] + "\n...\n" + proc.stderr[-2000:]
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())["metrics"]
    assert metrics["world_size"] == 2
    assert metrics["replicas_identical"] is True  # each rank saw other data: gradients synced
    assert load_checkpoint(out)[0] == name


def _replica_check(rank: int, port: int, perturb: bool, results) -> None:
    import os

    from training import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2")  # fmt: skip
    distributed.setup()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(50, 50), torch.nn.Linear(50, 3))
    if perturb and rank == 1:
        with torch.no_grad():
            model[0].weight[[3, 7]] = model[0].weight[[7, 3]].clone()  # same sums, other weights
    results[rank] = distributed.replicas_identical(model)
    distributed.teardown()


@pytest.mark.parametrize("perturb", [False, True])
def test_replica_check_compares_every_weight(perturb):
    import torch.multiprocessing as mp

    port = harness.free_port()
    results = mp.Manager().dict()
    mp.spawn(_replica_check, args=(port, perturb, results), nprocs=2, join=True)
    assert dict(results) == {0: not perturb, 1: not perturb}


def test_image_size_flag_travels_to_serving(tmp_path):
    """Trained at 20x20, exported at 20x20, and serving resizes any PNG to 20x20."""
    path = tmp_path / "seq_digits.pt"
    argv = ["seq_digits", "--dry-run", "--quiet", "--image-size", "20", "--out", str(path)]
    assert train_main(argv) == 0
    version = export_checkpoint(path, tmp_path / "repo")
    card = ModelCard.read(version)
    assert card.inputs[0].shape == (-1, 1, 20, 20)
    served = load_model(version, "cpu")
    png = io.BytesIO()
    Image.new("L", (57, 31), 255).save(png, "PNG")
    tensor = ImageDecoder().tensor(png.getvalue(), served.preprocess)
    assert tensor.shape == (1, 20, 20)
    assert served.probabilities(tensor[None]).shape == (1, 10)
