"""Verification every export must pass before it reaches the repository.

Failing any check raises VerificationError; nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ATOL = 1e-4


class VerificationError(RuntimeError):
    """An exported graph disagrees with its PyTorch source."""


def check_graph(path: Path) -> None:
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def cpu_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_close(what: str, got: np.ndarray, want: torch.Tensor | np.ndarray) -> None:
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else want
    if got.shape != want.shape:
        raise VerificationError(f"{what}: ONNX shape {got.shape} != PyTorch {want.shape}")
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    if not err <= ATOL:
        raise VerificationError(f"{what}: max |ONNX - PyTorch| = {err:.2e} > {ATOL:.0e}")


def verify_classifier(model: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> dict:
    """Outputs match at batch sizes the export never saw."""
    check_graph(path)
    sess = cpu_session(path)
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 3, 7):
        x = torch.randn(batch, *shape, generator=gen)
        with torch.no_grad():
            want = model(x)
        (got,) = sess.run(["logits"], {"input": x.numpy()})
        assert_close(f"logits at batch {batch}", got, want)
    return {"checked_batches": [1, 3, 7], "atol": ATOL}


def _random_state(model, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    cfg = model.config
    return tuple(0.5 * torch.randn(cfg.num_layers, batch, cfg.hidden_size, generator=gen)
                 for _ in model.state_names)  # fmt: skip


def check_step_parity(model, graphs: dict, shapes, gen: torch.Generator) -> None:
    """Every output of every graph within ATOL of PyTorch, from random tokens and state.

    graphs: {"step": session, "prefill": session}; the step graph is checked at T = 1.
    """
    states = list(model.state_names)
    outputs = ["logits", *(f"{n}_next" for n in states)]
    for batch, length in shapes:
        tokens = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
        state0 = _random_state(model, batch, gen)
        with torch.no_grad():
            logits, state = model(tokens, state0)
        feeds = {
            "tokens": tokens.numpy(),
            # The graphs' state is batch-first: [B, L, H].
            **{n: s.transpose(0, 1).numpy() for n, s in zip(states, state0, strict=True)},
        }
        state = tuple(s.transpose(0, 1) for s in state)
        want = dict(zip(outputs, (logits[:, -1], *state), strict=True))
        for graph, session in graphs.items():
            if graph == "step" and length != 1:
                continue
            for name, got in zip(outputs, session.run(outputs, feeds), strict=True):
                assert_close(f"{graph} {name} at B={batch} T={length}", got, want[name])


def verify_char_lm(model, step_path: Path, prefill_path: Path, rollout_steps: int = 200) -> dict:
    """Step and prefill graphs match PyTorch at unseen shapes; greedy rollouts agree."""
    check_graph(step_path)
    check_graph(prefill_path)
    step, prefill = cpu_session(step_path), cpu_session(prefill_path)
    gen = torch.Generator().manual_seed(2)
    shapes = ((1, 5), (3, 17), (5, 1))
    check_step_parity(model, {"prefill": prefill, "step": step}, shapes, gen)
    prompt = torch.randint(1, model.config.vocab_size, (2, 7), generator=gen)
    torch_tokens = _torch_rollout(model, prompt, rollout_steps)
    zeros = np.zeros((2, model.config.num_layers, model.config.hidden_size), np.float32)
    feeds = {"tokens": prompt.numpy(), **dict.fromkeys(model.state_names, zeros)}
    logits, *state = prefill.run(None, feeds)
    onnx_tokens = onnx_greedy(step, model.state_names, logits, state, rollout_steps)
    if not np.array_equal(torch_tokens, onnx_tokens):
        first = int(np.argmax((torch_tokens != onnx_tokens).any(0)))
        raise VerificationError(f"greedy rollout diverges from PyTorch at step {first}")
    return {"checked": [list(s) for s in shapes], "atol": ATOL, "rollout_steps": rollout_steps}


@torch.no_grad()
def _torch_rollout(model, prompt: torch.Tensor, steps: int) -> np.ndarray:
    logits, state = model(prompt, model.init_state(prompt.size(0)))
    out = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        out.append(token)
        logits, state = model(token, state)
    return torch.cat(out, 1).numpy()


def onnx_greedy(step, state_names, logits: np.ndarray, state: list, steps: int,
                never: tuple[int, ...] = ()) -> np.ndarray:  # fmt: skip
    """Greedy tokens [B, steps] through the step graph from the given logits and state."""
    out = []
    for _ in range(steps):
        scores = logits.copy()
        scores[:, list(never)] = -np.inf
        token = scores.argmax(-1)[:, None].astype(np.int64)  # [B, 1]
        out.append(token)
        logits, *state = step.run(
            None, {"tokens": token, **dict(zip(state_names, state, strict=True))}
        )
    return np.concatenate(out, 1)


def verify_captioner(model, encoder_path: Path, step_path: Path, images: int = 6) -> dict:
    """Encoder and step graph match PyTorch; greedy captions agree word for word."""
    from training.captioner import END_ID, START_ID
    from training.data.scenes import make_scenes
    from training.train_captioner import images_to_tensor

    check_graph(encoder_path)
    check_graph(step_path)
    encoder, step = cpu_session(encoder_path), cpu_session(step_path)
    x = images_to_tensor([im for im, _, _ in make_scenes(images, seed=99)], model.config)
    for batch in (1, 3):
        with torch.no_grad():
            h, c = model.encode(x[:batch])
        got_h, got_c = encoder.run(["h", "c"], {"image": x[:batch].numpy()})
        assert_close(f"encoder h at batch {batch}", got_h, h.transpose(0, 1))  # batch-first
        assert_close(f"encoder c at batch {batch}", got_c, c.transpose(0, 1))
    check_step_parity(
        model.decoder, {"step": step}, ((1, 1), (4, 1)), torch.Generator().manual_seed(3)
    )
    want = model.greedy(x).numpy()  # [N, max_length]
    names = model.state_names  # the encoder's outputs are the decoder's initial state
    state = encoder.run(list(names), {"image": x.numpy()})
    start = np.full((len(x), 1), START_ID, np.int64)
    logits, *state = step.run(None, {"tokens": start, **dict(zip(names, state, strict=True))})
    got = onnx_greedy(step, names, logits, state, want.shape[1], never=(START_ID,))
    ended = np.cumsum(got == END_ID, axis=1) > 0  # after <end> PyTorch pads with <end>
    after_end = np.concatenate([np.zeros((len(x), 1), bool), ended[:, :-1]], 1)
    got = np.where(after_end, END_ID, got)
    if not np.array_equal(got, want):
        raise VerificationError("greedy captions through the ONNX graphs differ from PyTorch")
    return {"encoder_batches": [1, 3], "step_batches": [1, 4], "atol": ATOL,
            "greedy_captions": len(x)}  # fmt: skip
