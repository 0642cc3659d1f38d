"""Pyramid level names and the one computation of which levels a config builds (TF-free).

A level is named by its number (``"P3"``: stride 2**3; ``"C4"``: a backbone map). The
neck builders (``fpn_tf.models.fpn_backbone`` and the necks of ``NECK_TYPES``), the
config checks and the anchor / RoI code read the levels from here.
"""

from __future__ import annotations


def level_number(name: str) -> int:
    """``"P4"`` / ``"C4"`` -> 4."""
    return int(name[1:])


def backbone_levels(fpn) -> list[str]:
    """The backbone maps a neck reads: ``C<min_level>..C<max_level>`` (one map for the c4 / c5 variant)."""
    if fpn.variant in ("c4", "c5"):
        return [fpn.variant.upper()]
    return [f"C{k}" for k in range(fpn.min_level, fpn.max_level + 1)]


def pyramid_levels(fpn) -> list[int]:
    """The level numbers of the pyramid ``fpn`` (an ``FPNConfig``) describes, finest first.

    ``min_level..max_level`` from the backbone, then ``num_extra_levels`` more unless
    ``extra_block`` is "none"; the paper's single-map variants give one level
    (``p2_only``: P_min; ``c4`` / ``c5``: the backbone map C4 / C5 itself).
    """
    if fpn.variant in ("c4", "c5"):
        return [int(fpn.variant[1])]
    if fpn.variant == "p2_only":
        return [fpn.min_level]
    levels = list(range(fpn.min_level, fpn.max_level + 1))
    if fpn.extra_block != "none":
        levels += [fpn.max_level + k for k in range(1, fpn.num_extra_levels + 1)]
    return levels


def pyramid_level_names(fpn) -> list[str]:
    """``pyramid_levels`` as names: ``["P2", ..., "P6"]`` (``["C4"]`` for the c4 variant)."""
    prefix = "C" if fpn.variant in ("c4", "c5") else "P"
    return [f"{prefix}{k}" for k in pyramid_levels(fpn)]
