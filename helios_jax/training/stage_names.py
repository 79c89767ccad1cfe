"""The training stages by the loop that runs them (config.train.stage)."""
STAGE_LOSSES = ("stage1", "stage2", "stage3_ode")  # one loss, trainer.train
DISTILL_STAGES = ("stage3_dmd",)  # generator + critic, dmd_trainer.train_dmd
