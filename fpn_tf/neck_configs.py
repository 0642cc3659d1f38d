"""The neck's config section (``model.neck``): which pyramid the detector's heads read.

``type`` picks the neck (the list is ``fpn_tf.detector_types.NECK_TYPES``); the levels
and the channel count are ``model.fpn``'s (``min_level``, ``max_level``, ``num_channels``,
``extra_block``, ``num_extra_levels``) whatever the neck, so a YAML that swaps the neck
keeps its anchors and heads. Options that only one neck has are fields below.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NeckConfig:
    type: str = "fpn"  # fpn (Lin et al. 2017, default) | pafpn (PANet's bottom-up path)
    # pafpn: "paper" (PANet §3.1: ReLU after each conv, the stride-2 conv reads N_{k-1}) or
    # "mmdetection" (its PAFPN: no activation, the stride-2 conv reads the running sum).
    pafpn_style: str = "paper"
