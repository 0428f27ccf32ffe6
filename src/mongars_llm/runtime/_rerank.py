"""The rerank prompt: one relevance question per (query, document) pair, answered yes or no.

The pointwise generative scorer of the yes/no rerankers (RankLLaMA,
bge-reranker-v2-gemma, Qwen3-Reranker): the model reads a relevance prompt in its
own chat template, and a document's score is the probability the model gives
"yes" over "no" as the first token of its answer::

    score = sigmoid(logit("yes") - logit("no"))      # in (0, 1)

so scores are comparable across calls, batches and adapters of one model. The
query comes before the document, so every document of one call shares the prompt
prefix up to its own text.

Torch-free: the runtime's scorer and the ``rerank`` training objective build the
same prompt and read the same two tokens from here.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import InvalidInputError

__all__ = [
    "DEFAULT_RERANK_INSTRUCTION",
    "RERANK_SYSTEM_PROMPT",
    "answer_token_ids",
    "rerank_messages",
]

#: what the relevance question asks when the caller gives no instruction
DEFAULT_RERANK_INSTRUCTION = "Given a search query, judge whether the document answers it"
#: the system turn of every rerank prompt
RERANK_SYSTEM_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".'
)
#: the two answers, in the order (yes, no)
ANSWERS = ("yes", "no")


def rerank_messages(
    query: str, document: str, instruction: str | None = None
) -> list[dict[str, str]]:
    """The chat messages that ask whether ``document`` answers ``query``.

    Rendered with the model's chat template and its generation prompt; the first
    token of the answer is read, nothing is generated.
    """
    return [
        {"role": "system", "content": RERANK_SYSTEM_PROMPT},
        {
            "role": "user",
            "content": (
                f"<Instruct>: {instruction or DEFAULT_RERANK_INSTRUCTION}\n"
                f"<Query>: {query}\n<Document>: {document}"
            ),
        },
    ]


def answer_token_ids(encode: Callable[[str], list[int]]) -> tuple[int, int]:
    """The token ids of "yes" and "no" as the first token of the answer.

    ``encode`` tokenises without special tokens. Each answer must be one token
    (as itself or with a leading space, the way the tokenizer writes it at the start
    of a turn); a vocabulary that splits them cannot be scored this way.
    """
    ids: list[int] = []
    for answer in ANSWERS:
        for spelling in (answer, " " + answer):
            tokens = encode(spelling)
            if len(tokens) == 1:
                ids.append(tokens[0])
                break
        else:
            raise InvalidInputError(
                f"this model's tokenizer splits {answer!r} into several tokens, so it cannot "
                "score documents by its yes/no answer; rerank with a model whose vocabulary "
                "has them as single tokens",
                param="model",
            )
    if ids[0] == ids[1]:
        raise InvalidInputError(
            "this model's tokenizer gives 'yes' and 'no' the same token", param="model"
        )
    return ids[0], ids[1]
