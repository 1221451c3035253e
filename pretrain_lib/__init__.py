"""pretrain_lib: the small library behind the pretraining course."""
__version__ = "0.1.0"
