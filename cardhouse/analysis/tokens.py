"""Which role a token plays for massive activations: first token, first delimiter, or other."""

from __future__ import annotations

from typing import Iterator, Sequence

from ..capture.batches import PromptBatch, batches
from ..capture.run import tokenize_prompts

BOS, FIRST_TOKEN, FIRST_DELIMITER, OTHER = "bos", "first token", "first delimiter", "other"
ROLES = (BOS, FIRST_TOKEN, FIRST_DELIMITER, OTHER)
DELIMITERS = {".", ",", "\n", ";", ":", "!", "?", "\n\n", "-"}


def is_delimiter(text: str) -> bool:
    return text.strip(" ") in DELIMITERS or (text != "" and text.strip() == "" and "\n" in text)


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def roles(tokenizer, ids: list[int], bos_id: int | None) -> list[str]:
    """The role of each position of one prompt.

    Position 0 is set apart (BOS or first token): under causal attention it sees only
    itself, so its state is the same for every prompt by construction. The first
    delimiter after it is the token that shows input-independence for real.
    """
    out, seen_delimiter = [], False
    for pos, text in enumerate(token_strings(tokenizer, ids)):
        if pos == 0:
            out.append(BOS if bos_id is not None and ids[0] == bos_id else FIRST_TOKEN)
        elif not seen_delimiter and is_delimiter(text):
            out.append(FIRST_DELIMITER)
            seen_delimiter = True
        else:
            out.append(OTHER)
    return out


class PromptInputs:
    """Prompts of a decoder LM: BOS first when the model uses one; roles from ``analysis.tokens``."""

    def __init__(self, lm, prompts: Sequence[str]):
        if lm.inputs != "causal":
            raise ValueError(f"{lm.name} is an encoder (it reads {'images' if lm.inputs == 'image' else 'sentences'}"
                             "): use `cardhouse encoder` or cardhouse.encoders")
        self.lm, self.prompts = lm, list(prompts)
        self.token_lists = tokenize_prompts(lm, self.prompts)
        self.role_names = ROLES
        self.role_lists = [roles(lm.tokenizer, ids, lm.bos_id) for ids in self.token_lists]

    def __len__(self) -> int:
        return len(self.token_lists)

    @property
    def tokens(self) -> int:
        return sum(map(len, self.token_lists))

    def batches(self, batch_size: int) -> Iterator[PromptBatch]:
        return batches(self.token_lists, batch_size)

    def token_text(self, token_id: int) -> str:
        return self.lm.tokenizer.decode([token_id])
