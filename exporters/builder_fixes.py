"""What onnxruntime-genai's model builder (0.12.2) writes wrong for three families, put right in its process.

Each was found by comparing the builder's fp32 graph with PyTorch's logits on a tiny random checkpoint
(tests/test_families.py keeps the comparison):

- **OLMo** normalises with a LayerNorm that has no weight and no bias (``OlmoLayerNorm``: mean-centred,
  epsilon 1e-5). The builder gives it ones and zeros but keeps its default *simplified* norm (RMSNorm, no
  mean subtracted) and the default epsilon of 1e-6: logits off by up to 0.25, top-1 0.80. Fixed by
  building real LayerNormalization nodes with OLMo's epsilon. It also leaves out OLMo's ``clip_qkv`` (q, k and
  v clamped after their projections); a Clip node puts it back.
- **SmolLM3** leaves rotary out of every fourth layer (NoPE: ``no_rope_layers[i] == 0``). The builder turns
  the rotary inside GroupQueryAttention off for those layers, which sends them down its other branch: a
  separate RotaryEmbedding node that reads a ``position_ids`` input the graph does not declare (the graph
  does not load) and would rotate a layer that must not be. Fixed by passing a NoPE layer's queries and
  keys to GroupQueryAttention unrotated (do_rotary=0, no cos/sin caches).
- **gpt-oss** clamps its experts' SwiGLU at 7 (``GptOssExperts.limit``, hard-coded in transformers 4.57, not a
  config field). The builder passes ``swiglu_limit`` to ORT's MoE/QMoE only when the config has one, so it
  wrote none, and ORT then clamps nothing: on a tiny checkpoint whose activations pass 7 the logits were
  0.57 off (top-1 0.53; 0.0025 and 1.0 with the limit). Fixed by giving the builder the limit transformers uses.
- **8-bit experts** (QMoE with ``expert_weight_bits=8``, which this project writes at int8): the builder
  stores each weight's two's complement in a uint8, and ORT's CPU QMoE reads a uint8 as ``q - 128`` (its
  8-bit zero point): every negative weight came out 128 steps off, a tiny gpt-oss top-1 0.0. Fixed by
  storing ``q + 128``.

``apply()`` patches the builder's classes by name; it is called by exporters.stream_build before the
builder runs. The builder imports its classes as the top-level package ``builders``.
"""

from __future__ import annotations

from typing import Any

GPT_OSS_SWIGLU_LIMIT = 7.0  # transformers' GptOssExperts.limit
OLMO_EPSILON = 1e-5  # transformers' OlmoLayerNorm: F.layer_norm(..., eps=1e-5), not a config field


def _olmo(model_class: Any) -> None:
    init, input_proj = model_class.__init__, model_class.make_attention_input_proj

    def with_layernorm(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        init(self, config, *args, **kwargs)
        self.layernorm_attrs["simple"] = False
        self.layernorm_attrs["epsilon"] = OLMO_EPSILON
        self.clip_qkv = getattr(config, "clip_qkv", None)

    def clipped(self: Any, layer_id: int, attention: Any, root_input: str, **kwargs: Any) -> None:
        # OLMo clamps q, k and v to +-clip_qkv (OLMo-1.7-7B: 8); the builder leaves it out. With the
        # projections packed into one MatMul, one Clip over the packed output clamps all three alike.
        input_proj(self, layer_id, attention, root_input, **kwargs)
        if self.clip_qkv is None:
            return
        dtype = self.io_dtype.name
        clip = float(self.clip_qkv)
        bounds = [f"/model/constants/{dtype}/{-clip}", f"/model/constants/{dtype}/{clip}"]
        for path in ("q_path", "k_path", "v_path"):
            value = self.attention_attrs[path]
            if value:
                name = f"/model/layers.{layer_id}/attn/{path[0]}_clip/Clip"
                self.make_clip(name, [value, *bounds], self.io_dtype, self.values[value].shape)
                self.attention_attrs[path] = f"{name}/output_0"

    model_class.__init__ = with_layernorm
    model_class.make_attention_input_proj = clipped


def _smollm3(model_class: Any) -> None:
    make_attention = model_class.make_attention

    def attention(self: Any, layer_id: int, attention: Any, root_input: str, **kwargs: Any) -> None:
        if self.no_rope_layers[layer_id]:
            make_attention(self, layer_id, attention, root_input, **kwargs)
            return
        # A NoPE layer: keep the builder on its rotary-inside-attention branch (no RotaryEmbedding node, no
        # position_ids), with no caches, and write its GroupQueryAttention with do_rotary=0.
        window, rope = self.window_size, self.attention_attrs["use_rope_in_attn"]
        if self.layer_types[layer_id] == "full_attention":
            self.window_size = -1
        attention_op = self.make_attention_op

        def unrotated_op(*args: Any, **kw: Any) -> Any:
            self.attention_attrs["use_rope_in_attn"] = False
            try:
                return attention_op(*args, **kw)
            finally:
                self.attention_attrs["use_rope_in_attn"] = True  # what the caller set below

        self.attention_attrs["use_rope_in_attn"] = True
        self.make_rotary_embedding_caches = lambda: ("", "")
        self.make_attention_op = unrotated_op
        try:
            super(model_class, self).make_attention(layer_id, attention, root_input, **kwargs)
        finally:
            del self.make_rotary_embedding_caches, self.make_attention_op
            self.window_size = window
            self.attention_attrs["use_rope_in_attn"] = rope

    model_class.make_attention = attention


def _experts_8bit(model_class: Any) -> None:
    make_qmoe_weights = model_class.make_qmoe_weights

    def offset(self: Any, weights: Any) -> Any:
        qweight, scales = make_qmoe_weights(self, weights)
        if self.moe_attrs["expert_weight_bits"] == 8 and self.ep == "cpu":
            # the caller stores these as uint8; CPU QMoE reads uint8 - 128
            return qweight.to(dtype=_int16()) + 128, scales
        return qweight, scales

    model_class.make_qmoe_weights = offset


def _int16() -> Any:
    import torch

    return torch.int16


def _gpt_oss(model_class: Any) -> None:
    init = model_class.__init__

    def with_limit(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        init(self, config, *args, **kwargs)
        if self.moe_attrs.get("swiglu_limit") is None:
            self.moe_attrs["swiglu_limit"] = GPT_OSS_SWIGLU_LIMIT

    model_class.__init__ = with_limit


def apply() -> None:
    from builders.base import Model
    from builders.gptoss import GPTOSSModel
    from builders.olmo import OLMoModel
    from builders.smollm import SmolLM3Model

    _olmo(OLMoModel)
    _smollm3(SmolLM3Model)
    _gpt_oss(GPTOSSModel)
    _experts_8bit(Model)
