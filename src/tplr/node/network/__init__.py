"""Where a node meets the others: the stores and their prefixes, peers and where their objects
live, gathering commitments and payloads, the lead's approvals and checkpoints, run.json and
per-window reports."""
