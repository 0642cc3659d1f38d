"""The RPN alone on the FPN (paper §5.1, Table 1): ``model.type: rpn``.

Detectron2's ``ProposalNetwork``: Faster R-CNN's first stage (normaliser, ResNet + the
neck, RPN head, proposal generator) trained with the RPN losses and scored by
proposal AR; it has no RoI head and serves no detections.

Call outputs: proposal_boxes [B, N, 4] float32 (y1, x1, y2, x2) in original-image
pixels and proposal_scores [B, N] (objectness probabilities); padded rows have
score 0. Shapes: B images, N = ``rpn.post_nms_topk_test`` proposals per image.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.config import ModelConfig
from fpn_tf.models.faster_rcnn import FasterRCNN
from fpn_tf.models.presets import resolve_model_config

LOSS_KEYS = ("rpn_objectness_loss", "rpn_box_loss", "total_loss")


@keras.saving.register_keras_serializable(package="fpn_tf")
class ProposalNetwork(FasterRCNN):
    """Faster R-CNN's first stage only; inputs as every Detector, outputs in the module docstring."""

    loss_keys = LOSS_KEYS

    def build_layers(self, cfg: ModelConfig) -> None:
        self.build_first_stage(cfg)

    def forward(self, images, image_info, training=False, targets=None, step=None) -> dict:
        return self.propose(
            images, image_info, training=targets is not None, with_anchors=targets is not None
        )

    def loss_terms(self, raw, targets, step=None) -> dict[str, tf.Tensor]:
        return self.rpn_loss_terms(raw, targets, step)

    def postprocess(self, raw, image_info) -> dict:
        proposals = raw["proposals"]
        return {
            "proposal_boxes": self.proposals_to_original(proposals["boxes"], image_info),
            "proposal_scores": proposals["scores"],
        }

    def served_config(self) -> ModelConfig:
        return self.config


def build_proposal_network(
    backbone: str | dict | None = None,
    config: ModelConfig | dict | None = None,
    preset: str | None = None,
    **overrides,
) -> ProposalNetwork:
    """Builds the FPN RPN (§5.1) with the paper's defaults (P2..P6, 3 ratios, one size per level).

    Args:
      backbone: "resnet50" (default), "resnet101", "resnet18", "resnet34", or the
        whole section as a dict, e.g. {"name": "resnet18", "width_multiplier": 0.5}.
      config: a ModelConfig of type "rpn" or a mapping of some of its keys.
      preset: instead of ``config``, "torchvision_v1" (torchvision's RPN graph).
      **overrides: ModelConfig fields, a section as a dict of some of its keys.
    """
    cfg = resolve_model_config("rpn", None, backbone, config, preset, overrides)
    return ProposalNetwork(cfg)
