"""The keys spandrel's architecture detection needs: a filter that needs no spandrel import.

spandrel detects an architecture from key names alone (every detection in its
MAIN_REGISTRY is a `KeyCondition` of "has all" / "has any" of some keys). For
each architecture, `ANCHORS` holds alternatives of one or two keys that such a
condition implies: a state dict that has every key of no alternative of any
architecture is not one spandrel detects, so merger need not import spandrel
(seconds, with torch and torchvision) to say so. The table is derived from the
spandrel version it names (`python -m merger.archs.spandrel_keys` prints it
again from the installed one; a test compares the two), and used only when that
version is the one installed.

May import: merger.core (nothing here imports spandrel at module level).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: the spandrel version `ANCHORS` was derived from
SPANDREL_VERSION = "0.4.2"

#: architecture id -> alternatives; detection implies every key of at least one alternative
ANCHORS: dict[str, tuple[tuple[str, ...], ...]] = {
    "Compact": (("body.0.weight", "body.1.weight"),),
    "SwiftSRGAN": (("initial.cnn.depthwise.weight", "final_conv.pointwise.weight"),),
    "HAT": (
        (
            "layers.0.residual_group.blocks.0.conv_block.cab.3.attention.1.weight",
            "layers.0.residual_group.blocks.0.conv_block.cab.3.attention.3.weight",
        ),
    ),
    "GRL": (
        (
            "layers.0.blocks.0.attn.stripe_attn.attn_transform1.logit_scale",
            "layers.0.blocks.0.attn.window_attn.attn_transform.logit_scale",
        ),
        (
            "model.layers.0.blocks.0.attn.stripe_attn.attn_transform1.logit_scale",
            "model.layers.0.blocks.0.attn.window_attn.attn_transform.logit_scale",
        ),
        (
            "model_g.layers.0.blocks.0.attn.stripe_attn.attn_transform1.logit_scale",
            "model_g.layers.0.blocks.0.attn.window_attn.attn_transform.logit_scale",
        ),
    ),
    "Swin2SR": (
        (
            "layers.0.residual_group.blocks.0.attn.relative_position_index",
            "layers.0.residual_group.blocks.0.mlp.fc1.bias",
        ),
    ),
    "SwinIR": (
        (
            "layers.0.residual_group.blocks.0.attn.relative_position_index",
            "layers.0.residual_group.blocks.0.mlp.fc1.bias",
        ),
    ),
    "GFPGAN": (("stylegan_decoder.style_mlp.1.weight", "toRGB.0.weight"),),
    "RestoreFormer": (("encoder.down.0.block.0.norm1.weight", "quantize.embedding.weight"),),
    "LaMa": (("model.model.1.bn_l.running_mean",), ("generator.model.1.bn_l.running_mean",)),
    "OmniSR": (("residual_layer.0.residual_layer.0.layer.0.fn.0.weight", "input.weight"),),
    "SCUNet": (("m_head.0.weight", "m_tail.0.weight"),),
    "FBCNN": (("m_body_encoder.0.res.0.weight", "m_down1.0.res.0.weight"),),
    "Uformer": (("decoderlayer_0.blocks.0.norm1.weight", "decoderlayer_2.blocks.0.norm1.weight"),),
    "RGT": (
        (
            "layers.0.blocks.0.attn.attns.0.relative_position_index",
            "layers.0.blocks.0.attn.attns.0.pos.pos_proj.weight",
        ),
    ),
    "DAT": (
        (
            "layers.0.blocks.0.attn.channel_interaction.2.running_mean",
            "layers.0.blocks.0.attn.spatial_interaction.1.running_mean",
        ),
    ),
    "CRAFT": (("layers.0.residual_group.hf_blocks.0.attn.temperature", "conv_first.weight"),),
    "KBNet": (
        ("decoders.0.0.attgamma", "encoders.0.0.attgamma"),
        ("encoder_level3.0.ffn.project_out.weight", "refinement.0.attn.dwconv.0.weight"),
    ),
    "DITN": (("UFONE.0.ITLs.0.ffn.project_out.weight", "UFONE.0.ITLs.0.ffn.project_in.weight"),),
    "MMRealSR": (("de_net.body.0.0.conv1.weight", "de_net.fc_degree.0.0.weight"),),
    "SPAN": (("block_1.c1_r.eval_conv.weight", "block_1.c3_r.eval_conv.weight"),),
    "RealCUGAN": (("unet1.conv2.seblock.conv1.weight", "unet2.conv2.seblock.conv1.weight"),),
    "SAFMN": (("feats.0.safm.mfr.0.weight", "feats.0.safm.mfr.3.weight"),),
    "SAFMNBCIE": (("feats.0.layers.0.safm.mfr.0.weight", "feats.0.layers.0.safm.mfr.3.weight"),),
    "DCTLSA": (
        (
            "B1.body.0.transformer_body.0.blocks.0.attn.local.pointwise_prenorm_1.weight",
            "B1.body.1.transformer_body.0.blocks.0.attn.local.pointwise_prenorm_1.weight",
        ),
    ),
    "FFTformer": (("encoder_level1.0.ffn.project_out.weight", "decoder_level1.0.attn.to_hidden.weight"),),
    "NAFNet": (("middle_blks.0.conv1.weight", "middle_blks.0.conv2.weight"),),
    "ATD": (
        (
            "layers.0.residual_group.layers.0.convffn.dwconv.depthwise_conv.0.weight",
            "layers.0.residual_group.layers.0.attn_win.relative_position_bias_table",
        ),
    ),
    "MixDehazeNet": (("layer1.blocks.0.norm1.running_mean", "layer1.blocks.0.norm2.running_mean"),),
    "DRUNet": (("m_down1.0.res.0.weight", "m_down1.0.res.2.weight"),),
    "DnCNN": (("model.0.weight", "model.2.weight"),),
    "IPT": (
        ("body.decoder.layers.0.multihead_attn.out_proj.weight", "body.decoder.layers.0.multihead_attn.in_proj_weight"),
    ),
    "DRCT": (("layers.0.swin1.attn.relative_position_bias_table", "layers.0.swin1.attn.relative_position_index"),),
    "ESRGAN": (
        ("model.1.sub.0.RDB1.conv1.0.weight", "model.0.weight"),
        ("body.0.rdb1.conv1.weight", "conv_first.weight"),
        ("RRDB_trunk.0.RDB1.conv1.weight", "conv_first.weight"),
        ("model.1.sub.0.RDB1.conv1x1.weight", "model.0.weight"),
    ),
    "PLKSR": (("feats.1.refine.weight", "feats.0.weight"),),
    "RetinexFormer": (
        (
            "body.0.denoiser.encoder_layers.0.0.blocks.0.0.pos_emb.0.weight",
            "body.0.denoiser.encoder_layers.0.0.blocks.0.1.fn.net.0.weight",
        ),
    ),
    "HVICIDNet": (("HV_LCA1.gdfn.project_out.weight", "HV_LCA1.ffn.project_out.weight"),),
    "SeemoRe": (
        (
            "body.0.local_block.block.moe_layer.experts.0.conv_1.weight",
            "body.0.local_block.block.moe_layer.experts.0.conv_2.weight",
        ),
    ),
    "MoSR": (("gblocks.1.conv.weight", "gblocks.1.norm.weight"),),
    "MoESR": (("blocks.0.blocks.0.conv.dwconv_hw.weight", "blocks.0.blocks.0.conv.dwconv_h.weight"),),
    "RCAN": (
        ("body.0.body.0.body.3.conv_du.0.weight", "body.0.body.0.body.0.weight"),
        ("body.0.body.0.body.3.conv_du.0.weight", "body.0.body.0.body.0.weight"),
    ),
    "FDAT": (
        ("groups.0.blocks.0.inter.cg.1.weight", "groups.0.blocks.0.ffn.fc1.weight"),
        ("groups.0.blocks.0.inter.cg.1.weight", "groups.0.blocks.0.ffn.fc1.weight"),
    ),
    "AuraSR": (("final_res_block.block1.proj.weights", "mid_attn.layers.0.0.to_out.weight"),),
}


def may_be_detected(keys: Iterable[str]) -> bool:
    """Whether some architecture of `ANCHORS` could detect a state dict with these keys."""
    present = set(keys)
    return any(all(k in present for k in alt) for alts in ANCHORS.values() for alt in alts)


def anchors_of(condition: Any) -> list[tuple[str, ...]]:
    """The alternatives a spandrel `KeyCondition` implies: for "has all", two of its keys (every one
    is needed); for "has any", the alternatives of each of its parts."""
    kind, parts = condition._kind, condition._keys  # spandrel keeps no public view of them
    if kind == "all":  # the two longest keys: the most telling ("conv_first.weight" is in many)
        keys = sorted((p for p in parts if isinstance(p, str)), key=lambda k: (-len(k), k))
        return [tuple(keys[:2])] if keys else anchors_of(parts[0])
    found: list[tuple[str, ...]] = []
    for part in parts:
        found.extend([(part,)] if isinstance(part, str) else anchors_of(part))
    return found


def derive() -> dict[str, tuple[tuple[str, ...], ...]]:
    """`ANCHORS` as the installed spandrel's MAIN_REGISTRY gives it (in detection order)."""
    from spandrel import MAIN_REGISTRY

    return {
        support.architecture.id: tuple(anchors_of(support.architecture._detect))
        for support in MAIN_REGISTRY.architectures("detection")
    }


if __name__ == "__main__":  # pragma: no cover - prints the table for a new spandrel version
    import importlib.metadata

    print(f'SPANDREL_VERSION = "{importlib.metadata.version("spandrel")}"')
    for arch, alternatives in derive().items():
        print(f"    {arch!r}: {alternatives!r},")
