"""The serving core without gRPC: providers, preprocessing, model loading, EOS."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from bench.harness import loopback_config
from export.__main__ import export_checkpoint
from serving.app import create_server
from serving.core.card import ModelCard
from serving.core.models import load_model
from serving.core.preprocess import ImageDecoder, decode_image, image_to_tensor
from serving.core.repository import ModelRegistry, latest_versions
from serving.core.runtime import CPU, CUDA, SessionFactory, check_providers, requested_providers
from serving.engine import EngineCore, run_alone, text_request
from serving.engine.sampler import SamplingParams
from serving.errors import DeviceError, InvalidArgument, NotFound
from training.char_lm import CharLM, CharLMConfig, build_vocab
from training.checkpoint import save_checkpoint
from training.data.digits import digit_to_image, image_to_array, load_digits_split


def test_provider_selection():
    assert requested_providers("cpu", [CUDA, CPU]) == [CPU]
    assert requested_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert requested_providers("auto", [CPU]) == [CPU]
    assert requested_providers("cuda", ["TensorrtExecutionProvider", CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(DeviceError, match="no CUDAExecutionProvider"):
        requested_providers("cuda", [CPU])
    with pytest.raises(ValueError, match="cpu, cuda, auto"):
        requested_providers("tpu", [CPU])


def test_silent_cpu_fallback_is_caught_for_cuda_only():
    with pytest.raises(DeviceError, match="fell back to CPUExecutionProvider"):
        check_providers("cuda", "m.onnx", [CPU])
    assert check_providers("cuda", "m.onnx", [CUDA, CPU]) == CUDA
    assert check_providers("auto", "m.onnx", [CPU]) == CPU
    assert check_providers("cpu", "m.onnx", [CPU]) == CPU


def test_serving_preprocessing_equals_training_preprocessing(repository):
    """No train/serve skew: an 8x8 digit PNG becomes the very tensor training saw, on the
    path the server takes (ImageDecoder.tensor: the size check, the bounded decoders,
    the reduced decode)."""
    pre = ModelCard.read(repository / "lenet5" / "1").preprocess
    pixels = load_digits_split()[4][:20]
    decoder = ImageDecoder()
    for p in pixels:
        buf = io.BytesIO()
        digit_to_image(p).save(buf, "PNG")
        served = decoder.tensor(buf.getvalue(), pre)
        trained = (image_to_array(digit_to_image(p)) - pre.mean[0]) / pre.std[0]
        np.testing.assert_allclose(served, trained, atol=1e-6)


def test_rgb_and_alpha_images_become_grayscale():
    spec = {
        "color_mode": "L",
        "height": 32,
        "width": 32,
        "resample": "bilinear",
        "scale": 1 / 255,
        "mean": [0.0],
        "std": [1.0],
    }
    white = Image.new("RGBA", (50, 70), (255, 255, 255, 255))
    x = image_to_tensor(white, spec)
    assert x.shape == (1, 32, 32) and np.allclose(x, 1.0)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_transparent_pixels_are_the_training_background(repository):
    """Ink that lives only in alpha (white everywhere, opaque strokes) reads like the
    digit itself; dropping alpha would give a blank white square."""
    pre = json.loads((repository / "lenet5" / "1" / "model.json").read_text())["preprocess"]
    assert pre["background"] == [0]
    digit = digit_to_image(load_digits_split()[4][0])
    want = image_to_tensor(decode_image(_png(digit)), pre)
    ink_in_alpha = Image.merge("LA", (Image.new("L", digit.size, 255), digit))
    rgba = ink_in_alpha.convert("RGBA")  # the same picture as RGBA
    for image in (ink_in_alpha, rgba):
        got = image_to_tensor(decode_image(_png(image)), pre)
        np.testing.assert_allclose(got, want, atol=1e-6)
    blank = image_to_tensor(decode_image(_png(Image.new("L", (8, 8), 255))), pre)
    assert not np.allclose(want, blank)
    # A scenes model's background is white: a fully transparent black image is white.
    scenes = {**pre, "color_mode": "RGB", "mean": [0.0] * 3, "std": [1.0] * 3,
              "background": [255, 255, 255]}  # fmt: skip
    clear = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    assert np.allclose(image_to_tensor(decode_image(_png(clear)), scenes), 1.0)
    keyed = Image.new("RGB", (30, 30), (0, 0, 0))  # tRNS chunk: black is transparent
    keyed.info["transparency"] = (0, 0, 0)
    assert np.allclose(image_to_tensor(decode_image(_png(keyed)), scenes), 1.0)


def _encoded(fmt: str, corrupt_at: int | None = None, keep: int | None = None) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buf, fmt)
    data = bytearray(buf.getvalue())
    if corrupt_at is not None:
        data[corrupt_at] ^= 0xFF
    return bytes(data[:keep])


@pytest.mark.parametrize(
    "data,needle",
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "cannot decode"),
        (_encoded("PNG", corrupt_at=40), "cannot decode"),  # a damaged chunk
        (_encoded("JPEG", keep=100), "cannot decode"),  # truncated
        (_encoded("GIF"), "cannot decode"),  # decodable, but not an accepted format
        (_encoded("TIFF"), "cannot decode"),
    ],
)
def test_undecodable_images(data, needle):
    with pytest.raises(InvalidArgument, match=f"^image: .*{needle}"):
        decode_image(data)


def test_jpeg_and_cmyk_are_accepted():
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 0, 0, 0)).save(buf, "JPEG")
    spec = {"color_mode": "RGB", "height": 8, "width": 8, "resample": "bilinear",
            "scale": 1 / 255, "mean": [0.0] * 3, "std": [1.0] * 3}  # fmt: skip
    x = image_to_tensor(decode_image(buf.getvalue()), spec)
    assert x.shape == (3, 8, 8) and x.min() > 0.9  # CMYK all-zero ink is white


def test_broken_model_is_skipped_and_others_load(repository, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(repository, root)
    broken = root / "broken" / "1"
    broken.mkdir(parents=True)
    card = json.loads((root / "lenet5" / "1" / "model.json").read_text())
    (broken / "model.json").write_text(json.dumps({**card, "name": "broken"}))
    (broken / "model.onnx").write_bytes(b"not onnx")
    (root / ".staging-half-written").mkdir()
    registry = ModelRegistry.load(root, "cpu")
    assert sorted(registry.models) == ["char_lstm", "char_lstm_prefill", "lenet5"]
    assert "broken" in registry.failed and "model.onnx" in registry.failed["broken"]
    with pytest.raises(NotFound, match="broken"):
        registry.get("broken", "classifier")


def test_latest_numeric_version_is_served(repository, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(repository / "lenet5" / "1", root / "lenet5" / "2")
    shutil.copytree(repository / "lenet5" / "1", root / "lenet5" / "10")
    (root / "lenet5" / "11").mkdir()  # no model card: ignored
    assert latest_versions(root)["lenet5"].name == "10"
    (root / "lenet5" / "10" / "metrics.json").write_text("{not json")
    model = ModelRegistry.load(root, "cpu").models["lenet5"]
    assert model.version == "10"  # the directory decides, not the card's copy
    assert model.metrics == {}  # unreadable figures are dropped, the model still serves


def test_eos_ends_generation(tmp_path):
    torch.manual_seed(0)
    model = CharLM(CharLMConfig(vocab=build_vocab(["ab"]), hidden_size=8, embed_dim=4))
    with torch.no_grad():
        model.head.bias[0] = 50.0  # EOS always wins
    save_checkpoint(tmp_path / "eos.pt", "char_lstm", model, None, 1, {})
    lm = load_model(export_checkpoint(tmp_path / "eos.pt", tmp_path / "repo"), "cpu")
    events = list(run_alone(lm, text_request(lm, "ab", 10, SamplingParams(temperature=0))))
    assert len(events) == 1
    last = events[0]
    assert (last.pieces, last.finish_reason, last.completion_tokens) == ([], "eos", 1)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_auto_settles_on_cpu_after_the_first_cuda_failure(repository):
    sessions = SessionFactory("auto")
    session = sessions(repository / "lenet5" / "1" / "model.onnx")
    assert session.get_providers() == [CPU]
    assert sessions.device == "cpu"  # later graphs do not retry CUDA


def test_a_cancelled_sequence_leaves_at_the_next_iteration(repository):
    lm = load_model(repository / "char_lstm" / "1", "cpu")
    engine = EngineCore(lm)
    seq = text_request(lm, "KING", 500, SamplingParams(seed=0))
    engine.submit(seq)
    for _ in range(3):  # prefill + first token, then two more tokens
        engine.step()
    engine.cancel(seq)
    assert engine.step() == 0 and not engine.has_work()
    delta = seq.outbox.take(timeout=0)
    assert (delta.finish_reason, delta.completion_tokens, len(delta.tokens)) == ("cancelled", 3, 3)
    assert engine.stats.step_runs + engine.stats.prefill_runs == 3 and engine.stats.leaves == 1


def test_intra_op_threads_reach_every_session_and_change_no_result(repository):
    default = ModelRegistry.load(repository, "cpu").models["lenet5"]
    single = ModelRegistry.load(repository, "cpu", intra_op_threads=1).models["lenet5"]
    assert single.session.get_session_options().intra_op_num_threads == 1
    # unset: by graph kind, as measured: a classifier runs on its calling thread, a
    # step model's graphs on the pool; one number set applies to every graph
    assert default.session.get_session_options().intra_op_num_threads == 1
    lm = ModelRegistry.load(repository, "cpu").models
    for graph in lm["char_lstm"].graphs.values():
        assert graph.get_session_options().intra_op_num_threads == 0
    assert lm["char_lstm_prefill"].session.get_session_options().intra_op_num_threads == 0
    pool = ModelRegistry.load(repository, "cpu", intra_op_threads=0).models["lenet5"]
    assert pool.session.get_session_options().intra_op_num_threads == 0
    x = np.random.default_rng(0).random((4, *single.input.shape[1:]), np.float32)
    np.testing.assert_allclose(
        np.stack(single.logit_rows(x)), np.stack(default.logit_rows(x)), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="intra_op_threads"):
        create_server(loopback_config(repository, intra_op_threads=-1))


def test_spinning_off_reaches_every_session_and_changes_no_result(repository):
    spin = ModelRegistry.load(repository, "cpu").models["char_lstm"]
    calm = ModelRegistry.load(repository, "cpu", spinning=False).models["char_lstm"]

    def spinning(session) -> str | None:
        try:
            return session.get_session_options().get_session_config_entry(
                "session.intra_op.allow_spinning"
            )
        except RuntimeError:  # not set: ONNX Runtime's default, spinning
            return None

    for graph in ("step", "prefill"):
        assert spinning(calm.graphs[graph]) == "0" and spinning(spin.graphs[graph]) is None
    tokens, state = np.asarray([[5], [9]], np.int64), spin.zero_state(2)
    np.testing.assert_array_equal(
        spin.run("step", tokens, state)[0], calm.run("step", tokens, state)[0]
    )
