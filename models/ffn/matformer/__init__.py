"""The ``matformer`` FFN kind (MatFormer, Devvrit et al. 2023): a nested SwiGLU whose first m
hidden units form a standalone sub-FFN for each configured granularity m (docs/matformer.md)."""

from models.ffn.matformer.config import MatFormerConfig
from models.ffn.matformer.layout import interleave_perm, to_canonical, to_stored
from models.ffn.matformer.module import MatFormerFFN, matformer_ffns, set_granularity
from models.spec import register_ffn

register_ffn(
    "matformer", MatFormerConfig, lambda config, d_model, layer_id: MatFormerFFN(
        d_model, config.d_ff, config.granularities, config.tp_interleave
    )
)

__all__ = [
    "MatFormerConfig", "MatFormerFFN", "interleave_perm", "matformer_ffns", "set_granularity", "to_canonical",
    "to_stored",
]
