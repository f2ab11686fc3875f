"""Recurrent drafting (ReDrafter): a small RNN draft head proposes a beam tree, the unmodified target
verifies it in one forward with tree attention, and the longest agreeing prefix is committed."""

from celeris.speculative.decoding import SpeculativeStats, redrafter_decode
from celeris.speculative.drafter import (
           DrafterConfig,
           RecurrentDrafter,
           load_drafter,
           new_drafter,
           target_signature,
)
from celeris.speculative.tree import beam_search, dedup_prefix, pack_beams, unpack

__all__ = ["DrafterConfig", "RecurrentDrafter", "SpeculativeStats", "beam_search", "dedup_prefix", "load_drafter",
           "new_drafter", "pack_beams", "redrafter_decode", "target_signature", "unpack"]
