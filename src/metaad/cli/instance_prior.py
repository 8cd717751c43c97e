"""``metaad train-prior``: train the instance-prior generator P (Metaformer §3.2) as a Visual-Effect GAN."""

from __future__ import annotations

import argparse
import shlex
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train-prior`` to ``metaad``'s sub-commands."""
    parser = subparsers.add_parser(
        "train-prior",
        help="train the instance-prior generator (colour-selectivo GAN) on saliency folders",
        description=(
            "Train the instance-prior generator P of Metaformer as a Visual-Effect GAN. Each --data folder "
            "holds images/ and masks/; a seeded part of the images and masks makes real colour-selectivo "
            "photos, a disjoint part's images (never their masks) train the generator. Checkpoints every "
            "epoch in --out; --resume continues after an interruption."
        ),
    )
    parser.add_argument("--data", nargs="+", required=True, metavar="DIR", help="saliency folders (images/, masks/)")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint, log.jsonl and the exported generator")
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu", help="PriorTrainingConfig.PRESETS")
    parser.add_argument("--epochs", type=int, help="override the preset's number of epochs")
    parser.add_argument("--batch-size", type=int, help="override the preset's batch size")
    parser.add_argument("--lr", type=float, help="override the preset's learning rate")
    parser.add_argument("--seed", type=int, help="seed of the data split, initialisation and sampling")
    parser.add_argument("--max-steps-per-epoch", type=int, help="cap the steps per epoch (smoke runs)")
    parser.add_argument("--encoder-weights", metavar="PATH", help="local ImageNet weights for the encoder")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    parser.add_argument("--export", metavar="PATH", help="also write the generator here (.safetensors + .json)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from metaad.models.metaformer.prior_training import PriorTrainingConfig, train_instance_prior

    config = PriorTrainingConfig.from_preset(
        args.preset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_steps_per_epoch=args.max_steps_per_epoch,
        encoder_weights=args.encoder_weights,
    )
    command = "metaad " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        train_instance_prior(
            args.data,
            args.out,
            config,
            resume=args.resume,
            export=args.export,
            device=args.device,
            progress=not args.no_progress,
            command=command,
        )
    except FileExistsError as error:  # a checkpoint in --out without --resume
        print(f"metaad train-prior: error: {error}", file=sys.stderr)
        return 2
    print(
        f"instance prior written to {args.out}/instance_prior.safetensors"
        + (f" and {args.export}" if args.export else "")
    )
    return 0
