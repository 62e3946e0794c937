"""The ``conceptlm`` command: ``conceptlm <method> <verb> --config FILE key=value ...`` and ``conceptlm demo``.

Examples::

    conceptlm demo
    conceptlm sft train --config configs/sft/tiny_cpu.yaml train.max_steps=50
    torchrun --nproc_per_node=2 -m conceptlm sft train --config configs/sft/tiny_cpu.yaml
    conceptlm sft eval --config configs/sft/tiny_cpu.yaml
    conceptlm jepa train --config configs/jepa/tiny_cpu.yaml jepa.lam=1.0 jepa.num_predictors=1
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from conceptlm.core.errors import ConceptLMError

__all__ = ["main", "METHODS"]


@dataclass
class Method:
    help: str
    config: str
    """``module:ClassName`` of the method's config dataclass (imported lazily: ``--help`` stays fast)."""
    recipe: str
    """Module with ``train(cfg, command=)`` and ``evaluate(cfg, checkpoint=, output=)`` (+ ``analyze``)."""
    verbs: list[str] = field(default_factory=list)

    def config_cls(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)


def _train(cfg, args, command):
    res = importlib.import_module(METHODS[args.method].recipe).train(cfg, command=command)
    return {"run_dir": str(res.run_dir), "step": res.step, "train": res.last_train, "eval": res.last_eval,
            "checkpoint": str(res.checkpoint) if res.checkpoint else None}


def _eval(cfg, args, command):
    return importlib.import_module(METHODS[args.method].recipe).evaluate(cfg, checkpoint=args.checkpoint,
                                                                           output=args.output)


def _analyze(cfg, args, command):
    return importlib.import_module(METHODS[args.method].recipe).analyze(cfg, checkpoint=args.checkpoint,
                                                                          output=args.output)


VERBS = {
    "train": ("train a model (works under torchrun)", _train),
    "eval": ("greedy generation on the eval data, scored; predictions to JSONL", _eval),
    "analyze": ("embedding analysis of a checkpoint: Enc(Text)/Enc(Code) export, singular values, linear-map "
                "residual, 2-D projection plot", _analyze),
}

METHODS: dict[str, Method] = {
    "sft": Method(help="supervised fine-tuning / from-scratch next-token training (the NTP baseline)",
                  config="conceptlm.sft.config:SFTConfig", recipe="conceptlm.sft.recipe", verbs=["train", "eval"]),
    "jepa": Method(help="LLM-JEPA: LM loss + lambda * JEPA loss between the Text and Code views (arXiv 2509.14252)",
                   config="conceptlm.jepa.config:JepaConfig", recipe="conceptlm.jepa.recipe",
                   verbs=["train", "eval", "analyze"]),
}


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conceptlm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run 'conceptlm <method> <verb> --help' for the options of a verb.")
    sub = p.add_subparsers(dest="method", metavar="<method>")
    demo = sub.add_parser("demo", help="train a tiny model on the offline defaults and report its result")
    demo.add_argument("--out-dir", default="runs", help="where the demo's run folders go (default: runs)")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    plot = sub.add_parser("plot", help="plot training/eval curves of runs (reads metrics.jsonl only)")
    plot.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR", help="e.g. ntp=runs/ntp jepa=runs/jepa")
    plot.add_argument("--out", required=True, help="PNG path")
    plot.add_argument("--keys", nargs="+", default=["loss"], help="metrics to plot, one panel each (e.g. lm jepa)")
    plot.add_argument("--title", default=None)
    for name, m in METHODS.items():
        mp = sub.add_parser(name, help=m.help)
        vs = mp.add_subparsers(dest="verb", metavar="<verb>")
        for verb in m.verbs:
            vhelp = VERBS[verb][0]
            vp = vs.add_parser(verb, help=vhelp,
                               description=f"{vhelp}. Overrides are dotted keys, e.g. optim.lr=1e-3 train.max_steps=20")
            vp.add_argument("--config", help="YAML config file (see configs/)")
            vp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
            if verb in ("eval", "analyze"):
                vp.add_argument("--checkpoint", help="checkpoint or model dir (default: the run's latest)")
                vp.add_argument("--output", help="output path (default: inside the run folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.method is None:
        parser.print_help()
        return 0
    try:
        if args.method == "demo":
            from conceptlm.demo import run_demo

            run_demo(out_dir=args.out_dir, steps=args.steps)
            return 0
        if args.method == "plot":
            from conceptlm.plots.curves import plot_curves

            runs = {}
            for item in args.runs:
                label, sep, path = item.partition("=")
                if not sep or not label or not path:
                    raise ConceptLMError(f"expected LABEL=RUN_DIR, got {item!r}")
                runs[label] = path
            print(plot_curves(runs, args.out, keys=tuple(args.keys), title=args.title))
            return 0
        method = METHODS[args.method]
        if args.verb is None:
            parser.parse_args([args.method, "--help"])
            return 0
        from conceptlm.core.config import load_config

        cfg = load_config(method.config_cls(), args.config, args.overrides)
        command = "conceptlm " + " ".join(shlex.quote(a) for a in argv)
        result = VERBS[args.verb][1](cfg, args, command)
        import os

        if os.environ.get("RANK", "0") == "0" and result is not None:  # the process group is gone by now
            print(json.dumps(result, indent=2, default=str))
        return 0
    except ConceptLMError as e:
        print(f"conceptlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conceptlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
