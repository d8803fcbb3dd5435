"""``kdlab segmentation-data``: build semantic segmentation sets.

Subcommands:

* ``synthetic``: Fashion-MNIST items pasted onto canvases with pixel-exact label maps
  (:func:`kdlab.tasks.segmentation.synthetic.make_fashion_mnist_segmentation`), in the layout
  ``data.name: fm_segmentation`` reads.

Handlers return the exit status and raise kdlab errors (:mod:`kdlab.core.errors`); the main CLI
turns those into one line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_segmentation_data_parser", "cmd_segmentation_data_synthetic"]


def cmd_segmentation_data_synthetic(args: argparse.Namespace) -> int:
    """Handler of ``kdlab segmentation-data synthetic``: write the set, print a summary.
    Returns 0; raises :class:`~kdlab.core.errors.ConfigError` for bad options and
    :class:`~kdlab.core.errors.DatasetError` when Fashion-MNIST is missing."""
    from kdlab.tasks.segmentation.synthetic import make_fashion_mnist_segmentation

    summary = make_fashion_mnist_segmentation(
        args.out, fashion_mnist_root=args.fashion_mnist, n_train=args.train, n_test=args.test,
        size=args.size, objects=tuple(args.objects), scale=tuple(args.scale), seed=args.seed)
    for split, stats in summary["splits"].items():
        fg = sum(stats["pixels"][1:]) / max(sum(stats["pixels"]), 1)
        sys.stdout.write(f"{split}: {stats['images']} images ({100 * fg:.1f}% item pixels) -> "
                         f"{stats['folder']}\n")
    return 0


def _add_synthetic(sub: Any) -> None:
    help_ = "Fashion-MNIST items pasted onto black canvases, with pixel-exact label maps"
    p = sub.add_parser("synthetic", help=help_, description=help_)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--train", type=int, default=1000, metavar="N", help="train images (1000)")
    p.add_argument("--test", type=int, default=200, metavar="N", help="test images (200)")
    p.add_argument("--size", type=int, default=64, metavar="S", help="canvas side (64)")
    p.add_argument("--objects", type=int, nargs=2, default=[1, 3], metavar=("MIN", "MAX"),
                   help="items per image (1 3)")  # fmt: skip
    p.add_argument("--scale", type=int, nargs=2, default=[1, 2], metavar=("MIN", "MAX"),
                   help="integer enlargement of the 28 px items (1 2)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="generator seed (0)")
    p.add_argument("--fashion-mnist", metavar="DIR",
                   help="folder with the Fashion-MNIST IDX files (default: the usual search)")
    p.set_defaults(fn=cmd_segmentation_data_synthetic)


def add_segmentation_data_parser(subparsers: Any) -> None:
    """Add ``kdlab segmentation-data`` (with its subcommands) to the main CLI's subparsers."""
    help_ = "build a semantic segmentation data set (synthetic)"
    p = subparsers.add_parser("segmentation-data", help=help_, description=help_)
    sub = p.add_subparsers(dest="segmentation_data_command", required=True, metavar="SOURCE")
    _add_synthetic(sub)
