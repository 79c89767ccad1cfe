"""Training: data, LoRA, the stage losses (flow matching, pyramid, ODE regression, DMD/GAN), EMA, the trainer loop."""
