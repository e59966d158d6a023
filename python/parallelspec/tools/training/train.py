"""Group-wise parallel training of the parallel (or EAGLE-style) drafter on extracted shards.

Per step: a global batch of sequences (sharded over DDP ranks), anchors sampled in the
generated region (shared by the batch), one training forward (``parallel_train_forward`` /
``eagle_train_forward``), and the loss

    sum_d w_d * CE_d / sum_d w_d  +  feat_weight * SmoothL1(g_t, f_{t+1})

where CE_d is the soft cross-entropy at depth d (d = 1: real positions, d > 1: slot d - 1 of
each group) against the target's top-K probabilities renormalised within the draft vocabulary
(positions whose target top-1 lies outside it are masked out), averaged over the positions
of the *global* batch, so that N ranks compute exactly the gradient one process would.

``distill_from`` (a saved EAGLE-style drafter, frozen): at depths >= 2 the label is the mix
(1 - w) * target + w * teacher, where the teacher's depth-d distribution comes from its
teacher-forced chain at the same anchor (``eagle_train_forward``: it has seen the true tokens
up to depth d - 1, which the mask slot has not). CE against a mixture is the same mix of CEs,
so the two terms are computed apart; anchors past the teacher's reach (a + k - 1 >= n) keep the
target's label alone.

Logged (JSON lines in <out>/log.jsonl): loss, per-depth train top-1 agreement, and at each
evaluation the held-out per-depth top-1 agreement and the estimated accepted tokens per
greedy chain step (1 + the number of leading depths whose top-1 equals the target's).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..common import device_arg
from ...drafters import EagleDrafter, ParallelDrafter, build_network
from ...drafters.checkpoint import LAYOUTS
from . import dist as pdist
from .forwards import TrainingForward, train_forward
from .warmstart import warm_start


# ---------------------------------------------------------------- data

class ShardData:
    """Extracted sequences held in memory (see extract.py for the shard layout)."""

    def __init__(self, paths, max_len: int | None = None, limit_tokens: int | None = None, aux: bool = False):
        """aux: also hold the shards' aux features (``extract --aux-layers``; the peagle layout's
        input), whose layers ``aux_layers`` then gives; a shard without them is refused."""
        self.seqs = []
        self.aux_layers = None
        keys = ("ids", "feat", "topk_ids", "topk_p") + (("aux",) if aux else ())
        tokens = 0
        for p in paths:
            shard = torch.load(p)
            if aux:
                layers = shard.get("aux_layers")
                if layers is None or (self.aux_layers is not None and layers != self.aux_layers):
                    raise ValueError(f"--data: {p} holds {'no aux features' if layers is None else f'aux layers {layers}'}"
                                     f"{'' if self.aux_layers is None else f', the shards before it {self.aux_layers}'}; "
                                     "--layout peagle reads the hidden states of the same target layers in every shard: "
                                     "make the shards with `parallelspec extract --aux-layers eagle3`")
                self.aux_layers = layers
            for i in range(len(shard["ids"])):
                n = len(shard["ids"][i]) if max_len is None else min(max_len, len(shard["ids"][i]))
                if n - shard["start"][i] < 2:
                    continue        # nothing generated to learn from
                self.seqs.append({k: shard[k][i][:n] for k in keys} | {"start": shard["start"][i]})
                tokens += n
                if limit_tokens is not None and tokens >= limit_tokens:
                    return

    def __len__(self):
        return len(self.seqs)

    def generated_tokens(self) -> int:
        return sum(len(s["ids"]) - s["start"] for s in self.seqs)

    def batch(self, indices, device) -> dict:
        """Right-padded batch. Real input t = (ids[t + 1], feat[t]) (and aux[t], "aux_features",
        when held); label position s holds the target's distribution of ids[s + 1]; valid[s]: that
        token is a generated one."""
        seqs = [self.seqs[i] for i in indices]
        N = max(len(s["ids"]) for s in seqs)
        B, K, d = len(seqs), seqs[0]["topk_ids"].shape[1], seqs[0]["feat"].shape[1]
        ids = torch.zeros(B, N, dtype=torch.long)
        feat = torch.zeros(B, N, d, dtype=torch.bfloat16)
        tk_ids = torch.zeros(B, N, K, dtype=torch.long)
        tk_p = torch.zeros(B, N, K, dtype=torch.float16)
        valid = torch.zeros(B, N, dtype=torch.bool)
        for r, s in enumerate(seqs):
            n = len(s["ids"])
            ids[r, :n] = s["ids"]
            feat[r, :n] = s["feat"]
            tk_ids[r, :n] = s["topk_ids"]
            tk_p[r, :n] = s["topk_p"]
            valid[r, max(s["start"] - 1, 0):n - 1] = True
        out = {"tokens": ids[:, 1:], "features": feat[:, :-1].float(), "next_features": feat[:, 1:].float(),
               "topk_ids": tk_ids, "topk_p": tk_p.float(), "valid": valid,
               "first_anchor": max(min(s["start"] for s in seqs) - 2, 0)}
        if "aux" in seqs[0]:
            aux = torch.zeros(B, N, seqs[0]["aux"].shape[1], dtype=torch.bfloat16)
            for r, s in enumerate(seqs):
                aux[r, :len(s["ids"])] = s["aux"]
            out["aux_features"] = aux[:, :-1].float()
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in out.items()}


def build_draft_vocab(data: ShardData, size: int, prior: torch.Tensor | None = None,
                      prior_weight: float = 0.3) -> tuple[torch.Tensor, float]:
    """The `size` target ids the target most often chooses in the generated text (draft id 0 =
    most frequent), mixed with a prior (token counts of the ShareGPT training split) so that
    little generated text still gives a broad vocabulary: 180k generated tokens hold only ~8k
    distinct choices, and a 16k vocabulary filled by them alone covered 87% of held-out
    choices, mixed with the prior 97.7%. Returns the ids and their share of the generated choices."""
    top1 = _choices(data)
    vocab = max(int(top1.max()) + 1, 0 if prior is None else prior.numel())
    gen = torch.bincount(top1, minlength=vocab).double()
    score = gen / gen.sum().clamp(min=1)
    if prior is not None:
        p = prior.double()
        score = (1 - prior_weight) * score + prior_weight * p / p.sum().clamp(min=1)
        score = score + 1e-12 * p / p.max().clamp(min=1)      # ties (unseen ids) by the prior
    ids = score.topk(min(size, vocab)).indices
    return ids, float(gen[ids].sum() / gen.sum().clamp(min=1))


def _choices(data: ShardData) -> torch.Tensor:
    """The target's top-1 choices over the generated text of every sequence."""
    return torch.cat([s["topk_ids"][max(s["start"] - 1, 0):len(s["ids"]) - 1, 0].long() for s in data.seqs])


def vocab_coverage(data: ShardData, draft_to_target: torch.Tensor) -> float:
    """The share of the target's generated choices that a draft vocabulary holds."""
    return float(torch.isin(_choices(data), draft_to_target.long()).double().mean())


def target_to_draft(draft_to_target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    t2d = torch.full((vocab_size,), -1, dtype=torch.long, device=draft_to_target.device)
    t2d[draft_to_target] = torch.arange(draft_to_target.numel(), device=draft_to_target.device)
    return t2d


# ---------------------------------------------------------------- loss

def label_rows(anchors: torch.Tensor, depth: int, n: int):
    """Label positions for the real rows [n] and the slots [A, depth - 1] (s = a + 2 + j)."""
    real = torch.arange(n, device=anchors.device) + 1
    slots = anchors[:, None] + 2 + torch.arange(depth - 1, device=anchors.device)
    return real, slots


def gather_labels(batch: dict, pos: torch.Tensor):
    """Labels at label positions pos [...] (out of range = invalid) for every batch row."""
    N = batch["valid"].shape[1]
    inside = pos < N
    p = pos.clamp(max=N - 1)
    return (batch["topk_ids"][:, p], batch["topk_p"][:, p], batch["valid"][:, p] & inside)


def soft_ce(logits, topk_ids, topk_p, t2d):
    """Soft CE against the target's top-K renormalised within the draft vocabulary, and top-1
    agreement, per row (rows whose target top-1 lies outside the draft vocabulary are the
    caller's to drop: nothing to learn there)."""
    d = t2d[topk_ids]                                  # [..., K] draft ids or -1
    q = topk_p * (d >= 0)
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-9)
    logp = torch.log_softmax(logits.float(), dim=-1)
    ce = -(q * logp.gather(-1, d.clamp(min=0))).sum(-1)
    return ce, logits.argmax(-1) == d[..., 0]


@dataclass
class TrainConfig:
    kind: str = "parallel"               # "parallel" or "eagle"
    depth: int = 4
    draft_vocab: int = 16384             # 0: the full target vocabulary
    vocab_prior: str | None = None       # token counts (torch.save'd tensor) mixed into the vocabulary choice
    head: str = "target"
    num_layers: int = 1
    slot1: str = "mask"                  # parallel drafter: "mask" or "draft" (DraftConfig.slot1)
    layout: str = "fused"                # "fused", "eagle3" or "peagle" (DraftConfig.layout)
    steps: int = 1000
    batch_size: int = 16                 # sequences per global step
    max_len: int = 512
    anchor_frac: float = 0.25            # share of anchor positions that get a group
    lr: float = 1e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    feat_weight: float = 0.1
    depth_weights: list = field(default_factory=list)     # [] = all 1
    distill_from: str | None = None      # a saved EAGLE-style drafter: its depth-d distribution
    distill_weight: float = 0.5          # ... mixed into the labels of depths >= 2 with this weight
    restart_schedule: bool = False       # on resume: a fresh warmup + cosine cycle from the resumed step
    init_from: str | None = None         # a saved drafter to start a fresh run from (warmstart.py)
    bf16: bool = False
    seed: int = 0
    eval_every: int = 200
    eval_sequences: int = 64
    eval_anchor_stride: int = 1
    checkpoint_every: int = 200
    time_budget: float | None = None     # seconds; stop early (cosine schedule kept)
    stop_after: int | None = None        # steps in this invocation (a later run resumes)
    train_tokens: int | None = None      # use only the first N tokens of training data


def inputs_of(net, batch: dict) -> torch.Tensor:
    """The features a network reads: the aux hidden states (peagle layout), else the last one."""
    return batch["aux_features"] if net.cfg.layout == "peagle" else batch["features"]


def anchor_sample(batch, n: int, depth: int, kind: str, frac: float, gen: torch.Generator, device):
    lo = batch["first_anchor"]
    hi = n - 1 - (depth - 1 if kind == "eagle" else 0)   # eagle feeds tokens up to a + depth - 1
    if hi < lo:
        return torch.zeros(0, dtype=torch.long, device=device)
    pool = torch.arange(lo, hi + 1)
    count = max(1, round(frac * len(pool)))
    pick = pool[torch.randperm(len(pool), generator=gen)[:count]].sort().values
    return pick.to(device)


def forward_losses(model, net, cfg: TrainConfig, batch: dict, anchors: torch.Tensor, t2d: torch.Tensor,
                   teacher=None):
    """Per-depth sums of CE and agreement, their counts, and the feature regression sum. The
    head runs only at rows with a label (most of the step's cost is the head)."""
    n = batch["tokens"].shape[1]
    with torch.autocast(batch["tokens"].device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        real_g, slot_g = model(batch["tokens"], inputs_of(net, batch), anchors)
    teacher_slots = teacher_features(teacher, batch, anchors, cfg) if teacher is not None else None
    real_pos, slot_pos = label_rows(anchors, cfg.depth, n)
    ce_sum, agree_sum, count = [], [], []
    for d in range(cfg.depth):
        g, pos = (real_g, real_pos) if d == 0 else (slot_g[:, :, d - 1], slot_pos[:, d - 1])
        topk_ids, topk_p, valid = gather_labels(batch, pos)
        valid = valid & (t2d[topk_ids[..., 0]] >= 0)
        if d == 0:
            feat_valid = valid
        with torch.autocast(batch["tokens"].device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = net.logits(g[valid])
        ce, agree = soft_ce(logits, topk_ids[valid], topk_p[valid], t2d)
        if teacher is not None and d > 0:
            t_ce, reached = teacher_ce(teacher, teacher_slots[:, :, d - 1], logits, valid, t2d)
            ce = torch.where(reached, (1 - cfg.distill_weight) * ce + cfg.distill_weight * t_ce, ce)
        ce_sum.append(ce.sum())
        agree_sum.append(agree.sum())
        count.append(valid.sum())
    feat_err = F.smooth_l1_loss(real_g.float()[feat_valid], batch["next_features"][feat_valid], reduction="none")
    return (torch.stack(ce_sum), torch.stack(agree_sum), torch.stack(count), feat_err.mean(-1).sum(),
            feat_valid.sum())


@torch.no_grad()
def teacher_features(teacher, batch: dict, anchors: torch.Tensor, cfg: TrainConfig):
    """The frozen teacher's slot features [B, A, k-1, d] at `anchors`; NaN where its chain
    would run past the tokens (those rows keep the target's label alone)."""
    n = batch["tokens"].shape[1]
    reach = anchors + cfg.depth - 1 < n
    with torch.autocast(batch["tokens"].device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        _, inner = train_forward(teacher, batch["tokens"], inputs_of(teacher, batch), anchors[reach])
    out = inner.new_full((inner.shape[0], anchors.shape[0], *inner.shape[2:]), float("nan"))
    out[:, reach] = inner
    return out


@torch.no_grad()
def _teacher_labels(teacher, g: torch.Tensor, top_k: int = 32):
    """Teacher features [R, d] -> its top-K (target ids, probabilities) per row."""
    p = torch.softmax(teacher.logits(g.to(teacher.norm.weight.dtype)), dim=-1)
    top = p.topk(min(top_k, p.shape[-1]), dim=-1)
    return teacher.draft_to_target[top.indices], top.values


def teacher_ce(teacher, slot_feats: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor, t2d: torch.Tensor):
    """Soft CE of the student's `logits` (rows of `valid`) against the teacher's distribution at
    the same rows, and which rows the teacher reached (the others: CE 0, not to be used)."""
    g = slot_feats[valid]
    ok = ~g.isnan().any(-1)
    ce = logits.new_zeros(logits.shape[0])
    if ok.any():
        ids, p = _teacher_labels(teacher, g[ok])
        ce = ce.index_put((ok.nonzero()[:, 0],), soft_ce(logits[ok], ids, p, t2d)[0])
    return ce, ok


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(net, cfg: TrainConfig, data: ShardData, t2d, device, batch_size: int = 8) -> dict:
    """Held-out per-depth top-1 agreement (every anchor in the generated region), the share of
    positions whose target top-1 is among the drafter's top 4 (what a tree of width 4 per depth
    could catch), the accepted tokens per greedy chain step, 1 + leading depths that agree,
    over anchors whose k labels all exist, and the share of target choices in the draft vocabulary."""
    was_training = net.training
    net.eval()
    agree_sum = torch.zeros(cfg.depth, dtype=torch.float64)
    count = torch.zeros(cfg.depth, dtype=torch.float64)
    top4_sum = torch.zeros(cfg.depth, dtype=torch.float64)
    chain_sum, chain_n, in_vocab = 0.0, 0, 0
    seqs = list(range(min(cfg.eval_sequences, len(data))))
    for s in range(0, len(seqs), batch_size):
        batch = data.batch(seqs[s:s + batch_size], device)
        n = batch["tokens"].shape[1]
        hi = n - 1 - (cfg.depth - 1 if cfg.kind == "eagle" else 0)
        anchors = torch.arange(batch["first_anchor"], hi + 1, cfg.eval_anchor_stride, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            real_g, slot_g = train_forward(net, batch["tokens"], inputs_of(net, batch), anchors)
            depth_logits = net.logits(torch.cat([real_g[:, anchors, None], slot_g], dim=2))   # [B, A, k, V]
        real_pos, slot_pos = label_rows(anchors, cfg.depth, n)
        pos = torch.cat([real_pos[anchors, None], slot_pos], dim=1)                      # [A, k]
        topk_ids, _, valid = gather_labels(batch, pos)
        # a target top-1 outside the draft vocabulary (t2d = -1) is a miss
        want = t2d[topk_ids[..., 0]]
        top = depth_logits.topk(min(4, depth_logits.shape[-1]), dim=-1).indices
        agree = top[..., 0] == want
        top4_sum += ((top == want[..., None]).any(-1) & valid).sum((0, 1)).double().cpu()
        in_vocab += int(((want[..., 0] >= 0) & valid[..., 0]).sum())
        agree_sum += (agree & valid).sum((0, 1)).double().cpu()
        count += valid.sum((0, 1)).double().cpu()
        full = valid.all(-1)
        lead = torch.cumprod(agree.long(), dim=-1).sum(-1)
        chain_sum += float((1 + lead)[full].sum())
        chain_n += int(full.sum())
    net.train(was_training)
    top1 = (agree_sum / count.clamp(min=1)).tolist()
    top4 = (top4_sum / count.clamp(min=1)).tolist()
    coverage = in_vocab / max(float(count[0]), 1.0)
    return {"heldout_top1": [round(x, 4) for x in top1], "heldout_top4": [round(x, 4) for x in top4],
            "heldout_positions": int(count[0]), "heldout_vocab_coverage": round(coverage, 4),
            "chain_accept": round(chain_sum / max(chain_n, 1), 4)}


# ---------------------------------------------------------------- loop

def lr_at(step: int, cfg: TrainConfig, cycle_start: int = 0) -> float:
    """Linear warmup then cosine to min_lr_frac * lr at cfg.steps; a cycle restarted at
    `cycle_start` (--restart-schedule) runs the same shape over steps cycle_start..cfg.steps."""
    step, steps = step - cycle_start, cfg.steps - cycle_start
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train(cfg: TrainConfig, target, train_paths, heldout_paths, out_dir, device=None, log=print):
    """Train (or resume from <out>/checkpoint.pt); rank 0 saves the drafter to <out>/drafter.
    Under torchrun each rank runs this; every global batch is split by rank. Returns
    (network, summary); the summary's "losses" are global-batch losses per step."""
    rank, world = pdist.rank_world()
    device = device or pdist.default_device()
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    aux = cfg.layout == "peagle"
    data = ShardData(train_paths, cfg.max_len, cfg.train_tokens, aux=aux)
    heldout = ShardData(heldout_paths, cfg.max_len, aux=aux) if rank == 0 and heldout_paths else None
    if heldout is not None and aux and heldout.aux_layers != data.aux_layers:
        raise ValueError(f"--data: the held-out shards hold aux layers {heldout.aux_layers}, the training shards "
                         f"{data.aux_layers}; make both with one `parallelspec extract --aux-layers` run")
    if rank == 0 and heldout is None:
        log("no held-out shards in the data (extract found no prompt for the held-out split): the run is not "
            "evaluated and writes no log.jsonl; give extract more prompts or a larger --held-out")
    ckpt_path = out_dir / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu") if ckpt_path.exists() else None
    source = load_init_source(cfg, target) if ckpt is None and cfg.init_from else None
    if ckpt is not None:
        d2t, coverage = ckpt["draft_to_target"], ckpt["coverage"]
    elif source is not None:        # the source's vocabulary (its head rows are the target's)
        d2t, coverage = source.draft_to_target, vocab_coverage(data, source.draft_to_target)
    elif cfg.draft_vocab:
        prior = torch.load(cfg.vocab_prior) if cfg.vocab_prior else None
        d2t, coverage = build_draft_vocab(data, cfg.draft_vocab, prior)
    else:
        d2t, coverage = None, 1.0
    net = build_network(target, parallel=cfg.kind == "parallel", depth=cfg.depth, draft_to_target=d2t,
                        head=cfg.head, num_layers=cfg.num_layers, slot1=cfg.slot1, layout=cfg.layout,
                        aux_layers=data.aux_layers, seed=cfg.seed).to(device)
    if source is not None:
        rows = [data.seqs[i] for i in range(min(len(data), 64))]
        fit = warm_start(net, source.to(device), torch.cat([r["ids"][1:] for r in rows]).to(device),
                         torch.cat([r["feat"][:-1] for r in rows]).to(device))
        log(f"initialised from {cfg.init_from} ({source.cfg.layout} -> {net.cfg.layout}; layer-0 input map "
            f"relative error {fit['fit_rel_err']:.3f})")
    t2d = target_to_draft(net.draft_to_target, net.cfg.vocab_size)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step, history, seen_tokens = 0, [], 0
    if ckpt is not None:
        net.load_state_dict(ckpt["net"], strict=False)
        opt.load_state_dict(ckpt["opt"])
        step, history, seen_tokens = ckpt["step"], ckpt["history"], ckpt["tokens"]
        log(f"resumed from {ckpt_path} at step {step}")
    cycle_start = ckpt.get("cycle_start", 0) if ckpt is not None else 0
    if cfg.restart_schedule and ckpt is not None:
        cycle_start = step
        log(f"learning-rate schedule restarted at step {step}: warmup {cfg.warmup}, cosine to step {cfg.steps}")
    teacher = load_teacher(cfg, target, device) if cfg.distill_from else None
    model = pdist.wrap(TrainingForward(net))
    weights = torch.tensor(cfg.depth_weights or [1.0] * cfg.depth, dtype=torch.float32, device=device)
    if rank == 0:
        log(f"{cfg.kind} drafter: {sum(p.numel() for p in params) / 1e6:.2f} M trained params, draft vocab "
            f"{net.draft_vocab_size} (covers {coverage:.1%} of the target's choices), {len(data)} sequences / "
            f"{data.generated_tokens()} generated tokens, world {world}")
    t0 = time.time()
    losses: list[float] = []
    first_step = step
    while step < cfg.steps:
        if cfg.time_budget is not None and time.time() - t0 > cfg.time_budget:
            log(f"time budget {cfg.time_budget:.0f} s reached at step {step}")
            break
        if cfg.stop_after is not None and step - first_step >= cfg.stop_after:
            break
        # every rank draws the same global batch and anchors (seeded by step), then takes its part
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        global_idx = torch.randint(len(data), (cfg.batch_size,), generator=gen).tolist()
        batch = data.batch(global_idx[rank::world], device)
        n_global = max(len(data.seqs[i]["ids"]) for i in global_idx) - 1
        batch["first_anchor"] = min(max(data.seqs[i]["start"] - 2, 0) for i in global_idx)
        anchors = anchor_sample(batch, n_global, cfg.depth, cfg.kind, cfg.anchor_frac, gen, device)
        anchors = anchors[anchors < batch["tokens"].shape[1] - (cfg.depth - 1 if cfg.kind == "eagle" else 0)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, cycle_start)
        ce_sum, agree_sum, count, feat_sum, feat_n = forward_losses(model, net, cfg, batch, anchors, t2d, teacher)
        totals = torch.cat([count.float(), feat_n.float()[None]]).detach()
        pdist.all_reduce_sum(totals)
        ce_mean = ce_sum / totals[:-1].clamp(min=1)
        loss = (weights * ce_mean).sum() / weights.sum() + cfg.feat_weight * feat_sum / totals[-1].clamp(min=1)
        # DDP averages gradients over ranks; scale so the result is the global-batch gradient
        (loss * world).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        k = cfg.depth
        stats = torch.cat([ce_sum.detach(), agree_sum.float(), feat_sum.detach()[None]])
        pdist.all_reduce_sum(stats)
        ce, acc = (stats[:k] / totals[:k].clamp(min=1)), (stats[k:2 * k] / totals[:k].clamp(min=1))
        global_loss = float((weights * ce).sum() / weights.sum() + cfg.feat_weight * stats[-1] / totals[-1].clamp(min=1))
        losses.append(global_loss)
        seen_tokens += int(totals[0])
        if rank == 0 and (step % 10 == 0 or step == cfg.steps):
            log(json.dumps({"step": step, "loss": round(global_loss, 4), "ce": [round(x, 3) for x in ce.tolist()],
                            "train_top1": [round(x, 3) for x in acc.tolist()], "lr": round(lr_at(step - 1, cfg, cycle_start), 6),
                            "grad_norm": round(float(grad_norm), 3), "tokens": seen_tokens,
                            "elapsed": round(time.time() - t0, 1)}))
        if rank == 0 and heldout is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            ev = evaluate(net, cfg, heldout, t2d, device)
            ev.update(step=step, tokens=seen_tokens, elapsed=round(time.time() - t0, 1))
            history.append(ev)
            log(json.dumps(ev))
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(ev) + "\n")
        if rank == 0 and step % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_path, net, opt, step, history, coverage, seen_tokens, cycle_start)
    if rank == 0:
        if heldout is not None and (not history or history[-1]["step"] != step):
            ev = evaluate(net, cfg, heldout, t2d, device)
            ev.update(step=step, tokens=seen_tokens, elapsed=round(time.time() - t0, 1))
            history.append(ev)
            log(json.dumps(ev))
        save_checkpoint(ckpt_path, net, opt, step, history, coverage, seen_tokens, cycle_start)
        drafter = (ParallelDrafter if cfg.kind == "parallel" else EagleDrafter)(net)
        drafter.save_pretrained(out_dir / "drafter")
        summary = {"config": asdict(cfg), "steps": step, "train_sequences": len(data),
                   "train_generated_tokens": data.generated_tokens(), "draft_vocab_coverage": round(coverage, 4),
                   "wall_s": round(time.time() - t0, 1), "history": history, "losses": losses}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return net, summary
    return net, {"losses": losses}


def load_teacher(cfg: TrainConfig, target, device):
    """The frozen EAGLE-style drafter of --distill-from, checked against the run's settings."""
    from ...defaults import load_drafter

    if cfg.kind != "parallel":
        raise ValueError(f"--distill-from: distills the parallel drafter's mask slots; got --kind {cfg.kind}")
    if not 0.0 < cfg.distill_weight <= 1.0:
        raise ValueError(f"--distill-weight: expected a weight in (0, 1], got {cfg.distill_weight}")
    drafter = load_drafter(cfg.distill_from, target, head_dtype=None)
    net = getattr(drafter, "net", None)
    if net is None or net.cfg.parallel or net.cfg.depth != cfg.depth:
        got = "not a network drafter" if net is None else f"{'parallel' if net.cfg.parallel else 'eagle'} depth {net.cfg.depth}"
        raise ValueError(f"--distill-from: expected an EAGLE-style drafter of depth {cfg.depth} (--k), got {got}")
    net = net.to(device).float().eval()
    for p_ in net.parameters():
        p_.requires_grad_(False)
    return net


def load_init_source(cfg: TrainConfig, target):
    """The drafter network of --init-from (a drafter directory, or a shipped name), target attached."""
    from ...defaults import SHIPPED
    from ...drafters.network import load_network

    path = Path(SHIPPED.get(cfg.init_from, cfg.init_from))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--init-from: expected a drafter directory (config.json + model.safetensors) or "
                                f"one of {sorted(SHIPPED)}, got {cfg.init_from!r}")
    source, _ = load_network(path, cfg.kind)
    source.attach_target(target)
    return source


def save_checkpoint(path: Path, net, opt, step: int, history: list, coverage: float, tokens: int,
                    cycle_start: int = 0) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step, "history": history, "tokens": tokens,
                "draft_to_target": net.draft_to_target.cpu(), "coverage": coverage, "cycle_start": cycle_start}, tmp)
    tmp.replace(path)


def main_train(argv=None) -> int:
    """`parallelspec train`: train a drafter on shards made by `parallelspec extract`; the
    drafter goes to <out>/drafter, the curve to <out>/summary.json."""
    from ..common import HelpFormatter, check_target_dir
    ap = argparse.ArgumentParser(prog="parallelspec train", description=main_train.__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--target", default=None, help="HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data", required=True, help="directory of *-ext-*.pt shards (parallelspec extract)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--kind", choices=("parallel", "eagle"), default="parallel")
    ap.add_argument("--k", type=int, default=4, help="draft depth")
    ap.add_argument("--draft-vocab", type=int, default=16384, help="0 = the full target vocabulary")
    ap.add_argument("--vocab-prior", default=None,
                    help="token counts for the draft vocabulary choice (default: <data>/sharegpt-counts.pt if present)")
    ap.add_argument("--head", choices=("target", "trained"), default="target")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--slot1", choices=("mask", "draft"), default="mask",
                    help="parallel drafter: mask slot 1 fed its learned vector (one pass a step) or the "
                         "drafted depth-1 token and feature (two passes a step)")
    ap.add_argument("--layout", choices=LAYOUTS, default="fused",
                    help="parallel drafter: the fused input layer (default); vLLM's EAGLE-3 layer with one shared "
                         "mask (eagle3); or that layer over EAGLE-3's features, the hidden states of three target "
                         "layers (peagle: needs shards from extract --aux-layers eagle3). eagle3 and peagle are "
                         "servable by vLLM (parallelspec export --format vllm), peagle also as SpecForge's P-EAGLE")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16, help="sequences per global step")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--anchor-frac", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--feat-weight", type=float, default=0.1)
    ap.add_argument("--depth-weights", type=float, nargs="*", default=[])
    ap.add_argument("--distill-from", default=None,
                    help="a saved EAGLE-style drafter (or 'eagle', the shipped one): its per-depth distribution "
                         "is mixed into the mask slots' labels")
    ap.add_argument("--distill-weight", type=float, default=0.5, help="the teacher's share of those labels")
    ap.add_argument("--init-from", default=None,
                    help="start a fresh run from a trained drafter (a directory or a shipped name: its draft "
                         "vocabulary and weights; fused -> eagle3 fits layer 0's input map on the data)")
    ap.add_argument("--restart-schedule", action="store_true",
                    help="on resume: a fresh warmup + cosine cycle from the resumed step to --steps")
    ap.add_argument("--tokens", type=int, default=None, help="use only the first N training tokens")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK where a GPU is, else cpu)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    try:
        check_target_dir(args.target)       # before anything is loaded or written
        check_data_dir(data)
    except (FileNotFoundError, ValueError) as exc:
        print(f"parallelspec train: error: {exc}", file=sys.stderr)
        return 2
    prior = args.vocab_prior or next((data / n for n in ("token-counts.pt", "sharegpt-counts.pt") if (data / n).exists()),
                                     data / "sharegpt-counts.pt")
    cfg = TrainConfig(kind=args.kind, depth=args.k, draft_vocab=args.draft_vocab, head=args.head,
                      vocab_prior=str(prior) if Path(prior).exists() else None,
                      num_layers=args.layers, slot1=args.slot1, layout=args.layout, steps=args.steps, batch_size=args.batch, max_len=args.max_len,
                      anchor_frac=args.anchor_frac, lr=args.lr, warmup=args.warmup, feat_weight=args.feat_weight,
                      depth_weights=args.depth_weights, distill_from=args.distill_from,
                      distill_weight=args.distill_weight, restart_schedule=args.restart_schedule, init_from=args.init_from, bf16=args.bf16, seed=args.seed, eval_every=args.eval_every,
                      eval_sequences=args.eval_sequences, time_budget=args.time_budget, train_tokens=args.tokens)
    pdist.init()
    try:
        from ...models import load_target

        if args.target is not None and not Path(args.target).is_dir():
            raise FileNotFoundError(f"--target: expected a local model directory (config.json + weights), got "
                                    f"{args.target!r}")
        target, _ = load_target(args.target, with_tokenizer=False)
        check_run(cfg, target, data, Path(args.out))
        train(cfg, target, sorted(data.glob("train-ext-*.pt")), sorted(data.glob("heldout-ext-*.pt")),
                        args.out, args.device,
                        log=lambda m: print(m, flush=True))
    except (FileNotFoundError, ValueError) as exc:
        print(f"parallelspec train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        pdist.shutdown()
    return 0


#: <out>/run.json: what a run's checkpoint was trained as; a rerun must ask for the same network
RUN_FILE = "run.json"
_NETWORK_FIELDS = {"kind": "--kind", "depth": "--k", "draft_vocab": "--draft-vocab", "head": "--head",
                   "num_layers": "--layers", "slot1": "--slot1", "layout": "--layout"}


def check_data_dir(data: Path) -> None:
    """--data must be a directory of shards written by `parallelspec extract`."""
    if not data.is_dir():
        raise FileNotFoundError(f"--data: expected a directory of shards written by `parallelspec extract --out "
                                f"{data}`, got {str(data)!r}, which does not exist")
    if not any(data.glob("train-ext-*.pt")):
        raise ValueError(f"--data: expected training shards (train-ext-NNNNN.pt) in {data}, found none; make them "
                         f"with `parallelspec extract --out {data} [--data YOUR.jsonl] [--target MODEL_DIR]`")


def check_run(cfg: TrainConfig, target, data: Path, out: Path) -> None:
    """Refuse, with what to do, shards made for another model, a checkpoint in --out of another
    network, and --steps a resumed checkpoint has already reached; then record the run's network."""
    from ...drafters.checkpoint import check_signature, target_signature
    from .data import TARGET_FILE

    made_for = data / TARGET_FILE
    if made_for.exists():
        try:
            check_signature(json.loads(made_for.read_text())["target"], target)
        except ValueError as exc:
            raise ValueError(f"--data: the shards in {data} were made for another model than --target "
                             f"({exc}); extract shards with this target (parallelspec extract --target ...) or "
                             "train for the model they were made for") from None
    else:                       # shards of an older extract (no record): their shapes at least
        first = torch.load(next(iter(sorted(data.glob("train-ext-*.pt")))), map_location="cpu", weights_only=False)
        width, vocab = int(first["feat"][0].shape[-1]), int(max(int(t.max()) for t in first["topk_ids"])) + 1
        if width != target.config.hidden_size or vocab > target.config.vocab_size:
            raise ValueError(f"--data: the shards in {data} were made for another model than --target (features of "
                             f"width {width}, token ids up to {vocab - 1}; the target's hidden_size is "
                             f"{target.config.hidden_size}, vocab_size {target.config.vocab_size}); extract shards "
                             "with this target (parallelspec extract --target ...)")
    network = {k: getattr(cfg, k) for k in _NETWORK_FIELDS if hasattr(cfg, k)}
    ckpt, record, summary = out / "checkpoint.pt", out / RUN_FILE, out / "summary.json"
    if ckpt.exists():
        # the run's record, or for a run made before it existed, the settings its summary keeps
        old = (json.loads(record.read_text()) if record.exists() else
               {"network": json.loads(summary.read_text()).get("config", {})} if summary.exists() else {})
        diff = [f"{_NETWORK_FIELDS[k]} {old['network'][k]} (now {network[k]})" for k in network
                if k in old.get("network", {}) and old["network"][k] != network[k]]
        if diff:
            raise ValueError(f"--out: {out} holds a checkpoint of another drafter ({', '.join(diff)}); rerun with "
                             f"those settings to resume it, or give another --out")
        if "target" in old:
            try:
                check_signature(old["target"], target)
            except ValueError as exc:
                raise ValueError(f"--out: {out} holds a checkpoint trained for another target ({exc}); give "
                                 "another --out") from None
        done = int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"])
        if cfg.steps <= done:
            raise ValueError(f"--steps {cfg.steps}: the checkpoint in {out} is already at step {done}, so there is "
                             f"nothing to train; pass --steps above {done} to train further (it resumes there), or "
                             f"another --out to start over (its drafter: {out / 'drafter'})")
    if pdist.rank_world()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps({"network": network, "target": target_signature(target)}, indent=1) + "\n")
        tmp.replace(record)


if __name__ == "__main__":
    sys.exit(main_train())
