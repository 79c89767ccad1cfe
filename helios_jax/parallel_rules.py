"""The project's logical-axis sharding rules (configs/sharding.py re-exports them).

Parameters: fully-sharded data parallel over `fsdp` on the model dimension, Megatron-style
tensor parallel over `tensor` on the heads / MLP / vocabulary dimension. Activations: the batch
over `data` (and `fsdp`, which is data parallel for activations), tokens over `seq`, heads and
MLP features over `tensor`.
"""
PARAMETER_RULES = (
    ("embed", ("fsdp",)),
    ("heads", ("tensor", "fsdp")),
    ("mlp", ("tensor", "fsdp")),
    ("vocab", ("tensor", "fsdp")),
    ("embed_out", ()),
    ("modulation", ()),
    ("layers", ()),
    ("conv_in", ()),
    ("conv_out", ("fsdp",)),
)

ACTIVATION_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", ("seq",)),
    ("embed", ()),
    ("heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("frames", ()),
    ("height", ("seq",)),
    ("width", ()),
    ("channels", ()),
)
