"""Tiny random configurations of Hugging Face causal LMs (the zoo of shared/arch-survey.md).

Hidden 64, vocab 256, 4 heads / 2 kv heads, intermediate 128; MoE 4 experts top-2.
"""

from __future__ import annotations

import dataclasses

import torch

LAYERS = 1
COMMON = dict(
    hidden_size=64, num_hidden_layers=LAYERS, vocab_size=256, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=128,
)
MOE = dict(num_experts_per_tok=2)


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    config_cls: str
    model_cls: str
    kwargs: dict
    moe: bool = False

    def build(self, seed: int = 0, **overrides) -> torch.nn.Module:
        import transformers

        config = getattr(transformers, self.config_cls)(**{**self.kwargs, **overrides})
        torch.manual_seed(seed)
        return getattr(transformers, self.model_cls)(config).eval()


DENSE = [
    Arch("llama", "LlamaConfig", "LlamaForCausalLM", COMMON),
    Arch("mistral", "MistralConfig", "MistralForCausalLM", COMMON),
    Arch("qwen2", "Qwen2Config", "Qwen2ForCausalLM", COMMON),
    Arch("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(COMMON, head_dim=16)),
    Arch("gemma2", "Gemma2Config", "Gemma2ForCausalLM", dict(COMMON, head_dim=16)),
    Arch("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM", dict(COMMON, head_dim=16)),
    Arch("phi3", "Phi3Config", "Phi3ForCausalLM", dict(COMMON, pad_token_id=0)),
    Arch("gpt2", "GPT2Config", "GPT2LMHeadModel",
         dict(n_embd=64, n_layer=LAYERS, n_head=4, n_inner=128, vocab_size=256, n_positions=128,
              bos_token_id=0, eos_token_id=0)),
    Arch("opt", "OPTConfig", "OPTForCausalLM",
         dict(hidden_size=64, num_hidden_layers=LAYERS, ffn_dim=128, num_attention_heads=4, vocab_size=256,
              max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=0, eos_token_id=0)),
    Arch("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM",
         dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128, vocab_size=256,
              max_position_embeddings=128)),
    Arch("falcon", "FalconConfig", "FalconForCausalLM",
         dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=256)),
    Arch("falcon_new_arch", "FalconConfig", "FalconForCausalLM",
         dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_kv_heads=2, vocab_size=256,
              new_decoder_architecture=True)),
    Arch("falcon_rw", "FalconConfig", "FalconForCausalLM",
         dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=256, bias=True, alibi=True,
              multi_query=False, parallel_attn=False)),
    Arch("stablelm", "StableLmConfig", "StableLmForCausalLM", COMMON),
    Arch("phi", "PhiConfig", "PhiForCausalLM", dict(COMMON, partial_rotary_factor=0.5)),
    Arch("gptj", "GPTJConfig", "GPTJForCausalLM",
         dict(n_embd=64, n_layer=LAYERS, n_head=4, n_inner=128, rotary_dim=8, vocab_size=256, n_positions=128,
              bos_token_id=0, eos_token_id=0)),
    Arch("bloom", "BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=LAYERS, n_head=4, vocab_size=256)),
    Arch("cohere", "CohereConfig", "CohereForCausalLM", COMMON),
    Arch("olmo2", "Olmo2Config", "Olmo2ForCausalLM", COMMON),
    Arch("granite", "GraniteConfig", "GraniteForCausalLM", COMMON),
]

MOE_ARCHS = [
    Arch("mixtral", "MixtralConfig", "MixtralForCausalLM", dict(COMMON, **MOE, num_local_experts=4), moe=True),
    Arch("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
         dict(COMMON, **MOE, num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=128,
              decoder_sparse_step=1, mlp_only_layers=[]), moe=True),
    Arch("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
         dict(COMMON, **MOE, num_experts=4, moe_intermediate_size=64, head_dim=16, decoder_sparse_step=1,
              mlp_only_layers=[]), moe=True),
    Arch("granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM", dict(COMMON, **MOE, num_local_experts=4), moe=True),
    # transposed expert weights [E, in, out] with biases, interleaved gate/up
    Arch("gpt_oss", "GptOssConfig", "GptOssForCausalLM", dict(COMMON, **MOE, num_local_experts=4, head_dim=16), moe=True),
]


MAMBA = dict(mamba_d_state=8)
# Hybrid decoders whose layer list mixes block classes (``model.layers`` holds attention and
# state-space layers of different classes): the layer list must be found whatever the mix.
HYBRID_ARCHS = [
    # JambaMambaDecoderLayer + JambaAttentionDecoderLayer (with a 4-expert MoE feed-forward)
    Arch("jamba", "JambaConfig", "JambaForCausalLM",
         dict(COMMON, **MAMBA, **MOE, num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1,
              expert_layer_period=2, expert_layer_offset=1, num_experts=4, mamba_d_conv=4, mamba_expand=2,
              mamba_dt_rank=8)),
    # Zamba2MambaDecoderLayer + Zamba2HybridLayer (a shared transformer block, LoRA adapters, mamba2);
    # its class does not support set_experts_implementation and its conv1d weights are 3-D
    Arch("zamba2", "Zamba2Config", "Zamba2ForCausalLM",
         dict(COMMON, **MAMBA, num_hidden_layers=2, mamba_headdim=16, n_mamba_heads=8, mamba_ngroups=1,
              layers_block_type=["mamba", "hybrid"], use_mem_eff_path=False, num_mem_blocks=1)),
]
# A mixture-of-experts class that rejects set_experts_implementation (its experts code is its own).
JETMOE = Arch("jetmoe", "JetMoeConfig", "JetMoeForCausalLM",
              dict(hidden_size=64, num_hidden_layers=1, num_key_value_heads=2, kv_channels=16, intermediate_size=128,
                   vocab_size=256, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128), moe=True)

# Models with several layer lists, one of which decodes: vision-language models (a vision tower
# beside the language model) and encoder-decoders whose encoder is the deeper, larger stack.
TEXT = dict(COMMON, num_hidden_layers=2)
VISION = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8)
IMAGE_TOKEN = 255
VLM_ARCHS = [
    # model.vision_tower + model.language_model (a CLIP tower: 16 patch features per 32x32 image)
    Arch("llava", "LlavaConfig", "LlavaForConditionalGeneration",
         dict(text_config=dict(TEXT, model_type="llama"), vision_config=dict(VISION, model_type="clip_vision_model"),
              image_token_index=IMAGE_TOKEN)),
    # model.vision_model + model.text_model
    Arch("idefics3", "Idefics3Config", "Idefics3ForConditionalGeneration",
         dict(text_config=dict(TEXT, model_type="llama"), vision_config=VISION, image_token_id=IMAGE_TOKEN,
              scale_factor=2)),
    # a SigLIP tower whose pooling head holds a [1, 1, D] ``probe`` (no expert)
    Arch("gemma3", "Gemma3Config", "Gemma3ForConditionalGeneration",
         dict(text_config=dict(TEXT, head_dim=16), vision_config=VISION, mm_tokens_per_image=4,
              image_token_index=IMAGE_TOKEN)),
]
ENCODER_DECODER_ARCHS = [
    # 4 encoder / 2 decoder layers: the encoder holds more parameters (whisper-large-v3-turbo's shape)
    Arch("bart", "BartConfig", "BartForConditionalGeneration",
         dict(d_model=64, encoder_layers=4, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
              encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=256, max_position_embeddings=128,
              tie_word_embeddings=False)),
    # T5: ``encoder.block`` / ``decoder.block``, each block a list of sub-layers
    Arch("t5", "T5Config", "T5ForConditionalGeneration",
         dict(d_model=64, d_kv=16, d_ff=128, num_layers=4, num_decoder_layers=2, num_heads=4, vocab_size=256,
              decoder_start_token_id=0)),
]

# What an encoder-decoder's decode step does not run: the cross-attention projections of the encoder
# output (computed once, then cached).
CROSS_ATTENTION_KV = ("encoder_attn.k_proj", "encoder_attn.v_proj", "EncDecAttention.k", "EncDecAttention.v")

BY_NAME = {a.name: a for a in DENSE + MOE_ARCHS + HYBRID_ARCHS + [JETMOE] + VLM_ARCHS + ENCODER_DECODER_ARCHS}


def text_batches(model: torch.nn.Module, n: int = 1, seed: int = 1) -> list:
    """Calibration text [2, 16] without the image token; an encoder-decoder's batches carry decoder
    ids too (T5's forward needs them)."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, IMAGE_TOKEN, (2, 16), generator=g) for _ in range(n)]
    return [dict(input_ids=x, decoder_input_ids=x[:, :8]) for x in ids] if model.config.is_encoder_decoder else ids
