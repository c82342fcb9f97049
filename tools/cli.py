"""``upclip COMMAND [args]``: one entry point for UpCLIP's command lines (pyproject.toml also
installs each as ``upclip-COMMAND``). ``upclip train --help`` shows a command's own help.

Each command is looked up by name and imported only when run (as a console script is), so
``upclip --help`` is instant and a command's heavy imports stay its own.
"""
from __future__ import annotations

import importlib
import sys

# name: (module, what it does)
COMMANDS = {
    "train": ("trainer.train", "train or fine-tune a (MoE) CLIP model"),
    "upcycle": ("trainer.upcycle", "turn a dense checkpoint into an MoE checkpoint"),
    "dmu": ("trainer.dmu.run", "DMU / CLIP-MoE: expert stages, assembly, router training"),
    "convert": ("tools.convert_checkpoint",
                "import open_clip / OpenAI / HF weights; export to HF, open_clip, MoE; reshard"),
    "eval": ("tools.evaluate", "zero-shot, retrieval and region retrieval of a checkpoint"),
    "shards": ("tools.make_shards", "write WebDataset shards (synthetic, Fashion-MNIST, folder)"),
    "regions": ("tools.add_regions", "merge region pseudo-labels into existing shards"),
    "label": ("tools.label_regions",
              "VESL-style region pseudo-labels: caption phrases + an open-vocabulary detector"),
    "plot": ("tools.plot_run", "PNG plots of a run's metrics.jsonl"),
    "summarize": ("tools.summarize_run", "evaluations and loss of runs"),
    "build-kernels": ("kernels.build", "compile the optional CUDA extension (needs nvcc)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: upclip COMMAND [args...]   (upclip COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; expected one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    sys.argv[0] = f"upclip {name}"  # argparse's default prog
    code = importlib.import_module(COMMANDS[name][0]).main(rest)
    return 0 if code is None else code


if __name__ == "__main__":
    sys.exit(main())
