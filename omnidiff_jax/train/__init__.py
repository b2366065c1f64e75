"""Three-stage masked-diffusion training of Omni-Diffusion in JAX.

data.py      records, chat template, supervision, corruption, packing, the grain pipeline
prepare.py   `omnidiff data prepare`: image/speech tokenizers run once, offline, into ArrayRecord shards
loss.py      the shifted masked cross-entropy and the packed forward pass (speech features scattered in)
optim.py     AdamW, clipping, the frozen pad row, DeepSpeed's log-warmup + cosine schedule
init.py      where a run's first weights come from (random, Dream-7B resized, Omni-Diffusion, a previous stage)
settings.py  the training sections of a config, with the reference's values
trainer.py   the sharded train step, orbax checkpoints that survive a kill, metrics
"""
