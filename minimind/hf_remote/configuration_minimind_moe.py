"""MiniMind MoE configuration for transformers (remote code: `trust_remote_code=True`).

A Llama-shaped decoder whose feed-forward block is a mixture of experts: a softmax router picks
`num_experts_per_tok` of `num_experts` SwiGLU experts per token (weights renormalised to sum to 1 when
`norm_topk_prob`), and `num_shared_experts` SwiGLU experts see every token, without a gate. Every expert, routed
or shared, is `intermediate_size` wide. The field names are Llama's where Llama has the field.
"""
from transformers import PretrainedConfig


class MiniMindMoEConfig(PretrainedConfig):
    model_type = "minimind_moe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 6400,
        hidden_size: int = 640,
        intermediate_size: int = 1728,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 1e6,
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        num_shared_experts: int = 1,
        norm_topk_prob: bool = True,
        aux_loss_alpha: float = 0.1,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        **kwargs,
    ):
        if hidden_act != "silu":
            raise ValueError(f"MiniMind experts are SwiGLU (hidden_act 'silu'), got {hidden_act!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        # config.json also carries transformers' newer `rope_parameters` ({"rope_type": "default", "rope_theta"});
        # this model reads rope_theta, which save_checkpoint keeps equal to it.
        self.rope_theta = rope_theta
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.norm_topk_prob = norm_topk_prob
        self.aux_loss_alpha = aux_loss_alpha
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        # Some transformers versions keep these fields only when a config class declares them; set them again.
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.use_cache = use_cache
