"""Torch models to port: the zoo both port test files use.

Written as users write torch models (``nn.Module`` subclasses, ``forward`` with tensor
methods and ``torch.nn.functional``), small enough that each runs in well under a second.
``ZOO[name]()`` returns ``(model, example_inputs)``, the model seeded; ``SLOW`` lists the entries
too big for the fast tier (torchvision's resnet18 and a full-width ViT), each with a small
counterpart in ``ZOO``.

| name | what it exercises |
| --- | --- |
| small_cnn | Conv2d, ReLU (module and function), MaxPool2d, flatten, Linear |
| audio1d | Conv1d with groups / dilation / 'same' / 'valid' / stride, BatchNorm1d, pools 1d, GELU tanh, SiLU |
| gru_tagger | Embedding (padding_idx), GRU bidirectional 2 layers batch-first, log_softmax |
| encoder_block | MultiheadAttention (batch-first, key padding mask), LayerNorm, GELU, Dropout, residuals |
| attention_seq_first | MultiheadAttention (sequence-first, need_weights, attn_mask), F.scaled_dot_product_attention (mask, causal) |
| unet | Conv2d / BatchNorm2d / ConvTranspose2d / cat / MaxPool2d / sigmoid, a user Block class used four times |
| groupnorm_net | GroupNorm, SiLU, leaky_relu, AdaptiveAvgPool2d, AvgPool2d, Dropout2d, ModuleList |
| bag_classifier | Embedding, class token and positional embedding as free parameters, a buffer, ModuleDict heads |
| seq2seq | LSTM encoder (2 layers, bidirectional) -> LSTM decoder started from its states, sequence-first |
| tensor_ops | split / chunk / einsum / where / clamp / indexing / stack / expand / casts / arange / max / in-place |
| transformer_classifier | nn.TransformerEncoder (pre-norm, gelu, final norm) with a key padding mask |
| gpt | nanoGPT's attention: a causal mask buffer sliced to T, arange positions, a size assert, a block loop |
| mini_resnet | torchvision's BasicBlock (downsample, shared inplace ReLU), Sequential stages, AdaptiveAvgPool2d |
| vit | a vision transformer in plain tensor ops: patch reshape, class token, positional embedding, qkv attention |
| resnet18 (slow) | torchvision.models.resnet18 |
| vit_base (slow) | the plain-ops ViT at 8 heads x 64 wide, 4 blocks |
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _seeded(cls, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return cls(*args, **kwargs)


def _randomise_bn(model: nn.Module, seed: int = 5) -> nn.Module:
    """Non-trivial batch-norm affine parameters and running statistics, so eval mode and the
    conversion are tested on values that are not ones and zeros."""
    g = _gen(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


# ----------------------------------------------------------------------------------------- #


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc(x)


def small_cnn():
    return _seeded(SmallCNN), (torch.randn(3, 1, 8, 8, generator=_gen(1)),)


class Audio1d(nn.Module):
    """A 1-d convolutional audio net: grouped, dilated, strided convolutions."""

    def __init__(self):
        super().__init__()
        self.front = nn.Conv1d(2, 8, kernel_size=5, stride=2, padding=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.dw = nn.Conv1d(8, 8, kernel_size=3, padding="same", dilation=2, groups=8, bias=False)
        self.pw = nn.Conv1d(8, 12, kernel_size=1, padding="valid")
        self.bn2 = nn.BatchNorm1d(12, momentum=0.2)
        self.grouped = nn.Conv1d(12, 12, kernel_size=4, padding="same", groups=3, padding_mode="reflect")
        self.pool = nn.MaxPool1d(3, stride=2, padding=1)
        self.avg = nn.AvgPool1d(2)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(12, 4)

    def forward(self, wave):
        h = F.gelu(self.bn1(self.front(wave)), approximate="tanh")
        h = self.pool(h)
        h = F.silu(self.bn2(self.pw(self.dw(h))))
        h = self.avg(h + self.grouped(h))
        h = self.gap(h).squeeze(-1)
        return self.head(h)


def audio1d():
    return _randomise_bn(_seeded(Audio1d)), (torch.randn(4, 2, 32, generator=_gen(2)),)


class GRUTagger(nn.Module):
    """A bidirectional 2-layer GRU tagger over token ids."""

    def __init__(self, vocab=20, dim=8, hidden=6, tags=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.gru = nn.GRU(dim, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, tags)

    def forward(self, tokens):
        h, last = self.gru(self.embed(tokens))
        scores = self.out(h) + last.sum(0).mean(-1, keepdim=True).unsqueeze(1)
        return F.log_softmax(scores, dim=-1)


def gru_tagger():
    tokens = torch.randint(0, 20, (3, 7), generator=_gen(3))
    tokens[:, -2:] = 0  # padding
    return _seeded(GRUTagger), (tokens,)


class EncoderBlock(nn.Module):
    """A pre-norm transformer encoder block: MultiheadAttention + LayerNorm + GELU MLP."""

    def __init__(self, dim=16, heads=4, p=0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=p, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(p), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(p)

    def forward(self, x, pad):
        h = self.norm1(x)
        a, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        x = x + self.drop(a)
        return x + self.mlp(self.norm2(x))


def encoder_block():
    x = torch.randn(2, 5, 16, generator=_gen(4))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, -2:] = True
    return _seeded(EncoderBlock), (x, pad)


class AttentionSeqFirst(nn.Module):
    """Sequence-first MultiheadAttention returning its weights, and scaled_dot_product_attention."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.mha = nn.MultiheadAttention(dim, heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        T, B, C = x.shape
        mask = torch.triu(torch.ones((T, T), dtype=torch.bool), diagonal=1)
        a, w = self.mha(x, x, x, attn_mask=mask)
        h = a.transpose(0, 1)  # (B, T, C)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        keep = torch.ones((T, T), dtype=torch.bool).tril()
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        y = (causal + masked).transpose(1, 2).reshape(B, T, C)
        return self.proj(y), w


def attention_seq_first():
    return _seeded(AttentionSeqFirst), (torch.randn(6, 2, 8, generator=_gen(5)),)


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class UNet(nn.Module):
    """A two-level UNet: down, up with ConvTranspose2d, skip connection by cat."""

    def __init__(self):
        super().__init__()
        self.down1 = Block(3, 4)
        self.down2 = Block(4, 8)
        self.up = nn.ConvTranspose2d(8, 4, kernel_size=2, stride=2)
        self.up_odd = nn.ConvTranspose2d(4, 4, kernel_size=3, stride=1, padding=1, groups=2)
        self.dec = Block(8, 4)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        s1 = self.down1(x)
        h = self.down2(F.max_pool2d(s1, 2))
        h = self.up_odd(self.up(h))
        h = self.dec(torch.cat([h, s1], dim=1))
        return torch.sigmoid(self.out(h))


def unet():
    return _randomise_bn(_seeded(UNet)), (torch.randn(2, 3, 8, 8, generator=_gen(6)),)


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stages = nn.ModuleList([
            nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1)),
            nn.Sequential(nn.GroupNorm(2, 8, eps=1e-3), nn.Dropout2d(0.1), nn.Conv2d(8, 8, 3, padding=1)),
        ])
        self.pool = nn.AvgPool2d(2, stride=1)
        self.gap = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = x + stage(x)
        x = F.leaky_relu(self.pool(x), 0.2)
        return self.fc(self.gap(x).flatten(1))


def groupnorm_net():
    return _seeded(GroupNormNet), (torch.randn(2, 3, 10, 10, generator=_gen(7)),)


class BagClassifier(nn.Module):
    """Token embeddings, a class token and a positional embedding (free parameters), a
    buffer, mean pooling and two heads in a ModuleDict."""

    def __init__(self, vocab=30, dim=8, length=6):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, length + 1, dim) * 0.02)
        self.register_buffer("scale", torch.full((dim,), 0.5))
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({"topic": nn.Linear(dim, 4), "sentiment": nn.Linear(dim, 2)})

    def forward(self, ids):
        B = ids.shape[0]
        x = self.tok(ids) * self.scale
        cls = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos
        x = self.norm(x)
        pooled = x[:, 1:].mean(dim=1) + x[:, 0]
        return torch.cat([self.heads["topic"](pooled), self.heads["sentiment"](pooled)], dim=-1)


def bag_classifier():
    return _seeded(BagClassifier), (torch.randint(0, 30, (4, 6), generator=_gen(8)),)


class Seq2Seq(nn.Module):
    """An LSTM encoder (2 layers, bidirectional) whose final states start a decoder LSTM."""

    def __init__(self, din=5, hidden=6, dout=3):
        super().__init__()
        self.encoder = nn.LSTM(din, hidden, num_layers=2, bidirectional=True)
        self.bridge = nn.Linear(2 * hidden, hidden)
        self.decoder = nn.LSTM(din, hidden, num_layers=1)
        self.out = nn.Linear(hidden, dout)

    def forward(self, src, tgt):
        _, (h, c) = self.encoder(src)
        h0 = torch.tanh(self.bridge(torch.cat([h[-2], h[-1]], dim=-1))).unsqueeze(0)
        c0 = torch.cat([c[-2], c[-1]], dim=-1)[:, : h0.shape[-1]].unsqueeze(0).contiguous()
        y, _ = self.decoder(tgt, (h0, c0))
        return self.out(y)


def seq2seq():
    return _seeded(Seq2Seq), (torch.randn(7, 2, 5, generator=_gen(9)), torch.randn(4, 2, 5, generator=_gen(10)))


class TensorOps(nn.Module):
    """The tensor functions real forwards use, on one small input."""

    def __init__(self, dim=12):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.linspace(-1.0, 1.0, 4))

    def forward(self, x):
        B, T, C = x.size()
        h = self.proj(x)
        a, b, c = h.split(4, dim=-1)
        left, right = torch.chunk(h, 2, dim=2)
        mix = torch.einsum("btc,bsc->bts", left, right) / math.sqrt(C)
        mix = mix.masked_fill(torch.eye(T, dtype=torch.bool), -1e4).softmax(dim=-1)
        y = torch.where(a > 0, b, c * 0.5).clamp(min=-2.0, max=2.0)
        y = y + self.gate.view(1, 1, -1) * torch.sigmoid(c)
        pooled = torch.stack([y.max(dim=1)[0], y.min(dim=1).values, y.mean(1), y.sum(1) / T], dim=1)
        odd = (torch.arange(T) % 2 == 1).float().view(1, T, 1)
        even = y[:, ::2] + (y * odd).sum(1, keepdim=True)
        z = (mix @ h)[:, -1, 2:10].reshape(B, 2, 4).permute(0, 2, 1).contiguous().view(B, -1)
        count = (x > 0).float().sum(dim=(1, 2), keepdim=False).unsqueeze(-1)
        scaled = z * (count / (T * C)) - torch.zeros((B, 1)) + torch.ones_like(z).cumsum(-1) * 0.01
        scaled[:, 0] = scaled[:, 0] * 2.0
        scaled += 1.0
        flat = pooled.flatten(1) @ torch.ones(16, 2) * 0.1
        idx_out = even.abs().amax(dim=(1, 2)).unsqueeze(1).expand(-1, 2)
        return torch.cat([scaled, flat, idx_out, y[..., 1:3].squeeze(1).transpose(1, 2)[:, 0, :2]], dim=-1)


def tensor_ops():
    return _seeded(TensorOps), (torch.randn(3, 5, 12, generator=_gen(11)),)


class TransformerClassifier(nn.Module):
    """torch's own nn.TransformerEncoder (pre-norm, gelu, final norm) over embedded tokens with a
    key padding mask, mean-pooled over the real tokens."""

    def __init__(self, vocab=25, dim=16, heads=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=32, dropout=0.1, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(dim),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens):
        pad = tokens == 0
        h = self.encoder(self.embed(tokens), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))


def transformer_classifier():
    tokens = torch.randint(1, 25, (3, 6), generator=_gen(16))
    tokens[0, 4:] = 0
    return _seeded(TransformerClassifier), (tokens,)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd=16, n_head=2, block_size=8):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        assert T <= self.bias.shape[-1], "sequence longer than the block"
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPT(nn.Module):
    """A nanoGPT-style decoder: a causal mask buffer sliced to the sequence, positions from
    torch.arange, a size assert, a loop over a ModuleList of blocks."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(20, 16)
        self.wpe = nn.Embedding(8, 16)
        self.h = nn.ModuleList([CausalSelfAttention() for _ in range(2)])
        self.ln_f = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 20, bias=False)

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = x + block(x)
        return self.lm_head(self.ln_f(x))


def gpt():
    return _seeded(GPT), (torch.randint(0, 20, (2, 6), generator=_gen(17)),)


def mini_resnet():
    """torchvision's ResNet with BasicBlock (downsample blocks, shared inplace ReLU), one block
    per stage: the resnet18 code path at 1/4 of its depth and a small image."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)
    return _randomise_bn(model), (torch.randn(4, 3, 64, 64, generator=_gen(12)),)


def resnet18():
    from torchvision.models import resnet18 as build

    torch.manual_seed(0)
    return _randomise_bn(build(num_classes=10)), (torch.randn(2, 3, 64, 64, generator=_gen(13)),)


class ViTAttention(nn.Module):
    def __init__(self, dim, heads, p):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(p)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ViTBlock(nn.Module):
    def __init__(self, dim, heads, p):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, heads, p)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = F.gelu(self.fc1(self.norm2(x)))
        return x + self.drop(self.fc2(h))


class ViT(nn.Module):
    """A vision transformer written with plain tensor ops (patches by reshape/permute)."""

    def __init__(self, image=16, patch=4, chans=3, dim=16, depth=2, heads=2, classes=10, p=0.1):
        super().__init__()
        self.patch = patch
        n = (image // patch) ** 2
        self.patch_embed = nn.Linear(chans * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([ViTBlock(dim, heads, p) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, img):
        B, C, H, W = img.shape
        p = self.patch
        x = img.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), -1)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def vit():
    return _seeded(ViT), (torch.randn(2, 3, 16, 16, generator=_gen(14)),)


def vit_base():
    return _seeded(ViT, image=32, patch=8, dim=64, depth=4, heads=8), (torch.randn(2, 3, 32, 32, generator=_gen(15)),)


ZOO = {
    "small_cnn": small_cnn,
    "audio1d": audio1d,
    "gru_tagger": gru_tagger,
    "encoder_block": encoder_block,
    "attention_seq_first": attention_seq_first,
    "unet": unet,
    "groupnorm_net": groupnorm_net,
    "bag_classifier": bag_classifier,
    "seq2seq": seq2seq,
    "tensor_ops": tensor_ops,
    "mini_resnet": mini_resnet,
    "vit": vit,
    "transformer_classifier": transformer_classifier,
    "gpt": gpt,
}

SLOW = {
    "resnet18": resnet18,
    "vit_base": vit_base,
}
