"""Run under torchrun by test_parallel: the tiny model's logits and greedy tokens, sharded over the ranks.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_logits.py OUT.pt
"""

import sys

import torch

from workbench.models.loader import load_model
from workbench.models.sources import resolve
from workbench.parallel import distributed as d


def main(out: str) -> None:
    d.init_process_group(torch.device("cpu"))
    world = torch.distributed.get_world_size()
    loaded = load_model(resolve("tiny"), "fp32", torch.device("cpu"), extra=d.tensor_parallel_kwargs(world))
    ids = loaded.tokenizer("def main():\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded.model(ids).logits
        greedy = loaded.model.generate(ids, max_new_tokens=12, do_sample=False)
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": logits, "greedy": greedy, "ids": ids}, out)
    d.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
