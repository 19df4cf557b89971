"""Generate the small bundled data set in minimind/data/ so the demo runs with no external data.

Everything is produced here from templates and a seeded RNG (no text is copied from anywhere), so the files are
reproducible byte for byte: ``python bench/make_sample_corpus.py`` rewrites

  minimind/data/sample_corpus.jsonl  pretraining text, MiniMind's ``{"text": ...}`` format: short Chinese and
                                     English stories, simple facts, and ChatML-style Q&A lines
  minimind/data/sample_sft.jsonl     ~200 ``{"conversations": [{role, content}, ...]}`` chats
  minimind/data/sample_dpo.jsonl     ~100 ``{"chosen": [...], "rejected": [...]}`` preference pairs
  minimind/data/sample_reason.jsonl  ~100 chats answered as ``<think>...</think><answer>...</answer>``

The facts (arithmetic, capitals, animal sounds, colours) appear in all three files, so a tiny model pretrained
on the corpus has seen what the SFT and DPO sets ask about.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "minimind" / "data"
SEED = 20240607
CORPUS_BYTES = 200_000  # target size of sample_corpus.jsonl

# ------------------------------------------------------------------------------------------- vocabulary tables

NAMES_ZH = ["小明", "小红", "小刚", "小丽", "小华", "小雨", "阿强", "阿美", "大伟", "小芳"]
NAMES_EN = ["Tom", "Lily", "Sam", "Anna", "Ben", "Mia", "Leo", "Emma", "Max", "Zoe"]
RELATIVES = [("妈妈", "mom"), ("爸爸", "dad"), ("奶奶", "grandma"), ("爷爷", "grandpa"), ("老师", "the teacher")]
PLACES = [("公园", "the park"), ("河边", "the river"), ("森林", "the forest"), ("海边", "the beach"),
          ("山上", "the hill"), ("花园", "the garden"), ("图书馆", "the library"), ("市场", "the market")]
TIMES = [("早上", "In the morning"), ("中午", "At noon"), ("下午", "In the afternoon"), ("傍晚", "In the evening"),
         ("星期天", "On Sunday"), ("放学以后", "After school")]
WEATHER = [("天气很好，太阳暖暖的", "the sun was warm"), ("下着小雨", "it was raining a little"),
           ("风很大", "the wind was strong"), ("天上有很多白云", "there were many white clouds"),
           ("下雪了，地上白白的", "snow covered the ground")]
# (Chinese, English, Chinese sound, English sound, Chinese action, English action)
ANIMALS = [("小猫", "cat", "喵喵", "meow", "在晒太阳", "sleeping in the sun"),
           ("小狗", "dog", "汪汪", "woof", "在追球", "chasing a ball"),
           ("小鸭", "duck", "嘎嘎", "quack", "在水里游泳", "swimming in the water"),
           ("小鸟", "bird", "叽叽喳喳", "tweet", "在树上唱歌", "singing in a tree"),
           ("小羊", "sheep", "咩咩", "baa", "在吃草", "eating grass"),
           ("小牛", "cow", "哞哞", "moo", "在田里散步", "walking in the field"),
           ("青蛙", "frog", "呱呱", "ribbit", "在荷叶上跳", "jumping on a lily pad"),
           ("小鸡", "chick", "叽叽", "cheep", "在找虫子", "looking for bugs")]
FEELINGS = [("很开心", "happy"), ("有点累", "a little tired"), ("非常高兴", "very glad"), ("很惊讶", "surprised")]
OBJECTS = [("红色的气球", "a red balloon"), ("一本新书", "a new book"), ("一个苹果", "an apple"),
           ("一把雨伞", "an umbrella"), ("一只风筝", "a kite"), ("一块蛋糕", "a piece of cake")]
CAPITALS = [("中国", "北京", "China", "Beijing"), ("日本", "东京", "Japan", "Tokyo"),
            ("法国", "巴黎", "France", "Paris"), ("英国", "伦敦", "the United Kingdom", "London"),
            ("德国", "柏林", "Germany", "Berlin"), ("意大利", "罗马", "Italy", "Rome"),
            ("俄罗斯", "莫斯科", "Russia", "Moscow"), ("加拿大", "渥太华", "Canada", "Ottawa"),
            ("澳大利亚", "堪培拉", "Australia", "Canberra"), ("埃及", "开罗", "Egypt", "Cairo"),
            ("韩国", "首尔", "South Korea", "Seoul"), ("西班牙", "马德里", "Spain", "Madrid")]
COLOURS = [("天空", "蓝色", "the sky", "blue"), ("草", "绿色", "grass", "green"), ("雪", "白色", "snow", "white"),
           ("香蕉", "黄色", "a banana", "yellow"), ("煤", "黑色", "coal", "black"),
           ("草莓", "红色", "a strawberry", "red")]
SEASONS = [("春天", "spring", "花开了，小草发芽了"), ("夏天", "summer", "天气很热，可以去游泳"),
           ("秋天", "autumn", "树叶变黄了，果子成熟了"), ("冬天", "winter", "天气很冷，有时会下雪")]
WEEKDAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期天"]
WEEKDAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
IDENTITY_ZH = "我是MiniMind-Ray，一个在Ray上训练的小型语言模型，可以回答简单的问题。"
IDENTITY_EN = "I am MiniMind-Ray, a small language model trained on Ray. I can answer simple questions."

DIGITS_ZH = "零一二三四五六七八九"


def zh_number(n: int) -> str:
    """Chinese numerals for 0..9999 (enough for the arithmetic here)."""
    if n < 10:
        return DIGITS_ZH[n]
    if n < 20:
        return "十" + (DIGITS_ZH[n % 10] if n % 10 else "")
    out, zero = "", False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        d = n // value % 10
        if d:
            if zero:
                out += "零"
            out += DIGITS_ZH[d] + unit
            zero = False
        elif out:
            zero = True
    return out


# ---------------------------------------------------------------------------------------------------- facts


def arithmetic(rng: random.Random) -> tuple[str, str, int, str, str]:
    """(Chinese question, English question, answer, Chinese answer sentence, English answer sentence)."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        c, zh_op, en_op = a * b, "乘以", "times"
    elif op == "-":
        a = rng.randint(5, 99)
        b = rng.randint(1, a)
        c, zh_op, en_op = a - b, "减", "minus"
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        c, zh_op, en_op = a + b, "加", "plus"
    q_zh = rng.choice([f"{a}{zh_op}{b}等于多少？", f"请计算{a}{op}{b}。", f"{zh_number(a)}{zh_op}{zh_number(b)}是多少？"])
    q_en = rng.choice([f"What is {a} {en_op} {b}?", f"Calculate {a} {op} {b}.", f"What does {a} {op} {b} equal?"])
    a_zh = f"{a}{zh_op}{b}等于{c}。"
    a_en = f"{a} {en_op} {b} equals {c}."
    return q_zh, q_en, c, a_zh, a_en


def fact_pairs(rng: random.Random) -> list[tuple[str, str]]:
    """All templated (question, answer) facts, Chinese and English."""
    pairs = []
    for zh_c, zh_cap, en_c, en_cap in CAPITALS:
        pairs.append((f"{zh_c}的首都是哪里？", f"{zh_c}的首都是{zh_cap}。"))
        pairs.append((f"What is the capital of {en_c}?", f"The capital of {en_c} is {en_cap}."))
    for zh_a, en_a, zh_s, en_s, _, _ in ANIMALS:
        pairs.append((f"{zh_a}怎么叫？", f"{zh_a}会“{zh_s}”地叫。"))
        pairs.append((f"What sound does a {en_a} make?", f"A {en_a} says \"{en_s}\"."))
    for zh_t, zh_col, en_t, en_col in COLOURS:
        pairs.append((f"{zh_t}是什么颜色的？", f"{zh_t}通常是{zh_col}的。"))
        pairs.append((f"What colour is {en_t}?", f"{en_t[0].upper() + en_t[1:]} is usually {en_col}."))
    for zh_s, en_s, desc in SEASONS:
        pairs.append((f"{zh_s}是什么样的？", f"{zh_s}的时候，{desc}。"))
    for i in range(7):
        pairs.append((f"{WEEKDAYS_ZH[i]}的后一天是星期几？", f"{WEEKDAYS_ZH[i]}的后一天是{WEEKDAYS_ZH[(i + 1) % 7]}。"))
        pairs.append((f"What day comes after {WEEKDAYS_EN[i]}?",
                      f"The day after {WEEKDAYS_EN[i]} is {WEEKDAYS_EN[(i + 1) % 7]}."))
    for q in ["你是谁？", "请介绍一下你自己。", "你叫什么名字？"]:
        pairs.append((q, IDENTITY_ZH))
    for q in ["Who are you?", "Introduce yourself.", "What is your name?"]:
        pairs.append((q, IDENTITY_EN))
    rng.shuffle(pairs)
    return pairs


# ------------------------------------------------------------------------------------------------ pretraining


def story_zh(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES_ZH, 2)
    t, _ = rng.choice(TIMES)
    place, _ = rng.choice(PLACES)
    weather, _ = rng.choice(WEATHER)
    animal, _, sound, _, action, _ = rng.choice(ANIMALS)
    feeling, _ = rng.choice(FEELINGS)
    obj, _ = rng.choice(OBJECTS)
    rel, _ = rng.choice(RELATIVES)
    n = rng.randint(2, 9)
    parts = [f"{t}，{name}和{friend}一起去{place}玩。", f"那天{weather}。",
             f"他们看见了{zh_number(n)}只{animal}，{animal}{action}，还“{sound}”地叫。",
             f"{friend}带来了{obj}，两个人分着玩。",
             f"{name}说：“今天真是{rng.choice(['美好', '有趣', '难忘'])}的一天！”",
             f"回家以后，{name}{feeling}，把这件事告诉了{rel}。"]
    if rng.random() < 0.5:
        parts.insert(3, f"{name}数了数，一共有{n}只{animal}。")
    return "".join(parts)


def story_en(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES_EN, 2)
    _, t = rng.choice(TIMES)
    _, place = rng.choice(PLACES)
    _, weather = rng.choice(WEATHER)
    _, animal, _, sound, _, action = rng.choice(ANIMALS)
    _, feeling = rng.choice(FEELINGS)
    _, obj = rng.choice(OBJECTS)
    _, rel = rng.choice(RELATIVES)
    n = rng.randint(2, 9)
    return (f"{t}, {name} and {friend} went to {place}. {weather[0].upper() + weather[1:]}. "
            f"They saw {n} {animal}s. One {animal} was {action} and said \"{sound}\". "
            f"{friend} had {obj}, and they shared it. "
            f"\"What a {rng.choice(['nice', 'fun', 'great'])} day!\" said {name}. "
            f"At home, {name} felt {feeling} and told {rel} all about it.")


def facts_paragraph(rng: random.Random, facts: list[tuple[str, str]]) -> str:
    chosen = [a for _, a in rng.sample(facts, rng.randint(3, 6))]
    for _ in range(rng.randint(1, 3)):
        chosen.append(arithmetic(rng)[rng.choice([3, 4])])
    rng.shuffle(chosen)
    return " ".join(chosen)


def chatml_line(rng: random.Random, facts: list[tuple[str, str]]) -> str:
    # Like MiniMind's pretrain_hq lines: several "<|im_start|>question answer<|im_end|>" segments per line.
    segments = []
    for _ in range(rng.randint(2, 5)):
        if rng.random() < 0.4:
            q_zh, q_en, _, a_zh, a_en = arithmetic(rng)
            q, a = (q_zh, a_zh) if rng.random() < 0.5 else (q_en, a_en)
        else:
            q, a = rng.choice(facts)
        sep = " " if q.isascii() else ""  # MiniMind's lines run question and answer together
        segments.append(f"<|im_start|>{q}{sep}{a}<|im_end|>")
    return " ".join(segments)


def make_corpus(rng: random.Random, facts: list[tuple[str, str]]) -> list[dict]:
    makers = [(story_zh, 0.35), (story_en, 0.25), (lambda r: facts_paragraph(r, facts), 0.2),
              (lambda r: chatml_line(r, facts), 0.2)]
    lines, size = [], 0
    while size < CORPUS_BYTES:
        make = rng.choices([m for m, _ in makers], weights=[w for _, w in makers])[0]
        record = {"text": make(rng)}
        lines.append(record)
        size += len(json.dumps(record, ensure_ascii=False).encode()) + 1
    return lines


# ------------------------------------------------------------------------------------------------ SFT and DPO


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def make_sft(rng: random.Random, facts: list[tuple[str, str]], n: int = 200) -> list[dict]:
    convs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:  # arithmetic, one turn
            q_zh, q_en, _, a_zh, a_en = arithmetic(rng)
            q, a = (q_zh, a_zh) if rng.random() < 0.5 else (q_en, a_en)
            convs.append([turn("user", q), turn("assistant", a)])
        elif kind in (1, 2):  # a fact, one turn
            q, a = facts[(i * 7) % len(facts)]
            convs.append([turn("user", q), turn("assistant", a)])
        else:  # two turns: a fact then a sum
            q, a = rng.choice(facts)
            q2, _, _, a2, _ = arithmetic(rng)
            convs.append([turn("user", q), turn("assistant", a), turn("user", q2), turn("assistant", a2)])
    return [{"conversations": c} for c in convs]


def make_dpo(rng: random.Random, facts: list[tuple[str, str]], n: int = 100) -> list[dict]:
    pairs = []
    for i in range(n):
        if i % 2 == 0:  # arithmetic: the rejected answer has a wrong result
            q_zh, q_en, c, a_zh, a_en = arithmetic(rng)
            wrong = c + rng.choice([-3, -2, -1, 1, 2, 10])
            if rng.random() < 0.5:
                q, good, bad = q_zh, a_zh, a_zh.replace(f"等于{c}。", f"等于{wrong}。")
            else:
                q, good, bad = q_en, a_en, a_en.replace(f"equals {c}.", f"equals {wrong}.")
        else:  # a fact: the rejected answer is unhelpful
            q, good = facts[(i * 5) % len(facts)]
            zh = any("\u4e00" <= ch <= "\u9fff" for ch in q)
            bad = rng.choice(["我不知道。", "这个问题没有意义。", "你自己去查吧。"] if zh
                             else ["I don't know.", "That is not a real question.", "Look it up yourself."])
        user = turn("user", q)
        pairs.append({"chosen": [user, turn("assistant", good)], "rejected": [user, turn("assistant", bad)]})
    return pairs


def make_reason(rng: random.Random, n: int = 100) -> list[dict]:
    """Arithmetic chats whose replies think first, in MiniMind's reasoning template."""
    convs = []
    for _ in range(n):
        q_zh, q_en, c, a_zh, a_en = arithmetic(rng)
        if rng.random() < 0.5:
            q, think, answer = q_zh, f"用户问的是一道算术题。逐步计算：{a_zh}答案是{c}。", a_zh
        else:
            q, think, answer = q_en, f"This is arithmetic. Step by step: {a_en} So the result is {c}.", a_en
        reply = f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"
        convs.append({"conversations": [turn("user", q), turn("assistant", reply)]})
    return convs


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({len(records)} lines, {path.stat().st_size:,} bytes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    facts = fact_pairs(rng)
    write_jsonl(args.out_dir / "sample_corpus.jsonl", make_corpus(rng, facts))
    write_jsonl(args.out_dir / "sample_sft.jsonl", make_sft(rng, facts))
    write_jsonl(args.out_dir / "sample_dpo.jsonl", make_dpo(rng, facts))
    write_jsonl(args.out_dir / "sample_reason.jsonl", make_reason(rng))


if __name__ == "__main__":
    main()
