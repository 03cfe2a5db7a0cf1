"""`tplr doctor`: one-line checks of a host, its settings, buckets, dataset, run and node."""
