"""`python -m training <name> [flags]`: train a registered architecture into a checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from training import registry, train_captioner, train_classifier, train_lm

TRAINERS = {
    "classifier": train_classifier,
    "language_model": train_lm,
    "captioner": train_captioner,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("arch", help="architecture: " + ", ".join(registry.names()))
    p.add_argument("--out", type=Path, help="checkpoint path (default checkpoints/<arch>.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="a few steps on tiny data")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    known, _ = p.parse_known_args(argv)
    try:
        arch = registry.get_arch(known.arch)
    except KeyError as exc:
        p.error(exc.args[0])
    trainer = TRAINERS[arch.task]
    trainer.add_arguments(p)
    args = p.parse_args(argv)
    args.out = args.out or Path("checkpoints") / f"{args.arch}.pt"
    try:
        getattr(trainer, "check_args", lambda args: None)(args)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    TRAINERS[registry.get_arch(args.arch).task].train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
