"""Writes the small instruction and chat samples shipped in lightning_peft/data (deterministic; written by us).

    python docs/data/make_llm_samples.py   # -> lightning_peft/data/{instructions,chat}_sample.jsonl

Simple templated tasks (arithmetic, antonyms, spelling, comparison, word counts) that a tiny model can start to learn
in a few hundred steps: for examples, tests and smoke runs, not a benchmark.
"""

import json
import random
from pathlib import Path

ANTONYMS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("early", "late"), ("happy", "sad"), ("light", "dark"),
            ("open", "closed"), ("full", "empty"), ("high", "low"), ("old", "new"), ("wet", "dry"), ("hard", "soft"),
            ("rich", "poor"), ("strong", "weak"), ("near", "far"), ("loud", "quiet"), ("thick", "thin"), ("up", "down")]
WORDS = ["apple", "river", "garden", "window", "pencil", "rocket", "silver", "planet", "forest", "candle", "bridge",
         "yellow", "market", "dragon", "pillow", "summer", "coffee", "guitar", "island", "ladder"]
SENTENCES = ["The cat sat on the mat.", "We walked to the old bridge at dawn.", "Rain fell all night.",
             "She reads a new book every week.", "The train was late again today.", "Birds sing in the morning.",
             "He painted the fence bright green.", "Our team won the final match."]


def _example(rng: random.Random) -> dict:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        return {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}."}
    if kind == 1:
        word, other = rng.choice(ANTONYMS)
        if rng.random() < 0.5:
            word, other = other, word
        return {"instruction": "Give the opposite of the word.", "input": word, "output": f"The opposite of {word} is {other}."}
    if kind == 2:
        word = rng.choice(WORDS)
        return {"instruction": f"Spell the word {word} backwards.", "input": "", "output": word[::-1]}
    if kind == 3:
        word = rng.choice(WORDS)
        return {"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()}
    if kind == 4:
        a, b = rng.sample(range(1, 100), 2)
        return {"instruction": f"Which is larger, {a} or {b}?", "input": "", "output": f"{max(a, b)} is larger."}
    sentence = rng.choice(SENTENCES)
    return {"instruction": "Count the words in the sentence.", "input": sentence, "output": f"There are {len(sentence.split())} words."}


def _user_text(e: dict) -> str:
    return e["instruction"] + (f"\n{e['input']}" if e["input"] else "")


def main(n: int = 320) -> None:
    out = Path(__file__).resolve().parents[2] / "lightning_peft" / "data"
    rng = random.Random(0)
    instructions = [_example(rng) for _ in range(n)]
    chats = []
    for i in range(n):
        first, second = _example(rng), _example(rng)
        messages = [{"role": "system", "content": "You are a concise assistant."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": _user_text(first)}, {"role": "assistant", "content": first["output"]}]
        if i % 2 == 0:
            messages += [{"role": "user", "content": _user_text(second)}, {"role": "assistant", "content": second["output"]}]
        chats.append({"messages": messages})
    for name, rows in (("instructions_sample.jsonl", instructions), ("chat_sample.jsonl", chats)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to {out / name}")


if __name__ == "__main__":
    main()
