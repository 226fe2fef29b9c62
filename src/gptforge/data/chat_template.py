"""The chat template: ChatML with the special tokens every gptforge tokenizer reserves.

    <|im_start|>system\\nYou are helpful.<|im_end|>\\n
    <|im_start|>user\\nHi<|im_end|>\\n
    <|im_start|>assistant\\nHello!<|im_end|>\\n

`encode_chat` renders a conversation to token ids plus a per-token mask that is 1 exactly on the
tokens the model must learn to produce: each assistant turn's content AND its closing <|im_end|>
(without it a model never learns to stop). The role headers, the other turns and the "\\n" after
<|im_end|> are 0. The same function renders chat prompts at inference, so training and chat agree
token for token. CHATML_JINJA is the same template for Hugging Face (`tokenizer_config.json`'s
`chat_template`); it is saved as `chat_template.jinja` beside tokenizer.json in SFT/DPO checkpoints.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from datetime import datetime

from gptforge.data.tokenizer import IM_END, IM_START
from gptforge.errors import UserError

ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE_FILE = "chat_template.jinja"

CHATML_JINJA = (
    "{%- for message in messages %}"
    "{{- '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '" + IM_START + "assistant\\n' }}{%- endif %}"
)


def check_messages(messages, where: str = "") -> list[dict]:
    """Validate a message list: dicts with a known role and string content. -> the list."""
    at = f"{where}: " if where else ""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{at}a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{at}message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{at}message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{at}message {i} has non-string content ({type(m['content']).__name__})")
    return messages


def _special_ids(tok) -> tuple[int, int]:
    try:
        s, e = tok.special[IM_START], tok.special[IM_END]
    except (AttributeError, KeyError):
        s = e = None
    if s is None or e is None:
        raise UserError(f"the tokenizer lacks the chat tokens {IM_START} / {IM_END}; "
                        "use a gptforge tokenizer (they reserve them)")
    return s, e


def encode_chat(tok, messages: list[dict], add_generation_prompt: bool = False,
                train_on: str = "assistant") -> tuple[list[int], list[int]]:
    """-> (ids, mask). mask[i] = 1 where token i is assistant content or an assistant turn's <|im_end|>.

    train_on: "assistant" (every assistant turn), "last" (only the final assistant turn: DPO responses)
    or "none". Each piece (header, content, separators) is encoded on its own so the mask is exact."""
    if getattr(tok, "chat_template", None) is not None:  # a folder's own template (inference only: no mask)
        ids = tok.chat_template.encode(tok, messages, add_generation_prompt)
        return ids, [0] * len(ids)
    s_id, e_id = _special_ids(tok)
    # encode every distinct text piece in one batch call
    texts: list[str] = []
    for m in messages:
        texts += [f"{m['role']}\n", m["content"]]
    encoded = tok.encode_batch(texts, specials=False) if texts else []
    nl = tok.encode("\n")
    last_asst = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
        header, content = encoded[2 * i], encoded[2 * i + 1]
        learn = m["role"] == "assistant" and (train_on == "assistant" or (train_on == "last" and i == last_asst))
        ids += [s_id, *header]
        mask += [0] * (1 + len(header))
        ids += [*content, e_id]
        mask += [int(learn)] * (len(content) + 1)
        ids += nl
        mask += [0] * len(nl)
    if add_generation_prompt:
        header = tok.encode("assistant\n")
        ids += [s_id, *header]
        mask += [0] * (1 + len(header))
    return ids, mask


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as CHATML_JINJA renders it (a gptforge tokenizer reads the special
    tokens' strings back as their ids). For trusted text only: user content that spells <|im_end|> becomes
    the special token, which `encode_chat` prevents."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def stop_ids(tok) -> set[int]:
    """Token ids that end an assistant reply: the model's end tokens (a folder's eos ids), and <|im_end|> when
    the model is prompted with ChatML."""
    ends = set(getattr(tok, "end_ids", None) or {tok.eos_id})
    if getattr(tok, "chat_template", None) is not None:
        return ends
    _, e = _special_ids(tok)
    return {e} | ends


# ---- a Hugging Face folder's own chat template ---------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """jinja2's ImmutableSandboxedEnvironment set up as transformers sets it up for chat templates (a template
    from a model folder is untrusted code: no attribute of Python internals, no mutation of the arguments)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("this model's own chat template needs jinja2: pip install 'jinja2>=3.1.6'") from None
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise UserError(f"jinja2 {jinja2.__version__} has known sandbox escapes; pip install -U 'jinja2>=3.1.6'")

    class Generation(jinja2.ext.Extension):  # {% generation %}...{% endgeneration %}: transformers' mask tag
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(template)


@dataclass
class FolderTemplate:
    """A Hugging Face folder's chat template, rendered as transformers' apply_chat_template renders it.

    Special-token strings typed in message content stay text. Without any, the rendered text is encoded in one
    call, special tokens parsed: exactly the ids of apply_chat_template(..., tokenize=True). With some, each one
    in a content is replaced, before rendering, by a placeholder character that occurs nowhere in the contents
    or the template (private use plane 15), so whatever the template does with the content (trim, upper,
    concatenation) the placeholders go through it. The rendered text is cut at the special tokens it holds
    (the template's own <s>, <|eot_id|>, ...: as the tokenizer cuts a text at its added tokens) and each
    section, placeholders turned back into the typed strings, is encoded with special tokens as plain text.
    So no typed string becomes a special id, and the text around it is tokenized as usual."""

    text: str
    tokens: dict = field(default_factory=dict)  # bos_token, eos_token, ...: what the template sees

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return _compiled(self.text).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               tools=None, documents=None, **self.tokens)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the template's code, sandbox violations included
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"the model's chat template failed ({type(e).__name__}: {first}); fix or remove the "
                            "chat_template of the model folder") from None

    def encode(self, tok, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        specials = sorted({t.content for t in tok.hf.get_added_tokens_decoder().values() if t.special}, key=len,
                          reverse=True)
        typed = [s for s in specials if any(s in m["content"] for m in messages)]
        if not typed:
            return tok.encode(self.render(messages, add_generation_prompt))
        used = set(self.text).union(*(m["content"] for m in messages), *map(str, self.tokens.values()))
        free = (chr(c) for c in range(0xF0000, 0xFFFFE) if chr(c) not in used)
        holder = {s: next(free) for s in typed}
        typed_re = re.compile("|".join(re.escape(s) for s in typed))
        safe = [{**m, "content": typed_re.sub(lambda x: holder[x.group(0)], m["content"])} for m in messages]
        back = {h: s for s, h in holder.items()}
        text = self.render(safe, add_generation_prompt)

        def plain(section: str) -> list[int]:  # typed strings restored, encoded as text
            return tok.encode_batch([re.sub(f"[{''.join(back)}]", lambda x: back[x.group(0)], section)],
                                    specials=False)[0] if section else []

        # the template's own special tokens cut the text into sections, as the tokenizer itself cuts it
        ids, at = [], 0
        for m in re.finditer("|".join(re.escape(s) for s in specials), text):
            ids += plain(text[at:m.start()]) + [tok.hf.token_to_id(m.group(0))]
            at = m.end()
        return ids + plain(text[at:])
