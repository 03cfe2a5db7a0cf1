"""Window clock, node lifecycle, miner and validator."""
