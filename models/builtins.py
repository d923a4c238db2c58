"""The built-in families and kinds; importing this module registers them (models/spec.py
imports it on the first lookup)."""

import models.attention.layer  # noqa: F401
import models.decoder  # noqa: F401
import models.retention  # noqa: F401
import models.yoco  # noqa: F401
import models.ffn.matformer  # noqa: F401
import models.ffn.moe  # noqa: F401
import models.ffn.swiglu  # noqa: F401
import models.ffn.gated  # noqa: F401
import models.encdec  # noqa: F401
