"""Sampled tag descriptions or example posts from a base LLM, from the tag's name alone.

A base model continues a few-shot list of `tag → description` lines (RAM++ style) or of
`tag → one post with that tag` (style "examples", HyDE-like); several samples per tag are
kept and `tagsys.embed_tags` mixes their mean into the tag's vector — descriptions on the
tag side, example posts on the content side, where the tag's items are. The few-shot
examples are tags of no shipped dataset (astronomy, gardening, archaeology, knitting), so
nothing about an evaluation's labels leaks in beyond their names. Chinese names get a
Chinese prompt, everything else an English one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal

import openai
import structlog
import tenacity
from pydantic import SecretStr

from consumer.tagging.llm import RETRYABLE, openai_client
from tagsys import DEFAULT_TEMPLATE, Tag

log = structlog.get_logger(__name__)

Style = Literal["descriptions", "examples"]
STYLES: tuple[Style, ...] = ("descriptions", "examples")
PROMPT_VERSIONS: dict[Style, str] = {
    "descriptions": "describe-fewshot-1",
    "examples": "examples-fewshot-1",
}

PROMPT_ZH = """以下是内容标签及其描述，描述列出该标签下的视频常见的内容和关键词。

标签：天文
描述：星空摄影、行星、望远镜观测、宇宙科普、流星雨、银河、星座观测。

标签：园艺
描述：种花、养多肉、盆栽修剪、阳台花园、施肥浇水、花卉品种介绍。

标签：考古
描述：古墓发掘、文物修复、历史遗址、出土文物、考古队日常、博物馆藏品。

标签：{tag}
描述："""

PROMPT_EN = """Tags and their descriptions. A description lists what posts with that tag are \
usually about.

Tag: astronomy
Description: stars, planets, telescopes, night sky photography, meteor showers, galaxies, \
space science.

Tag: gardening
Description: growing flowers and vegetables, pruning, potting soil, watering, fertiliser, \
garden pests.

Tag: knitting
Description: yarn, needles, stitches, knitting patterns, sweaters and scarves, casting on \
and binding off.

Tag: {tag}
Description:"""

EXAMPLES_ZH = """以下是短视频的类别，以及该类别下一条视频的封面文字和标题。

类别：园艺
视频：阳台种菜第30天，小番茄终于红了 #阳台种菜 #多肉植物

类别：天文
视频：在山顶等了三个小时，终于拍到了银河 #星空摄影 #天文

类别：考古
视频：这件文物出土于汉墓，你们知道它是做什么用的吗？#考古 #历史

类别：编织
视频：新手也能学会的围巾织法，一步一步教你 #手工编织 #毛线

类别：{tag}
视频："""

EXAMPLES_EN = """Tags, each with one post that carries that tag.

Tag: astronomy
Post: Why does Mars look red through my telescope but not in photos? I have an 8 inch \
reflector and ...

Tag: gardening
Post: My tomato leaves turn yellow from the bottom up. I water every morning; is it too much?

Tag: archaeology
Post: How do archaeologists date a site when there is no organic material for carbon dating?

Tag: knitting
Post: What is the easiest cast-on for a beginner knitting a scarf on circular needles?

Tag: {tag}
Post:"""

_PROMPTS: dict[Style, tuple[str, str]] = {
    "descriptions": (PROMPT_ZH, PROMPT_EN),
    "examples": (EXAMPLES_ZH, EXAMPLES_EN),
}

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_SPLIT = re.compile(r"[，,、。；;.]+")
# a special token the server printed as text (Gemma: `<start_of_image>`, `<end_of_turn>`)
_SPECIAL = re.compile(r"<(?:start|end)_of_[a-z_]+>|<\|[a-z_]+\|>|</?s>|<eos>|<bos>|<pad>")

Progress = Callable[[int, int], None]


def prompt_for(name: str, style: Style = "descriptions") -> str:
    zh, en = _PROMPTS[style]
    return (zh if _CJK.search(name) else en).format(tag=name)


def clean(text: str, max_chars: int = 200) -> str | None:
    """One line, special tokens and repeated phrases dropped (small models loop), None when
    nothing is left."""
    text = _SPECIAL.sub(" ", text)
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    parts = dict.fromkeys(p.strip() for p in _SPLIT.split(line) if p.strip())
    sep = "、" if _CJK.search(line) else ", "
    out = sep.join(parts)[:max_chars].strip()
    return out or None


def clean_post(text: str, max_chars: int = 300) -> str | None:
    """An example post as written: its first line, special tokens and runs of spaces dropped
    (punctuation kept: it is embedded as content is), None when nothing is left."""
    text = _SPECIAL.sub(" ", text)
    line = text.strip().splitlines()[0] if text.strip() else ""
    out = " ".join(line.split())[:max_chars].strip()
    return out or None


@dataclass
class DescribeReport:
    tags: int = 0
    requests: int = 0
    failed: int = 0  # requests that gave no usable text after retries
    described: int = 0  # tags with at least one description
    errors: list[str] = field(default_factory=list)


class Describer:
    """Asks an OpenAI-compatible *completions* endpoint (not chat: a base model has no chat
    template) for `samples` descriptions (or example posts) per tag, `concurrency` requests
    at a time."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: SecretStr = SecretStr(""),
        *,
        samples: int = 20,
        temperature: float = 0.8,
        max_tokens: int = 60,
        timeout_s: float = 60.0,
        attempts: int = 3,
        concurrency: int = 1,
        style: Style = "descriptions",
        template: str = DEFAULT_TEMPLATE,
    ) -> None:
        if samples < 1:
            raise ValueError("samples must be at least 1")
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        self.style: Style = style
        self.template = template  # how the prompt names the tag, e.g. "{name} (cooking)"
        self.model = model
        self.samples = samples
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.attempts = attempts
        self.concurrency = max(1, concurrency)
        self.client = openai_client(base_url, api_key, timeout_s)

    def _once(self, name: str, seed: int) -> str | None:
        r = self.client.completions.create(
            model=self.model,
            prompt=prompt_for(name, self.style),
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=seed,
            stop=["\n"],
            frequency_penalty=0.5,
            extra_body={"repeat_penalty": 1.3},  # llama.cpp; other servers ignore it
        )
        if not r.choices:
            return None
        text = r.choices[0].text
        return clean_post(text) if self.style == "examples" else clean(text)

    def _sample(self, name: str, seed: int) -> str | None:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(multiplier=0.5, max=8),
            retry=tenacity.retry_if_exception_type(RETRYABLE),
            reraise=True,
        )
        return retrying(self._once, name, seed)

    def describe(
        self, tags: Sequence[Tag], progress: Progress | None = None
    ) -> tuple[list[Tag], DescribeReport]:
        """The tags with `descriptions` (or `examples`) filled, existing ones replaced; a tag
        whose every sample failed keeps none and is counted, never dropped."""
        report = DescribeReport(tags=len(tags))
        jobs = [(i, s) for i in range(len(tags)) for s in range(self.samples)]
        got: dict[int, list[tuple[int, str]]] = {i: [] for i in range(len(tags))}
        done = 0

        def run(job: tuple[int, int]) -> tuple[int, int, str | None, str | None]:
            i, s = job
            try:
                name = self.template.format(name=tags[i].name)
                return i, s, self._sample(name, seed=s + 1), None
            except openai.OpenAIError as e:
                return i, s, None, f"{tags[i].name}: {type(e).__name__}: {e}"

        with ThreadPoolExecutor(self.concurrency) as pool:
            for i, s, text, error in pool.map(run, jobs):
                report.requests += 1
                if text is None:
                    report.failed += 1
                    if error and len(report.errors) < 20:
                        report.errors.append(error)
                        log.warning("describe_failed", error=error)
                else:
                    got[i].append((s, text))
                done += 1
                if progress:
                    progress(done, len(jobs))
        out = []
        for i, t in enumerate(tags):
            texts = tuple(dict.fromkeys(text for _, text in sorted(got[i])))
            report.described += bool(texts)
            if self.style == "examples":
                out.append(replace(t, examples=texts))
            else:
                out.append(replace(t, descriptions=texts))
        return out, report
