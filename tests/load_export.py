"""Load exported models with ``transformers`` + ``peft`` only, in a fresh process, as a user would.

    python tests/load_export.py SPEC.json   ->   JSON on stdout

SPEC: {"models": [{"folder": ..., "base": DIR or null, "auto": bool}], "prompts": [...],
"max_new_tokens": N, "logits_prompt": "..."}. An adapter with ``base`` is loaded as
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)``; with ``auto``, as
``AutoPeftModelForCausalLM.from_pretrained(folder)`` (the base named in ``adapter_config.json``); a
merged folder as ``AutoModelForCausalLM.from_pretrained(folder)``. This file must never import Kitchen:
the output says which modules named ``kitchen*`` were loaded (none).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def _load(spec: dict[str, Any]) -> Any:
    folder = spec["folder"]
    if spec.get("auto"):
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(folder)
    if spec.get("base"):
        from peft import PeftModel

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec["base"]), folder)
    return AutoModelForCausalLM.from_pretrained(folder)


def main(path: str) -> None:
    with open(path) as handle:
        request = json.load(handle)
    results = []
    for spec in request["models"]:
        model = _load(spec).eval()
        tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
        completions = []
        for prompt in request["prompts"]:
            messages = [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=request["max_new_tokens"], do_sample=False)
            new = out[0, inputs["input_ids"].shape[1] :]
            completions.append(tokenizer.decode(new, skip_special_tokens=True))
        ids = tokenizer(request["logits_prompt"], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits = model(**ids).logits[0].tolist()
        results.append({"completions": completions, "logits": logits})
    kitchen = sorted(name for name in sys.modules if name == "kitchen" or name.startswith("kitchen."))
    print(json.dumps({"results": results, "kitchen_modules": kitchen}))


if __name__ == "__main__":
    main(sys.argv[1])
