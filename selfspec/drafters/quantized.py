"""Self-speculation by precision (`--draft quantized`): the draft is the model itself run with
low-bit copies of its linear weights (int8 per output channel, or int4 in groups of 32, and an
int8 LM head), optionally with some sub-layers skipped too; verification runs the model as
loaded, so the output is exactly that of the loaded model.

Why it pays on a CPU: the cheapest kernel for one token is not the cheapest for several. Measured
on an AVX2 machine, an int8 weight-only GEMV reads a 1536x8960 layer in
0.67 ms against 2.15 ms for prepacked fp32, while prepacked fp32 verifies 8 tokens for 1.5x the
cost of one. Drafting with the first and verifying with the second uses each where it is best.
The draft agrees with the full-precision model on ~98% of greedy tokens (a SmolLM2 probe), so drafts
run long; the draft-exit threshold of Draft & Verify still ends a draft where the draft model
is unsure.

The draft writes its KV into the shared cache like the layer-skip drafter; verification
recomputes those positions at full precision and the usual rollback drops what was rejected.
"""
from __future__ import annotations

from pathlib import Path

from selfspec.hardware import check_cpu_only
from selfspec.drafters.layerskip import AdaptiveExit, LayerSkipDrafter, SkipConfig
from selfspec.errors import InvalidParameterError
from selfspec.models.native_draft import is_native
from selfspec.models.quant import DRAFT_BITS, draft_view, weight_bits

DEFAULT_BITS = 8
# The draft-exit threshold a precision draft starts from (Draft & Verify's 0.6 suits a skipped-
# layer draft). An int8/int4 draft agrees with the model ~98% of the time, so ending drafts at
# top probability < 0.6 cut them short: on SmolLM2 tau was 2.9 at 0.6, 4.6-5.0 at 0.3 with
# acceptance still 95-98%, 6.4-7.1 at 0 with acceptance falling to 83-91% (docs/benchmarks.md).
DEFAULT_GAMMA = 0.3


class QuantizedSelfDrafter(LayerSkipDrafter):
    name = "quantized"
    # auto's view of this draft before it has drafted (drafters/auto.py): it agreed with the model
    # on 91-99% of drafted tokens on the Qwen 1.5B's native blocks and 95-98% on SmolLM2 in fp32
    # (docs/benchmarks.md), so it starts at 0.9 where an unknown drafter starts at 0.6 (which
    # left it idle until a 2-token probe after 16 rounds, and longer after), and auto judges
    # whether probing it could pay at 0.97 rather than 0.9
    prior_acceptance = 0.9
    plausible_acceptance = 0.97

    @classmethod
    def for_model(cls, model, skip_config: str | Path | SkipConfig | None = None, bits: int | None = None,
                  exit: AdaptiveExit | None = None, **kwargs) -> "QuantizedSelfDrafter":
        """Draft with `bits`-bit weights (default: the skip config's `draft_bits`, else 8; 4 on
        GGUF-native blocks) and the sub-layers of `skip_config` skipped (default: none). The
        low-bit copy is built here, once."""
        check_cpu_only("--draft quantized", model.device)
        if bits is not None and bits not in DRAFT_BITS:
            raise InvalidParameterError(f"--draft-bits must be 8 or 4, got {bits}")
        if skip_config is None:
            config = SkipConfig(model=model.name, n_layers=model.config.n_layers, found_by="hand",
                                note="precision self-draft: no sub-layer skipped")
        else:
            config = LayerSkipDrafter.for_model(model, skip_config).config  # resolves and checks it
        native = is_native(model.transformer)
        # a native model's blocks are 4-6 bits already: its draft is on Q4_K/Q4_0 blocks (native_draft.py)
        bits = bits or config.draft_bits or (4 if native else DEFAULT_BITS)
        have = weight_bits(model.transformer)
        if have is not None and have <= bits:
            raise InvalidParameterError(
                f"the model is loaded as int{have}, so a draft with {bits}-bit weights would be no cheaper than the model; "
                + ("use --draft-bits 4 or " if have > 4 else "") + "load it with --dtype fp32 or bf16")
        config = SkipConfig(**{**config.__dict__, "draft_bits": bits})
        # The whole vocabulary by default: a draft head over a subset (layer-skip's default for
        # vocabularies over 65536) cut the agreement of Qwen 1.5B's int8 draft to 56% (0.69x).
        kwargs.setdefault("draft_vocab", 0)
        if kwargs["draft_vocab"] is None:
            kwargs["draft_vocab"] = 0
        return cls(config, exit=exit or AdaptiveExit(gamma=DEFAULT_GAMMA),
                   low_bit_view=(model.transformer, draft_view(model.transformer, bits)), **kwargs)
