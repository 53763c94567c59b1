"""Layer 1, core: what every method runs on.

Capturing a layer (``capture``), finding layers (``layers``, ``resolve``), token layouts of
transformers (``layout``, ``attention``), model outputs and targets (``outputs``), backward rules
(``rules``), input checks (``inputs``) and the shared forward/backward pass (``engine``).
"""
