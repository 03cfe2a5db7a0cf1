"""The training worker, its optimizers, compression and checkpoints; the model is in
:mod:`tplr.train.model`, what spans several processes in :mod:`tplr.train.parallel`."""
