"""Model architectures as plain ``nn.Module``s, organised as families and kinds (models/spec.py).

The built-ins (the ``attention`` mixer, the ``swiglu`` FFN, the ``decoder`` family) register
themselves when models/spec.py is first imported; importing ``models`` alone loads no torch, so
torch-free tools (``models.configtree``) stay fast to import.
"""
