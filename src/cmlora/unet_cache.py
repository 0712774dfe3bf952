"""The shallow/deep split of a diffusers UNet2DConditionModel, for per-LoRA feature caching.

Cache point (layer L, block b), DeepCache-style: the *shallow* part is conv_in, down-blocks
0..L-1, the first b+1 resnet/attention pairs of down-block L, the matching pairs of up-block
-(L+1) (from pair n_up-(b+2) on), the up-blocks after it and conv_out. A *full* call runs
everything and returns the hidden state entering the shallow tail (the cache entry); a *cached*
call runs only the shallow part and resumes from a given entry.

Both calls go through the same code below, which calls diffusers' own blocks, resnets,
attentions and embedding helpers in the order the UNet's forward does; nothing of the UNet is
copied. Since the shallow head of a cached call executes the same kernels on the same inputs as
the full call, a cached call fed the same step's entry reproduces the full call bit for bit
(tested), and the full call equals ``unet(...)`` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import OptionError


@dataclass(frozen=True)
class CachePoint:
    layer: int = 0
    block: int = 1


PUBLISHED_BLOCK = 1


def max_cache_block(unet: torch.nn.Module, layer: int) -> int | None:
    """The deepest block of level ``layer`` that can be a cache point, or None for no such level."""
    downs, ups = unet.down_blocks, unet.up_blocks
    if not 0 <= layer < len(downs):
        return None
    return min(len(downs[layer].resnets) - 1, len(ups[len(ups) - 1 - layer].resnets) - 2)


def default_cache_block(unet: torch.nn.Module, layer: int) -> int:
    """The published block 1, or the deepest block the level has when it has fewer pairs (a UNet
    with ``layers_per_block=1``, like the mini world's, has block 0 only)."""
    deepest = max_cache_block(unet, layer)
    return PUBLISHED_BLOCK if deepest is None or deepest < 0 else min(PUBLISHED_BLOCK, deepest)


class UNetSplit:
    def __init__(self, unet: torch.nn.Module, point: CachePoint = CachePoint()):
        self.unet = unet
        self.point = point
        config = unet.config
        if getattr(config, "center_input_sample", False):
            raise OptionError("feature caching does not support UNets with center_input_sample=True")
        if getattr(config, "addition_embed_type", None) == "image_hint":
            raise OptionError("feature caching does not support image_hint UNets")
        downs, ups = unet.down_blocks, unet.up_blocks
        if not 0 <= point.layer < len(downs):
            raise OptionError(
                f"cache_layer must be in [0, {len(downs) - 1}] for this UNet, got {point.layer}"
            )
        self.down = downs[point.layer]
        self.up_index = len(ups) - 1 - point.layer
        self.up = ups[self.up_index]
        deepest = max_cache_block(unet, point.layer)
        if not 0 <= point.block <= deepest:
            raise OptionError(
                f"cache_block must be in [0, {deepest}] for cache_layer {point.layer} of this "
                f"UNet, got {point.block}"
            )
        self.up_start = len(self.up.resnets) - (point.block + 2)

    # ------------------------------------------------------------------ pieces

    def _embed(self, sample, timestep, ehs, added_cond_kwargs):
        unet = self.unet
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, None)
        class_emb = unet.get_class_embed(sample=sample, class_labels=None)
        if class_emb is not None:
            raise OptionError("feature caching does not support class-conditioned UNets")
        aug = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added_cond_kwargs or {}
        )
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        ehs = unet.process_encoder_hidden_states(
            encoder_hidden_states=ehs, added_cond_kwargs=added_cond_kwargs
        )
        return emb, ehs

    @staticmethod
    def _pair(block, index: int, hidden, emb, ehs):
        hidden = block.resnets[index](hidden, emb)
        attentions = getattr(block, "attentions", None)
        if attentions is not None:
            hidden = attentions[index](
                hidden,
                encoder_hidden_states=ehs,
                cross_attention_kwargs=None,
                attention_mask=None,
                encoder_attention_mask=None,
                return_dict=False,
            )[0]
        return hidden

    @staticmethod
    def _block(block, hidden, emb, ehs, res=None, upsample_size=None):
        cross = getattr(block, "has_cross_attention", False)
        if res is None:
            if cross:
                return block(hidden_states=hidden, temb=emb, encoder_hidden_states=ehs)
            return block(hidden_states=hidden, temb=emb)
        if cross:
            return block(
                hidden_states=hidden,
                temb=emb,
                res_hidden_states_tuple=res,
                encoder_hidden_states=ehs,
                upsample_size=upsample_size,
            )
        return block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)

    def _upsample_sizes(self, residuals) -> list:
        """Per up-block upsample size, as the UNet's forward passes it for odd latent sizes."""
        unet = self.unet
        factor = 2**unet.num_upsamplers
        forward_size = any(d % factor for d in residuals[0].shape[-2:])
        sizes, remaining = [], len(residuals)
        for i, block in enumerate(unet.up_blocks):
            remaining -= len(block.resnets)
            is_final = i == len(unet.up_blocks) - 1
            sizes.append(residuals[remaining - 1].shape[2:] if forward_size and not is_final else None)
        return sizes

    # ------------------------------------------------------------------ calls

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, entry=None):
        """Run a full call (entry=None) or a cached one; returns (noise prediction, entry)."""
        unet, point = self.unet, self.point
        if getattr(self.up, "s1", None):
            raise OptionError("feature caching does not support FreeU: call pipe.disable_freeu() first")
        emb, ehs = self._embed(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        hidden = unet.conv_in(sample)
        residuals: tuple = (hidden,)
        for block in unet.down_blocks[: point.layer]:
            hidden, res = self._block(block, hidden, emb, ehs)
            residuals += res
        if entry is None:
            for block in unet.down_blocks[point.layer :]:
                hidden, res = self._block(block, hidden, emb, ehs)
                residuals += res
            if unet.mid_block is not None:
                if getattr(unet.mid_block, "has_cross_attention", False):
                    hidden = unet.mid_block(hidden, emb, encoder_hidden_states=ehs)
                else:
                    hidden = unet.mid_block(hidden, emb)
            sizes = self._upsample_sizes(residuals)
            for i, block in enumerate(unet.up_blocks[: self.up_index]):
                n = len(block.resnets)
                res, residuals = residuals[-n:], residuals[:-n]
                hidden = self._block(block, hidden, emb, ehs, res, sizes[i])
            res, residuals = residuals[-len(self.up.resnets) :], residuals[: -len(self.up.resnets)]
            for j in range(self.up_start):
                hidden = torch.cat([hidden, res[-1]], dim=1)
                res = res[:-1]
                hidden = self._pair(self.up, j, hidden, emb, ehs)
            entry = hidden
        else:
            for j in range(point.block + 1):
                hidden = self._pair(self.down, j, hidden, emb, ehs)
                residuals += (hidden,)
            sizes = self._upsample_sizes_cached(residuals)
            keep = point.block + 2
            res, residuals = residuals[-keep:], residuals[:-keep]
            hidden = entry
        for j in range(self.up_start, len(self.up.resnets)):
            hidden = torch.cat([hidden, res[-1]], dim=1)
            res = res[:-1]
            hidden = self._pair(self.up, j, hidden, emb, ehs)
        if self.up.upsamplers is not None:
            for upsampler in self.up.upsamplers:
                hidden = upsampler(hidden, sizes[self.up_index])
        for offset, block in enumerate(unet.up_blocks[self.up_index + 1 :]):
            n = len(block.resnets)
            res, residuals = residuals[-n:], residuals[:-n]
            hidden = self._block(block, hidden, emb, ehs, res, sizes[self.up_index + 1 + offset])
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden), entry

    def _upsample_sizes_cached(self, head_residuals) -> list:
        """Upsample sizes from the head's residuals: only the up-blocks of the shallow tail need them."""
        unet = self.unet
        factor = 2**unet.num_upsamplers
        forward_size = any(d % factor for d in head_residuals[0].shape[-2:])
        sizes: list = [None] * len(unet.up_blocks)
        if not forward_size:
            return sizes
        remaining = len(head_residuals) - (self.point.block + 2)
        for i in range(self.up_index, len(unet.up_blocks)):
            if i == len(unet.up_blocks) - 1:
                break
            sizes[i] = head_residuals[remaining - 1].shape[2:]
            remaining -= len(unet.up_blocks[i + 1].resnets)
        return sizes
