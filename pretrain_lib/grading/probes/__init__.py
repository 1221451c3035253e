"""Hidden probes, one file per exercise (``<exercise id>.py``), read as text by the grader.

``_common.py`` is prepended to each: the judges' helpers. See ``pretrain_lib.grading.probe_runner``.
"""
