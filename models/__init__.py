"""Model architectures as plain ``nn.Module``s, organised as families and kinds (models/spec.py).

Importing ``models`` registers the built-ins: the ``attention`` mixer, the ``swiglu`` FFN and the
``decoder`` family.
"""

import models.attention.layer  # noqa: F401
import models.decoder  # noqa: F401
import models.ffn.swiglu  # noqa: F401
