"""Llama, tensor-parallel and quantized, built only from tpquant layers (DESIGN s2, s6, s8).

Read top to bottom: the quantization choice per layer kind, RoPE, attention (over the KV
cache of `tpquant.layers.kv_cache`), MLP, decoder layer, the model; then the checkpoint table (walked by `tpquant.models.loader`), and greedy
generation. Tensor parallelism shows only through the layers used:

    attention  qkv ColumnLinear (no gather, this rank's heads) -> RoPE -> SDPA -> o_proj RowLinear
    mlp        gate_up ColumnLinear (no gather) -> silu(gate) * up -> down RowLinear
    lm_head    ColumnLinear over the vocabulary (padded to a multiple of tp), gathered

so each block costs one all-reduce (in its RowLinear) and the head one all-gather. Heads are
laid out by `tpquant.parallel.heads` (split, replicated KV or zero-padded; the padded model
computes the same function) and each rank caches only its own KV heads.

Shape letters: B batch, T new tokens, S cached positions, D hidden, H / Hkv this rank's query /
KV heads, hd head_dim, I intermediate size, V vocabulary.

Positions and prompts of different lengths: token t of row b sits at absolute position
start_pos[b] + t (`start_pos` an int for every row, or a [B] tensor). Attention is causal by
absolute position (a key is seen iff its position <= the query's), so a batch of prompts of
different lengths is RIGHT-padded: a row's real tokens never see its padding, its last real
logits are at index len_b - 1, and its first decode step (start_pos[b] = len_b) overwrites
the padding's cache entries before any query could attend to them. Callers pass no mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tpquant.collectives import Communicator
from tpquant.kernels import has_triton
from tpquant.kernels.activation import silu_mul
from tpquant.layers.column import ColumnLinear
from tpquant.layers.decode_attention import decode_attention, decode_attention_rope, fuses_rope
from tpquant.layers.kv_cache import KVCache
from tpquant.layers.norm import RmsNorm
from tpquant.layers.row import PartialSum, RowLinear
from tpquant.models.config import Llama3RopeScaling, LlamaConfig
from tpquant.parallel.heads import HeadLayout, plan_heads, qkv_part_sizes
from tpquant.parallel.mapping import Mapping
from tpquant.parallel.shard import check_divisible
from tpquant.quantization.mode import QuantMode
from tpquant.quantization.rotation import hadamard, rotate_activation, rotation_block
from tpquant.quantization.schemes import Passthrough, Scheme, scheme_for_mode

# -- which scheme quantizes which layer ---------------------------------------------------


@dataclass(frozen=True)
class LlamaSchemes:
    """One quantization scheme per kind of linear layer.

    The embedding is never quantized (it is a lookup table, kept in the model dtype), and the
    lm_head stays in the float dtype unless asked: its errors go straight into the logits.
    down_rotation: block size of the Hadamard rotation of down_proj's input
    (`tpquant.quantization.rotation`; 0 = none), see `default_down_rotation`.
    """

    qkv: Scheme
    o: Scheme
    gate_up: Scheme
    down: Scheme
    lm_head: Scheme
    down_rotation: int = 0

    @classmethod
    def from_mode(
        cls,
        mode: QuantMode,
        dtype: torch.dtype = torch.float16,
        group_size: int = 128,
        quantize_lm_head: bool = False,
        down_rotation: int = 0,
    ) -> LlamaSchemes:
        """Every transformer linear in `mode`'s scheme; lm_head float unless `quantize_lm_head`."""
        body = scheme_for_mode(mode, group_size=group_size, dtype=dtype)
        head = body if quantize_lm_head else Passthrough(dtype)
        return cls(qkv=body, o=body, gate_up=body, down=body, lm_head=head,
                   down_rotation=down_rotation)

    @classmethod
    def from_name(
        cls,
        name: str,
        dtype: torch.dtype = torch.float16,
        group_size: int = 128,
        quantize_lm_head: bool = False,
        down_rotation: int = 0,
    ) -> LlamaSchemes:
        """From a QuantMode short name ('fp16', 'int8_wo', 'int4_gw', 'w8a8_token', ...)."""
        return cls.from_mode(QuantMode.from_name(name), dtype, group_size, quantize_lm_head,
                             down_rotation)

    def untiled(self) -> LlamaSchemes:
        """The same schemes keeping weights in the stored layout (`pack` tiles nothing): the
        tiled layouts serve the GPU kernels, the CPU reference reads the stored ones."""
        return replace(self, **{name: replace(s, tiles=False) for name, s in self.items()
                                if hasattr(s, "tiles")})

    def items(self) -> list[tuple[str, Scheme]]:
        """(layer kind, scheme) of every kind of linear."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)
                if f.name in _LAYER_SCHEME.values()]

    def for_layer(self, layer_name: str) -> Scheme:
        """The scheme of a layer named as load_llama names it ("model.layers.3.mlp.down")."""
        for suffix, field in _LAYER_SCHEME.items():
            if layer_name == suffix or layer_name.endswith("." + suffix):
                return getattr(self, field)
        raise KeyError(f"no linear layer is named {layer_name!r}")


# load_llama's layer names (by suffix) -> the LlamaSchemes field that quantizes them
_LAYER_SCHEME = {"attention.qkv": "qkv", "attention.o_proj": "o", "mlp.gate_up": "gate_up",
                 "mlp.down": "down", "lm_head": "lm_head"}


def default_down_rotation(mode: QuantMode, intermediate_size: int, tp: int) -> int:
    """The Hadamard block for down_proj's input: W8A8 modes rotate it (their activation
    scales cannot take the attention-sink token's massive channels), in the largest block
    <= 128 that divides each rank's slice; other modes do not (0)."""
    if not mode.has_act_and_weight_quant():
        return 0
    check_divisible("intermediate_size", intermediate_size, tp)
    block = rotation_block(intermediate_size // tp)
    return block if block > 1 else 0  # an odd slice: a block of 1 would rotate nothing


# -- rotary position embedding -------------------------------------------------------------


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
) -> torch.Tensor:
    """Rotation frequencies theta^(-2i/hd), i < hd/2, in float64; llama3-scaled if given."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return inv_freq if scaling is None else llama3_scale_inv_freq(inv_freq, scaling)


def llama3_scale_inv_freq(inv_freq: torch.Tensor, s: Llama3RopeScaling) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths slowed by `factor`, short ones kept,
    the band between interpolated linearly in 1 / wavelength."""
    wavelen = 2 * math.pi / inv_freq
    long_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    short_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    between = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return torch.where(
        wavelen > long_wavelen,
        inv_freq / s.factor,
        torch.where(wavelen < short_wavelen, inv_freq, between),
    )


def rope_cos_sin(inv_freq: torch.Tensor, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, float32 [n_positions, hd/2] (computed in float64)."""
    positions = torch.arange(n_positions, dtype=torch.float64, device=inv_freq.device)
    angles = torch.outer(positions, inv_freq.double())
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, hd] by cos/sin [B, T, hd/2], Hugging Face "rotate halves" layout:
    pair i is (x[i], x[i + hd/2]). float32 math, result in x's dtype. On CUDA one Triton
    kernel does it (`tpquant.kernels.triton_rope`), here torch does."""
    if x.is_cuda and has_triton():
        from tpquant.kernels import triton_rope

        return triton_rope.apply_rope(x, cos, sin)
    return apply_rope_reference(x, cos, sin)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in torch: the CPU path and the kernel's oracle."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, T, H, hd/2] each
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


# -- the blocks ----------------------------------------------------------------------------


class Attention(nn.Module):
    """Grouped-query attention over this rank's heads (`layout.heads_per_rank` query heads
    reading `layout.kv_heads_per_rank` KV heads, q_per_kv consecutive query heads per KV head)."""

    def __init__(
        self,
        config: LlamaConfig,
        layout: HeadLayout,
        mapping: Mapping,
        comm: Communicator,
        schemes: LlamaSchemes,
    ) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.n_heads = layout.heads_per_rank  # local
        self.n_kv_heads = layout.kv_heads_per_rank  # local
        self.q_per_kv = layout.q_per_kv
        q, k, v = qkv_part_sizes(layout, config.head_dim)  # full, laid-out sizes
        bias = config.attention_bias
        self.qkv = ColumnLinear(
            config.hidden_size, q + k + v, schemes.qkv, mapping, comm,
            bias=bias, gather_output=False, part_sizes=(q, k, v),
        )
        self.o_proj = RowLinear(q, config.hidden_size, schemes.o, mapping, comm, bias=bias)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> PartialSum:
        """x [B, T, D] at positions pos [B, T] -> o_proj's output [B, T, D], its all-reduce
        left to the norm after it. Three ways to attend (see `Llama`):

        mask [B, 1, T, S]   any positions: SDPA over the cache's first S positions
        None, T > 1         prefill from position 0: causal SDPA over the new keys (flash)
        None, T == 1        one decode step: `decode_attention` over the whole cache, fixed
                            shapes, row b seeing positions 0 .. pos[b] (RoPE and the KV
                            write in its kernel where `fuses_rope`: `decode_attention_rope`)
        """
        if self.kv_cache is None:
            raise RuntimeError("no KV cache: call Llama.setup_caches(max_batch, max_seq)")
        B, T, _ = x.shape
        hd, H, Hkv = self.head_dim, self.n_heads, self.n_kv_heads
        qkv = self.qkv(x)  # local [q_r | k_r | v_r]
        if mask is None and T == 1 and fuses_rope(self.kv_cache, B):
            # RoPE, the KV write and attention in one kernel
            y = decode_attention_rope(qkv[:, 0], cos[:, 0], sin[:, 0], self.kv_cache,
                                      pos[:, 0], H)  # [B, H, hd]
            return self.o_proj(y.reshape(B, 1, H * hd), reduce=False)  # [B, 1, D]
        # q and k rotated together (adjacent heads of one row: one kernel on CUDA)
        qk = apply_rope(qkv[..., : (H + Hkv) * hd].view(B, T, H + Hkv, hd), cos, sin)
        q, k = qk.split([H, Hkv], dim=2)  # [B, T, H, hd], [B, T, Hkv, hd]
        v = qkv[..., (H + Hkv) * hd :].view(B, T, Hkv, hd)
        self.kv_cache.write(pos, k, v)
        if mask is None and T == 1:
            y = decode_attention(q[:, 0], self.kv_cache, pos[:, 0])  # [B, H, hd]
            return self.o_proj(y.reshape(B, 1, H * hd), reduce=False)  # [B, 1, D]
        if mask is not None:
            k, v = self.kv_cache.read(B, mask.shape[-1])  # [B, S, Hkv, hd]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first
        if self.q_per_kv > 1:  # query head h reads KV head h // q_per_kv
            k = k.repeat_interleave(self.q_per_kv, dim=1)  # [B, H, S, hd]
            v = v.repeat_interleave(self.q_per_kv, dim=1)
        if mask is None:  # from position 0, the new keys are the whole cache: plain causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, hd]
        y = y.transpose(1, 2).reshape(B, T, H * hd)
        return self.o_proj(y, reduce=False)  # [B, T, D]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), intermediate features split across ranks.

    With schemes.down_rotation = b, down's input is rotated by blockdiag(H_b) first (its weight
    was rotated while loading: the same function, an easier input to quantize).
    """

    def __init__(
        self, config: LlamaConfig, mapping: Mapping, comm: Communicator, schemes: LlamaSchemes
    ) -> None:
        super().__init__()
        I, D, bias = config.intermediate_size, config.hidden_size, config.mlp_bias
        check_divisible("intermediate_size", I, mapping.tp_size)
        self.local_intermediate = I // mapping.tp_size
        self.gate_up = ColumnLinear(
            D, 2 * I, schemes.gate_up, mapping, comm,
            bias=bias, gather_output=False, part_sizes=(I, I),
        )
        self.down = RowLinear(I, D, schemes.down, mapping, comm, bias=bias)
        self.down_rotation = schemes.down_rotation
        if self.down_rotation:
            if self.local_intermediate % self.down_rotation:
                raise ValueError(
                    f"down_proj's Hadamard block {self.down_rotation} does not divide this "
                    f"rank's {self.local_intermediate} intermediate features (tp={mapping.tp_size})"
                )
            # not in the state dict: a constant of the block size, which the engine records;
            # in the activations' dtype, so rotating is one matmul
            self.register_buffer("down_hadamard", hadamard(self.down_rotation).to(
                schemes.down.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> PartialSum:
        """x [B, T, D] -> down's output [B, T, D], its all-reduce left to the next norm."""
        h = silu_mul(self.gate_up(x))  # [B, T, I/tp]: the local [gate | up] halves
        if self.down_rotation:
            h = rotate_activation(h, self.down_hadamard)
        return self.down(h, reduce=False)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)), then h + mlp(norm(h)).

    The residual stream comes in as (x, delta) and goes out as (h, mlp output), the last add
    left to the next block: each add runs fused with the norm after it (one kernel on CUDA).
    The outputs of attention and MLP are row layers' PartialSums, so that norm also does
    their all-reduce (one custom kernel on GPUs where it fits: `Communicator.
    all_reduce_add_rms_norm`).
    """

    def __init__(
        self,
        config: LlamaConfig,
        layout: HeadLayout,
        mapping: Mapping,
        comm: Communicator,
        schemes: LlamaSchemes,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.attention_norm = RmsNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attention = Attention(config, layout, mapping, comm, schemes)
        self.ffn_norm = RmsNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, mapping, comm, schemes)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, D]
        delta: PartialSum | None,  # [B, T, D] still to be added to x, or None
        pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, PartialSum]:
        # x, the residual stream, was written before the kernels of delta's layer: each add +
        # norm may read it before its PDL wait (early_residual)
        x, normed = self.attention_norm.add_forward(x, delta, early_residual=True)
        h, normed = self.ffn_norm.add_forward(x, self.attention(normed, pos, cos, sin, mask),
                                              early_residual=True)
        return h, self.mlp(normed)


class Embedding(nn.Module):
    """Token embedding. Replicated on every rank for now: simple and exact, at the cost of
    V * D * (1 - 1/tp) extra weights per rank; a vocab-parallel embedding can replace it."""

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        weight = torch.zeros(vocab_size, hidden, dtype=dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)


class Llama(nn.Module):
    """The model on one rank: forward(tokens[B, T], start_pos) -> logits[B, T, V].

    The logits are gathered: every rank returns all of them. Three ways in:

    - `forward` with any start_pos: attention masked by absolute position over the cache
      (the general path: chunked prefill, CPU decode).
    - `forward` with start_pos 0 on CUDA: the prompt is the whole cache, so attention is
      plain causal SDPA (PyTorch's flash kernels), no mask.
    - `decode_step(tokens[B], pos[B])`: one token per row with shapes fixed by B alone and
      no host synchronisation, what `tpquant.engine.graphs` captures as a CUDA graph.

    `int8_kv_cache` (QuantMode.INT8_KV_CACHE) stores keys and values as int8 with a scale
    per (position, KV head); see `tpquant.layers.kv_cache`.
    """

    def __init__(
        self,
        config: LlamaConfig,
        mapping: Mapping,
        comm: Communicator,
        schemes: LlamaSchemes,
        dtype: torch.dtype = torch.float16,
        int8_kv_cache: bool = False,
    ) -> None:
        super().__init__()
        for kind, scheme in schemes.items():
            if scheme.dtype != dtype:
                raise ValueError(f"scheme for {kind} runs in {scheme.dtype}, the model in {dtype}")
        self.config, self.mapping, self.dtype = config, mapping, dtype
        self.int8_kv_cache = int8_kv_cache
        tp = mapping.tp_size
        self.layout = plan_heads(config.num_heads, config.num_kv_heads, tp)
        self.embed = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, self.layout, mapping, comm, schemes, dtype)
            for _ in range(config.num_layers)
        )
        self.norm = RmsNorm(config.hidden_size, config.rms_norm_eps, dtype)
        # vocabulary padded to a multiple of tp; the padding logits are dropped after the gather
        self.padded_vocab = config.vocab_size + (-config.vocab_size % tp)
        self.lm_head = ColumnLinear(
            config.hidden_size, self.padded_vocab, schemes.lm_head, mapping, comm,
            gather_output=True,
        )
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.max_batch = self.max_seq = 0
        # bumped by every setup_caches: captured CUDA graphs hold the old caches' addresses
        self.cache_version = 0

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """(Re)allocate every layer's KV cache and the RoPE table for max_seq positions."""
        device = self.embed.weight.device
        for layer in self.layers:
            layer.attention.kv_cache = None  # free the old cache before allocating the new
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                max_batch, max_seq, self.layout.kv_heads_per_rank, self.config.head_dim,
                self.dtype, device, int8=self.int8_kv_cache,
            )
        self.rope_cos, self.rope_sin = (t.to(device) for t in rope_cos_sin(self.inv_freq, max_seq))
        self.max_batch, self.max_seq = max_batch, max_seq
        self.cache_version += 1

    def kv_cache_bytes(self) -> int:
        """Device memory of this rank's KV caches, every layer."""
        return sum(layer.attention.kv_cache.nbytes() for layer in self.layers
                   if layer.attention.kv_cache is not None)

    def positions(self, start_pos: int | torch.Tensor, B: int, T: int) -> torch.Tensor:
        """Absolute positions [B, T] = start_pos (int or [B]) + t, checked against the cache."""
        device = self.embed.weight.device
        steps = torch.arange(T, device=device)
        if isinstance(start_pos, torch.Tensor):
            if start_pos.shape != (B,):
                raise ValueError(
                    f"start_pos must be an int or a [B]={B} tensor, got {tuple(start_pos.shape)}"
                )
            pos = start_pos.to(device=device, dtype=torch.long)[:, None] + steps
            first, last = int(start_pos.min()), int(pos.max())
        else:
            pos = (start_pos + steps).expand(B, T)
            first, last = start_pos, start_pos + T - 1
        if B > self.max_batch or first < 0 or last >= self.max_seq:
            raise ValueError(
                f"batch {B} at positions [{first}, {last}] does not fit the KV cache "
                f"(max_batch {self.max_batch}, max_seq {self.max_seq}): call setup_caches"
            )
        return pos

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V]; with `logits_at` [B] (an index into T per row) only those, [B, V]:
        a prefill needs one row of logits per prompt, not T."""
        B, T = tokens.shape
        pos = self.positions(start_pos, B, T)  # [B, T]
        mask = None
        if not (tokens.is_cuda and isinstance(start_pos, int) and start_pos == 0 and T > 1):
            # Attend over cached positions [0, S) with S = the last position + 1.
            S = int(pos.max()) + 1
            mask = (torch.arange(S, device=pos.device) <= pos[..., None])[:, None]  # [B, 1, T, S]
        x, delta = self._layers(tokens, pos, mask)  # [B, T, D] each
        if logits_at is not None:
            rows = torch.arange(B, device=x.device)
            x, delta = x[rows, logits_at][:, None], delta[rows, logits_at][:, None]  # [B, 1, D]
        x = self.norm.add_forward(x, delta)[1]
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # gathered: [B, T, V]
        return logits if logits_at is None else logits[:, 0]

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One new token per row: tokens [B] at positions pos [B] (device tensors) -> logits
        [B, V]. Nothing here reads a device value on the host, so it can be captured in a
        CUDA graph; the caller keeps pos < max_seq (it cannot be checked without a sync)."""
        x, delta = self._layers(tokens[:, None], pos[:, None], None)
        x = self.norm.add_forward(x, delta, early_residual=True)[1]
        return self.lm_head(x)[:, 0, : self.config.vocab_size]  # [B, V]

    def _layers(
        self, tokens: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, PartialSum | None]:
        """The residual stream after the last layer as (x, delta): x + delta, the add left
        to the final norm (see DecoderLayer)."""
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [B, T, hd/2]
        x, delta = self.embed(tokens), None  # [B, T, D]
        for layer in self.layers:
            x, delta = layer(x, delta, pos, cos, sin, mask)
        return x, delta


# -- checkpoint -> model --------------------------------------------------------------------

# Checkpoint names (Hugging Face Llama naming; tpquant.checkpoint translates GGUF) of every
# tensor, by where it goes in this model. Fused layers list their parts in the order they are
# concatenated along out_features. Biases ("<name>.bias") exist where config.attention_bias
# (q/k/v/o) or config.mlp_bias (gate/up/down) say so. lm_head is absent when tied.
GLOBAL_WEIGHTS = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
LAYER_WEIGHTS = {  # under "model.layers.{i}."
    "attention_norm.weight": "input_layernorm.weight",
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.o_proj": ("self_attn.o_proj",),
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down": ("mlp.down_proj",),
}

# -- generation -----------------------------------------------------------------------------


@torch.no_grad()
def generate_greedy(
    model: Llama,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    comm: Communicator,
    stop_ids: Iterable[int] | None = None,
) -> list[int]:
    """Greedy continuation of one prompt, run by every rank in lockstep.

    Rank 0's prompt is used (broadcast). Rank 0 picks each token, the argmax of the gathered
    logits, and broadcasts it, so ranks never diverge even if their logits differ by an ulp.
    Stops after a token in `stop_ids` (default: the model's EOS tokens; it is returned) or
    after max_new_tokens.
    """
    prompt = comm.broadcast_object([int(t) for t in prompt_ids] if comm.rank == 0 else None)
    stop = set(model.config.eos_token_ids if stop_ids is None else stop_ids)
    if len(prompt) + max_new_tokens > model.max_seq:
        raise ValueError(
            f"prompt {len(prompt)} + {max_new_tokens} new tokens exceed max_seq {model.max_seq}"
        )
    device = model.embed.weight.device
    logits = model(torch.tensor([prompt], device=device), 0)[:, -1]  # prefill: [1, V]
    out: list[int] = []
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    while len(out) < max_new_tokens:
        if comm.rank == 0:
            token.fill_(int(logits[0].argmax()))
        comm.broadcast(token, root=0)
        out.append(int(token))
        if out[-1] in stop or len(out) == max_new_tokens:
            break
        logits = model(token, len(prompt) + len(out) - 1)[:, -1]  # decode: [1, V]
    return out
