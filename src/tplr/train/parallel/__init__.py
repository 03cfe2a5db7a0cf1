"""One model over several processes: device and ``torch.distributed`` setup, FSDP2 sharding, state
written and read per rank, whole-parameter operations, and compression across ranks."""
