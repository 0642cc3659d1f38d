"""Config sections of the heads that only some detectors have (``ModelConfig`` fields).

``mask_head`` (Mask R-CNN), ``retinanet`` (RetinaNet) and ``segment`` (segment
proposals, FPN §6); the shared parts (backbone, FPN, anchors, RPN, RoI head, input)
are in ``fpn_tf.config``. Plain dataclasses, loaded from YAML by ``fpn_tf.config``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MaskHeadConfig:
    """The Mask R-CNN mask branch (He et al. 2017; torchvision / Detectron2 layout)."""

    pooler_resolution: int = 14  # mask RoIAlign side, P2..P5 by eq. (1) as the box branch
    sampling_ratio: int = 2
    num_convs: int = 4  # 3x3 convs before the 2x2 stride-2 transposed conv
    conv_channels: int = 256
    # Training pools masks for the first ``positive_fraction * roi_head.batch_size_per_image``
    # sampled RoIs (positives come first): a fixed-size subset for static shapes that
    # holds every sampled positive (the sampler never takes more).
    loss_weight: float = 1.0


@dataclass
class RetinaNetConfig:
    """RetinaNet's dense head, focal loss and inference (Lin et al. 2017b, "Focal Loss").

    Defaults are the paper's / Detectron2's; the ``torchvision_v1`` preset
    (fpn_tf.models.presets) changes what torchvision's ``retinanet_resnet50_fpn`` does
    differently. The pyramid (P3..P7) and the base anchor sizes (32..512) are
    ``model.fpn`` and ``model.anchors``; for ``model.type: retinanet`` the ``""`` preset
    of fpn_tf.models.presets sets them.
    """

    # Anchors: sizes[level] * 2**(i / scales_per_octave), i = 0..scales_per_octave-1
    scales_per_octave: int = 3
    truncate_anchor_sizes: bool = False  # torchvision: int(32 * 2**(1/3)) = 40, not 40.3
    num_convs: int = 4  # 3x3 conv + ReLU layers of each tower (class, box)
    conv_channels: int = 0  # 0 -> the pyramid's channels
    norm: str = "none"  # none | group_norm (GroupNorm(32) after each tower conv: torchvision v2)
    prior_probability: float = 0.01  # class-logit bias init -log((1 - p) / p)
    # False: K-1 sigmoid channels per anchor (label k -> channel k-1, background has none:
    # Detectron2). True: K channels, channel 0 trained towards 0 and ignored at inference
    # (torchvision's layout, needed to import its weights).
    background_channel: bool = False
    positive_iou: float = 0.5
    negative_iou: float = 0.4
    allow_low_quality_matches: bool = True  # each GT's best anchors are positive (torchvision, D2)
    box_coder_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: str = "smooth_l1"  # smooth_l1 | l1 (torchvision v1)
    smooth_l1_beta: float = 0.1  # Detectron2's RetinaNet
    # batch: losses summed over the batch / positive anchors of the batch (paper, Detectron2);
    # image: per image / its positive anchors, then averaged over images (torchvision).
    loss_normalization: str = "batch"
    class_loss_weight: float = 1.0
    box_loss_weight: float = 1.0
    score_threshold: float = 0.05
    topk_candidates: int = 1000  # per level, before NMS
    nms_iou: float = 0.5  # per class
    detections_per_image: int = 100


@dataclass
class SegmentProposalConfig:
    """FPN segmentation proposals (§6, Appendix A); every default is the paper's.

    The head is a "5×5 MLP" (a ``k×k`` conv with ``hidden_dim`` outputs, then
    sibling 1×1 convs: ``mask_size²`` mask logits and 1 object score), shared by
    all levels; a second one with a 7×7 window handles half octaves (``mlps``).
    An object of scale ``s = max(w, h)`` of its mask goes to the (level, MLP) whose
    canonical scale (``scales[k - 2]`` on P_k, × √2 for the 7×7 MLP) is nearest in
    log space; the mask output covers ``(1 + padding)`` × that scale.
    """

    mlps: tuple[int, ...] = (5, 7)  # window sizes: (5,), (7,) or (5, 7)
    hidden_dim: int = 512
    mask_size: int = 14  # 14 (paper's baseline) or 28 ("2x mask resolution")
    # canonical object scale of P2, P3, ... for the 5×5 MLP (×√2 for the 7×7)
    scales: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    padding: float = 0.25  # mask region = (1 + padding) × canonical scale
    levels: tuple[int, ...] = ()  # pyramid levels the head runs on; () = all
    # Objects farther than this (octaves) from every canonical scale are not
    # positives; 0 = none is too far (the paper: the nearest scale in log space).
    max_scale_distance: float = 0.0
    batch_size_per_image: int = 128
    positive_fraction: float = 0.25  # 1 : 3 positives : negatives
    mask_loss_weight: float = 10.0  # relative to the score loss
    proposals_per_image: int = 1000  # masks at the top-scoring locations, no NMS
    # The image-pyramid baseline (DeepMask's 2^{-2:0.5:1}): () = off. When set, the
    # model runs on every scale at inference (proposals merged to the top ones) and
    # trains on the batch resized by scale[step % len] (scale jitter).
    image_pyramid: tuple[float, ...] = ()
