"""Pairwise multimodal-LLM judge over any OpenAI-compatible chat-completions endpoint.

Implements the published protocol (Zhong et al., CMLoRA): two images of the same composition from
two methods are each scored 0-10 in 0.5 steps on composition quality and image quality.  Both
presentation orders are judged because these judges have a strong position bias; the report pools
the two orders.

Design constraints that shape this package (one module each: ``client`` talks HTTP, ``prompt``
builds the question, ``reply`` parses the answer, ``cache`` keeps it, ``run`` pairs images and
records verdicts):

* Only the standard library talks HTTP, so the judge works against OpenAI, vLLM, llama.cpp or
  LM Studio servers without adding a client dependency.
* Judging is paid and slow, so every well-formed reply is cached on disk keyed by
  ``sha256(model, prompt, image hashes)`` and every verdict is appended to ``judge.jsonl`` as soon as
  it is known: a re-run costs nothing and an interrupted run resumes.
* A reply that cannot be parsed into valid scores is retried and then recorded as a *failure*,
  never guessed into a score, because a fabricated score would bias win rates silently.
* The API key is a secret: it is only ever placed in the ``Authorization`` header and is scrubbed
  from every message this module produces.
"""

from __future__ import annotations

from ..runs import JUDGE_FILENAME
from .cache import ResponseCache
from .client import ChatClient, JudgeConfig, chat_completions_url, redact
from .client import _parse_retry_after as _parse_retry_after  # tested directly
from .errors import JudgeAborted, JudgeError, MalformedReply, TransportError
from .prompt import DIMENSIONS, build_messages, build_prompt, cache_key
from .prompt import _png_bytes as _png_bytes  # tested directly
from .reply import parse_scores
from .run import JudgeSummary, judge_run, retry_hint

__all__ = [
    "DIMENSIONS",
    "JUDGE_FILENAME",
    "ChatClient",
    "JudgeAborted",
    "JudgeConfig",
    "JudgeError",
    "JudgeSummary",
    "MalformedReply",
    "ResponseCache",
    "TransportError",
    "build_messages",
    "build_prompt",
    "cache_key",
    "chat_completions_url",
    "judge_run",
    "parse_scores",
    "redact",
    "retry_hint",
]
