"""Training (spec training.md): the three stages, each module named by the stage it serves.

  stages.py     config.train.stage -> its loop, loss, data and step cost (`helios-jax train` calls `run`)
  presets.py    the spec §7.1 runs: stage1[:post], stage2[:post], stage3_ode, stage3_dmd[:gan], `:tiny`
  config.py     the config builder and resume guards; stage3_config.py adds Stage 3's fields

  Stage 1 (Base)   stage1_flow_matching.py: the flow-matching loss with history
  Stage 2 (Mid)    stage2_pyramid.py: the pyramid loss
  Stage 3a (ODE)   stage3_ode_regression.py (loss), stage3_ode_data.py (prepare-ode records, loader),
                   stage3_ode_teacher.py (the teacher's roll-out), stage3_ode_schedules.py
  Stage 3b (DMD)   stage3_dmd.py (losses, critic), stage3_dmd_trainer.py (the generator/critic loop),
                   stage3_backward_simulation.py (the roll-out), stage3_gan_heads.py (GAN version)
  Stage 3, both    stage3_distill_schedules.py: the student's and the score models' timestep tables

  Shared: trainer.py (the one-loss loop), lora.py, history_augment.py, data.py (the prepare-data loader),
  synthetic.py, model_setup.py, optimizer.py, ema.py, checkpointing.py, metrics.py; after a run:
  run_weights.py (a workdir's trained model), release_folder.py (merge-lora's output folder).
"""
