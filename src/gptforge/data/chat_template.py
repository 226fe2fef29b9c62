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
    """Token ids that end an assistant reply."""
    _, e = _special_ids(tok)
    return {e} | ({tok.eos_id} if getattr(tok, "eos_id", None) is not None else set())
