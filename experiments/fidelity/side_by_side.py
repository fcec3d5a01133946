"""The official BlockPruner / SLEB search code against ours: same model, same raw rows, each side drawing its
calibration tokens its own way; prints both draws' token hashes and both removal orders.

    python experiments/fidelity/side_by_side.py blockpruner --official /path/to/BlockPruner
    python experiments/fidelity/side_by_side.py sleb --official /path/to/SLEB

`--official` is a local checkout of github.com/MrGGLS/BlockPruner (@ 8210707) or github.com/jiwonsong-dev/SLEB
(@ d07129a); nothing of it is copied here. Defaults: the embedded model (`model=smollm2_135m`, offline),
8 rows cut into 128-token sequences; BlockPruner 6 steps, SLEB 4 removals. On a shared 2-core CPU one forward
pass of 128 tokens takes about 1 s: `--rows 3` gives BlockPruner 2 sequences (about 345 official passes).
Our side draws with `calib=alpaca` (pool=official) and `calib=wikitext2_rows`.

What this script changes around the official code, and why (its search loop, scoring and data code run as
released):
- `datasets.load_dataset` returns the bundled rows (offline; WikiText-2 validation stands in for train on both
  sides), so both sides start from the same raw rows and the official split / shuffle / join / cut runs.
- The model and tokenizer are ours, handed to the official loaders (`from_pretrained`, SLEB's `get_llm`,
  `get_tokenizer`): SLEB's `get_tokenizer` would load the slow tokenizer; both sides use the same fast one.
- SLEB: `model.seqlen` is the given seqlen (the code fixes 2048) and `torch.device("cuda:0")` becomes the CPU.
- Both codes' masked/on-off decoder layers were written for transformers 4.x (attention returning three
  values, layers returning tuples); two thin adapters make them run under transformers 5 without touching
  their logic.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import prune  # noqa: E402,F401  (registers the config resolvers)
from prune.data.calibration import build_calibration  # noqa: E402
from prune.data.sources import load_rows  # noqa: E402
from prune.data.tokens import tensor_hash  # noqa: E402
from prune.methods.blockpruner import BlockPruner  # noqa: E402
from prune.methods.sleb import Sleb  # noqa: E402
from prune.models.adapter import adapter_for  # noqa: E402
from prune.models.load import load_model_and_tokenizer  # noqa: E402


class ThreeValueAttention(torch.nn.Module):
    """transformers-5 attention (output, weights) seen as the 4.x (output, weights, past_key_value)."""

    def __init__(self, attention: torch.nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, *args, **kwargs):
        output, weights = self.attention(*args, **kwargs)[:2]
        return output, weights, None


def transformers5_layer(official_layer: type) -> type:
    """A subclass of an official 4.x decoder layer that returns a tensor, as transformers-5 models expect."""

    class Layer(official_layer):
        def forward(self, hidden_states, *args, **kwargs):
            if self.self_attn is not None and not isinstance(self.self_attn, ThreeValueAttention):
                self.self_attn = ThreeValueAttention(self.self_attn)
            return super().forward(hidden_states, *args, **kwargs)[0]

    return Layer


def load_ours(model: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}"])
    loaded = load_model_and_tokenizer(cfg.model)
    loaded.model.eval()
    return loaded.model, loaded.tokenizer


def fake_load_dataset(datasets_module, tables: dict):
    """A `load_dataset` that answers with the given in-memory tables (keyed by the dataset path)."""
    def load_dataset(path, *args, split=None, **kwargs):
        table = datasets_module.Dataset.from_dict(tables[path])
        return table if split else datasets_module.DatasetDict({"train": table})
    return load_dataset


def orders_equal(name: str, official: list, ours: list, official_tokens: torch.Tensor,
                 our_tokens: torch.Tensor) -> bool:
    same_draw = official_tokens.shape == our_tokens.shape and torch.equal(official_tokens, our_tokens)
    print(f"\n== {name}")
    print(f"calibration: official {tuple(official_tokens.shape)} {tensor_hash(official_tokens)}, "
          f"ours {tuple(our_tokens.shape)} {tensor_hash(our_tokens)}: {'same' if same_draw else 'DIFFERENT'}")
    print(f"official order: {official}")
    print(f"our order:      {ours}")
    print("orders equal" if official == ours else "ORDERS DIFFER")
    return official == ours and same_draw


def blockpruner(args) -> bool:
    import datasets

    model, tokenizer = load_ours(args.model)
    records = json.loads((REPO / "prune/data/files/alpaca/alpaca_data_1k.json").read_text(encoding="utf-8"))
    texts, _ = load_rows("alpaca", "train", "bundled")
    table = {key: [r[key] for r in records] for key in ("instruction", "input", "output")} | {"text": texts}
    datasets.load_dataset = fake_load_dataset(datasets, {"tatsu-lab/alpaca": table})

    ours_calib = build_calibration(tokenizer, dataset="alpaca", style="row_chunks", join="\n\n",
                                   nsamples=args.rows, seqlen=args.seqlen, seed=42, source="bundled",
                                   pool="official")
    started = time.perf_counter()
    plan = BlockPruner(num_blocks=args.steps, cache=False).prune(adapter_for(model), ours_calib, 0.0)
    ours = [tuple(b) for b in plan.info["removal_order"]]
    print(f"our search: {time.perf_counter() - started:.0f} s")

    sys.path.insert(0, str(Path(args.official).resolve()))
    import block_search  # the official module: set_seed(42) on import, as when run as a script
    import utils

    block_search.MaskedLlamaDecoderLayer = transformers5_layer(block_search.MaskedLlamaDecoderLayer)
    block_search.AutoModelForCausalLM = types.SimpleNamespace(from_pretrained=lambda *a, **k: model)
    block_search.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: tokenizer)
    loaders = []
    prepare = utils.prepare_test_dataloader
    utils.prepare_test_dataloader = lambda *a, **k: loaders.append(prepare(*a, **k)) or loaders[-1]
    with tempfile.TemporaryDirectory() as out:
        sys.argv = ["block_search.py", "--model-path", args.model, "--device", "cpu",
                    "--compute-dtype", "fp32", "--del-block-num", str(args.steps), "--cal-dataset", "alpaca",
                    "--cal-nsamples", str(args.rows), "--ppl-eval-seqlen", str(args.seqlen),
                    "--ppl-eval-batch-size", "2", "--ppl-search-path", out]
        started = time.perf_counter()
        block_search.main()
        print(f"official search: {time.perf_counter() - started:.0f} s")
        nested = json.loads(next(Path(out).glob("*_del_order_list.json")).read_text())
    removed, official = set(), []
    for step in range(1, args.steps + 1):  # the file holds the removed set after each step; recover the order
        now = {tuple(b) for b in nested[str(step)]}
        official += list(now - removed)
        removed = now
    return orders_equal("BlockPruner", official, ours, loaders[0].dataset.input_ids, ours_calib.input_ids)


def sleb(args) -> bool:
    model, tokenizer = load_ours(args.model)
    rows, _ = load_rows("wikitext2", "train", "bundled")
    ours_calib = build_calibration(tokenizer, dataset="wikitext2", style="shuffled_rows", join="\n\n",
                                   nsamples=args.rows, seqlen=args.seqlen, seed=0, source="bundled")
    started = time.perf_counter()
    plan = Sleb(num_layers=args.removals, cache=False).prune(adapter_for(model), ours_calib, 0.0)
    ours = [layer for _, layer in plan.info["removal_order"]]
    print(f"our search: {time.perf_counter() - started:.0f} s")

    sys.path.insert(0, str(Path(args.official).resolve()))
    sys.modules.setdefault("fire", types.ModuleType("fire"))  # used only by `python sleb.py` (fire.Fire)
    import datasets
    import sleb as official_sleb  # the official module
    from utils import data_utils
    from utils.onoff_utils import onoff_llama

    data_utils.load_dataset = fake_load_dataset(datasets, {"wikitext": {"text": rows}})
    data_utils.get_tokenizer = lambda name: tokenizer
    onoff_llama.OnOff_LlamaDecoderLayer = transformers5_layer(onoff_llama.OnOff_LlamaDecoderLayer)
    model.seqlen, model.name = args.seqlen, f"{args.model}-llama"  # "llama" selects the code's LLaMA path
    official_sleb.get_llm = lambda name: model
    cpu = types.SimpleNamespace(device=lambda *a: torch.device("cpu"),
                                cuda=types.SimpleNamespace(empty_cache=lambda: None))
    official_sleb.torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in ("stack",)}, **vars(cpu))
    encodings = []
    trainloaders = official_sleb.get_trainloaders
    official_sleb.get_trainloaders = lambda *a, **k: encodings.append(trainloaders(*a, **k)) or encodings[-1]
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        official_sleb.sleb(model_name=model.name, num_blocks=model.config.num_hidden_layers,
                           num_remove_blocks=args.removals, early_barrier=1, latter_barrier=1, seed=0,
                           nsamples=args.rows, result_folder=out, dataset="wikitext2", eval_ppl=False)
        print(f"official search: {time.perf_counter() - started:.0f} s")
        report = (Path(out) / "sleb_results.txt").read_text().splitlines()
        line = next(t for t in report if "Removal Order" in t)
    official = ast.literal_eval(line.split(":", 1)[1].strip())
    stream = encodings[0].input_ids[0]
    count = len(stream) // args.seqlen
    return orders_equal("SLEB", official, ours, stream[: count * args.seqlen].view(count, args.seqlen),
                        ours_calib.input_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=["blockpruner", "sleb"])
    parser.add_argument("--official", required=True, help="local checkout of the official repository")
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model name (LLaMA family)")
    parser.add_argument("--rows", type=int, default=8, help="calibration rows (both codes' nsamples)")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="BlockPruner: blocks removed")
    parser.add_argument("--removals", type=int, default=4, help="SLEB: layers removed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        equal = blockpruner(args) if args.method == "blockpruner" else sleb(args)
    sys.exit(0 if equal else 1)


if __name__ == "__main__":
    main()
