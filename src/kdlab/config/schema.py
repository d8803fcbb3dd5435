"""The experiment config's typed schema, its validation and its fingerprint.

Architecture contract 5: every hyperparameter that changes a number lives in the config; an
unknown key or a bad value is a :class:`ConfigError` naming the key and the allowed values.
Names (datasets, optimizers, schedules, loggers, tasks) are checked through the registries of
:mod:`kdlab.core.registries` only. Files and overrides are :mod:`kdlab.config.yaml_io`'s.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kdlab.core.errors import ConfigError
from kdlab.core.registries import (
    DATASETS,
    LOGGERS,
    OPTIMIZERS,
    SCHEDULES,
    TASKS,
    split_external,
)
from kdlab.core.registry import check_keys_in_use, unknown_name_message

__all__ = [
    "DETECTION_DATASETS",
    "DataConfig",
    "DetectionConfig",
    "ExperimentConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "PartnerConfig",
    "RESIDENT_DATASETS",
    "RuntimeConfig",
    "SEGMENTATION_DATASETS",
    "STREAMED_DATASETS",
    "SegmentationConfig",
    "SyntheticDataConfig",
    "WandbConfig",
    "dict_fingerprint",
    "fingerprint_dict",
    "format_validation_error",
    "model_in_annotation",
    "validate_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticDataConfig(_Strict):
    """Sizes of the in-memory synthetic dataset (``data.name: synthetic``)."""

    n_train: int = Field(512, ge=1)
    n_test: int = Field(256, ge=1)
    num_classes: int = Field(10, ge=2)
    size: int = Field(32, ge=8)
    channels: int = Field(3, ge=1)
    seed: int = 0


#: datasets held on the device as uint8 tensors (augmented there in batches).
RESIDENT_DATASETS = ("cifar10", "cifar100", "fashion_mnist", "synthetic")
#: datasets streamed from image files through DataLoader workers.
STREAMED_DATASETS = ("imagenet", "cub200", "folder")
#: detection datasets (``task: detection``): ``coco`` is any COCO-format dataset under data.root.
DETECTION_DATASETS = ("coco",)
#: semantic segmentation datasets (``task: segmentation``), each in its own on-disk layout under
#: data.root (docs/segmentation.md): Pascal VOC 2012, Cityscapes (gtFine), ADE20K
#: (ADEChallengeData2016) and kdlab's synthetic Fashion-MNIST set.
SEGMENTATION_DATASETS = ("voc", "cityscapes", "ade20k", "fm_segmentation")


class DataConfig(_Strict):
    """Dataset, batch sizes and augmentation.

    Small datasets (CIFAR, Fashion-MNIST, synthetic) live on the device and are augmented there
    (random crop with ``crop_padding`` + flip); ImageNet, CUB-200 and class folders stream
    through ``num_workers`` DataLoader workers with their protocol's transforms.
    """

    #: a registered dataset (``kdlab.data.registry``, plugins included) or a streamed one.
    name: str = "cifar100"
    root: str | None = None
    download: bool = False
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)
    subset_seed: int = 0
    #: held-out validation: this fraction of every class of the TRAINING set (seeded by
    #: ``subset_seed``, carved before ``train_fraction`` subsets the rest) chooses the best epoch
    #: instead of the test set; 0 = no validation set (docs/data.md, "Validation split").
    val_fraction: float = Field(0.0, ge=0.0, le=0.5)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    crop_padding: int = Field(4, ge=0)
    hflip: bool = True
    synthetic: SyntheticDataConfig = Field(default_factory=SyntheticDataConfig)
    #: streamed datasets only: decoding worker processes, crop size, resize before the crop,
    #: and what to do with an unreadable image ("skip": replace and count, "stop": error).
    num_workers: int = Field(4, ge=0)
    image_size: int = Field(224, ge=8)
    resize: int = Field(256, ge=8)
    on_error: Literal["skip", "stop"] = "skip"
    #: imagenet and folder: the area fraction range of the training random-resized crop;
    #: "auto": ImageNet's (0.08, 1) for imagenet and for folders of image_size >= 128, (0.35, 1)
    #: for smaller folder images (docs/data.md, "Your own images").
    crop_scale: tuple[float, float] | Literal["auto"] = "auto"

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        known = [*DATASETS.names(), *STREAMED_DATASETS, *DETECTION_DATASETS,
                 *SEGMENTATION_DATASETS]
        if v not in known:
            raise ValueError(unknown_name_message("dataset", v, known))
        return v

    @model_validator(mode="after")
    def _stream_rules(self) -> DataConfig:
        if self.name in DETECTION_DATASETS and self.root is None:
            raise ValueError(f"data.root is required for dataset {self.name!r} (the folder "
                             "holding annotations/instances_<split>.json and <split>/)")
        if self.name in SEGMENTATION_DATASETS and self.root is None:
            raise ValueError(f"data.root is required for dataset {self.name!r} (the folder "
                             "holding its images and label maps; docs/segmentation.md)")
        if self.name in STREAMED_DATASETS:
            if self.root is None:
                raise ValueError(f"data.root is required for dataset {self.name!r} (the folder "
                                 "holding its files)")
            if self.train_fraction < 1.0:
                raise ValueError("data.train_fraction < 1 is only supported for the small "
                                 "in-memory datasets")
        if self.crop_scale != "auto" and not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"data.crop_scale must be (min, max) with 0 < min <= max <= 1, got "
                             f"{list(self.crop_scale)}")
        unused = self.inapplicable_keys()
        if unused:
            raise ValueError(f"data.{unused[0]} does not apply to dataset {self.name!r} "
                             f"({_APPLIES_TO[unused[0]]}); remove it")
        return self

    def inapplicable_keys(self) -> list[str]:
        """The keys set to a non-default value that the dataset ``name`` does not read
        (detection and segmentation datasets: not checked here)."""
        if self.name in DETECTION_DATASETS or self.name in SEGMENTATION_DATASETS:
            return []
        if self.name in STREAMED_DATASETS:
            keys = ["crop_padding", "synthetic"] + (["crop_scale"] if self.name == "cub200" else [])
        else:
            keys = ["num_workers", "image_size", "resize", "on_error", "crop_scale"]
            keys += [] if self.name == "synthetic" else ["synthetic"]
        fields = type(self).model_fields
        return [k for k in keys
                if getattr(self, k) != fields[k].get_default(call_default_factory=True)]

    def resolved_crop_scale(self) -> tuple[float, float]:
        """``crop_scale`` with "auto" resolved (see the key's comment)."""
        if self.crop_scale != "auto":
            return self.crop_scale
        small_folder = self.name == "folder" and self.image_size < 128
        return (0.35, 1.0) if small_folder else (0.08, 1.0)


#: which datasets read each DataConfig key that only some of them read.
_APPLIES_TO = {
    "crop_padding": "padded random crops are for the in-memory datasets: cifar10/100, "
                    "fashion_mnist, synthetic",
    "synthetic": "the synthetic dataset only",
    "crop_scale": "the random-resized crop of imagenet and folder data",
    **{k: "streamed datasets only: imagenet, cub200, folder"
       for k in ("num_workers", "image_size", "resize", "on_error")},
}


class DetectionConfig(_Strict):
    """Faster R-CNN with FPN (``task: detection``): data splits, image sizes and detector sizes.

    The defaults are torchvision's ``fasterrcnn_resnet50_fpn`` (and the DKD paper's Detectron2
    setting): 800/1333 px images, FPN width 256, 512 sampled RoIs per image. The configs for
    2 CPU cores shrink them (FPN 64, 128 RoIs, 128-256 px images); see docs/detection.md.
    Teacher and student share these settings (the teacher is run on the student's images and
    proposals).
    """

    #: COCO-format splits under data.root: ``annotations/instances_<split>.json`` + ``<split>/``.
    train_split: str = "train2017"
    test_split: str = "val2017"
    #: drop training images without any (non-crowd) box, as torchvision's reference does.
    drop_empty: bool = True
    #: GeneralizedRCNNTransform: the shorter side is resized to ``min_size`` (the longer side
    #: at most ``max_size``), then normalised with ``image_mean``/``image_std``.
    min_size: int = Field(800, ge=16)
    max_size: int = Field(1333, ge=16)
    image_mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225])
    fpn_channels: int = Field(256, ge=8)
    #: one anchor size per pyramid level (the FPN levels and the extra max-pool level).
    anchor_sizes: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = Field(2000, ge=1)
    rpn_pre_nms_top_n_test: int = Field(1000, ge=1)
    rpn_post_nms_top_n_train: int = Field(2000, ge=1)
    rpn_post_nms_top_n_test: int = Field(1000, ge=1)
    rpn_batch_size_per_image: int = Field(256, ge=1)
    #: RoIs sampled per image for the box head's losses (and distilled).
    box_batch_size_per_image: int = Field(512, ge=1)
    box_positive_fraction: float = Field(0.25, gt=0.0, le=1.0)
    box_score_thresh: float = Field(0.05, ge=0.0, le=1.0)
    box_nms_thresh: float = Field(0.5, gt=0.0, le=1.0)
    box_detections_per_img: int = Field(100, ge=1)
    #: width of the box head's two fully connected layers (TwoMLPHead).
    representation_size: int = Field(1024, ge=8)
    #: RoIAlign of the box head: output grid and sampling points per bin (torchvision: 7, 2).
    roi_output_size: int = Field(7, ge=1)
    roi_sampling_ratio: int = 2
    #: replace the backbone's BatchNorm by frozen statistics (for pretrained backbones and
    #: small batches, as torchvision and Detectron2 do).
    freeze_batchnorm: bool = False
    #: -1: off; k >= 0: draw every training batch from one aspect-ratio group (2k + 2 groups;
    #: torchvision's reference uses 3), see docs/detection.md.
    aspect_ratio_group_factor: int = Field(-1, ge=-1)

    @model_validator(mode="after")
    def _sizes(self) -> DetectionConfig:
        if self.max_size < self.min_size:
            raise ValueError(f"detection.max_size ({self.max_size}) must be >= detection.min_size "
                             f"({self.min_size})")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("detection.image_mean and detection.image_std need 3 values (RGB)")
        if not self.anchor_sizes or not self.aspect_ratios:
            raise ValueError("detection.anchor_sizes and detection.aspect_ratios must not be "
                             "empty")
        return self


class SegmentationConfig(_Strict):
    """Semantic segmentation (``task: segmentation``): the head, the data pipeline and inference.

    The defaults are torchvision's segmentation reference recipe (``references/segmentation``):
    DeepLabV3 at output stride 8, 480 px random crops of images rescaled by a factor in
    [0.5, 2.0] of ``base_size`` 520, horizontal flips, ImageNet normalisation, label 255 ignored,
    auxiliary FCN head weight 0.5 when enabled. The CPU configs shrink the sizes
    (configs/segmentation/fm_synthetic/); see docs/segmentation.md.
    """

    #: the segmentation head on the backbone's last feature map (torchvision's DeepLabHead with
    #: ASPP, FCNHead, LRASPPHead, which also reads the last stride-8 stage, or PSPNet's pyramid
    #: pooling module).
    head: Literal["deeplabv3", "fcn", "lraspp", "pspnet"] = "deeplabv3"
    #: the backbone's output stride: stride-2 convolutions beyond it become stride 1 with
    #: dilation (torchvision's replace_stride_with_dilation); backbones already finer are kept.
    output_stride: Literal[8, 16] = 8
    #: ASPP dilation rates of the deeplabv3 head (torchvision's DeepLabHead: 12, 24, 36).
    atrous_rates: list[int] = Field(default_factory=lambda: [12, 24, 36])
    #: channels of the ASPP branches and of the deeplabv3 head (torchvision: 256).
    aspp_channels: int = Field(256, ge=4)
    #: inner channels of the lraspp head (torchvision: 128).
    lraspp_channels: int = Field(128, ge=4)
    #: pyramid pooling bins of the pspnet head (Zhao et al., CVPR 2017: 1, 2, 3, 6); each
    #: branch has in_channels / len(psp_bins) channels.
    psp_bins: list[int] = Field(default_factory=lambda: [1, 2, 3, 6])
    #: output channels of the pspnet head's 3x3 bottleneck (PSPNet, mmseg: 512 for ResNet-50/101;
    #: CIRKD and CWD: 128 for ResNet-18).
    psp_channels: int = Field(512, ge=4)
    #: an auxiliary FCN head on the stage before the last (torchvision's aux_classifier).
    aux_head: bool = False
    #: weight of the auxiliary head's cross-entropy (torchvision's reference: 0.5).
    aux_weight: float = Field(0.5, ge=0.0)
    #: the label value that is never trained on nor scored (VOC borders, unmapped classes).
    ignore_index: int = Field(255, ge=0, le=255)
    #: the training crop: a side (square) or ``[height, width]`` (CIRKD's Cityscapes crop:
    #: [512, 1024]); padded with image 0 / label ignore_index where the image is smaller. A
    #: pair of equal sides is stored as one int.
    crop_size: int | tuple[int, int] = 480
    #: random rescale factor range of training images (times ``base_size``, or of the image).
    scale_range: tuple[float, float] = (0.5, 2.0)
    #: the shorter side a training image is rescaled around (null: the image's own size).
    base_size: int | None = Field(520, ge=8)
    #: evaluation: the shorter side images are resized to before inference (null: their own
    #: size); scores are always computed at the label map's full resolution.
    eval_size: int | None = Field(None, ge=8)
    #: evaluation: the whole image in one pass, or overlapping windows averaged (mmseg's slide).
    inference: Literal["whole", "sliding"] = "whole"
    #: sliding inference: the window side in pixels (mmseg's crop_size).
    window: int = Field(512, ge=8)
    #: sliding inference: the step between windows in pixels (at most ``window``).
    stride: int = Field(341, ge=1)
    #: RGB mean of the normalisation, in [0, 1] units (ImageNet's).
    image_mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    #: RGB standard deviation of the normalisation, in [0, 1] units (ImageNet's).
    image_std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225])
    #: the training split (VOC: an ImageSets/Segmentation list; Cityscapes: train; ADE20K:
    #: train = training; fm_segmentation: train).
    train_split: str = "train"
    #: the evaluated split (null: val, or test for fm_segmentation).
    test_split: str | None = None
    #: VOC: train on SBD's augmented set (SegmentationClassAug + train_aug.txt) when present.
    voc_augmented: bool = True
    #: head settings of one backbone ``arch`` (a ``student.arch`` or ``teacher.arch``), applied
    #: over this section when that model is built, for a teacher and student whose heads differ
    #: (CIRKD's ResNet-18 heads are half as wide as its ResNet-101's; CWD distils a PSPNet into a
    #: DeepLabV3). Keys: head, output_stride, atrous_rates, aspp_channels, lraspp_channels,
    #: psp_bins, psp_channels, aux_head.
    arch_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("crop_size", mode="before")
    @classmethod
    def _crop_pair(cls, v: Any) -> Any:
        if isinstance(v, list | tuple) and len(v) != 2:
            raise ValueError(f"crop_size must be a side or [height, width], not {len(v)} values")
        return v

    @field_validator("crop_size")
    @classmethod
    def _crop_sides(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        sides = (v, v) if isinstance(v, int) else v
        if min(sides) < 8:
            raise ValueError("crop_size must be a side >= 8 or [height, width], both >= 8")
        return sides[0] if sides[0] == sides[1] else sides

    @model_validator(mode="after")
    def _sizes(self) -> SegmentationConfig:
        lo, hi = self.scale_range
        if not 0.0 < lo <= hi:
            raise ValueError(f"segmentation.scale_range must be (min, max) with 0 < min <= max, "
                             f"got {[lo, hi]}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("segmentation.image_mean and segmentation.image_std need 3 values")
        if not self.atrous_rates or min(self.atrous_rates) < 1:
            raise ValueError("segmentation.atrous_rates must be positive integers")
        if self.stride > self.window:
            raise ValueError(f"segmentation.stride ({self.stride}) must be <= segmentation.window "
                             f"({self.window}) so the windows cover the image")
        if not self.psp_bins or min(self.psp_bins) < 1:
            raise ValueError("segmentation.psp_bins must be positive integers")
        return self

    @model_validator(mode="after")
    def _overrides(self) -> SegmentationConfig:
        head_keys = {"head", "output_stride", "atrous_rates", "aspp_channels", "lraspp_channels",
                     "psp_bins", "psp_channels", "aux_head"}
        for arch, keys in self.arch_overrides.items():
            unknown = sorted(set(keys) - head_keys)
            if unknown:
                raise ValueError(f"segmentation.arch_overrides.{arch}: {unknown} are not head "
                                 f"settings; use {sorted(head_keys)}")
            try:  # the merged section must be valid too
                self.for_arch(arch)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(x) for x in err["loc"])
                raise ValueError(f"segmentation.arch_overrides.{arch}"
                                 f"{'.' + where if where else ''}: "
                                 f"{err['msg'].removeprefix('Value error, ')}") from None
        return self

    def for_arch(self, arch: str) -> SegmentationConfig:
        """This section with ``arch_overrides[arch]`` applied (itself when ``arch`` has none);
        the result has no overrides of its own."""
        if arch not in self.arch_overrides:
            return self
        merged = {**self.model_dump(exclude={"arch_overrides"}), **self.arch_overrides[arch]}
        return SegmentationConfig.model_validate(merged)


class ModelConfig(_Strict):
    """A network of the model zoo (or ``torchvision:NAME`` / ``timm:NAME``, built by that
    library and wrapped by :func:`kdlab.models.adapter.adapt`), optionally initialised from a
    checkpoint or, for those libraries' models, from their pretrained weights."""

    arch: str
    checkpoint: str | None = None
    #: ``torchvision:``/``timm:`` archs only: start from the library's pretrained weights
    #: (fetched into its cache on first use; a new head when the class count differs).
    pretrained: bool = False
    #: teacher only: the value of the task's best metric (top-1 %, AP %) the checkpoint is known
    #: to reach on the test set.
    expected_accuracy: float | None = Field(None, ge=0.0, le=100.0)
    #: teacher only: how far (percentage points) worse than ``expected_accuracy`` stops the run.
    accuracy_tolerance: float = Field(2.0, ge=0.0)
    #: teacher only: distil from a randomly initialised teacher on purpose (speed and smoke
    #: tests); without it a teacher with neither a checkpoint nor pretrained weights stops the run.
    random_init: bool = False

    @model_validator(mode="after")
    def _pretrained_source(self) -> ModelConfig:
        if self.pretrained and split_external(self.arch) is None:
            raise ValueError(f"pretrained: true needs a torchvision:NAME or timm:NAME arch, not "
                             f"{self.arch!r} (zoo models start from a checkpoint)")
        if self.pretrained and self.checkpoint:
            raise ValueError("set either pretrained: true or a checkpoint, not both")
        if self.random_init and (self.pretrained or self.checkpoint):
            raise ValueError("random_init: true means no weights: drop the checkpoint or "
                             "pretrained setting")
        return self


class PartnerConfig(_Strict):
    """A feature/relation partner added to the logit method (FitNet, CRD, ...)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class MethodConfig(_Strict):
    """The distillation method: a logit method (or a partner alone) plus partners.

    The default, ``vanilla``, is cross-entropy alone (teacher training, student baselines).
    """

    name: str = "vanilla"
    params: dict[str, Any] = Field(default_factory=dict)
    partners: list[PartnerConfig] = Field(default_factory=list)


class OptimConfig(_Strict):
    """Optimizer and learning-rate schedule: SGD with momentum and a multi-step schedule (the CRD
    protocol) by default.

    ``name`` picks a registered optimizer (:mod:`kdlab.engine.optimizers`: ``sgd``, ``adamw``)
    and ``scheduler`` a registered schedule (:mod:`kdlab.engine.schedules`: ``multistep``,
    ``cosine``, ``poly``), applied per step after an optional linear warm-up of
    ``warmup_epochs``. A key that only another optimizer or schedule reads (``betas`` with SGD,
    ``milestones`` with cosine) is an error when set.
    """

    name: str = "sgd"
    lr: float = Field(0.05, gt=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    #: sgd: momentum factor and Nesterov momentum.
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    #: adamw: moment decay rates and the denominator's epsilon.
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    #: extra arguments of a registered optimizer, validated against its ``Args`` schema.
    args: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(240, ge=1)
    scheduler: str = "multistep"
    #: multistep: epochs after which the learning rate is multiplied by ``gamma``.
    milestones: list[int] = Field(default_factory=lambda: [150, 180, 210])
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    #: cosine, poly: the final learning rate.
    min_lr: float = Field(0.0, ge=0.0)
    #: poly: the exponent of ``(1 - t / T)`` (CIRKD, CWD, mmseg: 0.9).
    power: float = Field(0.9, gt=0.0)
    #: linear learning-rate warm-up over this many epochs (fractions allowed), applied per step.
    warmup_epochs: float = Field(0.0, ge=0.0)
    #: learning-rate rule for the global batch (``data.batch_size``): "none" keeps ``lr``;
    #: "linear"/"sqrt" scale it by (the square root of) batch_size / base_batch_size.
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    base_batch_size: int = Field(64, ge=1)
    #: "auto": the method's published setting (SDD methods clip at 40), a number, or null (off).
    clip_grad_norm: float | Literal["auto"] | None = "auto"

    @field_validator("milestones")
    @classmethod
    def _sorted_positive(cls, v: list[int]) -> list[int]:
        if any(m < 1 for m in v) or v != sorted(v):
            raise ValueError("milestones must be positive epoch numbers in increasing order")
        return v

    @field_validator("clip_grad_norm")
    @classmethod
    def _positive_clip(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and v <= 0:
            raise ValueError("clip_grad_norm must be > 0, 'auto' or null")
        return v

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("betas must be two numbers in [0, 1)")
        return v

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        OPTIMIZERS.get(v)
        return v

    @field_validator("scheduler")
    @classmethod
    def _known_schedule(cls, v: str) -> str:
        SCHEDULES.get(v)
        return v

    @model_validator(mode="after")
    def _keys_of_the_chosen_optimizer(self) -> OptimConfig:
        # keys given a non-default value (a resolved config file lists every key)
        changed = {k for k in self.model_fields_set
                   if getattr(self, k) != type(self).model_fields[k].get_default(
                       call_default_factory=True)}
        check_keys_in_use(OPTIMIZERS, self.name, changed)
        _check_optimizer_args(self.name, self.args)
        check_keys_in_use(SCHEDULES, self.scheduler, changed)
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs "
                             f"({self.epochs})")
        return self


def _check_optimizer_args(name: str, args: dict[str, Any]) -> None:
    """Raise ``ValueError`` when ``optim.args`` do not fit optimizer ``name``'s ``Args`` schema."""
    schema = OPTIMIZERS.get(name).Args
    try:
        schema.model_validate(args)
    except ValidationError as e:
        raise ValueError(format_validation_error(e, schema, prefix="optim.args")) from e


class WandbConfig(_Strict):
    """The ``wandb`` logger's settings (``runtime.loggers``; Weights & Biases, ``wandb.init``)."""

    #: the W&B project the run is logged into.
    project: str = "kdlab"
    #: the W&B user or team (null: the logged-in user's default).
    entity: str | None = None
    #: the run's name in W&B; null: ``NAME/seedSEED`` (the config's ``name`` and ``seed``).
    name: str | None = None
    #: W&B group of the run (e.g. a sweep's name), null: none.
    group: str | None = None
    #: W&B tags of the run.
    tags: list[str] = Field(default_factory=list)
    #: "offline": written under RUN_DIR/wandb only (upload later with ``wandb sync``);
    #: "online": streamed to the W&B server (needs ``wandb login``); "disabled": nothing.
    mode: Literal["offline", "online", "disabled"] = "offline"


class RuntimeConfig(_Strict):
    """Where and how fast to run. None of these change the mathematics of a method."""

    device: str = "auto"
    #: "auto": bf16 autocast where the hardware supports it (CUDA, CPUs with AVX512-BF16/AMX).
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    #: torch.compile the student's and the teacher's forward (the student's backward with it).
    compile: bool = False
    #: torch.compile mode: "reduce-overhead" captures CUDA graphs (pays on GPUs for small models
    #: whose step is launch bound), "max-autotune" also autotunes GEMMs/convolutions.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    threads: int | None = Field(None, ge=1)
    #: bit-reproducible kernels (torch.use_deterministic_algorithms); slower on GPU.
    deterministic: bool = False
    #: what to do with a step whose loss is NaN/Inf: stop the run, or skip the step.
    non_finite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = Field(10, ge=0)
    #: distributed runs: replace BatchNorm by SyncBatchNorm (statistics over the global batch).
    sync_batchnorm: bool = False
    #: steps between host synchronisations (progress bar, non-finite check).
    log_every: int = Field(50, ge=1)
    eval_every: int = Field(1, ge=1)
    #: also checkpoint every this many steps inside an epoch (0: only at epoch ends), and on
    #: SIGTERM/SIGINT, so that ``--resume`` continues mid-epoch (every rank's state under torchrun).
    checkpoint_every_steps: int = Field(0, ge=0)
    #: where metrics go, per step (every ``log_every`` steps) and per epoch, from rank 0:
    #: jsonl (metrics.jsonl, always written), csv, tensorboard, wandb, or a registered logger.
    loggers: list[str] = Field(default_factory=lambda: ["jsonl"])
    #: settings of the ``wandb`` logger (project, mode, names).
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @field_validator("loggers")
    @classmethod
    def _known_loggers(cls, v: list[str]) -> list[str]:
        for i, name in enumerate(v):
            if name not in LOGGERS:
                raise ValueError(unknown_name_message("logger", name, LOGGERS.names()))
            if name in v[:i]:
                raise ValueError(f"logger {name!r} is listed twice")
        return v

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` (in a file or in --set runtime.amp=off) as False
        return "off" if v is False else v


class ExperimentConfig(_Strict):
    """One run: data, student (and teacher), method, optimiser, runtime."""

    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs"
    #: plugin modules (dotted names or .py paths) imported before the config is validated.
    plugins: list[str] = Field(default_factory=list)
    data: DataConfig = Field(default_factory=DataConfig)
    student: ModelConfig
    teacher: ModelConfig | None = None
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    #: the task type (:mod:`kdlab.tasks`): what a batch, a model output and a metric are.
    task: str = "classification"
    #: ``task: detection`` only: the detector and its data (defaults when left out).
    detection: DetectionConfig | None = None
    #: ``task: segmentation`` only: the segmentation head and data pipeline (defaults when left
    #: out).
    segmentation: SegmentationConfig | None = None

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        TASKS.get(v)
        return v

    @model_validator(mode="after")
    def _task_data(self) -> ExperimentConfig:
        """The data set and the task-specific sections fit the task (each task declares the data
        sets it reads and its config section: :class:`kdlab.tasks.base.Task`)."""
        task = TASKS.get(self.task)
        claimed = {n: cls for _, cls in TASKS.items() for n in (cls.data_sets or ())}
        if task.data_sets is not None and self.data.name not in task.data_sets:
            raise ValueError(f"task {self.task!r} reads {task.data_description}: set data.name "
                             f"to one of {list(task.data_sets)} (got {self.data.name!r})")
        owner = claimed.get(self.data.name)
        if task.data_sets is None and owner is not None:
            raise ValueError(f"dataset {self.data.name!r} is a {owner.name} dataset: set "
                             f"task: {owner.name}")
        for _, cls in TASKS.items():
            section = cls.config_section
            if section and getattr(self, section, None) is not None and cls is not task:
                raise ValueError(f"the {section} section applies to task: {cls.name} only")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-serialisable dict of the resolved config."""
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """sha256 of the settings that define the run's numbers (runtime speed knobs excluded).

        Computed on the v1 canonical form (:func:`_v1_canonical`), so a run made before a key
        was added or renamed keeps its fingerprint and still resumes.
        """
        return dict_fingerprint(self.to_dict())


#: keys added after v1 (0.1.0) with the value that reproduces v1 behaviour: left out of the
#: fingerprint at that value (see docs/decisions.md, "fingerprints across versions").
_ADDED_AFTER_V1: dict[tuple[str, ...], Any] = {
    ("task",): "classification",
    ("plugins",): [],
    ("optim", "name"): "sgd",
    ("optim", "scheduler"): "multistep",
    ("optim", "warmup_epochs"): 0.0,
    ("optim", "min_lr"): 0.0,
    ("optim", "power"): 0.9,
    ("optim", "betas"): [0.9, 0.999],
    ("optim", "eps"): 1e-8,
    ("optim", "args"): {},
    ("student", "pretrained"): False,
    ("teacher", "pretrained"): False,
    ("student", "random_init"): False,
    ("teacher", "random_init"): False,
    ("runtime", "loggers"): ["jsonl"],
    ("runtime", "wandb"): WandbConfig().model_dump(mode="json"),
    ("data", "val_fraction"): 0.0,
    ("data", "crop_scale"): "auto",
    ("detection",): None,
    ("segmentation",): None,
}
#: method parameters renamed after v1: new name -> v1 name (the v1 name stays accepted).
_RENAMED_METHOD_PARAMS = {"warmup_epochs": "warmup"}
#: methods whose v1 parameter had the old name (ReviewKD always said ``warmup_epochs``).
_V1_WARMUP_METHODS = frozenset({"dkd", "nkd", "dckd", "sd_dkd", "sd_nkd"})


def _v1_canonical(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (a resolved config dict) as kdlab 0.1.0 wrote it, for fingerprints."""
    d = copy.deepcopy(d)
    for path, neutral in _ADDED_AFTER_V1.items():
        node = d
        for key in path[:-1]:
            node = node.get(key) or {}  # a section set to null (teacher) holds no key
        if path[-1] in node and node[path[-1]] == neutral:
            del node[path[-1]]
    method = d.get("method", {})
    if method.get("name") in _V1_WARMUP_METHODS:
        params = method.get("params", {})
        for new, old in _RENAMED_METHOD_PARAMS.items():
            if new in params and old not in params:
                params[old] = params.pop(new)
    return d


def fingerprint_dict(d: dict[str, Any]) -> dict[str, Any]:
    """The canonical form of a resolved config dict that the fingerprint hashes: the v1 form
    (:func:`_v1_canonical`) without ``output_dir`` and the runtime keys that do not define the
    run's numbers. Two configs differ as runs exactly where these dicts differ."""
    d = _v1_canonical(d)
    # speed knobs and the non-finite policy (which the NaN error suggests switching before
    # --resume) do not define the run
    runtime = d.get("runtime")
    if isinstance(runtime, dict):
        for k in ("device", "threads", "log_every", "compile", "compile_mode", "non_finite",
                  "max_skipped_steps", "checkpoint_every_steps", "loggers", "wandb"):
            runtime.pop(k, None)
    d.pop("output_dir", None)
    return d


def dict_fingerprint(d: dict[str, Any]) -> str:
    """sha256 of :func:`fingerprint_dict` of a resolved config dict (what
    :meth:`ExperimentConfig.fingerprint` returns for its ``to_dict()``)."""
    return hashlib.sha256(json.dumps(fingerprint_dict(d), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- loading


def format_validation_error(err: ValidationError, schema: type[BaseModel], prefix: str = "") -> str:
    """One line per problem: ``key.path: what is wrong (allowed: ...)``."""
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        key = ".".join(([prefix] if prefix else []) + loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, e["loc"][:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"unknown config key {key!r}{hint}")
        elif e["type"] == "missing":
            lines.append(f"config key {key!r} is required")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"config key {key!r}: {e['msg']}{shown}")
    return "; ".join(lines)


def _allowed_keys(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: Any = schema
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = model_in_annotation(field.annotation)
        if model is None:
            return []
    return sorted(getattr(model, "model_fields", {}))


def model_in_annotation(ann: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's annotation (``ModelConfig | None``,
    ``list[PartnerConfig]``), or None: how the config schema nests its sections."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = model_in_annotation(arg)
        if found is not None:
            return found
    return None


def validate_config(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a plain dict into an :class:`ExperimentConfig` (ConfigError on any problem)."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e, ExperimentConfig)}") from e
