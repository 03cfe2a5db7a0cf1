"""``python -m tplr.train`` (also under ``torchrun ... -m tplr.train``)."""

from tplr.train.entry import main

raise SystemExit(main())
