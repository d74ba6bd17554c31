"""Free tag proposals from a *base* LLM by few-shot continuation (build-tags, `--prompt fewshot`).

A base model has no chat template and cannot follow a JSON schema, but it continues a list
of `post → tags` examples well: the bundled Gemma 3 270M proposes `steak, beef, menu` for
"Should I write Steak or Beef Tenderloin on the menu?", where the bundled chat model
(SmolLM2-135M) echoes field names and numbers (docs/QUALITY.md, "Building a vocabulary").
The examples are posts of domains no shipped dataset covers (astronomy, gardening,
archaeology), so they teach the form, not the vocabulary. Chinese items get a Chinese prompt.
The item is one quoted line of data; the answer is one line, split into tags.
"""

from __future__ import annotations

import re
from typing import Any

import openai
import tenacity
from pydantic import SecretStr

from consumer.tagging.llm import MAX_FREE_TAG_CHARS, RETRYABLE, LLMAnswer, openai_client
from tagsys.lexicon import Lexicon

PROMPT_VERSION = "propose-fewshot-2"

PROMPT_EN = """Posts and the topic tags their authors gave them.

Post: How do I collimate a Newtonian telescope without a laser? Stars look like smeared \
comets at high magnification.
Tags: telescopes, collimation, stargazing, optics

Post: My sunflower seedlings are tall and thin with pale leaves. They sit on a north-facing \
windowsill.
Tags: seedlings, sunflowers, grow lights, gardening

Post: Found a Roman coin while metal detecting in a ploughed field. Do I have to report it?
Tags: metal detecting, roman coins, archaeology, law

Post: {text}
Tags:"""

PROMPT_ZH = """以下是短视频的文字和作者给它们打的话题标签。

视频：第一次用长曝光拍到了银河和星轨，凌晨三点的山顶太冷了
标签：星轨、银河、长曝光、夜空

视频：阳台种的多肉终于爆盆了，分享一下我的浇水和配土经验
标签：多肉、园艺、阳台种植、配土

视频：跟着考古队下工地的第一天，刷出了一片汉代的瓦当
标签：考古、汉代、瓦当、文物

视频：{text}
标签："""

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_SPLIT = re.compile(r"[,，、;；|]+")
_SPACE = re.compile(r"\s+")
_TAG_LINE = re.compile(r"^(?:Tags: |标签：)(.+)$", re.M)

# the examples' own tags: a small model sometimes copies them ("metal detecting" for a
# question about pastry); one is kept only where the item itself names it. Matched as the
# lexical boost matches: by normal form, English stems ("garden" is "gardening"), CJK substrings
EXAMPLES = Lexicon(
    [
        [t]
        for p in (PROMPT_EN, PROMPT_ZH)
        for line in _TAG_LINE.findall(p)
        for t in _SPLIT.split(line)
    ],
    stem=True,
)


def item_line(item: dict[str, Any], max_chars: int = 500) -> str:
    """The item's text fields as one line (the prompt is line-based)."""
    text = " ".join(
        str(v)
        for k, v in item.items()
        if k not in ("content_type", "cover_url", "cover_b64") and isinstance(v, str) and v.strip()
    )
    return _SPACE.sub(" ", text).strip()[:max_chars]


def prompt_for(item: dict[str, Any]) -> str:
    text = item_line(item)
    return (PROMPT_ZH if _CJK.search(text) else PROMPT_EN).format(text=text)


def parse_line(text: str, max_tags: int, item_text: str = "") -> tuple[list[str], int]:
    """The first line, split on commas (and 、), trimmed of `#` and dots, deduplicated; and
    how many parts were dropped (too long, or an example's tag that `item_text` does not
    name)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    named = EXAMPLES.match(item_text) if item_text else set()
    out: list[str] = []
    dropped = 0
    for part in _SPLIT.split(line):
        tag = part.strip().strip("#.。").strip()
        if not tag or tag in out:
            continue
        hits = EXAMPLES.lookup(tag)  # an example's tag, by normal form or stems
        echo = bool(hits) and not named.intersection(hits)
        if len(tag) > MAX_FREE_TAG_CHARS or echo:
            dropped += 1
        else:
            out.append(tag)
    return out[:max_tags], dropped


class FewShotProposer:
    """Proposes free tags through an OpenAI-compatible *completions* endpoint; like
    `SelectiveTagger.propose` it never raises: a failure is an `LLMAnswer` status."""

    prompt_version = PROMPT_VERSION

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: SecretStr = SecretStr(""),
        *,
        max_tokens: int = 40,
        timeout_s: float = 60.0,
        attempts: int = 3,
    ) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.attempts = max(1, attempts)
        self.client = openai_client(base_url, api_key, timeout_s)

    def _once(self, item: dict[str, Any], max_tags: int, temperature: float) -> LLMAnswer:
        r = self.client.completions.create(
            model=self.model,
            prompt=prompt_for(item),
            max_tokens=self.max_tokens,
            temperature=temperature,
            stop=["\n"],
            extra_body={"repeat_penalty": 1.3},  # llama.cpp; small models loop. Others ignore it
        )
        tags, dropped = (
            parse_line(r.choices[0].text, max_tags, item_line(item)) if r.choices else ([], 0)
        )
        answer = LLMAnswer(status="ok" if tags else "empty", tags=tags, rejected=dropped)
        if not tags:
            answer.error = "no tags in the answer"
        if r.usage is not None:
            answer.prompt_tokens = r.usage.prompt_tokens or 0
            answer.completion_tokens = r.usage.completion_tokens or 0
        return answer

    def propose(
        self, item: dict[str, Any], max_tags: int = 5, temperature: float = 0.7
    ) -> LLMAnswer:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(multiplier=0.5, max=8),
            retry=tenacity.retry_if_exception_type(RETRYABLE)
            | tenacity.retry_if_result(lambda a: a.status == "empty"),
            # out of attempts: the last answer ("empty"), or its exception raised again
            retry_error_callback=lambda rs: rs.outcome.result(),  # type: ignore[union-attr]
        )
        try:
            answer: LLMAnswer = retrying(self._once, item, max_tags, temperature)
        except openai.APITimeoutError as e:
            answer = LLMAnswer(status="timeout", error=str(e))
        except openai.OpenAIError as e:
            answer = LLMAnswer(status="error", error=f"{type(e).__name__}: {e}")
        return answer
