"""Layer 3, the Python API: :func:`~camlens.api.explainer.explain` (a frozen request run as named
steps over the methods layer) and :class:`~camlens.api.explanation.Explanation` (data only: its
``show``/``save``/``figure`` are thin calls into :mod:`camlens.viz`)."""
