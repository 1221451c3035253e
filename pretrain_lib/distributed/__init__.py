"""Chapter 3: distributed training.

``launch.run_torchrun`` starts a strategy module under torchrun from a notebook or a test;
each strategy module (``data_parallel``, ``zero``, ``tensor_parallel``,
``pipeline_parallel``, ``collectives``) runs a few steps of a small Transformer on every
rank and has rank 0 write ``metrics.json``. ``comm_model`` estimates communication time
per step for a model size, a parallel layout and link bandwidths; ``exercise_check`` grades
the chapter's exercise on 2 ranks.
"""
