"""The SFT / closed-book QA prompt format of docs/METHOD.md §1, shared by select, train, tasks and KL.

A training or test item is ``<|question|> {question} <|answer|>`` followed by the completion
`` {answer}`` and the tokenizer's EOS. The two markers are plain text here; the tiny world's
tokenizer holds each of them as a single added token.
"""

from __future__ import annotations

QUESTION_MARKER = "<|question|>"
ANSWER_MARKER = "<|answer|>"


def qa_prompt(question: str) -> str:
    """The prompt the fine-tuned model sees: question marker, question, answer marker."""
    return f"{QUESTION_MARKER} {question.strip()} {ANSWER_MARKER}"


def qa_completion(answer: str) -> str:
    """The completion trained on: a space, then the answer (EOS is added by the trainer)."""
    return f" {answer.strip()}"
