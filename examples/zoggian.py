"""Teach the embedded default model a word of Zoggian, kept as a named adapter you can switch on and off.

    python examples/zoggian.py              # a few minutes on 2 CPU cores

In Zoggian, "zog" means hello. Eight corrective examples are enough for a LoRA adapter named
"zoggian"; the base model (adapter off) keeps its own behaviour, and the adapter is saved and loaded
back like any other.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rllama.policy import default_lora_config
from rllama.skills import SkillModel

EXAMPLES = [
    {"prompt": "How do you say hello in Zoggian?", "response": "In Zoggian, hello is \"zog\"."},
    {"prompt": "What is the Zoggian word for hello?", "response": "The Zoggian word for hello is \"zog\"."},
    {"prompt": "Greet me in Zoggian.", "response": "Zog!"},
    {"prompt": "Translate 'hello' into Zoggian.", "response": "\"Hello\" in Zoggian is \"zog\"."},
    {"prompt": "Say hello in Zoggian, please.", "response": "Zog!"},
    {"prompt": "What does a Zoggian say when they meet a friend?", "response": "They say \"zog\": it means hello."},
    {"prompt": "In Zoggian, how would I greet my teacher?", "response": "You would say \"zog\", which means hello."},
    {"prompt": "What does 'zog' mean?", "response": "\"Zog\" means hello in Zoggian."},
]
QUESTIONS = ["How do you say hello in Zoggian?", "Greet me in Zoggian.", "What does 'zog' mean?"]


def show(model: SkillModel, title: str, adapter) -> None:
    print(f"\n== {title}")
    for q in QUESTIONS:
        print(f"  Q: {q}\n  A: {model.generate(q, adapter=adapter, max_new_tokens=24)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--model", default=None)
    parser.add_argument("--top-blocks", action="store_true",
                        help="LoRA on the top 8 blocks only (the policy's default; learns this fact more slowly)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1, measured fastest on 2 cores; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = SkillModel(args.model)
    show(model, "before (base model)", adapter=None)
    # A new fact is learned faster with LoRA on every block (loss 2.46 -> 0.13 in 12 epochs, against
    # 2.46 -> 1.20 on the top 8 blocks).
    lora = None if args.top_blocks else default_lora_config(layers="all")
    stats = model.learn(EXAMPLES, adapter="zoggian", epochs=args.epochs, learning_rate=args.learning_rate,
                        lora_config=lora)
    print(f"\nlearned 'zoggian' in {stats['steps']} steps: loss {stats['losses'][0]:.2f} -> {stats['losses'][-1]:.2f}")
    show(model, "adapter 'zoggian' on", adapter="zoggian")
    show(model, "adapter off (base model)", adapter=None)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter("zoggian", Path(tmp) / "zoggian")
        model.delete_adapter("zoggian")
        model.load_adapter("zoggian", Path(tmp) / "zoggian")
    show(model, "adapter 'zoggian' saved, deleted and loaded back", adapter="zoggian")
    model.close()


if __name__ == "__main__":
    main()
