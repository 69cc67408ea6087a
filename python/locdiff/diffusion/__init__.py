"""Diffusion over SHDD vectors: schedules, samplers, the LocDiff loss and EMA weights."""
from locdiff.diffusion.ema import EMA
from locdiff.diffusion.losses import DiffusionConfig, diffusion_loss
from locdiff.diffusion.samplers import guided, sample_ddim, sample_ddpm, split_prediction
from locdiff.diffusion.schedules import Schedule, get_cosine_schedule, get_linear_schedule, get_schedule

__all__ = ["DiffusionConfig", "EMA", "Schedule", "diffusion_loss", "get_cosine_schedule",
           "get_linear_schedule", "get_schedule", "guided", "sample_ddim", "sample_ddpm",
           "split_prediction"]
