"""``metaad meta-train``: unsupervised meta-training of a universal Metaformer (Algorithm 1).

Feature space (the default):  metaad meta-train --wild DIR [DIR ...] --out DIR [--param adapt_steps=30 ...]
Pixel space (the paper's):    metaad meta-train --space pixel --wild DIR ... --out DIR --preset cpu|paper
  data-parallel:               torchrun --nproc-per-node N -m metaad.cli.main meta-train --space pixel ...
Then adapt and evaluate:  metaad fit --model metaformer --param init=OUT/universal.safetensors --shots K ...
(with the same --param settings of the architecture as meta-training had)
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``meta-train`` command."""
    parser = subparsers.add_parser(
        "meta-train",
        help="meta-train a universal Metaformer on folders of wild images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--wild",
        nargs="+",
        required=True,
        metavar="DIR",
        help="folders of wild images (their images/ subfolder when present; masks are never read)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder: universal.safetensors, checkpoint.safetensors, progress.json, and caches of the "
        "meta-tasks and of the wild images' priors",
    )
    parser.add_argument(
        "--space", choices=("feature", "pixel"), default="feature",
        help="what A reconstructs: frozen backbone features (default) or pixels (the paper's)",
    )
    parser.add_argument(
        "--preset",
        choices=("cpu", "paper", "tiny"),  # the configs' PRESETS, literal so that --help needs no torch
        default="cpu",
        help="pixel space: 'paper' 256 px, full width, 100 epochs, batch 64 (GPU); 'cpu' 64 px, width 1/8. "
        "Feature space: 'cpu' (20 epochs) or 'tiny' (one short epoch, for tests)",
    )
    parser.add_argument(
        "--algorithm", choices=("fomaml", "reptile"), default=None,
        help="feature space: the outer update, first-order MAML (default) or Reptile",
    )
    parser.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE",
        help="feature space: a Metaformer argument for the model meta-trained (architecture: taps, bottleneck, "
        "hidden; inner loop = adaptation: adapt_steps, lr, adapt_optimizer, batch_size); repeatable",
    )
    parser.add_argument(
        "--configuration",
        choices=("A", "A+P", "A+P+T"),  # metaformer.CONFIGURATIONS (Table 3)
        default=None,
        help="Table 3 variant to meta-train (default: the shipped model's, A in feature space, A+P+T in pixel space)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    order = parser.add_mutually_exclusive_group()
    order.add_argument(
        "--first-order", dest="first_order", action="store_const", const=True, default=None,
        help="first-order MAML (no second derivatives); default: the preset's",
    )
    order.add_argument(
        "--second-order", dest="first_order", action="store_const", const=False, help="second-order MAML (eq. 5)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's number of epochs")
    parser.add_argument(
        "--mixed-precision", action="store_true",
        help="pixel space: forward passes under bfloat16 autocast, the losses in float32 (for a GPU)",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="pixel space: channels-last memory layout (for a GPU)"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, metavar="PX",
        help="override the preset's image side (a multiple of 32; cpu 64, paper 256); adapt the result with "
        "--param image_size=PX",
    )
    parser.add_argument(
        "--width", type=float, default=None, metavar="MULTIPLIER",
        help="override the preset's channel width multiplier (cpu 0.125, paper 1.0); adapt the result with "
        "--param width_multiplier=MULTIPLIER",
    )
    parser.add_argument(
        "--prior",
        default=None,
        help="instance-prior weights (.safetensors); default: the shipped generator; "
        "'center-bias' for the built-in stand-in",
    )
    parser.add_argument(
        "--backbone",
        default="tf_efficientnet_lite0",
        help="embedding backbone for the meta-tasks (the paper: resnet18 with --backbone-weights)",
    )
    parser.add_argument("--backbone-weights", default=None, metavar="FILE", help="local weights file for --backbone")
    parser.add_argument("--group-size", type=int, default=200, help="images per fine group (§4: about 200)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the meta-tasks and the initial weights (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.set_defaults(handler=run_meta_train)


def run_meta_train(args: argparse.Namespace) -> int:
    """Handler of ``metaad meta-train``: prints the universal checkpoint's path."""
    if args.space == "feature":
        return _run_feature_meta_train(args)
    if args.preset == "tiny" or args.param or args.algorithm:
        raise SystemExit("metaad meta-train --space pixel: --preset tiny, --param and --algorithm are for the "
                         "feature space")
    from metaad.models.metaformer.maml import distributed_context, run_meta_training

    path = run_meta_training(
        wild=args.wild,
        out=args.out,
        preset=args.preset,
        configuration=args.configuration or "A+P+T",
        resume=args.resume,
        first_order=args.first_order,
        epochs=args.epochs,
        image_size=args.image_size,
        width_multiplier=args.width,
        prior=args.prior,
        backbone=args.backbone,
        backbone_weights=args.backbone_weights,
        group_size=args.group_size,
        seed=args.seed,
        device=args.device,
        mixed_precision=args.mixed_precision,
        channels_last=args.channels_last,
    )
    if distributed_context()[0] == 0:
        print(path)
    return 0


def _run_feature_meta_train(args: argparse.Namespace) -> int:
    from metaad.cli.commands import _model_params

    params = _model_params(args)
    pixel_only = [flag for flag, value in (("--image-size", args.image_size), ("--width", args.width),
                                           ("--first-order/--second-order", args.first_order),
                                           ("--mixed-precision", args.mixed_precision or None),
                                           ("--channels-last", args.channels_last or None)) if value is not None]
    if pixel_only:
        raise SystemExit(f"metaad meta-train --space feature: {', '.join(pixel_only)} are for --space pixel "
                         "(set the feature model's architecture with --param)")
    if args.preset == "paper":
        raise SystemExit("metaad meta-train --space feature has presets 'cpu' and 'tiny'; 'paper' is pixel space")
    from metaad.models import check_params
    from metaad.models.metaformer.feature_meta import run_feature_meta_training

    check_params("metaformer", params)
    path = run_feature_meta_training(
        wild=args.wild, out=args.out, preset=args.preset, configuration=args.configuration, resume=args.resume,
        epochs=args.epochs, algorithm=args.algorithm, model_params=params, prior=args.prior,
        backbone=args.backbone, backbone_weights=args.backbone_weights, group_size=args.group_size,
        seed=args.seed, device=args.device,
    )
    print(path)
    return 0
