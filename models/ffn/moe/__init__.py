"""The ``moe`` FFN kind: mixture of experts (docs/moe.md).

- config.py: ``MoEConfig`` (``model.ffn: {kind: moe, ...}``) and its validation;
- routers.py: softmax_topk, topk_softmax, sigmoid_bias, hash, compete's router;
- dispatch.py: grouping assignments by expert, the capacity rule, the weighted combine;
- experts.py: the stacked SwiGLU experts, grouped GEMM or per-expert loop;
- balancing.py: Switch loss, z-loss, CompeteSMoE's router loss, the aux-loss-free bias update;
- layer.py: the layer (routed + shared experts), its hooks, metrics and counts.
"""

from models.ffn.moe.config import MoEConfig
from models.ffn.moe.layer import MoE, build_moe
from models.spec import register_ffn

register_ffn("moe", MoEConfig, build_moe)

__all__ = ["MoE", "MoEConfig", "build_moe"]
