"""Caption mergers: one caption for a speech + environment mix."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

# The defaults of both mergers; preprocess's `captions` config section takes them from here.
MIX_CAPTION_TEMPLATE = "a person saying {speech}, with {env} in the background"  # {speech} and {env} are clauses
MERGE_PROMPT = "merge captions. speech: {speech} background: {env}"  # the seq2seq model's input

# -----------------------------------------------------------------------------
# caption merging for mixes


class CaptionMerger(Protocol):
    def __call__(self, speech_caption: str, env_caption: str) -> str: ...


def as_clause(caption: str) -> str:
    """Make a sentence usable mid-sentence: collapse whitespace, drop trailing punctuation
    (a closing quote is kept), and lowercase the first letter unless the first word is
    "I" (or a contraction of it) or has another capital (an acronym such as "BBC")."""
    text = " ".join(caption.split()).rstrip(".!?;:,… ")
    if not text:
        return text
    first = text.split(" ", 1)[0]
    keep_case = first.split("'")[0] == "I" or any(c.isupper() for c in first[1:])
    return text if keep_case else text[0].lower() + text[1:]


@dataclass
class TemplateCaptionMerger:
    template: str = MIX_CAPTION_TEMPLATE

    def __call__(self, speech_caption: str, env_caption: str) -> str:
        return self.template.format(speech=as_clause(speech_caption), env=as_clause(env_caption))


class Seq2SeqCaptionMerger:
    """Rewrites the pair with a local seq2seq model (e.g. a T5/BART fine-tuned for caption
    fusion). Loads offline only; greedy decoding makes it deterministic."""

    def __init__(
        self,
        model_name_or_path: str,
        prompt: str = MERGE_PROMPT,
        max_new_tokens: int = 48,
        device: str = "cpu",
    ):
        # transformers is heavy to import and only this merger needs it
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, local_files_only=True)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(model_name_or_path, local_files_only=True).to(device).eval()

    def __call__(self, speech_caption: str, env_caption: str) -> str:
        import torch

        text = self.prompt.format(speech=as_clause(speech_caption), env=as_clause(env_caption))
        inputs = self.tokenizer(text, return_tensors="pt").to(self.device)
        with torch.no_grad():
            tokens = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        return self.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()


CAPTION_MERGERS: dict[str, Callable[..., CaptionMerger]] = {
    "template": TemplateCaptionMerger,
    "seq2seq": Seq2SeqCaptionMerger,
}


def build_caption_merger(kind: str, **kwargs) -> CaptionMerger:
    """Instantiate a registered merger, e.g. build_caption_merger("seq2seq", model_name_or_path=...)."""
    return CAPTION_MERGERS[kind](**kwargs)
