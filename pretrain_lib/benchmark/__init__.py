"""A zero-shot multiple-choice benchmark from held-out plays, in the manner of HellaSwag.

An item is a passage of a play the training split never sees (``context``), cut in the middle of a
spoken line after a word, and four one-word ``endings``: the word that truly follows and three words
that follow the same kind of cut elsewhere in held-out text, of the same length and drawn as often
as the text uses them, so that only fit to the context tells them apart (version 2; see ``items``).
A causal model picks the ending with the highest log-likelihood per UTF-8 byte, so a tokenizer that
cuts text into fewer, longer tokens gains nothing from it; chance is 25 %. ``items`` builds and reads the fixed, versioned item file (``pretrain_lib/assets/``),
``scoring`` scores a course model and a unigram baseline on it with a bootstrap interval,
``lm_eval_task/`` defines the same benchmark for EleutherAI's ``lm-eval``.
"""
