"""Learnable prompt context in front of open_clip's frozen text tower (shared by CoOp and CoCoOp).

Prompts are "[SOS] ctx_1 … ctx_M <class name>. [EOS]": the tokenized text "X X … X <name>." supplies
the [SOS] embedding (prefix) and the class-name/EOS/padding embeddings (suffix); the M placeholders
are replaced by learnable vectors. The text tower (token/positional embeddings, transformer with its
causal mask, ln_final, EOT pooling, text_projection) is read from the open_clip model and never
updated: training runs inside `frozen_parameters(model)` and only the context (and CoCoOp's meta-net)
are given to the optimizer.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
from open_clip.transformer import text_global_pool
from torch import nn

from clipconv.training import warmup_cosine_lr  # re-exported: CoOp/CoCoOp's schedule

__all__ = ["FrozenTextEncoder", "PromptLearner", "warmup_cosine_lr", "phrase_context_length", "frozen_parameters",
           "context_placeholder", "check_prompt_length"]


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Within the block every parameter of `model` has requires_grad=False; the flags are restored after."""
    flags = [param.requires_grad for param in model.parameters()]
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)


class FrozenTextEncoder(nn.Module):
    """open_clip's `encode_text` from prompt embeddings instead of token ids (weights borrowed, not copied)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "clip", model)  # not a submodule: never in state_dict / parameters()
        self.pool_type = getattr(model, "text_pool_type", "argmax")
        self.eos_token_id = getattr(model, "text_eos_id", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.transformer.get_cast_dtype()

    def forward(self, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """prompts (B, L, width) embeddings; tokens (B, L) the ids they came from (for EOT pooling)."""

        clip = self.clip
        x = prompts.to(self.dtype) + clip.positional_embedding.to(self.dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_token_id)
        projection = clip.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return x.float()


class PromptLearner(nn.Module):
    """Context vectors (M, width) — or (C, M, width) when `class_specific` — plus the fixed token pieces.

    `init_phrase` (e.g. "a photo of a") fixes M to its WORD count, as the reference does
    (`len(phrase.split(" "))`, underscores read as spaces), and initializes the context from the first M
    token embeddings of the phrase; the prompt text is "<phrase> <class name>.", so when the phrase has
    more BPE tokens than words (e.g. "itap of a": 3 words, 4 tokens) its remaining tokens stay in the
    fixed part after the context, exactly as in CoOp. Otherwise M = `n_ctx` and the vectors are drawn
    from N(0, `init_std`²).
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, classnames: Sequence[str], n_ctx: int = 16,
                 init_phrase: Optional[str] = None, class_specific: bool = False, init_std: float = 0.02) -> None:
        super().__init__()
        if not classnames:
            raise ValueError("PromptLearner needs at least one class name")
        embedding = model.token_embedding
        width = embedding.weight.shape[1]
        device = embedding.weight.device
        n_ctx, placeholder = check_prompt_length(model, tokenizer, classnames, n_ctx, init_phrase)
        with torch.no_grad():
            if init_phrase:
                phrase_ids = _content_ids(tokenizer, placeholder)
                init = embedding(torch.tensor(phrase_ids[:n_ctx], device=device)).float()
            else:
                init = torch.randn(n_ctx, width, device=device) * init_std
            texts = [f"{placeholder} {name}." for name in classnames]
            tokens = tokenizer(texts).to(device)
            token_embeddings = embedding(tokens).float()
        if class_specific:
            init = init.unsqueeze(0).repeat(len(classnames), 1, 1)
        self.n_ctx, self.class_specific, self.width = n_ctx, class_specific, width
        self.ctx = nn.Parameter(init.clone())
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", token_embeddings[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", token_embeddings[:, 1 + n_ctx:].clone(), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.tokens.shape[0]

    def forward(self, shift: Optional[torch.Tensor] = None, classes: Optional[slice] = None) -> torch.Tensor:
        """Prompt embeddings (C', L, width) for the classes in `classes`; `shift` (width,) is added to
        every context vector (CoCoOp's image-conditioned bias)."""
        classes = classes or slice(None)
        prefix, suffix = self.prefix[classes], self.suffix[classes]
        ctx = self.ctx[classes] if self.class_specific else self.ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)
        if shift is not None:
            ctx = ctx + shift.view(1, 1, -1)
        return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)


def context_placeholder(tokenizer: Callable, n_ctx: int, init_phrase: Optional[str] = None) -> tuple[int, str]:
    """(M, the text standing for the context in the prompts): the init phrase's word count and the phrase,
    else `n_ctx` and "X X … X". A phrase with more words than tokens raises ValueError."""
    if init_phrase:
        placeholder = init_phrase.replace("_", " ").strip()
        n_ctx = phrase_context_length(placeholder)
        tokens = len(_content_ids(tokenizer, placeholder))
        if n_ctx > tokens:
            raise ValueError(f"init_phrase {init_phrase!r} has {n_ctx} space-separated words but only {tokens} "
                             "tokens: separate its words by single spaces")
        return n_ctx, placeholder
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
    return n_ctx, " ".join(["X"] * n_ctx)


def check_prompt_length(model: nn.Module, tokenizer: Callable, classnames: Sequence[str], n_ctx: int,
                        init_phrase: Optional[str] = None) -> tuple[int, str]:
    """`context_placeholder`'s (M, placeholder), once every prompt "<context> <class name>." with its start and
    end tokens is known to fit `model`'s text context length; ValueError naming the option otherwise."""
    n_ctx, placeholder = context_placeholder(tokenizer, n_ctx, init_phrase)
    context_length = int(model.positional_embedding.shape[0])
    too_long = [name for name in classnames if len(_content_ids(tokenizer, f"{placeholder} {name}.")) + 2
                > context_length]
    if too_long:
        fix = "a shorter init_phrase" if init_phrase else "fewer context tokens (n_ctx)"
        raise ValueError(f"{n_ctx} context tokens + class name exceed the text context length {context_length} "
                         f"of this model for {len(too_long)} class(es), e.g. {too_long[0]!r}: use {fix}")
    return n_ctx, placeholder


def _content_ids(tokenizer: Callable, text: str) -> list[int]:
    """Token ids of `text` without the start/end tokens and padding (untruncated when the tokenizer allows)."""
    if hasattr(tokenizer, "encode"):  # open_clip's SimpleTokenizer: BPE ids, no start/end, no truncation
        return list(tokenizer.encode(text))
    ids = tokenizer([text])[0].tolist()
    end = ids.index(max(ids))  # EOT has the highest id in CLIP's vocabulary
    return ids[1:end]


def phrase_context_length(phrase: str) -> int:
    """Context length CoOp derives from an init phrase: its number of space-separated words."""
    return len(phrase.split(" "))
