"""What users run: the command line, the query browser, the notebooks, the figures.

``cli``        the ``remap`` command (one sub-command per main step)
``browser``    the re-pooling query browser (ipywidgets)
``notebooks``  runs the guided-tour notebooks with papermill
``plots``      the figures of the notebooks and the demo
``demo``       the demo benchmark end to end (``remap demo``)
"""
