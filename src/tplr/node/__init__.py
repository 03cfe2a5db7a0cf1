"""The nodes: the miner and the validator (their roles, judgement, evaluation, scoring, the
global model). Where a node meets the others is :mod:`tplr.node.network`; the process
around it (settings, lifecycle, logging, metrics) is :mod:`tplr.node.process`."""
