"""The error every checkpoint reader, loader and converter raises (readers: `safetensors_stream`)."""


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used; the message names it."""
