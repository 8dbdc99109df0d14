"""Planning before spending compute: `recommend` (the guide's decision tree) and `estimate` (memory and time).

Everything here works from a model's architecture config alone: models are built on PyTorch's meta device (shapes,
no storage), so a 70B estimate needs no weights, no download and no GPU.
"""
