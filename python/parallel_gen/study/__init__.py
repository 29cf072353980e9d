"""Annotation studies around classify: several models x prompts against gold labels and
each other (:mod:`.compare`, :mod:`.agreement`, :mod:`.alpha`, :mod:`.report`), and the run
record every file job writes beside its output (:mod:`.record`). Nothing here is imported
until used: scikit-learn (the ``annotate`` extra) and matplotlib (``plot``) load on first use.
"""
