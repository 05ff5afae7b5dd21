"""Chat fine-tuning acceptance: fine-tune a base model on 150 short question/answer conversations (task
`type: chat`), serve it, and ask the same questions through `/v1/chat/completions` (greedy).

    python benchmarks/chat_qa.py BASE_DIR OUT_DIR [--steps N] [--method full|lora]

Prints and returns the fraction of answers that match exactly (after stripping spaces and a final period).
The facts are real (countries: capital, continent, main language); the conversations are generated from
them with a few phrasings, seeded.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# country, capital, continent, official / main language
FACTS = [
    ("France", "Paris", "Europe", "French"), ("Germany", "Berlin", "Europe", "German"),
    ("Italy", "Rome", "Europe", "Italian"), ("Spain", "Madrid", "Europe", "Spanish"),
    ("Portugal", "Lisbon", "Europe", "Portuguese"), ("Greece", "Athens", "Europe", "Greek"),
    ("Poland", "Warsaw", "Europe", "Polish"), ("Sweden", "Stockholm", "Europe", "Swedish"),
    ("Norway", "Oslo", "Europe", "Norwegian"), ("Finland", "Helsinki", "Europe", "Finnish"),
    ("Ireland", "Dublin", "Europe", "Irish"), ("Austria", "Vienna", "Europe", "German"),
    ("Hungary", "Budapest", "Europe", "Hungarian"), ("Romania", "Bucharest", "Europe", "Romanian"),
    ("Ukraine", "Kyiv", "Europe", "Ukrainian"), ("Russia", "Moscow", "Europe", "Russian"),
    ("Turkey", "Ankara", "Asia", "Turkish"), ("Egypt", "Cairo", "Africa", "Arabic"),
    ("Kenya", "Nairobi", "Africa", "Swahili"), ("Nigeria", "Abuja", "Africa", "English"),
    ("Ghana", "Accra", "Africa", "English"), ("Morocco", "Rabat", "Africa", "Arabic"),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic"), ("Senegal", "Dakar", "Africa", "French"),
    ("Japan", "Tokyo", "Asia", "Japanese"), ("China", "Beijing", "Asia", "Chinese"),
    ("India", "New Delhi", "Asia", "Hindi"), ("Thailand", "Bangkok", "Asia", "Thai"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese"), ("Indonesia", "Jakarta", "Asia", "Indonesian"),
    ("Iran", "Tehran", "Asia", "Persian"), ("Iraq", "Baghdad", "Asia", "Arabic"),
    ("Israel", "Jerusalem", "Asia", "Hebrew"), ("Nepal", "Kathmandu", "Asia", "Nepali"),
    ("Mongolia", "Ulaanbaatar", "Asia", "Mongolian"), ("Canada", "Ottawa", "North America", "English"),
    ("Mexico", "Mexico City", "North America", "Spanish"), ("Cuba", "Havana", "North America", "Spanish"),
    ("Jamaica", "Kingston", "North America", "English"), ("Brazil", "Brasilia", "South America", "Portuguese"),
    ("Argentina", "Buenos Aires", "South America", "Spanish"), ("Chile", "Santiago", "South America", "Spanish"),
    ("Peru", "Lima", "South America", "Spanish"), ("Colombia", "Bogota", "South America", "Spanish"),
    ("Australia", "Canberra", "Oceania", "English"), ("New Zealand", "Wellington", "Oceania", "English"),
    ("Fiji", "Suva", "Oceania", "English"), ("Iceland", "Reykjavik", "Europe", "Icelandic"),
    ("Denmark", "Copenhagen", "Europe", "Danish"), ("Netherlands", "Amsterdam", "Europe", "Dutch"),
]
QUESTIONS = {
    "capital": ["What is the capital of {c}?", "Which city is the capital of {c}?"],
    "continent": ["On which continent is {c}?", "Which continent is {c} in?"],
    "language": ["What language is spoken in {c}?", "Which language do people in {c} speak?"],
}
SYSTEM = "Answer in one short sentence."


def conversations(seed: int = 0) -> list[dict]:
    """150 conversations (50 countries x capital / continent / language), some with a system message."""
    rng = random.Random(seed)
    out = []
    for country, capital, continent, language in FACTS:
        for kind, answer in (("capital", capital), ("continent", continent), ("language", language)):
            q = rng.choice(QUESTIONS[kind]).format(c=country)
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": answer + "."}]
            if rng.random() < 0.5:
                msgs.insert(0, {"role": "system", "content": SYSTEM})
            out.append({"messages": msgs})
    return out


def norm(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def ask_all(base_url: str, model: str, convs: list[dict]) -> float:
    """Fraction of conversations whose greedy reply to the last user message matches the assistant answer."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    right = 0
    for conv in convs:
        r = client.chat.completions.create(model=model, messages=conv["messages"][:-1], max_tokens=16, temperature=0)
        right += norm(r.choices[0].message.content or "") == norm(conv["messages"][-1]["content"])
    return right / len(convs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--method", default="full")
    args = ap.parse_args()
    import yaml

    from seekformer.serving import ServerConfig, ServerThread, create_app, load_model_dir
    from seekformer.training.finetune import finetune
    from seekformer.training.multitask_recipe import load_finetune_recipe

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    convs = conversations()
    data = out / "qa_chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in convs))
    recipe = {"base": args.base, "out": str(out / "model"),
              "tasks": [{"name": "qa", "type": "chat", "train": str(data), "max_length": 64}],
              "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "method": args.method,
                        "warmup_steps": 20, "validate": False, "test": False, "progress": False}}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    finetune(load_finetune_recipe(str(out / "recipe.yaml")))
    model, tok = load_model_dir(out / "model")
    app = create_app(model, tok, ServerConfig(model_name="qa", max_batch_size=8))
    with ServerThread(app) as srv:
        acc = ask_all(srv.url + "/v1", "qa", convs)
    print(json.dumps({"accuracy": acc, "conversations": len(convs), "steps": args.steps, "method": args.method}))


if __name__ == "__main__":
    main()
