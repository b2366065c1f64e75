"""The reference's training data path and loss in plain Python/PyTorch, written from
Omni-Diffusion `dataset_qwen2.py`, `finetune.sh` and transformers' `ForCausalLMLoss`, for parity tests.

- `corrupt`: tail padding and the per-token mask draw, drawing exactly as the reference does: Python
  `random.randint(1, max_n)` (only when a tail is appended), torch `rand(1)` (a discarded per-sample p_mask),
  `rand(n)` for t, `rand(n)` for r over the first..last supervised span.
- `Packer`: the per-source buffer of `Qwen2Dataset.__getitem__` (emit on overflow, drop over-long samples,
  pad with eos / -100 / attention 0, positions continuing to the pack length).
- `causal_lm_loss`: HF ForCausalLMLoss (fp32 logits, logits[i] vs labels[i+1], mean over non-ignored labels).
- `reference_update`: one optimizer update as DeepSpeed ZeRO-2 runs it: per pack (one per rank and micro-step)
  the mean-CE gradient, averaged over ranks and summed over micro-steps, clip_grad_norm 1.0, torch AdamW.
"""

import random

import torch

IGNORE = -100


def corrupt(input_ids, targets, eos=151643, mask=151666, max_n=16, eps=1e-3, special_ratio=0.6):
    """Lists in, (input_ids, labels) lists out; consumes `random` and torch's global RNG like the reference."""
    ids = torch.tensor(input_ids)
    labels = torch.tensor(targets)
    if not (ids == eos).any():
        n = random.randint(1, max_n)
        ids = torch.cat([ids, torch.full((n,), eos)])
        labels = torch.cat([labels, torch.full((n,), eos)])
    torch.rand(1)  # the reference's per-sample p_mask, drawn and never used
    masked = torch.zeros(len(ids), dtype=torch.bool)
    eligible = (labels != IGNORE).nonzero()[:, 0]
    if len(eligible):
        first, last = int(eligible[0]), int(eligible[-1])
        t = torch.rand(last - first + 1)
        threshold = (1 - eps) * t + eps
        r = torch.rand(last - first + 1)
        special = labels[first:last + 1] == eos
        masked[first:last + 1] = torch.where(special, r <= threshold * special_ratio, r <= threshold)
    masked &= labels != IGNORE
    ids = torch.where(masked, torch.full_like(ids, mask), ids)
    labels = torch.where(masked, labels, torch.full_like(labels, IGNORE))
    return ids.tolist(), labels.tolist()


class Packer:
    """One source's buffer. `add(ids, labels)` returns a finished pack (dict of [1, L] tensors) or None."""

    def __init__(self, max_len, pad_id=151643):
        self.max_len, self.pad_id = max_len, pad_id
        self.tokens, self.labels, self.positions = [], [], []
        self.dropped = 0

    def add(self, ids, labels):
        if len(ids) > self.max_len:
            self.dropped += 1
            return None
        out = None
        if len(self.tokens) + len(ids) > self.max_len:
            out = self.emit()
        self.tokens += ids
        self.labels += labels
        self.positions += list(range(len(ids)))
        return out

    def emit(self):
        tokens, labels, positions = self.tokens, self.labels, self.positions
        attention = [1] * len(tokens)
        pad = self.max_len - len(tokens)
        if pad > 0:
            tokens = tokens + [self.pad_id] * pad
            labels = labels + [IGNORE] * pad
            positions = positions + list(range(positions[-1] + 1, self.max_len))  # then cut to max_len
            attention = attention + [0] * pad
        self.tokens, self.labels, self.positions = [], [], []
        cut = lambda x: torch.tensor(x[:self.max_len])[None]  # noqa: E731
        return {"input_ids": cut(tokens), "labels": cut(labels), "position_ids": cut(positions),
                "attention_mask": cut(attention)}


def causal_lm_loss(logits, labels):
    """HF ForCausalLMLoss with num_items_in_batch None: mean CE of logits[:, i] against labels[:, i+1]."""
    logits = logits.float()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                             ignore_index=IGNORE, reduction="mean")


def pack_loss(model, pack):
    """The reference's micro-batch loss for one pack through `DreamModel.forward` (tests/torch_ref/dream.py)."""
    logits = model(pack["input_ids"], pack["attention_mask"], pack["position_ids"])
    return causal_lm_loss(logits, pack["labels"])


def reference_update(model, optimizer, micro_steps, lr, clip=1.0):
    """One update: `micro_steps` is a list (accumulation) of lists (ranks) of packs."""
    optimizer.zero_grad()
    ranks = len(micro_steps[0])
    for packs in micro_steps:
        for pack in packs:
            (pack_loss(model, pack) / ranks).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()


def deepspeed_lr(count, peak, warmup, total, cos_min_ratio=0.1):
    """The lr DeepSpeed's WarmupCosineLR (log warmup) gives optimizer update number `count` (0-based)."""
    import math

    j = count - 1  # the scheduler starts at lr 0 and steps after each update
    warmup = max(2, warmup)
    if j < 0:
        return 0.0
    if j < warmup:
        return peak * math.log(j + 1) / math.log(warmup)
    progress = (j - warmup + 1) / (total - warmup)
    return peak * max(0.0, cos_min_ratio + (1 - cos_min_ratio) * (1 + math.cos(math.pi * progress)) / 2)
