"""The ``autosp train`` job: a small Llama trained with sequence parallelism."""
