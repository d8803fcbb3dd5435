"""``kdlab detection-data``: build COCO-format detection sets.

Subcommands (each writes ``OUT/annotations/instances_<split>.json`` and ``OUT/<split>/``, the
layout :meth:`kdlab.tasks.detection.coco.CocoDetection.from_split` reads):

* ``synthetic``: Fashion-MNIST items pasted onto canvases
  (:func:`kdlab.tools.synthetic_detection.make_fashion_mnist_detection`).
* ``voc``: a Pascal-VOC folder converted (:func:`kdlab.tools.voc.import_voc`).
* ``trees``: DeepForest's aerial tree crowns (:func:`kdlab.tools.trees.import_tree_crowns`).

Handlers return the exit status and raise kdlab errors (:mod:`kdlab.core.errors`); the main
CLI turns those into one line and a non-zero exit. Heavy imports happen inside the handlers so that
``kdlab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kdlab.core.errors import ConfigError
from kdlab.tools import synthetic_detection, trees, voc

__all__ = [
    "add_detection_data_parser",
    "cmd_detection_data_synthetic",
    "cmd_detection_data_trees",
    "cmd_detection_data_voc",
]


def cmd_detection_data_synthetic(args: argparse.Namespace) -> int:
    """Handler of ``kdlab detection-data synthetic``: write the synthetic set, print a summary.

    ``--min-size`` / ``--max-size`` (both or neither) replace ``--size`` by a range from which
    each canvas's height and width are drawn. Returns 0; raises :class:`ConfigError` for bad
    options and :class:`~kdlab.core.errors.DatasetError` when Fashion-MNIST is missing.
    """

    if (args.min_size is None) != (args.max_size is None):
        raise ConfigError("give both --min-size and --max-size (or neither, to use --size)")
    size: int | tuple[int, int] = (
        args.size if args.min_size is None else (args.min_size, args.max_size)
    )
    summary = synthetic_detection.make_fashion_mnist_detection(
        args.out,
        fashion_mnist_root=args.fashion_mnist,
        n_train=args.train,
        n_test=args.test,
        size=size,
        objects=tuple(args.objects),
        scale=tuple(args.scale),
        max_overlap=args.max_overlap,
        noise=args.noise,
        seed=args.seed,
    )
    for split, stats in summary["splits"].items():
        sys.stdout.write(
            f"{split}: {stats['images']} images, {stats['boxes']} boxes "
            f"({stats['skipped_objects']} objects skipped) -> {stats['annotation_file']}\n"
        )
    return 0


def _add_synthetic(sub: Any) -> None:
    help_ = "Fashion-MNIST items pasted onto black canvases (train/test from FM's train/test)"
    p = sub.add_parser("synthetic", help=help_, description=help_)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (COCO layout)")
    p.add_argument("--train", type=int, default=1000, metavar="N", help="train images (1000)")
    p.add_argument("--test", type=int, default=200, metavar="N", help="test images (200)")
    p.add_argument("--size", type=int, default=128, metavar="S", help="canvas side (128)")
    p.add_argument("--min-size", type=int, metavar="S", help="random canvas sides from here...")
    p.add_argument("--max-size", type=int, metavar="S", help="...to here (with --min-size)")
    p.add_argument("--objects", type=int, nargs=2, default=[1, 4], metavar=("MIN", "MAX"),
                   help="objects per image (1 4)")  # fmt: skip
    p.add_argument("--scale", type=float, nargs=2, default=[1.0, 3.0], metavar=("MIN", "MAX"),
                   help="object side = 28 * scale (1 3)")  # fmt: skip
    p.add_argument("--max-overlap", type=float, default=0.3, metavar="IOU",
                   help="largest IoU between two objects of an image (0.3)")  # fmt: skip
    p.add_argument("--noise", type=float, default=0.0, metavar="STD",
                   help="Gaussian pixel noise, 0..255 units (0)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="generator seed (0)")
    p.add_argument(
        "--fashion-mnist",
        metavar="DIR",
        help="folder with the Fashion-MNIST IDX files (default: the usual search)",
    )
    p.set_defaults(fn=cmd_detection_data_synthetic)


def cmd_detection_data_voc(args: argparse.Namespace) -> int:
    """Handler of ``kdlab detection-data voc``: convert a Pascal-VOC folder, print a summary.

    ``--split NAME=SET`` (repeatable) maps an output split to an image set; ``--classes`` fixes
    the class order. Returns 0; raises :class:`ConfigError` for a malformed ``--split`` and
    :class:`~kdlab.core.errors.DatasetError` for unusable VOC data.
    """

    splits: dict[str, str] | None = None
    if args.split:
        splits = {}
        for item in args.split:
            name, sep, image_set = item.partition("=")
            if not sep or not name or not image_set:
                raise ConfigError(f"--split {item!r}: expected NAME=SET, e.g. train=trainval")
            splits[name] = image_set
    summary = voc.import_voc(args.voc_root, args.out, splits=splits, classes=args.classes,
                         test_fraction=args.test_fraction, seed=args.seed,
                         difficult_as_crowd=not args.keep_difficult)
    sys.stdout.write(f"classes: {', '.join(summary['classes'])}\n")
    for split, stats in summary["splits"].items():
        sys.stdout.write(f"{split}: {stats['images']} images, {stats['boxes']} boxes "
                         f"({stats['crowd']} difficult as crowd) -> "
                         f"{summary['annotation_files'][split]}\n")
    return 0


def _add_voc(sub: Any) -> None:
    help_ = "convert Pascal-VOC annotations (VOCdevkit/VOC20xx or a folder of XML + images)"
    p = sub.add_parser("voc", help=help_, description=help_)
    p.add_argument("--voc-root", required=True, metavar="DIR",
                   help="VOC20xx folder (or VOCdevkit with one), or *.xml next to images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (COCO layout)")
    p.add_argument("--split", action="append", metavar="NAME=SET",
                   help="output split from ImageSets/Main/SET.txt or a list file (repeatable; "
                        "default trainval/test or train/val, or a seeded split of a plain folder)")
    p.add_argument("--classes", nargs="+", metavar="NAME",
                   help="class names in id order (default: sorted names found)")
    p.add_argument("--test-fraction", type=float, default=0.2, metavar="F",
                   help="plain folder: fraction of images in 'test' (0.2)")
    p.add_argument("--seed", type=int, default=0, help="plain folder: split seed (0)")
    p.add_argument("--keep-difficult", action="store_true",
                   help="'difficult' objects as normal boxes (default: iscrowd=1, ignored)")
    p.set_defaults(fn=cmd_detection_data_voc)


def cmd_detection_data_trees(args: argparse.Namespace) -> int:
    """Handler of ``kdlab detection-data trees``: DeepForest's tree crowns as COCO, with a
    summary. Returns 0; raises :class:`~kdlab.core.errors.DatasetError` without the wheel, for a
    checksum mismatch or a failed download."""

    summary = trees.import_tree_crowns(args.out, wheel=args.wheel, download=args.download,
                                 tile=args.tile, overlap=args.overlap,
                                 min_visible=args.min_visible)
    for split, stats in summary["splits"].items():
        sys.stdout.write(f"{split}: {stats['images']} images, {stats['boxes']} boxes -> "
                         f"{summary['annotation_files'][split]}\n")
    return 0


def _add_trees(sub: Any) -> None:
    help_ = ("DeepForest's annotated aerial tree crowns, one class (train / test: two YELL "
             "crops, tiled; test_other_sites: OSBS_029 + SOAP_061)")
    p = sub.add_parser("trees", help=help_, description=help_)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (COCO layout)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--wheel", metavar="PATH", help="deepforest-2.1.0-py3-none-any.whl")
    src.add_argument("--download", action="store_true",
                     help="pip download --no-deps deepforest==2.1.0 into OUT/_wheel")
    p.add_argument("--tile", type=int, default=400, metavar="PX", help="tile side (400)")
    p.add_argument("--overlap", type=int, default=0, metavar="PX", help="tile overlap (0)")
    p.add_argument("--min-visible", type=float, default=0.5, metavar="F",
                   help="keep a box in a tile when more than F of it is inside (0.5)")
    p.set_defaults(fn=cmd_detection_data_trees)


def add_detection_data_parser(subparsers: Any) -> None:
    """Add ``kdlab detection-data`` (with its subcommands) to the main CLI's subparsers."""
    help_ = "build a COCO-format detection data set (synthetic, voc, trees)"
    p = subparsers.add_parser("detection-data", help=help_, description=help_)
    sub = p.add_subparsers(dest="detection_data_command", required=True, metavar="SOURCE")
    _add_synthetic(sub)
    _add_voc(sub)
    _add_trees(sub)
