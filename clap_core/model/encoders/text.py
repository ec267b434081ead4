"""Text encoders: any transformers AutoModel (BERT, RoBERTa, XLM-R, GPT-2, ...) plus a pooling rule.

The backbone comes from `AutoModel.from_pretrained(name_or_folder)` or, offline, from a config dict
(`AutoConfig.for_model(model_type, **kwargs)` + `AutoModel.from_config`). Tokenizers likewise come
from `AutoTokenizer.from_pretrained`, or "bytes": a built-in byte-level tokenizer that needs no
download and covers every language (used by the `tiny` model).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# --- pooling: token states (B, L, H) + mask (B, L) -> (B, H) or (B, 2H) ---


def pool_cls(states: torch.Tensor, mask: torch.Tensor, outputs: Any) -> torch.Tensor:
    return states[:, 0]


def pool_mean(states: torch.Tensor, mask: torch.Tensor, outputs: Any) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
    return (states * m).sum(1) / m.sum(1).clamp(min=1.0)


def pool_last(states: torch.Tensor, mask: torch.Tensor, outputs: Any) -> torch.Tensor:
    """Last non-padding token: the summary position of causal models such as GPT-2 (right padding)."""
    last = mask.long().sum(1).clamp(min=1) - 1  # (B,)
    return states[torch.arange(states.shape[0], device=states.device), last]


def pool_mean_max(states: torch.Tensor, mask: torch.Tensor, outputs: Any) -> torch.Tensor:
    """Mean and max over real tokens, concatenated (CLARA)."""
    masked = states.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(states.dtype).min)
    return torch.cat([pool_mean(states, mask, outputs), masked.max(1).values], dim=-1)


def pool_pooler(states: torch.Tensor, mask: torch.Tensor, outputs: Any) -> torch.Tensor:
    """The backbone's own pooler (dense + tanh on the first token in BERT/RoBERTa): LAION-CLAP's choice."""
    if getattr(outputs, "pooler_output", None) is None:
        raise ValueError("pooling='pooler' needs a backbone with a pooling layer (BERT, RoBERTa, XLM-R)")
    return outputs.pooler_output


POOLINGS: dict[str, Callable] = {"cls": pool_cls, "mean": pool_mean, "last": pool_last,
                                  "mean_max": pool_mean_max, "pooler": pool_pooler}


class TextEncoder(nn.Module):
    """Token ids (B, L) + attention mask (B, L) -> pooled text features (B, out_dim)."""

    def __init__(self, backbone: nn.Module, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling '{pooling}'; choose one of {sorted(POOLINGS)}")
        self.backbone = backbone
        self.pooling = pooling
        hidden = backbone.config.hidden_size if hasattr(backbone.config, "hidden_size") else backbone.config.n_embd
        self.out_dim = 2 * hidden if pooling == "mean_max" else hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return POOLINGS[self.pooling](outputs.last_hidden_state, attention_mask, outputs)


def build_text_backbone(pretrained: str | None, hf_config: dict[str, Any],
                        tokenizer: PreTrainedTokenizerBase | None = None) -> nn.Module:
    """AutoModel from a hub name / local folder, or built offline (random init) from a config dict."""
    if pretrained:
        return AutoModel.from_pretrained(pretrained)
    kwargs = dict(hf_config)
    model_type = kwargs.pop("model_type", None)
    if not model_type:
        raise ValueError("text_encoder.hf_config needs 'model_type' (e.g. bert, roberta, gpt2, xlm-roberta)")
    if tokenizer is not None:
        kwargs.update(_special_token_ids(tokenizer, kwargs))
    config = AutoConfig.for_model(model_type, **kwargs)
    return AutoModel.from_config(config)


def _special_token_ids(tokenizer: PreTrainedTokenizerBase, kwargs: dict) -> dict:
    """Make an offline backbone agree with its tokenizer on vocabulary size and special ids."""
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    ids = {k: v for k, v in ids.items() if v is not None}
    ids["vocab_size"] = max(kwargs.get("vocab_size", 0), len(tokenizer))
    return ids


# --- tokenizers ---


def byte_level_tokenizer(max_length: int = 77) -> PreTrainedTokenizerFast:
    """Lower-cased UTF-8 bytes as tokens (256 + 4 specials): offline, deterministic, any language."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


BUILTIN_TOKENIZERS: dict[str, Callable[[int], PreTrainedTokenizerBase]] = {"bytes": byte_level_tokenizer}


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Captions -> {'input_ids', 'attention_mask'} (B, L): padded to the longest, truncated to max_length. The one
    tokenization of ClapModel.tokenize and of an ONNX export's text graph (OnnxTowers.embed_text)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("tokenize expects a list of strings")
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def build_tokenizer(name: str, max_length: int) -> PreTrainedTokenizerBase:
    """A built-in tokenizer by name, or AutoTokenizer from a hub name / local folder."""
    if name in BUILTIN_TOKENIZERS:
        return BUILTIN_TOKENIZERS[name](max_length)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:  # GPT-2 ships without one; pad with EOS and pool the last real token
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
