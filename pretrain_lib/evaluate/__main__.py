"""``python -m pretrain_lib.evaluate``."""
from .run import main

raise SystemExit(main())
