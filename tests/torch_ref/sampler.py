"""The reference masked-diffusion sampling loop (`_sample`, Omni-Diffusion `generation_utils.py`) in PyTorch.

A transcription of the reference loop, written for our parity tests and benchmarks and driven by the torch Dream of
`torch_ref/dream.py`. It keeps the reference's control flow and quirks on purpose: host syncs every step,
boolean gathers of the masked rows, a Python loop over generated ids for the repeat penalty, a Python-list
position-penalty map, `torch.topk` with a data-dependent k, the canvas [0]*P ++ [MASK]*N with the prompt
embeddings injected every step, the one-position logit shift, and the misaligned, zero-padded CFG row.
"""

import torch
import torch.nn.functional as F


def top_p_filter(logits, top_p):
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
    drop[..., 0] = False
    remove = torch.zeros_like(drop).scatter(-1, order, drop)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def top_k_filter(logits, top_k):
    kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(logits, temperature, top_p, top_k, margin=False, neg_entropy=False, repeat_penalty=1.0,
                  max_position_penalty=1.0, past_x=None, mask_id=None, generator=None):
    """`sample_tokens`: (confidence [n], x0 [n]) for masked rows [n, V]."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if repeat_penalty != 1.0:
        seen = past_x[(past_x != 0) & (past_x != mask_id)]
        for token in sorted(set(seen.tolist())):
            column = logits[:, token]
            logits[:, token] = torch.where(column < 0, column * repeat_penalty, column / repeat_penalty)
    if max_position_penalty != 1.0:
        n = logits.shape[0]
        if n > 100:
            ramp = [r / (n - 100) * (max_position_penalty - 1.0) + 1.0 for r in range(n - 100)]
            m = torch.cat([torch.ones(100), torch.tensor(ramp)]).to(logits.dtype)[:, None]
            logits = torch.where(logits < 0, logits * m, logits / m)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.multinomial(probs.float(), 1, generator=generator)[:, 0]
        confidence = probs.gather(-1, x0[:, None])[:, 0]
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin:
        top2 = torch.sort(probs, dim=-1, descending=True)[0][:, :2]
        confidence = top2[:, 0] - top2[:, 1]
    if neg_entropy:
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return confidence, x0


@torch.no_grad()
def reference_sample(model, prompt_embeds, *, gen_length, steps, alg="entropy", temperature=0.0, top_p=0.9,
                     top_k=50, alg_temp=0.0, block_size=-1, cfg=0.0, uncond_ids=None, repeat_penalty=1.0,
                     max_position_penalty=1.0, add_boa=False, mask_id, boa_id, eps=1e-3, seed=0, cut_ties=None):
    """Runs `_sample` on prompt embeddings [B, P, H]. Returns (x [B, P+N], histories: list of x after each step).

    cut_ties: a list to which every step of a confidence alg (alg_temp 0) appends whether its top-k cut falls in a
    tie (the k-th and (k+1)-th largest confidences equal), where `torch.topk`'s choice is unspecified."""
    gen = torch.Generator().manual_seed(seed)
    embed = model.model.embed_tokens
    b, p = prompt_embeds.shape[:2]
    n = gen_length
    x = torch.cat([torch.zeros(b, p, dtype=torch.long), torch.full((b, n), mask_id, dtype=torch.long)], dim=1)
    length = x.shape[1]
    total_steps = min(steps, n)
    block_size = n if block_size is None or block_size < 0 else block_size
    if add_boa:
        n_mask = (x == mask_id).sum()
        x[:, int((length - n_mask) + n_mask * 0.2)] = boa_id
    n_mask = int((x == mask_id).sum())
    block_num = -(-n_mask // block_size)
    histories = []
    for block in range(block_num):
        block_mask = torch.zeros(length, dtype=torch.bool)
        block_mask[p + block * block_size: p + (block + 1) * block_size] = True
        block_steps = int(block_mask.sum() / (length - p) * total_steps)
        t = torch.linspace(1, eps, block_steps + 1)
        for i in range(block_steps):
            mask_index = x == mask_id
            if mask_index.sum() == 0:
                break
            embeds = embed(x)
            embeds[:, :p] = prompt_embeds
            if cfg > 0:
                un = torch.cat([torch.tensor(uncond_ids)[None], x[:, p:]], dim=1)
                un_embeds = embed(un)
                if un_embeds.shape[1] != length:
                    un_embeds = torch.cat([un_embeds, torch.zeros_like(embeds[:, :length - un_embeds.shape[1]])], 1)
                both = model.forward_dream(inputs_embeds=torch.cat([embeds, un_embeds]))
                cond, uncond = both[:1], both[1:]
                logits = uncond + (cfg + 1) * (cond - uncond)
            else:
                logits = model.forward_dream(inputs_embeds=embeds)
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            rows = logits[mask_index]
            ratio = 1 - t[i + 1] / t[i]
            if alg == "origin":
                p_transfer = ratio if i < block_steps - 1 else 1
                x0 = torch.full_like(x[mask_index], mask_id)
                chosen = torch.rand(x0.shape, generator=gen) < p_transfer
                _, x0[chosen] = sample_tokens(rows[chosen], temperature, top_p, top_k,
                                              max_position_penalty=max_position_penalty, generator=gen)
                x[mask_index] = x0
            else:
                options = dict(margin=alg == "topk_margin", neg_entropy=alg in ("entropy", "entropy-penalty"),
                               max_position_penalty=max_position_penalty, generator=gen)
                if alg == "entropy-penalty" and histories:
                    options.update(repeat_penalty=repeat_penalty, past_x=histories[-1], mask_id=mask_id)
                elif alg not in ("maskgit_plus", "topk_margin", "entropy", "entropy-penalty"):
                    raise RuntimeError(f"Unknown alg: {alg}")
                confidence, x0 = sample_tokens(rows, temperature, top_p, top_k, **options)
                in_block = block_mask[mask_index[0]]
                confidence = confidence + torch.where(in_block, 0.0, -torch.inf).to(confidence.dtype)
                m = (x[:, block_mask] == mask_id).sum()
                k = int(m * ratio) if i < block_steps - 1 else int(m)
                k = max(k, 1)
                if alg_temp is None or alg_temp == 0:
                    chosen = torch.topk(confidence, k).indices
                    if cut_ties is not None:
                        ranked = torch.sort(confidence, descending=True).values
                        cut_ties.append(k < len(ranked) and bool(ranked[k - 1] == ranked[k]))
                else:
                    weights = F.softmax(confidence / alg_temp, dim=-1)
                    chosen = torch.multinomial(weights.float(), k, replacement=False, generator=gen)
                update = torch.full_like(x0, mask_id)
                update[chosen] = x0[chosen]
                x[mask_index] = update
            histories.append(x.clone())
    return x, histories
