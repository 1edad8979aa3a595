"""Models: the embedded default (built offline) and loading of Qwen-VL-family checkpoints."""
from .embedded import build_embedded_checkpoint, default_checkpoint_dir
from .loading import (
    VLProcessor,
    decoder_layers,
    final_hidden_states,
    forward_hidden,
    input_embeddings,
    language_model,
    lm_head_weight,
    load_model_and_processor,
    vision_module,
)

__all__ = ["build_embedded_checkpoint", "default_checkpoint_dir", "load_model_and_processor", "VLProcessor",
           "vision_module", "decoder_layers", "language_model", "input_embeddings", "lm_head_weight",
           "forward_hidden", "final_hidden_states"]
