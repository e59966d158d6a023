import torch


def children_in_order(parents_row: torch.Tensor) -> list[list[int]]:
    n = parents_row.shape[0]
    kids: list[list[int]] = [[] for _ in range(n)]
    for c in range(1, n):
        kids[int(parents_row[c])].append(c)
    return kids


def tree_accept(tokens: torch.Tensor, parents: torch.Tensor, target: torch.Tensor, mode: str = "greedy",
                draft_probs: torch.Tensor | None = None, uniforms: torch.Tensor | None = None):
    """Which path of the token tree the target accepts (the specification).

    tokens:  [B, N] int64   node tokens; node 0 is the root (the last committed token)
    parents: [N] or [B, N]  parent index per node, parents[..., 0] = -1, parents[i] < i
    target:  [B, N, V]      greedy: the target's logits at each node;
                            sample: its processed probabilities (temperature/top-k/top-p applied)
    mode: "greedy" | "sample"
    draft_probs: [B, N, V] or None (sample mode) the draft distribution node c's token was
             drawn from; None = candidates chosen deterministically (q = one-hot at the token)
    uniforms: [B, N] float in [0, 1) (sample mode): uniforms[b, c] decides the trial of child c,
             uniforms[b, 0] the final draw from the residual distribution

    Greedy: from the root, move to the first child whose token equals the argmax at the current
    node; stop when none does; the argmax at the last accepted node is the next token.
    Sample (recursive rejection, lossless): at the current node r = target[cur]; try children in
    order: accept child c with probability min(1, r(t_c) / q_c(t_c)) (q_c = draft_probs[c] or
    one-hot), else r <- normalise(max(0, r - q_c)); when every child fails, the next token is
    drawn from r by inverse CDF with uniforms[b, 0]; when a leaf is accepted, from target[leaf].

    Returns accept_index [B, N] int64 (accepted nodes in path order, root first, then -1),
    accept_lens [B] int64 (>= 1, the root counts), next_token [B] int64.
    """
    B, N = tokens.shape
    par = parents if parents.dim() == 2 else parents.unsqueeze(0).expand(B, N)
    accept_index = torch.full((B, N), -1, dtype=torch.int64, device=tokens.device)
    accept_lens = torch.zeros(B, dtype=torch.int64, device=tokens.device)
    next_token = torch.zeros(B, dtype=torch.int64, device=tokens.device)
    for b in range(B):
        kids = children_in_order(par[b])
        cur, path = 0, [0]
        while True:
            if mode == "greedy":
                want = int(torch.argmax(target[b, cur]))
                nxt = next((c for c in kids[cur] if int(tokens[b, c]) == want), None)
                if nxt is None:
                    next_token[b] = want
                    break
                cur = nxt
                path.append(cur)
                continue
            r = target[b, cur].double().clone()
            accepted = None
            for c in kids[cur]:
                t = int(tokens[b, c])
                total = r.sum()
                if total <= 0:
                    break
                if draft_probs is None:
                    ratio = float(r[t] / total)
                else:
                    q = draft_probs[b, c].double()
                    ratio = min(1.0, float(r[t] / total) / max(float(q[t]), 1e-30))
                if float(uniforms[b, c]) < ratio:
                    accepted = c
                    break
                if draft_probs is None:
                    r[t] = 0.0
                else:
                    r = torch.clamp(r / total - draft_probs[b, c].double(), min=0.0)
            if accepted is None:
                next_token[b] = sample_inverse_cdf(r, float(uniforms[b, 0]))
                break
            cur = accepted
            path.append(cur)
            if not kids[cur]:
                next_token[b] = sample_inverse_cdf(target[b, cur].double(), float(uniforms[b, 0]))
                break
        accept_index[b, :len(path)] = torch.tensor(path, device=tokens.device)
        accept_lens[b] = len(path)
    return accept_index, accept_lens, next_token


def sample_inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """Smallest v with cumsum(weights)[v] > u * sum(weights); weights need not be normalised."""
    cdf = torch.cumsum(weights, 0)
    total = float(cdf[-1])
    v = int(torch.searchsorted(cdf, torch.tensor([u * total], dtype=cdf.dtype, device=cdf.device), right=True)[0])
    return min(v, weights.shape[0] - 1)
