"""Attention over packed sequences at each sequence's own cost: one causal sdpa call per sequence.

With remove-padding, verl packs a micro-batch into one row (``[1, total_tokens]``, position ids restarting at
every sequence). On a GPU, flash-attention's varlen kernel attends within each sequence. transformers' sdpa
path instead attends over the whole packed row under a block-diagonal mask, so its cost grows with the square
of the packed length: four 400-token sequences cost four times their own attention, and on CPU the model's
forward + backward took 1.9x as long as the same sequences padded into a batch. This attention function
splits the packed row where the position ids restart and runs causal sdpa on each piece; every other input
(a real batch, a KV cache, a padding mask) goes to transformers' sdpa unchanged.

Registered under ``PACKED_ATTENTION`` for attention and, with sdpa's mask builder, for masks, in every process
that imports transformers' model code (``patches``); the CPU backend's overrides select it for the trained
and scoring models. The rollout server keeps plain sdpa: generation runs on padded batches with a KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import PACKED_ATTENTION


def sequence_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]] | None:
    """``[(start, end), ...]`` of the sequences packed in one row, or None if the row holds only one.

    A sequence starts where the position id does not follow its predecessor's (verl's packed position ids
    restart at 0 for each sequence), as transformers' own packed-sequence detection reads them.
    """
    row = position_ids.reshape(-1)
    starts = (torch.nonzero(row[1:] != row[:-1] + 1).flatten() + 1).tolist()
    if not starts:
        return None
    edges = [0, *starts, row.numel()]
    return list(zip(edges[:-1], edges[1:], strict=True))


def packed_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: ``query [B, heads, L, d]`` → ``([B, L, heads, d], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = (
        position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]  # no earlier tokens from a cache: the row is all there is
        and getattr(module, "is_causal", True)
        and getattr(module, "sliding_window", None) is None  # sdpa's mask builder applies the window
    )
    bounds = sequence_bounds(position_ids) if packed else None
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout if module.training else 0.0,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        for start, end in bounds
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation=PACKED_ATTENTION`` loadable in this process (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
