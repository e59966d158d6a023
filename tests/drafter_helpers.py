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
