"""The captioner end to end: train tiny, export two graphs, stream captions over gRPC."""

from __future__ import annotations

import io

import grpc
import pytest
import torch

from bench.harness import loopback_config
from export.__main__ import export_checkpoint
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving.app import create_server
from serving.client import StepwiseClient
from training import train_captioner
from training.__main__ import parse_args
from training.checkpoint import load_checkpoint
from training.data.scenes import make_scenes


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioner")
    args = parse_args(["captioner", "--out", str(root / "captioner.pt"), "--train-scenes", "600",
                       "--eval-scenes", "50", "--epochs", "3", "--width", "0.25",
                       "--hidden-size", "64", "--embed-dim", "16", "--quiet"])  # fmt: skip
    metrics = train_captioner.train(args)
    version = export_checkpoint(args.out, root / "repo")
    server, port = create_server(loopback_config(root / "repo"))
    server.start()
    with StepwiseClient(f"127.0.0.1:{port}", timeout=30) as client:
        yield client, args.out, version, metrics
    server.stop(None)


def _caption(client, image: bytes, **options) -> tuple[list[str], pb.CaptionResponse]:
    responses = list(client.caption_stream(image, **options))
    assert all(not r.finish_reason for r in responses[:-1])
    words = " ".join(r.text for r in responses if r.text).split()
    return words, responses[-1]


def test_metrics_and_model_card(captioner):
    _, _, version, metrics = captioner
    assert {"bleu4", "object_recall", "exact_match"} <= set(metrics)
    assert 0 <= metrics["bleu4"] <= 1 and 0 <= metrics["object_recall"] <= 1
    assert sorted(p.name for p in version.glob("*.onnx")) == ["encoder.onnx", "model.onnx"]


def test_served_greedy_caption_equals_pytorch(captioner):
    client, checkpoint, _, _ = captioner
    _, model, _ = load_checkpoint(checkpoint)
    scenes = make_scenes(5, seed=123)
    x = train_captioner.images_to_tensor([im for im, _, _ in scenes], model.config)
    want = model.greedy(x)
    vocab = model.config.vocab
    for (image, _, _), ids in zip(scenes, want, strict=True):
        words, last = _caption(client, png(image))
        expected = [vocab[t] for t in ids.tolist()]
        expected = expected[: expected.index("<end>")] if "<end>" in expected else expected
        assert words == expected and last.caption == " ".join(expected)
        assert last.finish_reason in ("eos", "length")
        assert last.completion_tokens == len(words) + (last.finish_reason == "eos")


@pytest.mark.parametrize("max_length", [1, 2, 3])
def test_words_stream_one_per_message_and_length_limits(captioner, max_length):
    client = captioner[0]
    for seed in range(4):
        image = png(make_scenes(1, seed=seed)[0][0])
        words, last = _caption(client, image, max_length=max_length, temperature=2.0, seed=seed)
        assert all(w and " " not in w for w in words)
        assert last.completion_tokens <= max_length
        if last.finish_reason == "length":
            assert len(words) == last.completion_tokens == max_length
        else:
            assert last.finish_reason == "eos" and len(words) == last.completion_tokens - 1


def test_seeded_sampling_repeats_differs_across_seeds_and_never_says_start(captioner):
    client = captioner[0]
    image = png(make_scenes(1, seed=6)[0][0].resize((100, 100)))  # any size is resized
    a = _caption(client, image, temperature=1.5, seed=3)
    b = _caption(client, image, temperature=1.5, seed=3)
    assert a[0] == b[0] and a[1].seed == b[1].seed == 3
    captions = {tuple(_caption(client, image, temperature=5.0, seed=s)[0]) for s in range(30)}
    assert len(captions) > 1  # the temperature is honoured
    assert not any(w.startswith("<") for c in captions for w in c)  # no <start>, no <end>


@pytest.mark.parametrize("fields,code,field", [
    (dict(model="nope", image=b"x"), grpc.StatusCode.NOT_FOUND, "model"),
    (dict(model="captioner", image=b"junk"), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    (dict(model="captioner", image=b"x", max_length=0), grpc.StatusCode.INVALID_ARGUMENT,
     "max_length"),
    (dict(model="captioner", image=b"x", max_length=65), grpc.StatusCode.INVALID_ARGUMENT,
     "max_length"),
    (dict(model="captioner", image=b"x", temperature=-1), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature"),
    (dict(model="captioner", image=b"x", temperature=11), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature"),
    (dict(model="captioner", image=b"x", temperature=float("nan")),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(model="captioner", image=b"x", beam_size=17), grpc.StatusCode.INVALID_ARGUMENT,
     "beam_size"),
    (dict(model="captioner", image=b"x", beam_size=-1), grpc.StatusCode.INVALID_ARGUMENT,
     "beam_size"),
    (dict(model="captioner", image=b"x", beam_size=3, temperature=1.0),
     grpc.StatusCode.INVALID_ARGUMENT, "beam_size"),
    (dict(model="captioner", image=b"x", stream_interval_ms=1001),
     grpc.StatusCode.INVALID_ARGUMENT, "stream_interval_ms"),
])  # fmt: skip
def test_caption_errors_name_the_field(captioner, fields, code, field):
    client = captioner[0]
    with pytest.raises(grpc.RpcError) as info:
        list(client.stub.Caption(pb.CaptionRequest(**fields)))
    assert info.value.code() == code and info.value.details().startswith(field + ":")
    assert [m.kind for m in client.list_models()] == ["captioner", "graph"]  # + its encoder


def test_other_rpcs_refuse_a_captioner(captioner):
    client = captioner[0]
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate_stream("a", model="captioner"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is a captioner" in info.value.details()


def test_teacher_forcing_targets_shift_by_one():
    from training.captioner import build_word_vocab

    vocab = build_word_vocab(["a red circle"])
    inputs, targets = train_captioner._teacher_forcing_batch(["a red circle"], vocab, 6)
    words = [vocab[i] for i in inputs[0, :4].tolist()]
    assert words == ["<start>", "a", "red", "circle"]
    assert [vocab[i] for i in targets[0, :4].tolist()] == ["a", "red", "circle", "<end>"]
    assert targets[0, 4:].tolist() == [-100, -100] and torch.all(inputs[0, 4:] == 0)


def test_caption_streams_share_the_stream_limit(captioner):
    """A Caption beyond max_streams (none may wait here) is refused with
    RESOURCE_EXHAUSTED while the running one goes on; the slot comes back when the
    running one is cancelled."""
    import time

    repo = captioner[2].parent.parent
    config = loopback_config(repo, max_streams=1, max_waiting_streams=0)
    server, port = create_server(config)
    model = server.registry.models["captioner"]
    run = model.run
    model.run = lambda *args: (time.sleep(0.3), run(*args))[1]  # a word per 0.3 s
    server.start()
    image = png(make_scenes(1, seed=0)[0][0])
    try:
        with StepwiseClient(f"127.0.0.1:{port}", timeout=30) as client:
            first = client.caption_stream(image)
            assert next(first).text  # a word out, the next one on its way
            with pytest.raises(grpc.RpcError) as info:
                list(client.caption_stream(image))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "1 streams are busy" in info.value.details()
            first.cancel()
            time.sleep(0.3)  # the slot is released when the server sees the cancellation
            words, last = _caption(client, image)
            assert last.caption == " ".join(words) and last.finish_reason
    finally:
        server.stop(None)


def _sequence_scores(model, state, max_length: int) -> dict[tuple[str, ...], float]:
    """Every caption of at most `max_length` tokens with its mean log-probability per
    token (<end> included when it ends), by brute force over the decoder step graph."""
    import numpy as np

    from serving.engine.sampler import log_softmax

    vocab, eos = model.vocab, model.eos
    scores = {}
    frontier = [((), 0.0, state, model.bos)]
    for depth in range(max_length):
        grown = []
        for ids, total, st, token in frontier:
            logits, nxt = model.run("step", np.asarray([[token]], np.int64), st)
            logp = log_softmax(logits)[0]
            for t in range(len(vocab)):
                if t in model.never_sampled:
                    continue
                if t == eos:
                    scores[tuple(vocab[i] for i in ids)] = (total + logp[t]) / (len(ids) + 1)
                elif depth == max_length - 1:
                    cut = tuple(vocab[i] for i in (*ids, t))
                    scores.setdefault(cut, (total + logp[t]) / (len(ids) + 1))
                else:
                    grown.append(((*ids, t), total + logp[t], nxt, t))
        frontier = grown
    return scores


def test_beam_search_finds_the_best_caption_and_streams_only_decided_words(captioner):
    from serving.core.models import load_model
    from serving.core.preprocess import ImageDecoder

    client, _, version, _ = captioner
    model = load_model(version, "cpu")
    for image, _, _ in make_scenes(3, seed=321):
        data = png(image)
        responses = list(client.caption_stream(data, max_length=2, beam_size=16))
        last = responses[-1]
        state = model.initial_state(ImageDecoder().tensor(data, model.preprocess))
        every = _sequence_scores(model, state, max_length=2)
        best = max(every.items(), key=lambda kv: kv[1])
        # 16 beams over 2 steps cover every candidate: the search is exhaustive here.
        assert tuple(last.caption.split()) == best[0]
        assert last.beams[0].score == pytest.approx(best[1], abs=1e-4)
        scores = [b.score for b in last.beams]
        assert scores == sorted(scores, reverse=True) and len(last.beams) == 16
        for b in last.beams:
            assert b.score == pytest.approx(every[tuple(b.caption.split())], abs=1e-4)
        assert " ".join(r.text for r in responses if r.text).split() == last.caption.split()
    deep = list(client.caption_stream(data, beam_size=3))
    assert deep[-1].caption and len(deep[-1].beams) <= 3
    assert " ".join(r.text for r in deep if r.text) == deep[-1].caption


@pytest.mark.parametrize("bind", [False, True], ids=["host-state", "bound-state"])
def test_beam_search_jobs_in_the_engine_equal_the_former_beam_search(captioner, bind):
    """`beam_request` jobs stepped in one batch with each other and with sampled
    captions give exactly what `beam_search` (beams in a batch of their own) gives:
    the same words at the same steps, the same ranked beams, scores to the bit."""
    from beam_reference import beam_search, run_beams

    from serving.core.models import load_model
    from serving.core.preprocess import ImageDecoder
    from serving.engine import EngineConfig, EngineCore, beam_request, caption_request
    from serving.engine.sampler import SamplingParams

    model = load_model(captioner[2], "cpu")
    images = [
        ImageDecoder().tensor(png(image), model.preprocess)
        for image, _, _ in make_scenes(3, seed=77)
    ]
    cases = [(image, k, n) for image in images for k, n in ((3, model.max_length), (16, 2))]
    core = EngineCore(model, EngineConfig(max_batch_size=64, bind_state=bind))
    jobs = [beam_request(model, image, k, n) for image, k, n in cases]
    sampled = [
        caption_request(model, image, 8, SamplingParams(seed=i)) for i, image in enumerate(images)
    ]
    for job in [sampled[0], *jobs, *sampled[1:]]:
        core.submit(job)
    got = run_beams(core, jobs)
    for (image, k, n), deltas in zip(cases, got, strict=True):
        events = list(beam_search(model, model.initial_state(image), k, n))
        assert [d.pieces for d in deltas] == [e.words for e in events]
        assert deltas[-1].beams == events[-1].beams and len(deltas[-1].beams) <= k
        assert deltas[-1].finish_reason in ("eos", "length") and deltas[-1].error is None
    assert all(s.outbox.take(timeout=0).finished for s in sampled)
    assert max(core.stats.batch_sizes) > 16  # the beams really ran with company


def test_captions_and_beams_from_the_engine_process_equal_one_process(captioner):
    """`--engine-process on`: the image is decoded and encoded in the frontend, the
    decoder's state crosses to the engine process, and sampled captions (seeded) and
    beam searches (the ranked beams, scores to the bit) come back as in one process."""
    client, _, version, _ = captioner
    server, port = create_server(loopback_config(version.parent.parent, engine_process=True))
    server.start()
    try:
        with StepwiseClient(f"127.0.0.1:{port}", timeout=30) as remote:
            for i, (image, _, _) in enumerate(make_scenes(3, seed=55)):
                data = png(image)
                for options in (dict(temperature=0.9, seed=i), dict(beam_size=4)):
                    want = list(client.caption_stream(data, **options))
                    got = list(remote.caption_stream(data, **options))
                    assert got[-1].caption == want[-1].caption
                    assert [(b.caption, b.score) for b in got[-1].beams] == [
                        (b.caption, b.score) for b in want[-1].beams
                    ]
                    assert got[-1].finish_reason == want[-1].finish_reason
    finally:
        server.stop(None).wait(30)
