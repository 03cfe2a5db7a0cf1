"""The model: the GPT and Llama presets (:mod:`.gpt`), the head's loss, FLOPs and MFU, peak
memory by arithmetic, and the vocabulary against the data's."""
