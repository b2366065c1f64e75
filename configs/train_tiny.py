"""Training the tiny Dream on a small prepared dataset (tests and the demo): packs of 128 tokens, 2 x 2 packs per
update, byte-level text tokens, no user speech. Point `data.root` at a folder holding the prepared sources."""

from omnidiff_jax.configs.tiny import get_config as tiny
from omnidiff_jax.train.settings import add_training, source


def get_config():
    cfg = add_training(tiny(), workdir="runs/tiny", steps=20, seq_len=128, micro_batch=2, grad_accum=2, sources={
        "t2i": source("t2i", "t2i", jsonl=("t2i.jsonl",)),
        "tts": source("tts", "tts", jsonl=("tts.jsonl",)),
        "vqa": source("vqa", "vqa", jsonl=("vqa.jsonl",)),
    })
    cfg.data.root = "data/tiny"
    cfg.train.checkpoint_every = 5
    cfg.optim.lr = 1e-3
    cfg.prepare.text_tokenizer = "bytes"
    cfg.prepare.user_image_size, cfg.prepare.image_size = 64, 32  # 16 and 4 codes with a fake tokenizer
    return cfg
