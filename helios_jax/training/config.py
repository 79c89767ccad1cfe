"""The training config (spec §7.1) shared by the run presets (training/presets.py): one builder,
the per-stage numbers passed in, and the tiny variant for tests and the CPU demo."""
from __future__ import annotations

import ml_collections

# Fields whose change makes a checkpoint unusable (parameter/optimizer shapes, the data order the
# iterator state refers to, or what the run is): resuming with another value is refused.
RESUME_GUARDED = (
    "model.config", "model.init", "model.dtype",
    "lora",
    "train.stage", "seed", "train.grad_accum",
    "data_dir", "data.batch_size", "data.seed",
    "pyramid",
    # Stage 3: the critic's adapters and heads are in the checkpoint, the score backbone shapes them
    "critic", "score.init", "gan.enabled", "gan.hooks", "gan.cond_map_dim",
    "ema",  # whether the state carries an EMA, and how it was averaged so far
)


def training_config(*, stage: str, lr: float, schedule: str, warmup_steps: int, seed: int,
                    lora_rank: int, patch_embedding: str, history_patches: str,
                    sample_ratios: tuple = (), batch_size: int, tiny: bool = False) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # The four fields every training config has (spec api.md): where the data is, how long to train,
    # how often to save, and the run's seed.
    config.data_dir = ""  # a `helios-jax prepare-data` folder, or "synthetic"
    config.total_steps = 1_000_000  # the reference's placeholder: run until stopped
    config.checkpoint_every = 500
    config.seed = seed
    config.model = dict(config="helios_14b", init="", dtype="bfloat16", remat_policy="full")
    config.lora = dict(rank=lora_rank, alpha=float(lora_rank), patch_embedding=patch_embedding,
                       history_patches=history_patches)
    # batch_size is global: the reference ran `batch_size` per GPU; scale it with the device count.
    config.data = dict(batch_size=batch_size, seed=seed, worker_count=4)
    config.history = dict(drop_t2v=0.4, drop_i2v=0.0, drop_v2v=0.4, corrupt=True, corrupt_mode="noise",
                          clean_prob=0.1, noise_ratio=1 / 3, saturation=False, saturation_clean_prob=0.1)
    config.pyramid = dict(sample_ratios=tuple(sample_ratios))
    config.optimizer = dict(lr=lr, schedule=schedule, warmup_steps=warmup_steps, b1=0.9, b2=0.999, eps=1e-8,
                            weight_decay=1e-4, clip_norm=1.0)
    config.train = dict(stage=stage, log_every=10, keep_checkpoints=3, grad_accum=1)
    config.mesh = dict(data=1, fsdp=-1, tensor=1, seq=1)
    if tiny:
        shrink_to_tiny(config)
    return config


def shrink_to_tiny(config: ml_collections.ConfigDict) -> None:
    """The tiny random transformer, a small batch and a few steps: CPU tests and the demo."""
    config.model.update(config="tiny-random", dtype="float32", remat_policy="none")
    if not config.data_dir:
        config.data_dir = "synthetic"  # random batches in the loader's format; point it at prepared data
    config.lora.update(rank=4, alpha=4.0)
    config.data.update(batch_size=2, worker_count=0)
    config.optimizer.update(lr=1e-3, warmup_steps=min(config.optimizer.warmup_steps, 5))
    config.update(total_steps=20, checkpoint_every=10)
    config.train.update(log_every=1, keep_checkpoints=2)


def flatten(config) -> dict:
    """{"a.b": value} for every leaf (tuples as lists, as JSON stores them)."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, (dict, ml_collections.ConfigDict)):
                walk(value, name + ".")
            else:
                out[name] = list(value) if isinstance(value, tuple) else value
    walk(config, "")
    return out


def guarded_differences(saved: dict, current: dict) -> list[str]:
    """`field (saved -> current)` for each resume-guarded field that differs; inputs are `flatten`ed."""
    def guarded(name):
        return any(name == g or name.startswith(g + ".") for g in RESUME_GUARDED)
    names = sorted(n for n in set(saved) | set(current) if guarded(n))
    return [f"{n} ({saved.get(n, '<absent>')!r} -> {current.get(n, '<absent>')!r})"
            for n in names if saved.get(n) != current.get(n)]
