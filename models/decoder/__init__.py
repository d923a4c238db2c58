"""The ``decoder`` family: a Llama-style decoder-only language model (config.py, model.py),
trained on packed GPT samples (models/causal_lm.py), converted to and from Hugging Face
``LlamaForCausalLM`` (hf.py), and with an MoE FFN to ``MixtralForCausalLM`` and
``Qwen3MoeForCausalLM`` (hf_moe.py)."""

from models import causal_lm
from models.decoder.config import DecoderConfig
from models.decoder.hf import LLAMA_ADAPTER
from models.decoder.hf_moe import MIXTRAL_ADAPTER, QWEN3_MOE_ADAPTER
from models.decoder.model import Decoder
from models.spec import ModelSpec, register_family


SPEC = register_family(
    ModelSpec(
        name="decoder",
        config=DecoderConfig,
        build=Decoder,
        inputs=causal_lm.inputs_with_token_ids,
        targets=causal_lm.targets,
        loss_tokens=causal_lm.loss_tokens,
        loss=causal_lm.loss,
        hf=(LLAMA_ADAPTER, MIXTRAL_ADAPTER, QWEN3_MOE_ADAPTER),
    )
)
