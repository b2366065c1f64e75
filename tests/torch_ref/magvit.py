"""A PyTorch MAGVIT-v2 (Omni-Diffusion `modeling_magvitv2.py`) with the reference's state_dict names, for parity tests.

Written from a description of the reference, independently of our JAX code, in NCHW: GroupNorm(32, eps 1e-6), swish,
F.pad (0, 1, 0, 1) before the stride-2 downsampling conv, F.interpolate nearest x2, single-head bmm attention, and the
LFQ with its `embedding` / `power_vals` buffers. Widths and depths come from a plain dict so tests can shrink it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

REAL = dict(ch=128, encoder_ch_mult=(1, 2, 2, 4, 4), encoder_num_res_blocks=(4, 3, 4, 3, 4),
            decoder_ch_mult=(1, 1, 2, 2, 4), decoder_num_res_blocks=(4, 4, 3, 4, 3))


def norm(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1 = norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
        k = self.k(h).reshape(b, c, hh * ww)  # b, c, hw
        v = self.v(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # [b, query, key]
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c = ch
        for level, (mult, n) in enumerate(zip(ch_mult, num_res_blocks)):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(n):
                stage.block.append(ResnetBlock(c, ch * mult))
                c = ch * mult
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(c)
            self.down.append(stage)
        self.mid = Mid(c)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, 13, 3, 1, 1)
        self.quant_conv = nn.Conv2d(13, 13, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.quant_conv(self.conv_out(swish(self.norm_out(h))))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks):
        super().__init__()
        c = ch * ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(13, 13, 1)
        self.conv_in = nn.Conv2d(13, c, 3, 1, 1)
        self.mid = Mid(c)
        stages = {}
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks[level]):
                stage.block.append(ResnetBlock(c, ch * ch_mult[level]))
                c = ch * ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(c)
            stages[level] = stage
        self.up = nn.ModuleList([stages[level] for level in range(len(ch_mult))])
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class LFQuantizer(nn.Module):
    def __init__(self, bits=13):
        super().__init__()
        idx = torch.arange(2 ** bits)
        binary = (idx[:, None] >> torch.arange(bits - 1, -1, -1)) & 1
        self.register_buffer("embedding", binary.float() * 2 - 1)
        self.register_buffer("power_vals", 2 ** torch.arange(bits - 1, -1, -1))

    def indices(self, z):
        """z [B, 13, h, w] -> [B, h*w] int64 (sign test z > 0, exactly 0 negative)."""
        return (self.power_vals.reshape(1, -1, 1, 1) * (z > 0).float()).sum(1).long().reshape(z.shape[0], -1)

    def entry(self, codes):
        """codes [B, N] -> z_q [B, 13, sqrt(N), sqrt(N)]."""
        b, n = codes.shape
        side = int(math.sqrt(n))
        return self.embedding[codes.reshape(-1)].view(b, side, side, -1).permute(0, 3, 1, 2).contiguous()


class MAGVITv2(nn.Module):
    def __init__(self, cfg=REAL):
        super().__init__()
        self.encoder = Encoder(cfg["ch"], cfg["encoder_ch_mult"], cfg["encoder_num_res_blocks"])
        self.decoder = Decoder(cfg["ch"], cfg["decoder_ch_mult"], cfg["decoder_num_res_blocks"])
        self.quantize = LFQuantizer()

    def get_code(self, pixels):
        return self.quantize.indices(self.encoder(pixels))

    def decode_code(self, codes):
        return self.decoder(self.quantize.entry(codes))


def random_magvit(cfg, seed=0) -> MAGVITv2:
    """A reference model with random weights, GroupNorm affines included (so none is the identity)."""
    torch.manual_seed(seed)
    model = MAGVITv2(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model
