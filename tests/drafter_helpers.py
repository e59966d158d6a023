"""Tiny random targets and drafters for the drafter and training tests."""
import torch


def tiny_target(seed: int = 0, vocab: int = 96, hidden: int = 48):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=hidden // 6,
                      max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0)
    return LlamaForCausalLM(cfg).eval()


def target_features(model, ids):
    """(last hidden states [B, N, d], probs [B, N, V]) of the target over ids [B, N]."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.hidden_states[-1], torch.softmax(out.logits.float(), dim=-1)


def peaked_random_weights(net, seed: int) -> None:
    """Overwrite a drafter network's weights with random ones large enough for peaked drafts
    (norm weights near 1, the rest N(0, 0.25^2)), so that comparisons of drafts see distinct
    candidates rather than near-uniform ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
