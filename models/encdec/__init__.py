"""The ``encdec`` family: T5-style encoder-decoder models (config.py, model.py; docs/encdec.md),
trained on span corruption (objective.py, data/span_corruption.py), converted to and from
Hugging Face ``T5ForConditionalGeneration`` (hf.py)."""

from models import causal_lm
from models.encdec import objective
from models.encdec.counting import row_training_flops
from models.encdec.config import EncDecConfig
from models.encdec.hf import T5_ADAPTER
from models.encdec.model import EncoderDecoder
from models.spec import ModelSpec, register_family

SPEC = register_family(
    ModelSpec(
        name="encdec",
        config=EncDecConfig,
        build=EncoderDecoder,
        inputs=objective.inputs,
        targets=causal_lm.targets,
        loss_tokens=causal_lm.loss_tokens,
        loss=causal_lm.loss,
        hf=(T5_ADAPTER,),
        task=objective.task,
        row_flops=row_training_flops,
    )
)

__all__ = ["EncDecConfig", "EncoderDecoder", "SPEC"]
