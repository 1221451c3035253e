"""Chapter 3: distributed training.

``launch.run_torchrun`` starts a strategy module under torchrun from a notebook or a test.
The strategies are functions applied to the course's GPT (``strategies``: ``apply_ddp``,
``apply_fsdp``, ``apply_zero1``, ``apply_tensor_parallel``, ``pipeline_stage``); each
chapter module (``data_parallel``, ``zero``, ``tensor_parallel``, ``pipeline_parallel``,
``collectives``) applies one to the model, trains a few steps with the engine's
``train_step`` on every rank, compares with one process (``reference``), and has rank 0
write ``metrics.json`` in one schema (``metrics``). ``process_group`` joins and leaves the
group; ``arguments``, ``faults`` and ``errors`` are the modules' command line, failure
injection and traceback hand-off. ``comm_model`` estimates communication time per step;
``exercise_check`` grades the chapter's exercise on 2 ranks. Chapter 9.2: ``context_parallel`` (ring
attention over a sequence split across ranks) and its runner ``context_parallel_run``.
"""
