"""The ``yoco`` family: YOCO decoder-decoder language models (Sun et al. 2024; config.py,
model.py, docs/yoco.md), trained on packed GPT samples like the decoder (models/causal_lm.py)."""

from models import causal_lm
from models.spec import ModelSpec, register_family
from models.yoco.config import CrossAttentionConfig, YocoConfig
from models.yoco.model import Yoco

SPEC = register_family(
    ModelSpec(
        name="yoco",
        config=YocoConfig,
        build=Yoco,
        inputs=causal_lm.inputs_with_token_ids,
        targets=causal_lm.targets,
        loss_tokens=causal_lm.loss_tokens,
        loss=causal_lm.loss,
    )
)

__all__ = ["CrossAttentionConfig", "SPEC", "Yoco", "YocoConfig"]
