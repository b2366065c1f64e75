"""Three-stage masked-diffusion training of Omni-Diffusion in JAX.

data.py      records, chat template, supervision, corruption, packing, the grain pipeline
prepare.py   `omnidiff data prepare`: image/speech tokenizers run once, offline, into ArrayRecord shards
loss.py      the shifted masked cross-entropy and the packed forward pass (speech features scattered in)
optim.py     AdamW, clipping, the frozen pad row, DeepSpeed's log-warmup + cosine schedule
speech.py    user speech: the frozen SenseVoice encoder and the trained projector wired into the loss
init.py      where a run's first weights come from (random, Dream-7B resized, Omni-Diffusion, a previous stage)
settings.py  the training sections of a config, with the reference's values
checkpoints.py  the run's orbax checkpoints that survive a kill, its parameters read back or exported
metrics.py   the metrics log (metrics.jsonl) and the line printed per logged step
trainer.py   the sharded train step and the loop
"""
