"""The ``conceptlm`` command: ``conceptlm <method> <verb> --config FILE key=value ...`` and ``conceptlm demo``.

Examples::

    conceptlm demo
    conceptlm sft train --config configs/sft/tiny_cpu.yaml train.max_steps=50
    torchrun --nproc_per_node=2 -m conceptlm sft train --config configs/sft/tiny_cpu.yaml
    conceptlm sft eval --config configs/sft/tiny_cpu.yaml
    conceptlm jepa train --config configs/jepa/tiny_cpu.yaml jepa.lam=1.0 jepa.num_predictors=1
    conceptlm data tokenize source=corpus.txt out=shards/corpus text_unit=line workers=2
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import shlex
import sys
from dataclasses import dataclass, field

from conceptlm.core.errors import ConceptLMError

__all__ = ["main", "METHODS", "Method", "Verb"]

_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
"""Write failures the CLI reports as one line (a full disk, a quota, a read-only file system), not a traceback."""


@dataclass(frozen=True)
class Verb:
    """One ``conceptlm <method> <verb>``: ``func`` is ``module:function`` (imported lazily, ``--help`` stays fast).

    ``kind="train"`` functions are called as ``f(cfg, command=...)`` and return a ``TrainResult``; ``kind="run"``
    functions as ``f(cfg, checkpoint=..., output=...)`` (``f(cfg, output=...)`` when ``takes_checkpoint`` is False:
    the verb then has no ``--checkpoint`` option) and return a JSON-able dict. A verb that ``prints`` its own
    human-readable result and writes the whole of it to ``result["output"]`` has the CLI name that file instead of
    dumping the JSON after the table.
    """

    help: str
    func: str
    kind: str = "run"
    prints: bool = False
    checkpoint_help: str = "checkpoint dir (default: the run's latest)"
    takes_checkpoint: bool = True

    def call(self, cfg, args, command: str):
        module, name = self.func.split(":")
        fn = getattr(importlib.import_module(module), name)
        if self.kind == "train":
            res = fn(cfg, command=command)
            return {"run_dir": str(res.run_dir), "step": res.step, "train": res.last_train, "eval": res.last_eval,
                    "checkpoint": str(res.checkpoint) if res.checkpoint else None}
        if not self.takes_checkpoint:
            return fn(cfg, output=args.output)
        return fn(cfg, checkpoint=args.checkpoint, output=args.output)


@dataclass
class Method:
    """A method package's entry in the CLI: its config dataclass and the verbs it declares."""

    help: str
    config: str
    """``module:ClassName`` of the method's config dataclass."""
    verbs: dict[str, Verb] = field(default_factory=dict)

    def config_cls(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)


_EVAL_HELP = "greedy generation on the eval data, scored; predictions to JSONL"
_LM_CHECKPOINT_HELP = ("checkpoint or HF model dir, .gguf file or named model such as smollm2-135m, e.g. to score "
                       "a model before fine-tuning (default: the run's latest checkpoint)")

METHODS: dict[str, Method] = {
    "sft": Method(
        help="supervised fine-tuning / from-scratch next-token training (the NTP baseline)",
        config="conceptlm.sft.config:SFTConfig",
        verbs={"train": Verb("train a model (works under torchrun)", "conceptlm.sft.recipe:train", kind="train"),
               "eval": Verb(_EVAL_HELP, "conceptlm.sft.recipe:evaluate", checkpoint_help=_LM_CHECKPOINT_HELP)}),
    "jepa": Method(
        help="LLM-JEPA: LM loss + lambda * JEPA loss between the Text and Code views (arXiv 2509.14252)",
        config="conceptlm.jepa.config:JepaConfig",
        verbs={"train": Verb("train a model (works under torchrun)", "conceptlm.jepa.recipe:train", kind="train"),
               "eval": Verb(_EVAL_HELP, "conceptlm.jepa.recipe:evaluate", checkpoint_help=_LM_CHECKPOINT_HELP),
               "analyze": Verb("embedding analysis of a checkpoint: Enc(Text)/Enc(Code) export, singular values, "
                               "linear-map residual, collapse diagnostics (mismatched distance, variance, effective "
                               "rank), Text->Code retrieval top-1/5, 2-D projection plot",
                               "conceptlm.jepa.recipe:analyze", checkpoint_help=_LM_CHECKPOINT_HELP)}),
    "cocomix": Method(
        help="CoCoMix: continuous-concept pretraining from a teacher's SAE concepts (arXiv 2502.08524)",
        config="conceptlm.cocomix.config:CocomixConfig",
        verbs={"pipeline": Verb("teacher -> SAE -> labels -> students -> report, each stage resumable and skipped "
                                "when done", "conceptlm.cocomix.pipeline:pipeline", takes_checkpoint=False),
               "train-sae": Verb("train the TopK SAE on the teacher's hidden states (trains a tiny teacher first "
                                 "when teacher.path is null)", "conceptlm.cocomix.sae_train:train_sae", kind="train"),
               "label": Verb("compute the concept labels of the corpus windows once and cache them (resumable)",
                             "conceptlm.cocomix.labels:label"),
               "train": Verb("train one student as configured (student + cocomix sections) on the cached labels",
                             "conceptlm.cocomix.pipeline:train", kind="train"),
               "report": Verb("rebuild the report (curves vs tokens and FLOPs, markdown table) from the student "
                              "runs", "conceptlm.cocomix.pipeline:report", takes_checkpoint=False),
               "concepts": Verb("describe every SAE latent by its top-activating teacher tokens (cached in "
                                "sae/concepts.json)", "conceptlm.cocomix.interpret:concepts"),
               "explain": Verb("the student's top predicted concepts for every token of interpret.prompt, with "
                               "descriptions", "conceptlm.cocomix.interpret:explain", prints=True),
               "steer": Verb("continue interpret.prompt plainly and with one concept amplified; measured effect",
                             "conceptlm.cocomix.interpret:steer", prints=True),
               "eval-harness": Verb("lm-evaluation-harness tasks (harness.tasks) on every trained student; results "
                                    "JSON in the run folder", "conceptlm.cocomix.harness:eval_harness"),
               "export": Verb("every trained student as a Hub-format folder (config.json + model.safetensors + "
                              "tokenizer)", "conceptlm.cocomix.hub:export")}),
    "data": Method(
        help="data preparation for pretraining-scale corpora",
        config="conceptlm.data.config:TokenizeConfig",
        verbs={"tokenize": Verb("tokenize a text / JSONL / Parquet / hf: source into a token-shard folder (streaming, "
                                "parallel over workers and torchrun ranks, resumable)",
                                "conceptlm.data.tokenize:tokenize", takes_checkpoint=False)}),
    "lcm": Method(
        help="Large Concept Model: next-sentence-embedding modelling over segmented, embedded documents "
             "(arXiv 2412.08821)",
        config="conceptlm.lcm.config:LCMConfig",
        verbs={"prepare": Verb("segment and embed the documents, store them as Parquet shards (resumable)",
                               "conceptlm.lcm.recipe:prepare", takes_checkpoint=False),
               "train": Verb("train the LCM of lcm.model (base, two_tower, one_tower, quant_d, quant_c) on the "
                             "prepared documents (works under torchrun)", "conceptlm.lcm.recipe:train", kind="train"),
               "train-decoder": Verb("train the sentence decoder (embedding -> text) or build its retrieval bank",
                                     "conceptlm.lcm.recipe:train_decoder", kind="train"),
               "train-autoencoder": Verb("train a sentence encoder + decoder together (autoencoder section); the "
                                         "folder is then encoder.name and decoder.path",
                                         "conceptlm.lcm.recipe:train_autoencoder", kind="train"),
               "eval-decoder": Verb("AutoBLEU and round-trip cosine of the decoder on held-out sentences",
                                    "conceptlm.lcm.recipe:eval_decoder"),
               "generate": Verb("continue a prompt sentence by sentence and print the decoded continuation",
                                "conceptlm.lcm.recipe:generate"),
               "evaluate": Verb("teacher-forced l2, round-trip l2, contrastive accuracy, paraphrasing, MI and "
                                "text metrics of continuations on validation documents",
                                "conceptlm.lcm.recipe:evaluate"),
               "cost": Verb("inference FLOPs of LCM generation vs a token-level LLM by context and sentence length "
                            "(table + plot, section cost)", "conceptlm.lcm.recipe:cost", takes_checkpoint=False),
               "export": Verb("the run's newest checkpoint as a Hub-format folder (config.json + model.safetensors + "
                              "normalizer + encoder identity + modeling_lcm.py)", "conceptlm.lcm.hub:export"),
               "eval-harness": Verb("lm-evaluation-harness generation tasks (harness.tasks) on the LCM: prompt -> "
                                    "encode -> LCM -> decode; results JSON in the run folder",
                                    "conceptlm.lcm.harness:eval_harness")}),
}
"""Every method and its verbs. A new method (or verb) is one entry here; nothing else in the CLI changes."""


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
        for verb, v in m.verbs.items():
            vhelp = v.help
            vp = vs.add_parser(verb, help=vhelp,
                               description=f"{vhelp}. Overrides are dotted keys, e.g. optim.lr=1e-3 train.max_steps=20")
            vp.add_argument("--config", help="YAML config file (see configs/)")
            vp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
            if v.kind != "train":
                if v.takes_checkpoint:
                    vp.add_argument("--checkpoint", help=v.checkpoint_help)
                vp.add_argument("--output", help="output path (default: inside the run folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.method is None:
        parser.print_help()
        return 0
    from conceptlm.core.progress import silence_library_bars

    silence_library_bars()
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
        verb = method.verbs[args.verb]
        result = verb.call(cfg, args, command)
        if os.environ.get("RANK", "0") == "0" and result is not None:  # the process group is gone by now
            if verb.prints and "output" in result:
                print(f"written: {result['output']}")
            else:
                print(json.dumps(result, indent=2, default=str))
        return 0
    except ConceptLMError as e:
        print(f"conceptlm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _OUTPUT_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"conceptlm: error: {where}{os.strerror(e.errno)} (checkpoints and outputs are written under a "
              "temporary name and renamed, so the last complete ones are intact; free some space, or write "
              "elsewhere with run.out_dir=...)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conceptlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
